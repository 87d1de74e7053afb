"""The ``torch`` backend of the fused LoRA linear op: the three primitives of ``lora_linear.py`` with addmm.

Same contract as ``triton_lora_linear.py`` (2-D inputs, any strides, results in the input's
dtype), on any device; ``lora_linear.py`` holds the equations and the autograd wiring.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SUPPORTED_DTYPES", "unavailable_reason", "project", "matmul_plus_low_rank", "low_rank_grad"]

# Every floating dtype (lora_linear.py itself admits fp32, bf16 and fp16 inputs).
SUPPORTED_DTYPES = None


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """The torch backend runs on every device."""
    return None


def project(x: torch.Tensor, m: torch.Tensor, scale: float, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale · (keep ⊙ x) · mᵀ``."""
    if keep is not None:
        x = x * keep
    return torch.mm(x, m.t()).mul_(scale)


def matmul_plus_low_rank(x, w, h, l, scaling, bias=None, keep=None) -> torch.Tensor:
    """``x·w + bias + scaling·[keep ⊙](h·l)``."""
    out = torch.addmm(bias, x, w) if bias is not None else torch.mm(x, w)
    if keep is None:
        return out.addmm_(h, l, alpha=scaling)
    return out.add_(torch.mm(h, l).mul_(keep).mul_(scaling))


def low_rank_grad(h: torch.Tensor, x: torch.Tensor, scale: float, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale · hᵀ · (keep ⊙ x)``."""
    if keep is not None:
        x = x * keep
    return torch.mm(h.t(), x).mul_(scale)
