"""The backend registry of both ops: which backends exist, what each can run, and dispatch.

Two ops, each with its own set of backends, one module per (op, backend):

    op              torch                   triton                   native
    phase_update    torch_phase_update.py   triton_phase_update.py   native_phase_update.py
    lora_linear     torch_lora_linear.py    triton_lora_linear.py    -

A backend module defines

    SUPPORTED_DTYPES: tuple of torch dtypes, or None (every floating dtype)
    unavailable_reason(device: torch.device | None) -> str | None   # None: it can run there now

and the op itself: ``phase_update(groups, hp, found_inf)`` with the semantics of
``torch_phase_update.py``, or ``project`` / ``matmul_plus_low_rank`` / ``low_rank_grad`` with
those of ``lora_linear.py``. It may define ``prepare(device)``: make it runnable (the native
backend compiles), called only for a backend the user named. Adding a backend is adding its
module and one line to ``_MODULES`` (and to ``AUTO_ORDER`` if "auto" should pick it).

Choosing: :func:`unsupported_reason` says why a backend cannot run parameters of a dtype on a
device (a missing package or build, the wrong device, a dtype its kernels do not take), or None.
``"auto"`` takes the first backend of ``AUTO_ORDER`` for the device type that can (so float64
goes to ``"torch"``: the other backends compute in float32), never Triton's CPU interpreter
(it is for tests), and ``"torch"`` when nothing else can. A backend named explicitly that cannot
run raises a ``RuntimeError`` that says why.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Optional, Sequence

import torch

from .phase_types import FactorGroup, PhaseHyperParams

__all__ = [
    "PHASE_UPDATE",
    "LORA_LINEAR",
    "OPS",
    "BACKENDS",
    "AUTO_ORDER",
    "backend_names",
    "backend_module",
    "supported_dtypes",
    "unavailable_reason",
    "unsupported_reason",
    "resolve_auto",
    "resolve_backend",
    "phase_update",
]

PHASE_UPDATE = "phase_update"
LORA_LINEAR = "lora_linear"

_MODULES = {
    PHASE_UPDATE: {"torch": "torch_phase_update", "triton": "triton_phase_update", "native": "native_phase_update"},
    LORA_LINEAR: {"torch": "torch_lora_linear", "triton": "triton_lora_linear"},
}
OPS = tuple(_MODULES)

# Preference of "auto" per op and device type; "torch" (runs everywhere) closes every list, and a
# device type not listed gets "torch".
AUTO_ORDER = {
    PHASE_UPDATE: {"cuda": ("triton", "torch"), "cpu": ("native", "torch")},
    LORA_LINEAR: {"cuda": ("triton", "torch")},
}


def _modules(op: str) -> dict:
    if op not in _MODULES:
        raise ValueError(f"Invalid op: {op!r} (expected one of {', '.join(OPS)})")
    return _MODULES[op]


def backend_names(op: str = PHASE_UPDATE) -> tuple:
    """``("auto", <concrete backends of op>)``."""
    return ("auto",) + tuple(_modules(op))


# The names the optimizers accept (the phase update's backends).
BACKENDS = backend_names(PHASE_UPDATE)


def _check_name(name: str, op: str, allow_auto: bool = True) -> None:
    names = backend_names(op)
    if name not in names or (name == "auto" and not allow_auto):
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(names)})")


# (name, op) -> module or None: looked up once (the step asks for it every phase; an import
# lookup costs several µs).
_LOADED: Dict[tuple, Any] = {}


def backend_module(name: str, op: str = PHASE_UPDATE):
    """The module of concrete backend ``name`` for ``op``, or None when it is not part of this build."""
    key = (name, op)
    if key in _LOADED:
        return _LOADED[key]
    _check_name(name, op, allow_auto=False)
    module_name = _modules(op)[name]
    try:
        module = importlib.import_module(f".{module_name}", __package__)
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith(module_name):
            module = None
        else:
            raise
    _LOADED[key] = module
    return module


def supported_dtypes(name: str, op: str = PHASE_UPDATE) -> Optional[tuple]:
    """The parameter dtypes backend ``name`` takes for ``op``; None means every floating dtype."""
    module = backend_module(name, op)
    return None if module is None else getattr(module, "SUPPORTED_DTYPES", None)


def unavailable_reason(name: str, device: Optional[torch.device] = None, *, op: str = PHASE_UPDATE) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` on ``device`` now (any dtype aside), or None if it can."""
    module = backend_module(name, op)
    if module is None:
        return f"backend={name!r} is not part of this build of altlora"
    return module.unavailable_reason(device)


def _dtype_reason(name: str, dtype: Optional[torch.dtype], op: str) -> Optional[str]:
    if dtype is None:
        return None
    dtypes = supported_dtypes(name, op)
    if dtypes is None or dtype in dtypes:
        return None
    names = [str(d).replace("torch.", "") for d in dtypes]
    listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    return f"backend={name!r} takes {listed} parameters, not {str(dtype).replace('torch.', '')}"


def unsupported_reason(
    name: str,
    dtype: Optional[torch.dtype],
    device: Optional[torch.device],
    *,
    op: str = PHASE_UPDATE,
) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` for parameters of ``dtype`` on ``device``, or None if it can.

    ``dtype`` None checks the device only; ``device`` None means tensors on several devices.
    Never compiles or builds anything.
    """
    _check_name(name, op, allow_auto=False)
    if backend_module(name, op) is None:
        return f"backend={name!r} is not part of this build of altlora"
    return _dtype_reason(name, dtype, op) or unavailable_reason(name, device, op=op)


def _interpreted(name: str) -> bool:
    if name != "triton":
        return False
    from .triton_runtime import interpreter_enabled, triton

    return triton is not None and interpreter_enabled()


def resolve_auto(dtype: Optional[torch.dtype], device: Optional[torch.device], *, op: str = PHASE_UPDATE) -> str:
    """The backend ``"auto"`` means for parameters of ``dtype`` on ``device`` (``"torch"`` when nothing else can)."""
    order = AUTO_ORDER[op].get(torch.device(device).type, ("torch",)) if device is not None else ("torch",)
    for name in order:
        if name in _modules(op) and unsupported_reason(name, dtype, device, op=op) is None and not _interpreted(name):
            return name
    return "torch"


def resolve_backend(
    name: str,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    *,
    op: str = PHASE_UPDATE,
) -> str:
    """The concrete backend for ``name``; raises ``RuntimeError`` if a named one cannot run there.

    ``device`` is the one device all tensors live on, or None when they are spread over several
    (then ``"auto"`` means ``"torch"``); ``dtype``, when given, is the parameters' dtype.
    """
    _check_name(name, op)
    if name == "auto":
        return resolve_auto(dtype, device, op=op)
    module = backend_module(name, op)
    if module is not None and hasattr(module, "prepare") and _dtype_reason(name, dtype, op) is None:
        # Only a backend the user named may take time to get ready (the native one compiles):
        # "auto" never waits on a compiler.
        module.prepare(device)
    reason = unsupported_reason(name, dtype, device, op=op)
    if reason is not None:
        raise RuntimeError(f"{reason}; use backend='torch' (runs everywhere) or backend='auto'")
    return name


def phase_update(
    backend: str,
    groups: Sequence[FactorGroup],
    hp: PhaseHyperParams,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One phase for every group with the named concrete backend (semantics: ``torch_phase_update.py``)."""
    if backend not in _modules(PHASE_UPDATE):
        raise ValueError(f"unknown concrete backend {backend!r}")
    module = backend_module(backend)
    if module is None:
        raise ValueError(f"backend={backend!r} is not part of this build of altlora")
    module.phase_update(groups, hp, found_inf)
