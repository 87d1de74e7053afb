"""Turning what a user passes as ``params`` into param groups of LoRA pairs and other parameters.

Accepted: an ``nn.Module`` (its trainable LoRA pairs, found by :func:`find_lora_pairs`, plus every
other trainable parameter, which AdamW steps), an iterable of :class:`LoRAPair`, or param-group
dicts with ``"pairs"`` and/or ``"params"``.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from .pairs import LoRAPair, find_lora_pairs

__all__ = ["LORA", "ADAMW", "KIND", "collect_param_groups"]

KIND = "kind"
LORA = "lora"
ADAMW = "adamw"


def _trainable_pairs(model: nn.Module) -> List[LoRAPair]:
    pairs = []
    for pair in find_lora_pairs(model):
        a, b = pair.A.requires_grad, pair.B.requires_grad
        if a and b:
            pairs.append(pair)
        elif a != b:
            frozen, trained = ("A", "B") if b else ("B", "A")
            raise ValueError(
                f"{pair.name}: lora_{trained} requires grad but lora_{frozen} does not; AltLoRA trains "
                f"both factors of a pair. Set requires_grad on both, or freeze both to leave the layer out."
            )
    return pairs


def collect_param_groups(params, names: Dict[int, str]) -> List[dict]:
    """Param-group dicts (``"pairs"`` and/or ``"params"``); fills ``names`` (id → display name)."""
    if isinstance(params, nn.Module):
        model = params
        for name, p in model.named_parameters():
            names.setdefault(id(p), name)
        pairs = _trainable_pairs(model)
        if not pairs:
            raise ValueError(
                f"params: {type(model).__name__} has no trainable LoRA layers (no PEFT LoraLayer with "
                f"lora_A/lora_B, no module with lora_A/lora_B parameters). Wrap it with peft.get_peft_model "
                f"or pass LoRAPair objects."
            )
        in_pairs = {id(t) for pair in pairs for t in (pair.A, pair.B)}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
        groups = [{"pairs": pairs}]
        if others:
            groups.append({"params": others})
        return groups
    if isinstance(params, torch.Tensor):
        raise ValueError(
            "params: got a single tensor. AltLoRA needs to know which tensors form LoRA (A, B) pairs: "
            "pass the model, altlora.find_lora_pairs(model), or param groups with 'pairs'."
        )
    try:
        items = list(params)
    except TypeError:
        raise ValueError(f"params: expected an nn.Module, LoRAPairs or param-group dicts, got {type(params).__name__}") from None
    if not items:
        raise ValueError("params: empty; AltLoRA needs at least one LoRA pair")
    if all(isinstance(x, LoRAPair) for x in items):
        return [{"pairs": items}]
    if all(isinstance(x, dict) for x in items):
        return [dict(x) for x in items]
    if all(isinstance(x, torch.Tensor) for x in items):
        raise ValueError(
            "params: got plain tensors (e.g. model.parameters()). AltLoRA needs to know which tensors form "
            "LoRA (A, B) pairs: pass the model itself, altlora.find_lora_pairs(model), or param groups "
            "{'pairs': [...], 'params': [...]}."
        )
    kinds = sorted({type(x).__name__ for x in items})
    raise ValueError(f"params: mixes {', '.join(kinds)}; pass LoRAPairs or param-group dicts, not both")
