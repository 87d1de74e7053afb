"""Damped Cholesky factorization of a batch of small r×r Gram matrices.

Every AltLoRA phase needs ``P = (G + λI)⁻¹`` for the Gram ``G`` of the factor that is held
fixed (``AAᵀ`` in a B phase, ``BᵀB`` in an A phase). ``P`` is always formed from the Cholesky
factor ``L`` of the *damped* Gram ``G + λ_eff·I = LLᵀ`` (the backends take ``cholesky_inverse(L)``
or ``Z = L⁻¹``, ``P = ZᵀZ``), never by inverting a raw Gram; this module chooses ``λ_eff``.

A shifted Gram counts as numerically positive definite when its Cholesky factorization succeeds
and every pivot satisfies ``L_jj² ≥ PIVOT_FLOOR · μ`` with ``μ = tr(G)/r`` (the mean eigenvalue).
A Gram computed in fp32 carries rounding of order 1e-7·‖G‖, so a rank-deficient factor (λ = 0 and
B = 0 at initialization, or a factor that lost rank) can leave tiny *positive* pivots that
``cholesky`` accepts but that would amplify rounding noise by 1e7 and more. When the requested
damping is not enough, it is escalated along a fixed ladder:

    rung 0:  λ
    rung j:  λ + ESCALATION[j-1] · μ
    last:    λ + max(μ, ABSOLUTE_FLOOR)

Each matrix takes the first rung that passes; the last one always does, so a zero or
rank-deficient factor never produces NaN or Inf. The choice is made on the device, per matrix.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["PIVOT_FLOOR", "ESCALATION", "ABSOLUTE_FLOOR", "damping_ladder", "damped_cholesky"]

# Smallest accepted pivot², relative to μ: accepts condition numbers up to ~1e6, about what fp32
# can still invert meaningfully, and rejects Grams singular up to fp32 rounding (≈ 1e-7·r·μ).
PIVOT_FLOOR = 1e-6

# Relative escalation steps. The first sits 100× above PIVOT_FLOOR so that it passes despite
# rounding and amplifies fp32 noise in a Gram's null space by at most ~1e3; each further rung
# trades 100× more bias for conditioning; λ + μ is always positive definite.
ESCALATION = (1e-4, 1e-2, 1.0)

# Used only when G is (numerically) zero, i.e. the held factor is zero: then the gradient of the
# factor being updated is exactly zero too, so this value only scales zeros. Kept far from fp32
# overflow so that P·0 stays 0.
ABSOLUTE_FLOOR = 1e-12


def _mean_eigenvalue(gram: torch.Tensor) -> torch.Tensor:
    return (torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / gram.shape[-1]).clamp_min(0.0)


def damping_ladder(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Damping of every rung for every matrix: ``(len(ESCALATION) + 1, L)``."""
    mean_eig = _mean_eigenvalue(gram)
    rungs = [torch.full_like(mean_eig, float(damping))]
    for i, rel in enumerate(ESCALATION):
        scale = mean_eig.clamp_min(ABSOLUTE_FLOOR) if i == len(ESCALATION) - 1 else mean_eig
        rungs.append(damping + rel * scale)
    return torch.stack(rungs)


def _passes(factor: torch.Tensor, info: torch.Tensor, mean_eig: torch.Tensor) -> torch.Tensor:
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1)
    # NaN pivots (failed factorizations) compare False.
    return (info == 0) & (pivots.square().amin(-1) >= PIVOT_FLOOR * mean_eig)


def damped_cholesky(gram: torch.Tensor, damping: float, *, host_check: Optional[bool] = None) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + λ_eff·I`` for a batch ``(L, r, r)``.

    ``λ_eff`` is ``damping`` where that is numerically positive definite, else the first rung of
    the ladder above that is. With ``host_check`` (default: on CPU, where it is free) the ladder is
    only tried when rung 0 fails somewhere; otherwise every rung is factored in one batched call
    so that no host sync is needed. The selected rung is the same either way.
    """
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be (L, r, r), got {tuple(gram.shape)}")
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    mean_eig = _mean_eigenvalue(gram)
    if host_check is None:
        host_check = gram.device.type == "cpu"
    if host_check:
        factor, info = torch.linalg.cholesky_ex(gram + damping * eye)
        if bool(_passes(factor, info, mean_eig).all()):
            return factor
    ladder = damping_ladder(gram, damping)  # (J, L)
    shifted = gram.unsqueeze(0) + ladder[..., None, None] * eye  # (J, L, r, r)
    factors, infos = torch.linalg.cholesky_ex(shifted)
    ok = _passes(factors, infos, mean_eig)
    ok[-1] = True  # the last rung is positive definite by construction
    rung = ok.to(torch.int32).argmax(dim=0)  # first passing rung (argmax returns the first max)
    return factors[rung, torch.arange(gram.shape[0], device=gram.device)]
