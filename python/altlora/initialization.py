"""Initializations of LoRA factors: random with one factor zero, spectral, PiSSA.

One adapted layer is ``W = W0 + s·B·A`` with ``A`` (r, d), ``B`` (k, r), ``W0`` (k, d) the base
weight read as ``nn.Linear`` reads it (PEFT ``fan_in_fan_out`` and embeddings are transposed,
convolutions flattened to ``(c_out, c_in·kh·kw)``). :func:`init_lora` rewrites ``A`` and ``B``
(and ``W0`` where said) of every LoRA layer of a model, in place::

    method      A                         B                               W0            W after init
    kaiming     U(−c/√d, c/√d)            0                               unchanged     W0
      zero="A"  0                         U(−c/√r, c/√r)                  unchanged     W0
    gaussian    N(0, (c/r)²)              0                               unchanged     W0
      zero="A"  0                         N(0, (c/r)²)                    unchanged     W0
    spectral    a·Vᵣᵀ                     sign(s)·a·Uᵣ                    W0 − s·B·A    W0
      zero="B"  c·Vᵣᵀ                     0                               unchanged     W0
      zero="A"  0                         c·Uᵣ                            unchanged     W0
    pissa       √(Σᵣ/|s|)·Vᵣᵀ             sign(s)·Uᵣ·√(Σᵣ/|s|)            W0 − s·B·A    W0

(The last column is the original ``W0``.) ``c`` is ``scale``; ``Uᵣ Σᵣ Vᵣᵀ`` is the top-r SVD of
the *source* matrix: ``W0`` itself, or, for ``"spectral"``, a matrix you pass per layer in
``sources`` (below); ``a = c·√(σ₁/|s|)``, so the spectral product ``s·B·A = c²·σ₁·Uᵣ Vᵣᵀ`` is
``c²`` times the source's top singular value. For a PEFT embedding ``d`` is the number of
embeddings (``A`` is ``(r, num_embeddings)``); PEFT's own default zeroes A and draws B there,
which ``zero="A"`` resembles.

* ``"kaiming"`` is PEFT's default (``kaiming_uniform_(a=√5)``: bound ``1/√fan_in``) and
  ``"gaussian"`` PEFT's ``init_lora_weights="gaussian"`` (std ``1/r``); ``zero="A"`` is the
  reverse set-up of the AltLoRA paper's Table 7.
* ``"spectral"`` (default ``zero=None``, ``scale=1e-2``) is the *small* spectral
  initialization of the gradient-flow analysis of LoRA in matrix factorization (Xu et al.,
  "Understanding the Learning Dynamics of LoRA", 2025): both factors are small multiples of the
  source's top singular vectors, so gradient flow starts aligned with them instead of spending
  an alignment phase (and keeping a misalignment error) to find them. The paper's source is the
  fine-tuning target (in matrix factorization the residual ``Y − W0``, which is ``−∇W`` at the
  start); with no ``sources`` the pretrained ``W0`` is used, as in the AltLoRA paper's Table 7.
  ``s·B·A`` is subtracted from ``W0`` so the model is unchanged. ``zero="B"`` / ``zero="A"``
  (default ``scale=1/√3``: the expected row norm of a Kaiming-uniform ``A``) are Table 7's
  "Spectral / zero" rows: one factor holds unit singular vectors times ``c``, the other is zero.
* ``"pissa"`` (Meng et al., 2024) moves the principal rank-r part of ``W0`` into the adapter and
  leaves the residual in ``W0``.

Every method leaves the model computing ``W0`` as it was before the call (the adapter's previous
contribution, if any, is discarded): exactly where a factor is zero, up to rounding of the new
``W0`` where the base weight is adjusted (fp32: ~1e-7 relative; bf16 base weights round the
adjustment to bf16, as PEFT's PiSSA does). An adjusted base weight is part of the model: save
it, or an adapter saved alone no longer matches its base.

SVD: ``svd="full"`` uses ``torch.linalg.svd`` (``O(k·d·min(k, d))``); ``"lowrank"`` uses
``torch.svd_lowrank`` with ``q = min(r + 10, min(k, d))`` and ``niter`` power iterations
(``O(k·d·q·niter)``; it draws from torch's global RNG); ``"auto"`` takes lowrank when
``min(k, d) > 4·q`` and ``min(k, d) >= 512``. Factorizations run in float32 (float64 for
float64 weights). ``bench/mgpo_cost.py`` measures both; on one CPU thread (r = 8, power-law
spectrum) full vs lowrank took 161 vs 10 ms at 768×768, 2.7 s vs 77 ms at 1024×4096 and 24 s vs
0.3 s at 4096×4096, the randomized one missing at most 5e-5 of the top-r energy Σσᵢ².
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional

import torch
from torch import nn

from .layers import LoRALayer, find_lora_layers
from .pairs import LoRAPair

__all__ = ["init_lora", "INIT_METHODS"]

INIT_METHODS = ("kaiming", "gaussian", "spectral", "pissa")

# Default `scale` per (method, zero). Kaiming/Gaussian: multiplier of PEFT's default bound/std.
# Small spectral: the gradient-flow analysis wants a small start; 1e-2 makes s·B·A 1e-4·σ₁.
# Spectral with a zero factor: unit singular vectors times 1/√3, the expected row norm of a
# Kaiming-uniform A (d entries of variance 1/(3d)).
_DEFAULT_SCALE = {
    ("kaiming", "A"): 1.0,
    ("kaiming", "B"): 1.0,
    ("gaussian", "A"): 1.0,
    ("gaussian", "B"): 1.0,
    ("spectral", None): 1e-2,
    ("spectral", "A"): 1.0 / math.sqrt(3.0),
    ("spectral", "B"): 1.0 / math.sqrt(3.0),
}

_SVD_MODES = ("auto", "full", "lowrank")


class _Unset:
    def __repr__(self) -> str:
        return "<per method>"


# `zero`'s default: "B" for kaiming/gaussian, None (both factors non-zero) for spectral and pissa.
_PER_METHOD = _Unset()
# Oversampling of the randomized SVD beyond the rank (Halko et al. recommend 5-10).
_OVERSAMPLE = 10
# "auto" takes the randomized SVD only for layers this wide (below it a full SVD costs little).
_LOWRANK_MIN_DIM = 512


# --------------------------------------------------------------------------- factorization
def top_singular(matrix: torch.Tensor, rank: int, svd: str = "auto", niter: int = 4):
    """``(U_r, σ_r, V_r)`` of a (k, d) matrix: U_r (k, r), σ_r (r,), V_r (d, r), in the compute dtype."""
    compute = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    m = matrix.detach().to(compute)
    k, d = m.shape
    q = min(rank + _OVERSAMPLE, k, d)
    lowrank = svd == "lowrank" or (svd == "auto" and min(k, d) >= _LOWRANK_MIN_DIM and min(k, d) > 4 * q)
    if lowrank:
        U, S, V = torch.svd_lowrank(m, q=q, niter=niter)
    else:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        V = Vh.mT
    return U[:, :rank], S[:rank], V[:, :rank]


# --------------------------------------------------------------------------- public entry point
def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Invalid scale: {scale!r} (expected a finite number > 0)")
    return float(scale)


def _random(shape, kind: str, bound_or_std: float, like: torch.Tensor, generator: Optional[torch.Generator]):
    device = generator.device if generator is not None else like.device
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if kind == "uniform":
        out.uniform_(-bound_or_std, bound_or_std, generator=generator)
    else:
        out.normal_(0.0, bound_or_std, generator=generator)
    return out


@torch.no_grad()
def init_lora(
    model: nn.Module,
    method: str = "kaiming",
    *,
    zero=_PER_METHOD,
    scale: Optional[float] = None,
    adapter: Optional[str] = None,
    sources: Optional[Mapping[str, torch.Tensor]] = None,
    svd: str = "auto",
    niter: int = 4,
    generator: Optional[torch.Generator] = None,
) -> List[LoRAPair]:
    """Initialize the LoRA factors of every LoRA layer of ``model`` (see the module docstring).

    Args:
        model: a PEFT model or any module with LoRA layers (:func:`~altlora.find_lora_pairs`).
        method: ``"kaiming"`` (default), ``"gaussian"``, ``"spectral"`` or ``"pissa"``.
        zero: which factor is zero: ``"B"`` (default for kaiming/gaussian) or ``"A"``; for
            ``"spectral"`` also ``None`` (default: both small, base weight adjusted). Not for pissa.
        scale: ``c`` of the table in the module docstring (default per method and ``zero``).
        adapter: only this PEFT adapter (default: every adapter, and modules owning their factors).
        sources: ``"spectral"`` only: ``{pair name: (k, d) matrix}`` whose top-r singular
            vectors to use instead of ``W0`` for those layers (pair names as
            :func:`~altlora.find_lora_pairs` gives them, e.g. ``"...query[default]"``). Every
            name must match a layer being initialized.
        svd: ``"auto"`` (default), ``"full"`` or ``"lowrank"``.
        niter: power iterations of the randomized SVD (default 4).
        generator: for the random methods (default: torch's global RNG on the factor's device).

    Returns:
        The pairs that were initialized. Raises ValueError for bad arguments, a model without
        LoRA layers (of ``adapter``), DoRA/variant layers, a rank above ``min(k, d)`` and, for
        the methods that need ``W0``, a layer without a floating point base weight.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    if method not in INIT_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(INIT_METHODS)})")
    if zero is _PER_METHOD:
        zero = None if method in ("spectral", "pissa") else "B"
    allowed = {"kaiming": ("A", "B"), "gaussian": ("A", "B"), "spectral": (None, "A", "B"), "pissa": (None,)}[method]
    if zero not in allowed:
        raise ValueError(f"Invalid zero: {zero!r} for method {method!r} (expected one of {allowed})")
    if method == "pissa":
        if scale is not None:
            raise ValueError("Invalid scale: 'pissa' takes no scale (the adapter holds the principal part of W0 itself)")
    else:
        scale = _DEFAULT_SCALE[(method, zero)] if scale is None else _check_scale(scale)
    if svd not in _SVD_MODES:
        raise ValueError(f"Invalid svd: {svd!r} (expected one of {', '.join(_SVD_MODES)})")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"Invalid niter: {niter!r} (expected an int >= 0)")
    if sources is not None and method != "spectral":
        raise ValueError(f"Invalid sources: only method 'spectral' takes source matrices, not {method!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"Invalid generator: expected a torch.Generator, got {type(generator).__name__}")

    layers = find_lora_layers(model)
    if adapter is not None:
        layers = [layer for layer in layers if layer.adapter == adapter]
    if not layers:
        where = f" of adapter {adapter!r}" if adapter is not None else ""
        raise ValueError(f"Invalid model: {type(model).__name__} has no LoRA layers{where}")
    sources = dict(sources or {})
    unknown = sorted(set(sources) - {layer.name for layer in layers})
    if unknown:
        raise ValueError(f"Invalid sources: no LoRA layer being initialized is named {', '.join(map(repr, unknown))}")

    # Validate every layer before writing anything, so a bad layer leaves the model untouched.
    needs_base = method == "pissa" or (method == "spectral" and zero is None)
    plans = []
    for layer in layers:
        pair = layer.pair
        if layer.variant() is not None:
            raise ValueError(
                f"{layer.name}: {layer.variant()} layers are not supported by init_lora (their output depends on "
                f"W0 + s·B·A through more than the sum, so the model would change)"
            )
        r, k, d = pair.rank, pair.out_features, pair.in_features
        base = layer.base_matrix() if needs_base else None
        source = None
        if method in ("spectral", "pissa"):
            if r > min(k, d):
                raise ValueError(f"{layer.name}: rank {r} exceeds min(k, d) = {min(k, d)}; an SVD has no {r} components")
            if layer.name in sources:
                source = sources[layer.name]
                if not isinstance(source, torch.Tensor) or tuple(source.shape) != (k, d):
                    shape = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
                    raise ValueError(f"Invalid sources[{layer.name!r}]: expected a ({k}, {d}) tensor, got {shape}")
                source = source.to(pair.A.device)
            else:
                source = base if base is not None else layer.base_matrix()
        plans.append((layer, base, source))

    for layer, base, source in plans:
        _init_layer(layer, method, zero, scale, base, source, svd, niter, generator)
    return [layer.pair for layer, _, _ in plans]


def _init_layer(layer: LoRALayer, method: str, zero, scale, base, source, svd: str, niter: int, generator) -> None:
    pair = layer.pair
    A, B = pair.matrices()
    r, k, d = pair.rank, pair.out_features, pair.in_features
    s = pair.scaling
    if method in ("kaiming", "gaussian"):
        if method == "kaiming":
            # kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in.
            fan_in = d if zero == "B" else r
            value = _random((r, d) if zero == "B" else (k, r), "uniform", scale / math.sqrt(fan_in), A, generator)
        else:
            value = _random((r, d) if zero == "B" else (k, r), "normal", scale / r, A, generator)
        (A if zero == "B" else B).copy_(value)
        (B if zero == "B" else A).zero_()
        return

    U, S, V = top_singular(source, r, svd, niter)
    sign = 1.0 if s > 0 else -1.0
    if method == "pissa":
        root = torch.sqrt(S / abs(s))
        new_A = root[:, None] * V.mT
        new_B = sign * U * root[None, :]
    elif zero is None:
        a = scale * math.sqrt(float(S[0]) / abs(s)) if float(S[0]) > 0 else 0.0
        new_A = a * V.mT
        new_B = sign * a * U
    else:
        new_A = scale * V.mT if zero == "B" else torch.zeros(r, d, dtype=V.dtype, device=V.device)
        new_B = scale * U if zero == "A" else torch.zeros(k, r, dtype=U.dtype, device=U.device)
    A.copy_(new_A)
    B.copy_(new_B)
    if base is not None:
        # Subtract what the adapter now adds, computed from the stored (rounded) factors.
        compute = new_A.dtype
        residual = base.to(compute) - s * (B.to(compute) @ A.to(compute))
        base.copy_(residual)
