"""Backend selection and dispatch of the phase update.

Each concrete backend is a module of this package that defines

    unavailable_reason(device: torch.device | None) -> str | None   # None: it can run there
    phase_update(groups: Sequence[FactorGroup], hp: PhaseHyperParams, found_inf: Tensor | None) -> None

with the semantics of ``phase_update.py`` (the torch backend, which runs everywhere), and may define

    prepare(device) -> None      # make it runnable (e.g. compile it); called only for an explicit name

A backend
whose module is missing or whose ``unavailable_reason`` says so cannot be chosen: naming it raises
a ``RuntimeError`` that says why; ``"auto"`` takes the first available one in ``AUTO_ORDER`` for
the device and falls back to ``"torch"`` quietly.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

from .phase_update import FactorGroup, PhaseHyperParams

__all__ = ["BACKENDS", "AUTO_ORDER", "unavailable_reason", "resolve_backend", "phase_update"]

_MODULES = {
    "torch": "phase_update",
    "triton": "triton_phase_update",
    "native": "native_phase_update",
}
BACKENDS = ("auto",) + tuple(_MODULES)

# Preference of "auto" per device type; "torch" always closes the list.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("native", "torch")}


def _module(name: str):
    try:
        return importlib.import_module(f".{_MODULES[name]}", __package__)
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith(_MODULES[name]):
            return None
        raise


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    if name not in _MODULES:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(BACKENDS)})")
    module = _module(name)
    if module is None:
        return f"backend={name!r} is not part of this build of altlora"
    return module.unavailable_reason(device)


def resolve_backend(name: str, device: Optional[torch.device] = None) -> str:
    """The concrete backend for ``name`` on ``device``; raises ``RuntimeError`` if it cannot run there.

    ``device`` is the one device all LoRA factors live on, or None when they are spread over several
    (then ``"auto"`` means ``"torch"``).
    """
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(BACKENDS)})")
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ("torch",)) if device is not None else ("torch",)
        return next(b for b in order if unavailable_reason(b, device) is None)
    module = _module(name)
    if module is not None and hasattr(module, "prepare"):
        # Only a backend the user named may take time to get ready (the native one compiles):
        # "auto" never waits on a compiler.
        module.prepare(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"{reason}; use backend='torch' (runs everywhere) or backend='auto'")
    return name


def phase_update(
    backend: str,
    groups: Sequence[FactorGroup],
    hp: PhaseHyperParams,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One phase for every group with the named concrete backend (see ``phase_update.py``)."""
    module = _module(backend)
    if module is None:
        raise ValueError(f"unknown concrete backend {backend!r}")
    module.phase_update(groups, hp, found_inf)
