"""Argument checks shared by the optimizer's declarations: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

__all__ = ["check_real", "check_betas", "check_choice"]


def check_real(name: str, value: Any, low: float = 0.0, high: Optional[float] = None, high_open: bool = True) -> float:
    """``value`` as a float in ``[low, high)`` (or ``[low, high]``); NaN, Inf, bools and non-numbers fail."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number)")
    if value < low:
        raise ValueError(f"Invalid {name}: {value} (must be >= {low})")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
    return float(value)


def check_betas(name: str, betas: Any) -> tuple:
    """A pair ``(β1, β2)``, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (expected a pair (beta1, beta2))")
    return tuple(check_real(f"{name}[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))


def check_choice(name: str, value: Any, choices) -> Any:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")
    return value
