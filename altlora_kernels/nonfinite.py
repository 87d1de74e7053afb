"""A device-side flag that says whether any of a list of tensors holds a NaN or an Inf."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

__all__ = ["nonfinite_flag"]

_NATIVE = None


def _native():
    """``native_phase_update``, imported on first use: importing it with the package would make
    ``python -m altlora_kernels.native_phase_update`` (the build command) warn that the module it
    runs was already imported."""
    global _NATIVE
    if _NATIVE is None:
        from . import native_phase_update

        _NATIVE = native_phase_update
    return _NATIVE


def nonfinite_flag(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """0-dim float32 tensor, 1.0 if any element of ``tensors`` is not finite, else 0.0; no host sync.

    Uses the multi-tensor check that ``GradScaler`` runs on gradients (one launch per device and
    dtype, a real fused loop on CPU too) with a scale of exactly 1, so the values are unchanged.
    Where that op is unavailable, a multi-tensor ∞-norm does the same job (max |x| is Inf only
    where the data holds an Inf, unlike the 2-norm, which overflows for large finite bf16/fp16
    values, and a NaN propagates through it). Returns None for an empty list. With tensors on
    several devices the flag lives on the first one's device. On the CPU, when the native library
    is built, its read-only check runs instead (``native_phase_update.nonfinite_flag``; contiguous
    float tensors).
    """
    if not tensors:
        return None
    if tensors[0].device.type == "cpu":
        # The native library's read-only check when it is built and applies (CPU, contiguous).
        found = _native().nonfinite_flag(tensors)
        if found is not None:
            return found
    first = tensors[0].device
    found = torch.zeros((), dtype=torch.float32, device=first)
    try:
        # NOTE: one call for the usual case (every tensor on one device; the op takes mixed
        # dtypes): sorting by device and dtype first costs a host-side attribute read per tensor,
        # more than the check itself on CPU (~38 vs ~11 µs for 32 small gradients).
        torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, torch.ones((), device=first))
        return found
    except (RuntimeError, NotImplementedError):
        pass  # several devices, or no such op here: per (device, dtype) below
    buckets = defaultdict(list)
    for t in tensors:
        buckets[(t.device, t.dtype)].append(t)
    flags = []
    for (device, _), ts in buckets.items():
        found = torch.zeros((), dtype=torch.float32, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(ts, found, torch.ones((), device=device))
        except (RuntimeError, NotImplementedError):
            norms = torch.stack(torch._foreach_norm(ts, ord=float("inf")))
            found = (~torch.isfinite(norms).all()).to(torch.float32)
        flags.append(found.to(first))
    return flags[0] if len(flags) == 1 else torch.stack(flags).amax()
