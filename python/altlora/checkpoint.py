"""The optimizer's checkpoint format: torch's (per-parameter state, param groups) plus the schedule
position under the ``"altlora"`` key, and the checks that refuse a state from another optimizer,
schedule or model. The format has not changed since the first release: older files load.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, List

import torch

from .param_groups import KIND, LORA
from .schedule import Schedule
from .variants import Variant

__all__ = ["STATE_DICT_KEY", "STRUCTURE_KEYS", "position", "read_position", "remap_state", "restore_hparams"]

STATE_DICT_KEY = "altlora"

# Group keys that describe the structure, not hyper-parameters: never taken from a state_dict.
# (The schedule position is also stored in every group under STATE_DICT_KEY: the state_dict
# helpers of torch.distributed.checkpoint keep only "state" and "param_groups".)
STRUCTURE_KEYS = ("params", KIND, "lora_names", "lora_scalings", STATE_DICT_KEY)


def position(variant: Variant, schedule: Schedule, step_index: int, skipped) -> Dict[str, Any]:
    return {
        "variant": variant.name,
        **schedule.describe(),
        "step_index": step_index,
        "skipped_steps": None if skipped is None else skipped.clone(),
    }


def read_position(state_dict: Dict[str, Any], variant: Variant, schedule: Schedule) -> Dict[str, Any]:
    """The saved position; ``ValueError`` when the state comes from another variant or schedule."""
    extra = state_dict.get(STATE_DICT_KEY)
    if extra is None and state_dict.get("param_groups"):
        # Through torch.distributed.checkpoint.state_dict, only the groups carry it.
        extra = state_dict["param_groups"][0].get(STATE_DICT_KEY)
    if not isinstance(extra, dict):
        raise ValueError("state_dict was not saved by an altlora optimizer (no 'altlora' entry)")
    if extra.get("variant") != variant.name:
        raise ValueError(f"state_dict was saved by {extra.get('variant')}, not {variant.name}")
    mine = schedule.describe()
    saved = tuple(extra.get(key) for key in mine)
    if saved != tuple(mine.values()):
        raise ValueError(f"state_dict was saved with ({', '.join(mine)}) = {saved}, this optimizer has {tuple(mine.values())}")
    return extra


def remap_state(state_dict: Dict[str, Any], param_groups: List[dict]) -> Dict[torch.Tensor, Dict[str, Any]]:
    """The saved per-index state keyed by this optimizer's parameters, after checking that the
    groups match (count, kinds, sizes, scalings)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(param_groups)}: "
            f"it was saved for another model or configuration"
        )
    id_map = {}
    for index, (group, sg) in enumerate(zip(param_groups, saved_groups)):
        if sg.get(KIND) != group[KIND] or len(sg["params"]) != len(group["params"]):
            raise ValueError(
                f"param_groups[{index}] does not match the state_dict ({group[KIND]} group of "
                f"{len(group['params'])} tensors vs {sg.get(KIND)} group of {len(sg['params'])})"
            )
        if group[KIND] == LORA:
            for name, mine, theirs in zip(group["lora_names"], group["lora_scalings"], sg["lora_scalings"]):
                if not math.isclose(mine, theirs, rel_tol=1e-6):
                    raise ValueError(f"{name}: state_dict was saved with scaling {theirs}, this model has {mine}")
        id_map.update(zip(sg["params"], group["params"]))
    new_state: Dict[torch.Tensor, Dict[str, Any]] = defaultdict(dict)
    for key, value in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"state_dict holds state for parameter index {key}, which this optimizer does not have")
        new_state[id_map[key]] = dict(value)
    return new_state


def restore_hparams(state_dict: Dict[str, Any], param_groups: List[dict]) -> None:
    """Take the saved hyper-parameters (lr after a scheduler, ...) into the groups."""
    for group, sg in zip(param_groups, state_dict["param_groups"]):
        for key, value in sg.items():
            if key not in STRUCTURE_KEYS:
                group[key] = tuple(value) if key == "betas" else value
