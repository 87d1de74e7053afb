"""altlora_kernels: the compute layer of altlora.

One function per op, with a torch implementation that runs on any device:

* :func:`damped_cholesky` — batched r×r Cholesky with damping escalation (``cholesky.py``)
* :func:`phase_update_torch` — one AltLoRA/AltLoRA+ phase over groups of layers (``phase_update.py``)
* :func:`adamw_step` — fused AdamW for the non-LoRA parameters (``adamw.py``)
* :func:`nonfinite_flag` — device-side NaN/Inf detection (``nonfinite.py``)
* :func:`phase_update` / :func:`resolve_backend` — backend dispatch (``backends.py``)

This package never imports ``altlora``.
"""

from .adamw import adamw_step
from .backends import BACKENDS, phase_update, resolve_backend, unavailable_reason
from .cholesky import damped_cholesky, damping_ladder
from .nonfinite import nonfinite_flag
from .phase_update import FactorGroup, PhaseHyperParams, phase_update_torch

__all__ = [
    "BACKENDS",
    "phase_update",
    "resolve_backend",
    "unavailable_reason",
    "FactorGroup",
    "PhaseHyperParams",
    "adamw_step",
    "damped_cholesky",
    "damping_ladder",
    "nonfinite_flag",
    "phase_update_torch",
]
