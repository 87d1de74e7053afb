"""LoRA layers: each pair of :func:`~altlora.find_lora_pairs` with the module that owns it.

What MGPO and the initializations need beyond the factors: the owning module (for forward hooks
and the base weight), the PEFT adapter name, whether the adapter is active, its variant (DoRA...),
and how the adapter's ``(k, d)`` matrix maps onto the base weight (``kind``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from .pairs import LoRAPair, find_lora_pairs

__all__ = ["LoRALayer", "find_lora_layers", "LINEAR", "EMBEDDING", "CONV", "OTHER"]

# Layer kinds: how the adapter's (k, d) matrix maps onto the base weight and the input.
LINEAR = "linear"
EMBEDDING = "embedding"
CONV = "conv"
OTHER = "other"


@dataclass(eq=False)
class LoRALayer:
    """One (layer, adapter): its :class:`LoRAPair`, the module that owns it, the adapter name
    (``None`` for modules that own their factors) and its kind (LINEAR, EMBEDDING, CONV, OTHER)."""

    pair: LoRAPair
    module: nn.Module
    adapter: Optional[str]
    kind: str

    @property
    def name(self) -> str:
        return self.pair.name

    @property
    def is_peft(self) -> bool:
        return self.adapter is not None

    def variant(self) -> Optional[str]:
        """The PEFT LoRA variant of this adapter (``"DoRA"``, ...), ``None`` for plain LoRA."""
        if not self.is_peft:
            return None
        use_dora = getattr(self.module, "use_dora", None)
        if isinstance(use_dora, Mapping) and use_dora.get(self.adapter, False):
            return "DoRA"
        variants = getattr(self.module, "lora_variant", None)
        if isinstance(variants, Mapping) and self.adapter in variants:
            return type(variants[self.adapter]).__name__
        return None

    def is_active(self) -> bool:
        """Whether the layer's forward uses this adapter now (PEFT: enabled and active)."""
        if not self.is_peft:
            return True
        if getattr(self.module, "disable_adapters", False):
            return False
        active = getattr(self.module, "active_adapters", None)
        if active is None:
            return True
        return self.adapter in ([active] if isinstance(active, str) else list(active))

    def base_weight(self) -> Optional[torch.Tensor]:
        """The base weight tensor as stored, or ``None`` if the module has none."""
        if self.is_peft:
            get_base = getattr(self.module, "get_base_layer", None)
            base = get_base() if callable(get_base) else getattr(self.module, "base_layer", None)
            weight = getattr(base, "weight", None)
        else:
            weight = getattr(self.module, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None

    def base_matrix(self) -> torch.Tensor:
        """``W0`` as a (k, d) view of the base weight (writes through to it).

        Raises ValueError where there is no floating point base weight of matching shape.
        """
        weight = self.base_weight()
        if weight is None:
            raise ValueError(f"{self.name}: the module has no base weight (no .weight / .base_layer.weight)")
        if not weight.is_floating_point():
            raise ValueError(
                f"{self.name}: the base weight has dtype {weight.dtype} (quantized?); this initialization "
                f"rewrites or factorizes W0 and needs a floating point base weight"
            )
        if self.kind == EMBEDDING:
            matrix = weight.T
        elif self.kind == CONV:
            matrix = weight.view(weight.shape[0], -1)
        else:
            matrix = weight.T if getattr(self.module, "fan_in_fan_out", False) else weight
        k, d = self.pair.out_features, self.pair.in_features
        if tuple(matrix.shape) != (k, d):
            raise ValueError(
                f"{self.name}: the base weight read as a matrix has shape {tuple(matrix.shape)}, but the "
                f"adapter is ({k}, {d}) (B is {tuple(self.pair.B.shape)}, A is {tuple(self.pair.A.shape)})"
            )
        return matrix


def _kind_of(factor_module: nn.Module) -> str:
    if isinstance(factor_module, nn.Linear):
        return LINEAR
    if isinstance(factor_module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    return OTHER


def find_lora_layers(model: nn.Module) -> List[LoRALayer]:
    """Every pair of :func:`~altlora.find_lora_pairs`, with the module that owns it, in the same order."""
    pairs = find_lora_pairs(model)
    owners: Dict[int, tuple] = {}
    for _, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict):
            for adapter, a_module in lora_A.items():
                weight = getattr(a_module, "weight", None)
                if isinstance(weight, torch.Tensor):
                    owners[id(weight)] = (module, adapter, _kind_of(a_module))
        elif isinstance(lora_A, torch.Tensor):
            owners[id(lora_A)] = (module, None, LINEAR if lora_A.dim() == 2 else OTHER)
        emb_A = getattr(module, "lora_embedding_A", None)
        if isinstance(emb_A, nn.ParameterDict):
            for adapter, A in emb_A.items():
                owners[id(A)] = (module, adapter, EMBEDDING)
    return [LoRALayer(pair, *owners[id(pair.A)]) for pair in pairs]
