"""Route PEFT ``lora.Linear`` layers through the fused LoRA linear op, and back.

:func:`fuse_peft` gives each PEFT ``lora.Linear`` that it can serve an instance-level ``forward``
that calls ``altlora_kernels.lora_linear`` (``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with only the
requested weight gradients). Nothing else changes: no module is replaced, no parameter is moved or
renamed, so ``model.state_dict()`` and the parameter objects stay the same and an optimizer built
before fusing keeps working. :func:`unfuse_peft` deletes the instance ``forward`` again.

A layer is fused when it is exactly PEFT's ``lora.Linear`` over a plain ``nn.Linear`` with one
active adapter of vanilla LoRA (no DoRA or other variant, no ``lora_bias``, no ``fan_in_fan_out``)
and no hooks on its sub-modules or an instance ``forward`` of someone else. Everything else stays
as it was and is reported with the reason. At call time the fused forward checks the conditions
that can change later (adapters disabled or merged, another active adapter set, ``adapter_names``
or other extra arguments, autocast, an input dtype other than the base weight's) and hands such
calls to PEFT's own forward.

Numerics: the adapter runs in the input's dtype (PEFT keeps fp32 adapters on a bf16 base and
computes the LoRA branch in fp32); with dropout active, the keep-mask comes from the op's own
seeded generator, so it has the same distribution as ``nn.Dropout``'s but other random values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from altlora_kernels.lora_linear import LORA_LINEAR_BACKENDS, lora_linear

__all__ = ["FusionReport", "fuse_peft", "unfuse_peft", "is_fused"]

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class FusionReport:
    """What :func:`fuse_peft` did: module paths fused, and the reason for each PEFT LoRA layer left alone."""

    fused: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    backend: str = "auto"

    def __str__(self) -> str:
        total = len(self.fused) + len(self.skipped)
        text = f"fuse_peft: fused {len(self.fused)} of {total} PEFT LoRA layers (backend={self.backend!r})"
        if self.skipped:
            text += "; left as they were: " + ", ".join(f"{name} ({why})" for name, why in self.skipped.items())
        return text


class _FusedForward:
    """The instance ``forward`` of a fused layer (a picklable, deep-copyable callable)."""

    def __init__(self, module: nn.Module, backend: str) -> None:
        self.module = module
        self.backend = backend

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.module
        adapter = None if (args or kwargs) else _servable_adapter(module, x)
        if adapter is None:
            return type(module).forward(module, x, *args, **kwargs)
        base = module.base_layer
        dropout = module.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return lora_linear(
            x, base.weight, base.bias, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
            module.scaling[adapter], dropout_p=p, backend=self.backend,
        )


def _has_hooks(module: nn.Module) -> bool:
    return any(
        len(getattr(module, name, ()) or ())
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _variant(module, adapter: str) -> Optional[str]:
    """The name of a LoRA variant (DoRA, ...) on ``adapter``, or None for vanilla LoRA.

    Read with getattr: older PEFT versions mark DoRA in ``use_dora`` only and have no ``lora_variant``.
    """
    if getattr(module, "use_dora", {}).get(adapter, False):
        return "DoRA"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    return None if variant is None else f"LoRA variant {type(variant).__name__}"


def _lora_bias(module, adapter: str) -> bool:
    return bool(getattr(module, "lora_bias", {}).get(adapter, False))


def _single_active_adapter(module) -> Optional[str]:
    active = module.active_adapters
    if isinstance(active, str):
        active = [active]
    return active[0] if len(active) == 1 else None


def _servable_adapter(module, x: torch.Tensor) -> Optional[str]:
    """The adapter to run fused for this call, or None to use PEFT's forward (conditions that can change)."""
    if module.disable_adapters or module.merged:
        return None
    adapter = _single_active_adapter(module)
    if adapter is None or adapter not in module.lora_A or _variant(module, adapter) or _lora_bias(module, adapter):
        return None
    weight = module.base_layer.weight
    if x.dtype != weight.dtype or x.dtype not in _SUPPORTED_DTYPES or x.device != weight.device:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    return adapter


def _static_reason(module, lora_linear_cls) -> Optional[str]:
    """Why ``module`` (a PEFT LoRA layer) cannot be fused, or None."""
    if type(module) is not lora_linear_cls:
        return f"{type(module).__name__} is not PEFT's lora.Linear"
    if isinstance(module.__dict__.get("forward"), _FusedForward):
        return "already fused"
    if "forward" in module.__dict__:
        return "its forward is already replaced on the instance (e.g. by accelerate hooks)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    base = module.base_layer
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not a plain nn.Linear (quantized or wrapped)"
    if base.weight.dtype not in _SUPPORTED_DTYPES:
        return f"base weight dtype {base.weight.dtype} is not supported"
    if base.weight.device.type == "meta":
        return "base weight is on the meta device"
    adapter = _single_active_adapter(module)
    if adapter is None:
        return f"{len(module.active_adapters)} active adapters"
    if adapter not in module.lora_A:
        return f"active adapter {adapter!r} has no LoRA factors here"
    variant = _variant(module, adapter)
    if variant:
        return variant
    if _lora_bias(module, adapter):
        return "lora_bias"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(dropout).__name__}"
    subs = [base, module.lora_A[adapter], module.lora_B[adapter], dropout]
    if any(_has_hooks(m) for m in subs):
        return "hooks on its base layer, factors or dropout"
    if module.lora_A[adapter].bias is not None:
        return "lora_A has a bias"
    return None


def fuse_peft(model: nn.Module, backend: str = "auto") -> FusionReport:
    """Run every servable PEFT ``lora.Linear`` of ``model`` through the fused op (see the module docstring).

    Args:
        model: a PEFT model (or any module holding PEFT LoRA layers).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (checked at each call; ``"triton"`` raises
            ``RuntimeError`` there if it cannot run on the input's device).

    Returns:
        A :class:`FusionReport`; it is also logged at INFO level on ``altlora.peft_fusion``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"fuse_peft expects an nn.Module, got {type(model).__name__}")
    if backend not in LORA_LINEAR_BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(LORA_LINEAR_BACKENDS)})")
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError as err:
        raise ImportError("fuse_peft needs the peft package (pip install peft)") from err

    report = FusionReport(backend=backend)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        reason = _static_reason(module, PeftLoraLinear)
        if reason is None:
            module.forward = _FusedForward(module, backend)
            report.fused.append(name)
        else:
            report.skipped[name] = reason
    if not report.fused and not report.skipped:
        raise ValueError("model has no PEFT LoRA layers to fuse")
    logger.info("%s", report)
    return report


def is_fused(module: nn.Module) -> bool:
    """Whether ``module`` runs through the fused op (set by :func:`fuse_peft`)."""
    return isinstance(module.__dict__.get("forward"), _FusedForward)


def unfuse_peft(model: nn.Module) -> List[str]:
    """Undo :func:`fuse_peft`: the paths of the layers given back their PEFT forward."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"unfuse_peft expects an nn.Module, got {type(model).__name__}")
    restored = []
    for name, module in model.named_modules():
        if is_fused(module):
            del module.forward
            restored.append(name)
    logger.info("unfuse_peft: restored %d layers", len(restored))
    return restored
