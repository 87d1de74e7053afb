"""A device-side flag that says whether any of a list of tensors holds a NaN or an Inf."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

__all__ = ["nonfinite_flag"]


def nonfinite_flag(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """0-dim float32 tensor, 1.0 if any element of ``tensors`` is not finite, else 0.0.

    One multi-tensor ∞-norm per (device, dtype) bucket, then one reduction of the norms; no host
    sync. The ∞-norm (max |x|) is Inf only where the data holds an Inf, unlike the 2-norm, which
    overflows for large finite bf16/fp16 values; a NaN propagates through it. Returns None for an
    empty list. With tensors on several devices the flag lives on the first one's device.
    """
    if not tensors:
        return None
    buckets = defaultdict(list)
    for t in tensors:
        buckets[(t.device, t.dtype)].append(t)
    first = tensors[0].device
    flags = []
    for ts in buckets.values():
        norms = torch.stack(torch._foreach_norm(ts, ord=float("inf")))
        flags.append((~torch.isfinite(norms).all()).to(first))
    flag = flags[0] if len(flags) == 1 else torch.stack(flags).any()
    return flag.to(torch.float32)
