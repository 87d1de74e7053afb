"""Backend selection and dispatch of the phase update.

``"torch"`` runs everywhere. ``"auto"`` picks the fastest backend available for the device and
falls back to ``"torch"`` quietly; naming a backend that cannot run raises a ``RuntimeError``
that says why.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .phase_update import FactorGroup, PhaseHyperParams, phase_update_torch

__all__ = ["BACKENDS", "resolve_backend", "phase_update"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: Optional[torch.device] = None) -> str:
    """The concrete backend for ``name`` on ``device``; raises if it cannot run there."""
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(BACKENDS)})")
    if name == "triton":
        raise RuntimeError(
            "backend='triton' is not available in this build of altlora yet (the fused Triton phase "
            "update is work in progress); use backend='torch' or backend='auto'."
        )
    return "torch"


def phase_update(
    backend: str,
    groups: Sequence[FactorGroup],
    hp: PhaseHyperParams,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One phase for every group with the named concrete backend (see ``phase_update.py``)."""
    if backend == "torch":
        phase_update_torch(groups, hp, found_inf)
    else:
        raise ValueError(f"unknown concrete backend {backend!r}")
