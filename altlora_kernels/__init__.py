"""altlora_kernels: the compute layer of altlora.

One function per op, with a torch implementation that runs on any device:

* :func:`damped_cholesky` — batched r×r Cholesky with damping escalation (``cholesky.py``)
* :func:`phase_update_torch` — one AltLoRA/AltLoRA+ phase over groups of layers (``phase_update.py``)
* :func:`adamw_step` — fused AdamW for the non-LoRA parameters (``adamw.py``)
* :func:`nonfinite_flag` — device-side NaN/Inf detection (``nonfinite.py``)
* :func:`phase_update` / :func:`resolve_backend` — backend dispatch (``backends.py``)
* ``lora_linear.lora_linear`` — fused LoRA linear forward/backward that computes only the requested factor
  gradients (``lora_linear.py``; Triton kernels in ``triton_lora_linear.py``)

This package never imports ``altlora``.
"""

from .adamw import adamw_step
from .backends import BACKENDS, phase_update, resolve_backend, unavailable_reason
from .cholesky import damped_cholesky, damping_ladder
# NOTE: the function ``lora_linear`` is not re-exported here: it would shadow the submodule of the
# same name (``import altlora_kernels.lora_linear`` must give the module).
from .lora_linear import LoRALinearFunction, dropout_keep_mask
from .nonfinite import nonfinite_flag
from .phase_update import FactorGroup, PhaseHyperParams, phase_update_torch

__all__ = [
    "BACKENDS",
    "phase_update",
    "resolve_backend",
    "unavailable_reason",
    "FactorGroup",
    "LoRALinearFunction",
    "dropout_keep_mask",
    "PhaseHyperParams",
    "adamw_step",
    "damped_cholesky",
    "damping_ladder",
    "nonfinite_flag",
    "phase_update_torch",
]
