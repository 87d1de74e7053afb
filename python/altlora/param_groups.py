"""Admission of param groups: what a user passes as ``params`` (or to ``add_param_group``) becomes
checked param-group dicts of LoRA pairs and of other parameters.

Accepted: an ``nn.Module`` (its trainable LoRA pairs, found by :func:`find_lora_pairs`, plus every
other trainable parameter, which AdamW steps), an iterable of :class:`LoRAPair`, or param-group
dicts with ``"pairs"`` and/or ``"params"``. Every problem is a ``ValueError`` that names the
parameter or argument, raised here, before the optimizer exists.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .checks import check_betas, check_real
from .deepspeed_guard import check_no_zero3_parameters
from .options import Options
from .pairs import LoRAPair, find_lora_pairs
from .variants import Variant

__all__ = ["LORA", "ADAMW", "KIND", "collect_param_groups", "Admission"]

KIND = "kind"
LORA = "lora"
ADAMW = "adamw"
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")


def _trainable_pairs(model: nn.Module) -> List[LoRAPair]:
    found = find_lora_pairs(model)
    pairs = []
    for pair in found:
        a, b = pair.A.requires_grad, pair.B.requires_grad
        if a and b:
            pairs.append(pair)
        elif a != b:
            frozen, trained = ("A", "B") if b else ("B", "A")
            raise ValueError(
                f"{pair.name}: lora_{trained} requires grad but lora_{frozen} does not; AltLoRA trains "
                f"both factors of a pair. Set requires_grad on both, or freeze both to leave the layer out."
            )
    if found and not pairs:
        raise ValueError(
            f"params: {type(model).__name__} has {len(found)} LoRA layer(s) (e.g. {found[0].name}), but all of "
            f"them are frozen (requires_grad=False). Unfreeze the adapter (e.g. peft's "
            f"model.set_adapter(name) or is_trainable=True when loading it) before building the optimizer."
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
        return [{"pairs": pairs}] + ([{"params": others}] if others else [])
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
    if all(isinstance(x, (tuple, list)) for x in items):
        raise ValueError(
            "params: got (A, B) tuples; AltLoRA also needs each layer's scaling s (W = W0 + s·B·A). Wrap each as "
            "altlora.LoRAPair(A, B, scaling, name), or pass the model."
        )
    kinds = sorted({type(x).__name__ for x in items})
    raise ValueError(f"params: mixes {', '.join(kinds)}; pass LoRAPairs or param-group dicts, not both")


class Admission:
    """Turns one param-group dict into checked groups; keeps the display names of parameters."""

    def __init__(self, variant: Variant, options: Options, defaults: Dict[str, Any]):
        self.variant = variant
        self.defaults = defaults
        self.adamw_defaults = options.adamw_defaults(variant.other_adamw(defaults))
        self.names: Dict[int, str] = {}

    def display(self, p: torch.Tensor) -> str:
        return self.names.get(id(p), "an unnamed parameter")

    def check(self, group: Dict[str, Any], index: int) -> None:
        """The hyper-parameters of ``param_groups[index]`` (also at every step: schedulers write them)."""
        where = f" (param_groups[{index}])"
        if group[KIND] == LORA:
            self.variant.check(group, where)
        else:
            check_real("lr" + where, group["lr"])
            check_betas("betas" + where, group["betas"])
            check_real("eps" + where, group["eps"])
            check_real("weight_decay" + where, group["weight_decay"])

    def admit(self, param_group: Dict[str, Any], existing: List[dict]) -> List[Tuple[dict, Optional[List[LoRAPair]]]]:
        """``[(group, pairs)]``: the LoRA group (with its pairs) and/or the AdamW group (pairs None).

        A dict with both ``pairs`` and ``params`` becomes two groups: the LoRA pairs, then an AdamW
        group for ``params`` with ``other_lr`` / ``other_betas`` / ``other_eps`` (keys of the dict or
        the optimizer's). A dict with only ``params`` is an AdamW group whose own ``lr``, ``betas``,
        ``eps`` apply.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        pairs = group.pop("pairs", None)
        params = group.pop("params", None)
        other = {key: group.pop("other_" + key) for key in ("lr", "betas", "eps") if "other_" + key in group}
        if pairs is None and params is None:
            raise ValueError("a param group needs 'pairs' (LoRA pairs) and/or 'params' (other parameters)")
        known = {id(p): self.display(p) for g in existing for p in g["params"]}
        out = []
        if pairs is not None:
            out.append(self._lora_group(list(pairs), group, known, len(existing)))
        if params is not None:
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            hp = {**self.adamw_defaults, "weight_decay": group.get("weight_decay", self.defaults["weight_decay"])}
            if pairs is None:
                if not params:
                    raise ValueError("a param group with only 'params' must not be empty")
                hp.update({k: v for k, v in group.items() if k in _ADAMW_KEYS})
            hp.update(other)
            if params:
                out.append((self._adamw_group(params, hp, known, len(existing) + len(out)), None))
        return out

    def _check_tensor(self, t: torch.Tensor, known: Dict[int, str], where: str) -> None:
        check_no_zero3_parameters([(self.display(t), t)])
        if not t.is_leaf:
            raise ValueError(f"{self.display(t)} is not a leaf tensor; an optimizer can only step leaves")
        if t.device.type == "meta":
            raise ValueError(
                f"{self.display(t)} is on the meta device (no data yet): materialize the model (e.g. "
                f"model.to_empty(device=...) and load its weights) before building the optimizer"
            )
        if id(t) in known:
            raise ValueError(
                f"{self.display(t)} appears in two places ({known[id(t)]} and {where}); "
                f"each parameter may belong to one pair or group only"
            )
        known[id(t)] = where

    def _lora_group(self, pairs: List[LoRAPair], hp: Dict[str, Any], known, index: int):
        if not pairs:
            raise ValueError("'pairs' is empty: a LoRA param group needs at least one LoRAPair")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, LoRAPair):
                raise ValueError(f"pairs[{i}] is a {type(pair).__name__}, expected altlora.LoRAPair")
            for factor, t in (("A", pair.A), ("B", pair.B)):
                self.names.setdefault(id(t), pair.factor_name(factor))
                self._check_tensor(t, known, f"pair {pair.name or i}")
        for key, default in self.defaults.items():
            hp.setdefault(key, default)
        group = {
            "params": [t for pair in pairs for t in (pair.A, pair.B)],
            KIND: LORA,
            "lora_names": [pair.name for pair in pairs],
            "lora_scalings": [pair.scaling for pair in pairs],
            **hp,
        }
        self.check(group, index)
        return group, pairs

    def _adamw_group(self, params: List[torch.Tensor], hp: Dict[str, Any], known, index: int) -> dict:
        for j, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"param_groups[{index}]['params'][{j}] is a {type(p).__name__}, expected a tensor")
            self.names.setdefault(id(p), f"param_groups[{index}]['params'][{j}]")
            if not p.is_floating_point():
                raise ValueError(f"{self.display(p)} has dtype {p.dtype}; only floating point parameters can be trained")
            self._check_tensor(p, known, "an AdamW group")
        group = {"params": params, KIND: ADAMW, **hp}
        group["betas"] = tuple(group["betas"])
        self.check(group, index)
        return group
