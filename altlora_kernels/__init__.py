"""altlora_kernels: the compute layer of altlora.

Two ops, each with a torch implementation that runs on any device and faster ones where they can run;
``backends.py`` is the one registry that lists them, says what each can run and dispatches:

* the phase update — one AltLoRA/AltLoRA+ phase over groups of layers: :func:`phase_update`
  (dispatch), backends ``torch_phase_update.py``, ``triton_phase_update.py``, ``native_phase_update.py``;
  its inputs are the types of ``phase_types.py``;
* the fused LoRA linear — forward/backward that computes only the requested factor gradients:
  ``lora_linear.lora_linear`` (the op and its autograd), backends ``torch_lora_linear.py``,
  ``triton_lora_linear.py``.

Helpers shared by the backends: :func:`damped_cholesky` (batched r×r Cholesky with damping
escalation, ``cholesky.py``), :func:`adamw_step` (fused AdamW for the non-LoRA parameters,
``adamw.py``), :func:`nonfinite_flag` (device-side NaN/Inf detection, ``nonfinite.py``) and, for
the Triton kernels, ``triton_runtime.py``. The math is in ``docs/math.md``.

No name exported here is also the name of a submodule (``import altlora_kernels.X`` always gives
the module X). This package never imports ``altlora``.
"""

from .adamw import adamw_step
from .backends import (
    BACKENDS,
    LORA_LINEAR,
    PHASE_UPDATE,
    phase_update,
    resolve_auto,
    resolve_backend,
    unavailable_reason,
    unsupported_reason,
)
from .cholesky import damped_cholesky, damping_ladder
from .lora_linear import LoRALinearFunction, dropout_keep_mask
from .nonfinite import nonfinite_flag
from .phase_types import FactorGroup, PhaseHyperParams
from .torch_phase_update import phase_update_torch

__all__ = [
    "BACKENDS",
    "PHASE_UPDATE",
    "LORA_LINEAR",
    "phase_update",
    "resolve_auto",
    "resolve_backend",
    "unavailable_reason",
    "unsupported_reason",
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
