"""One AltLoRA / AltLoRA+ phase over groups of same-shaped layers (the ``torch`` backend).

Row form. Both phases are the same computation once each factor is seen as an ``r × n`` matrix
``X`` ("row form"): ``A`` itself (n = d) or ``Bᵀ`` (n = k). With ``Y`` the other factor in row form,
the phase that updates ``X`` is (DESIGN.md §1, written once here):

    P   = (Y Yᵀ + λI)⁻¹                  Cholesky of the cached Gram of Y, damping escalated
    g̃   = (1/s²) · P · ∇X                 the scaled gradient (Theorem 1)
    M̃   = P · C_Y · M                      C_Y = Y_cur · Y_prevᵀ, Y_prev = Y at X's last phase
    M   = β1·M̃ + (1−β1)·g̃                (Theorem 2)
    AltLoRA : X ← X − η·(M + γX)
    AltLoRA+: V = β2·V + (1−β2)·g̃⊙g̃ ; n += 1
              X ← X − η·((M/(1−β1ⁿ)) / (sqrt(V/(1−β2ⁿ)) + ε) + γX)

For a B phase (X = Bᵀ) this is exactly ``g̃ = (1/s²)∇B·P`` and ``M̃ = M_B·C·P`` with
``C = A_prev·Aᵀ``; for an A phase it is ``g̃ = (1/s²)P·∇A`` and ``M̃ = P·C·M_A`` with
``C = Bᵀ·B_prev``.

Bookkeeping done in the same pass, so that no copy of a factor is ever kept:
  * ``gram  ← X_new X_newᵀ``                  (the next phase of Y needs it)
  * ``cross ← X_new X_refᵀ``                  X_ref = X_old, or the run's snapshot when the
                                              schedule updates X several times in a row
  * ``other_cross ← other_gram``              Y's momentum alignment is now at Y's current value

Grams are taken of the values actually stored (after rounding to the parameter dtype), so a
resumed run that recomputes them from the parameters gets the same numbers.

``found_inf`` (a 0-dim tensor, non-zero when a gradient is not finite) turns the whole phase
into a no-op on the device, without a host sync: every output keeps its old value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .cholesky import damped_cholesky

__all__ = ["PhaseHyperParams", "FactorGroup", "phase_update_torch", "phase_update", "unavailable_reason"]


@dataclass(frozen=True)
class PhaseHyperParams:
    lr: float
    beta1: float
    weight_decay: float
    damping: float
    adaptive: bool = False  # AltLoRA+ (second moment and bias correction)
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class FactorGroup:
    """The factor being updated, for L layers whose factors have one shape, dtype and device.

    ``params``/``grads`` are 2-D tensors as stored (A: ``(r, d)``; B: ``(k, r)``) and
    ``transposed`` says whether the row form is their transpose (True for B). The state buffers
    are stacked ``(L, *param_shape)`` float32 tensors updated in place; r×r matrices are
    ``(L, r, r)`` in row form (see the module docstring).
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    transposed: bool
    momentum: torch.Tensor
    variance: Optional[torch.Tensor]
    step: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    other_gram: torch.Tensor
    other_cross: torch.Tensor
    inv_scale_sq: torch.Tensor
    snapshot: Optional[torch.Tensor] = None


def _rows(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.mT if transposed else t


def _keep_old(found_inf: Optional[torch.Tensor], old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return new if found_inf is None else torch.where(found_inf != 0, old, new)


def phase_update_torch(
    groups: Sequence[FactorGroup],
    hp: PhaseHyperParams,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """Run one phase for every group; a fixed number of batched ops per group."""
    for g in groups:
        _phase_update_group(g, hp, found_inf)


def _phase_update_group(g: FactorGroup, hp: PhaseHyperParams, found_inf: Optional[torch.Tensor]) -> None:
    t = g.transposed
    stored = torch.stack(list(g.params))
    x_old = _rows(stored.float(), t)
    grad = _rows(torch.stack(list(g.grads)).float(), t)
    momentum = _rows(g.momentum, t)

    chol = damped_cholesky(g.other_gram, hp.damping)
    scaled_grad = torch.cholesky_solve(grad, chol) * g.inv_scale_sq[:, None, None]
    carry = torch.cholesky_solve(g.other_cross, chol)  # P · C_Y
    new_momentum = torch.baddbmm(scaled_grad, carry, momentum, beta=1.0 - hp.beta1, alpha=hp.beta1)

    new_step = g.step + 1.0
    if hp.adaptive:
        variance = _rows(g.variance, t)
        new_variance = torch.addcmul(variance * hp.beta2, scaled_grad, scaled_grad, value=1.0 - hp.beta2)
        bias1 = (1.0 - torch.pow(hp.beta1, new_step))[:, None, None]
        bias2 = (1.0 - torch.pow(hp.beta2, new_step))[:, None, None]
        direction = (new_momentum / bias1) / ((new_variance / bias2).sqrt() + hp.eps)
    else:
        direction = new_momentum
    x_new = x_old - hp.lr * (direction + hp.weight_decay * x_old)

    new_stored = _rows(x_new, t).to(stored.dtype)
    new_stored = _keep_old(found_inf, stored, new_stored)
    x_written = _rows(new_stored.float(), t) if new_stored.dtype != torch.float32 else _rows(new_stored, t)
    reference = x_old if g.snapshot is None else _rows(g.snapshot.float(), t)

    # NOTE: on a skipped phase the Grams recomputed from the unchanged values equal the old ones
    # except `cross`, which must also keep its old value; hence _keep_old on every output.
    new_gram = torch.bmm(x_written, x_written.mT)
    new_cross = torch.bmm(x_written, reference.mT)
    g.cross.copy_(_keep_old(found_inf, g.cross, new_cross))
    g.gram.copy_(_keep_old(found_inf, g.gram, new_gram))
    g.other_cross.copy_(_keep_old(found_inf, g.other_cross, g.other_gram))
    momentum.copy_(_keep_old(found_inf, momentum, new_momentum))
    if hp.adaptive:
        variance.copy_(_keep_old(found_inf, variance, new_variance))
    g.step.copy_(_keep_old(found_inf, g.step, new_step))
    torch._foreach_copy_(list(g.params), list(new_stored.unbind(0)))


def unavailable_reason(device=None):
    """The torch backend runs on every device."""
    return None


phase_update = phase_update_torch  # the backend-module interface of backends.py
