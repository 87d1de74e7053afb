"""The types every phase-update backend takes: hyper-parameters and a group of same-shaped factors.

The math the backends implement is in ``docs/math.md`` (and, in row form, in ``torch_phase_update.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["PhaseHyperParams", "FactorGroup"]


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
    are stacked ``(L, *param_shape)`` tensors in the state dtype (``promote_types(param dtype,
    float32)``) updated in place, ``snapshot`` in the parameters' dtype; r×r matrices are
    ``(L, r, r)`` in row form (see ``torch_phase_update.py``).
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
