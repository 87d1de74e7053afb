"""Recognizing DeepSpeed ZeRO, which hands the optimizer tensors AltLoRA cannot work with.

Every AltLoRA phase needs whole factors: the r×r Grams ``A·Aᵀ`` and ``BᵀB`` (and the cross-Grams)
are products of complete rows of ``A`` and columns of ``B``. DeepSpeed ZeRO takes that away:

* ZeRO-1/2 replace each param group's ``"params"`` with one flat fp32 partition of all its
  parameters and give gradients only to that partition;
* ZeRO-3 also partitions the parameters themselves: outside a forward pass each is an empty
  placeholder that carries ``ds_id``, ``ds_numel``, ``ds_status``.

Neither keeps a factor's rows together, so the Grams cannot be formed. Rather than train silently
wrong (or not at all: the original parameters never receive a gradient), the optimizer and the
Trainer integration refuse DeepSpeed with an error that names what works instead.

DeepSpeed is never imported: it is recognized by what it leaves behind (duck typing), so these
checks cost nothing where it is not installed.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional, Sequence, Tuple

import torch

__all__ = [
    "SUPPORTED_ALTERNATIVES",
    "ZERO3_PARAMETER_ATTRIBUTES",
    "deepspeed_in_use",
    "deepspeed_error",
    "check_not_deepspeed",
    "check_no_zero3_parameters",
    "check_lora_params_in_place",
]

SUPPORTED_ALTERNATIVES = (
    "plain DistributedDataParallel (DDP), FSDP2 (torch.distributed.fsdp.fully_shard), or a single GPU"
)

# Attributes DeepSpeed ZeRO-3 sets on every parameter it partitions.
ZERO3_PARAMETER_ATTRIBUTES = ("ds_id", "ds_numel", "ds_status")

# Values `accelerate launch --use_deepspeed` (and TrainingArguments, briefly) put in ACCELERATE_USE_DEEPSPEED.
_TRUE_STRINGS = ("1", "true", "yes", "y", "on")


def deepspeed_error(where: str) -> ValueError:
    """The error for DeepSpeed found at ``where``: what cannot work, and what to use instead."""
    return ValueError(_unsupported(where))


def _unsupported(where: str) -> str:
    return (
        f"{where}: AltLoRA does not support DeepSpeed ZeRO. ZeRO flattens and partitions parameters, so the "
        f"optimizer never sees whole LoRA factors and cannot form their r×r Grams. Use {SUPPORTED_ALTERNATIVES} "
        f"instead (with transformers.Trainer: leave `deepspeed` unset; torchrun gives DDP, and "
        f"`fsdp=...` with fsdp_version 2 gives FSDP2)."
    )


def deepspeed_in_use(args: Any = None) -> Optional[str]:
    """Where DeepSpeed was found, in words, or ``None``.

    Looks at, in order: ``args`` (a ``TrainingArguments`` or anything with a ``deepspeed`` or
    ``deepspeed_plugin`` attribute), the ``ACCELERATE_USE_DEEPSPEED`` environment variable,
    transformers' process-wide DeepSpeed config (set while a ``TrainingArguments(deepspeed=...)``
    lives) and accelerate's shared state. Modules that were never imported are not imported.
    """
    if args is not None:
        if getattr(args, "deepspeed", None):
            return f"args.deepspeed is set ({getattr(args, 'deepspeed')!r})"
        if getattr(args, "deepspeed_plugin", None) is not None:
            return "args.deepspeed_plugin is set"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in _TRUE_STRINGS:
        return "the environment variable ACCELERATE_USE_DEEPSPEED is set"
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    config_of = getattr(hf_deepspeed, "deepspeed_config", None)
    if callable(config_of) and config_of() is not None:
        return "a transformers DeepSpeed config is active (TrainingArguments(deepspeed=...) or HfDeepSpeedConfig)"
    accelerate_state = sys.modules.get("accelerate.state")
    partial_state = getattr(accelerate_state, "PartialState", None)
    shared = getattr(partial_state, "_shared_state", None)
    if shared is not None:
        kind = shared.get("distributed_type") if hasattr(shared, "get") else None
        if kind is not None and str(getattr(kind, "value", kind)).upper() == "DEEPSPEED":
            return "accelerate's distributed state is DEEPSPEED"
    return None


def check_not_deepspeed(args: Any = None, model: Optional[torch.nn.Module] = None) -> None:
    """Raise ``ValueError`` if DeepSpeed is in use (see :func:`deepspeed_in_use`) or if ``model``
    has ZeRO-3 partitioned parameters."""
    where = deepspeed_in_use(args)
    if where is not None:
        raise deepspeed_error(where)
    if model is not None:
        check_no_zero3_parameters(model.named_parameters())


def check_no_zero3_parameters(named_parameters: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` naming the first parameter that carries a ZeRO-3 attribute."""
    for name, p in named_parameters:
        for attribute in ZERO3_PARAMETER_ATTRIBUTES:
            if hasattr(p, attribute):
                raise deepspeed_error(f"{name} carries `{attribute}`, so DeepSpeed ZeRO-3 has partitioned it")


def check_lora_params_in_place(index: int, params: Sequence[torch.Tensor], expected_ids: Iterable[int]) -> None:
    """Raise ``ValueError`` if ``param_groups[index]["params"]`` no longer holds the LoRA factors
    the optimizer was built with (``expected_ids``: their ``id()``s).

    Engines that swap an optimizer's parameters after it is built leave the optimizer stepping
    tensors that never receive a gradient, so a step would silently do nothing: DeepSpeed ZeRO-1/2
    put one flat fp32 partition in their place, accelerate's FSDP2 preparation sharded copies.
    """
    if list(map(id, params)) == expected_ids:  # the usual case: the same tensors in the same order
        return
    expected = set(expected_ids)
    held = {id(p) for p in params}
    if held == expected and len(params) == len(expected):
        return
    what = (
        f"param_groups[{index}]['params'] no longer holds the {len(expected)} LoRA factors this optimizer was built "
        f"with; it holds {len(params)} other tensor(s)"
    )
    if len(params) == len(expected):
        raise ValueError(
            f"{what}, swapped one for one (accelerate's FSDP2 preparation swaps in sharded copies after the optimizer "
            f"is built). The optimizer keeps its own references to the factors and cannot follow such a swap: build "
            f"it on the model after torch.distributed.fsdp.fully_shard."
        )
    raise deepspeed_error(f"{what} (DeepSpeed ZeRO-1/2 replace a group's parameters with one flat partition)")
