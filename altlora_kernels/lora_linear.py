"""Fused LoRA linear op: forward and backward that compute only the gradients asked for.

With ``x`` (N×d, any leading dimensions flattened), the frozen ``W0`` (k×d) and bias ``b``, the
factors ``A`` (r×d) and ``B`` (k×r), the scaling ``s`` and inverted dropout with keep-mask ``m``
(``drop(x) = m⊙x / (1−p)``; no mask at all when p = 0):

    h  = drop(x)·Aᵀ                                  N×r
    y  = x·W0ᵀ + b + s·h·Bᵀ                          one GEMM whose accumulator starts at s·h·Bᵀ
    g  = dy·B                                        N×r
    dx = dy·W0 + s·m⊙(g·A)/(1−p)                     one GEMM (the masked term joins in its epilogue)
    dA = s·gᵀ·drop(x)                                only if A requires grad
    dB = s·dyᵀ·h                                     only if B requires grad

What is saved for the backward follows from what it will compute: ``x`` only when dA (or a
gradient of W0) is needed, ``h`` (N×r) only when dB is, and the parameters ``W0``, ``A``, ``B``
(which cost no memory) only where used. So a B phase (A frozen) keeps ``h`` and not ``x``; an A
phase (B frozen) keeps ``x`` and never touches dB. A frozen ``W0``/``b`` gets no gradient work; a
trainable one gets its ordinary gradient (``dyᵀ·x``, ``Σ dy``) with torch ops.

Dropout is reproducible: the keep-mask is a function of an integer seed (``dropout_keep_mask``),
drawn from torch's default CPU generator when not given, and regenerated in the backward instead
of being saved. Both backends use the same mask for the same seed.

Backends (registered in ``backends.py``, op ``"lora_linear"``): ``"triton"``
(``triton_lora_linear.py``; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``
(``torch_lora_linear.py``: addmm-based, any device, the same skipping and the same saved tensors)
and ``"auto"`` (Triton on CUDA when it is installed, torch otherwise).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends

__all__ = [
    "LORA_LINEAR_BACKENDS",
    "LoRALinearFunction",
    "dropout_keep_mask",
    "draw_dropout_seed",
    "lora_linear",
    "lora_linear_unavailable_reason",
    "resolve_lora_linear_backend",
]

LORA_LINEAR_BACKENDS = backends.backend_names(backends.LORA_LINEAR)

# Seeds are drawn below 2**62 so that they stay valid int64 generator seeds on every device.
_SEED_BOUND = 2**62


# --------------------------------------------------------------------------------------------
# Dropout mask


def draw_dropout_seed(generator: Optional[torch.Generator] = None) -> int:
    """A dropout seed from ``generator`` (a CPU generator; default: torch's global one). No device sync."""
    return int(torch.randint(_SEED_BOUND, (1,), generator=generator).item())


def dropout_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The bool keep-mask (True with probability 1 − p) that the op uses for ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


# --------------------------------------------------------------------------------------------
# Backend selection (the registry in backends.py)


def lora_linear_unavailable_reason(backend: str, device: Optional[torch.device]) -> Optional[str]:
    """Why ``backend`` cannot run the op on ``device``, or None if it can (``"auto"`` always can)."""
    if backend == "auto":
        return None
    return backends.unavailable_reason(backend, device, op=backends.LORA_LINEAR)


def resolve_lora_linear_backend(backend: str, device: Optional[torch.device]) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for ``backend`` on ``device``.

    ``"auto"`` picks Triton on CUDA devices when it can run there (the interpreter is never chosen
    automatically: it is for tests). ``"triton"`` where it cannot run raises ``RuntimeError``.
    """
    return backends.resolve_backend(backend, device, op=backends.LORA_LINEAR)


def _ops(backend: str):
    return backends.backend_module(backend, backends.LORA_LINEAR)


# --------------------------------------------------------------------------------------------
# autograd


class LoRALinearFunction(torch.autograd.Function):
    """The op on 2-D ``x``; use :func:`lora_linear`, which checks arguments and flattens leading dims."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, backend):
        ops = _ops(backend)
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        keep_scale = 1.0 / (1.0 - dropout_p)
        keep = dropout_keep_mask(dropout_seed, x.shape, dropout_p, x.device) if dropout_p > 0 else None
        h = ops.project(x, lora_A, keep_scale, keep)
        y = ops.matmul_plus_low_rank(x, weight.t(), h, lora_B.t(), scaling, bias)

        # Save only what the requested gradients read (see the module docstring).
        need_g = need_dx or need_dA
        ctx.save_for_backward(
            x if (need_dA or need_dW) else None,
            h if need_dB else None,
            weight if need_dx else None,
            lora_A if need_dx else None,
            lora_B if need_g else None,
        )
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.dropout_seed = dropout_seed
        ctx.backend = backend
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, h, weight, lora_A, lora_B = ctx.saved_tensors
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        ops = _ops(ctx.backend)
        s, p = ctx.scaling, ctx.dropout_p
        keep_scale = 1.0 / (1.0 - p)
        dx = dW = db = dA = dB = None
        keep = None
        if p > 0 and (need_dx or need_dA):
            keep = dropout_keep_mask(ctx.dropout_seed, ctx.x_shape, p, dy.device)
        if need_dx or need_dA:
            g = ops.project(dy, lora_B.t(), 1.0)
            if need_dx:
                dx = ops.matmul_plus_low_rank(dy, weight, g, lora_A, s * keep_scale, None, keep)
            if need_dA:
                dA = ops.low_rank_grad(g, x, s * keep_scale, keep)
        if need_dB:
            dB = ops.low_rank_grad(h, dy, s).t().contiguous()
        if need_dW:
            dW = torch.mm(dy.t(), x)
        if need_db:
            db = dy.sum(0)
        return dx, dW, db, dA, dB, None, None, None, None


def _check(name: str, t: Optional[torch.Tensor], shape, dtype: torch.dtype, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but x has {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` for ``x`` of shape ``(..., d)`` (see the module docstring).

    Args:
        x: input ``(..., d)``; fp32, bf16 or fp16.
        weight: ``W0`` ``(k, d)``, same dtype and device as ``x``.
        bias: ``(k,)`` or None.
        lora_A, lora_B: ``(r, d)`` and ``(k, r)``. Factors of another floating dtype are cast to
            ``x.dtype`` (autograd carries the gradient back to their own dtype).
        scaling: ``s``.
        dropout_p: dropout probability of the LoRA branch's input, in [0, 1).
        dropout_seed: seed of the keep-mask; drawn from torch's default generator when None and
            ``dropout_p > 0``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = getattr(weight, "shape", weight)
        raise ValueError(f"weight must be a 2-D tensor (out_features, in_features), got {shape}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {in_features}")
    for name, factor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(factor, torch.Tensor) or factor.dim() != 2 or not factor.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {getattr(factor, 'shape', factor)}")
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"lora_A must have at least one row (the rank), got shape {tuple(lora_A.shape)}")
    # Factors kept in another dtype (PEFT keeps fp32 adapters on a bf16 base) are cast once here.
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    _check("weight", weight, (out_features, in_features), x.dtype, x.device)
    _check("bias", bias, (out_features,), x.dtype, x.device)
    _check("lora_A", lora_A, (rank, in_features), x.dtype, x.device)
    _check("lora_B", lora_B, (out_features, rank), x.dtype, x.device)
    try:
        scaling = float(scaling)
        dropout_p = float(dropout_p)
    except (TypeError, ValueError):
        raise ValueError(f"scaling and dropout_p must be numbers, got {scaling!r} and {dropout_p!r}") from None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    concrete = resolve_lora_linear_backend(backend, x.device)

    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    x2d = x.reshape(-1, in_features)
    y = LoRALinearFunction.apply(
        x2d, weight, bias, lora_A, lora_B, scaling,
        dropout_p, dropout_seed if dropout_p > 0 else None, concrete,
    )
    return y.reshape(*x.shape[:-1], out_features)
