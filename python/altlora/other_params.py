"""AdamW for the trainable parameters that are not LoRA factors (heads, biases, DoRA magnitudes).

torch's own functional AdamW steps them (``torch.optim.adamw.adamw``): the fused kernel where the
device has one (CPU and CUDA do), which takes ``found_inf`` and skips on the device without a
host sync, as it does under ``GradScaler``; else the foreach form, which cannot take the flag, so
a skip is then decided on the host. The state follows ``torch.optim.AdamW``: ``exp_avg`` and
``exp_avg_sq`` in the parameter's dtype and device, a float32 ``step`` on the parameter's device.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_fused_kernels_supported_devices

__all__ = ["EXP_AVG", "EXP_AVG_SQ", "STEP", "KEYS", "adamw_group_step", "follow_params", "check_loaded"]

# torch.optim.AdamW's key names, so that its state_dicts and ours read alike.
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
STEP = "step"
KEYS = (STEP, EXP_AVG, EXP_AVG_SQ)

_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _fresh(p: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {
        STEP: torch.zeros((), dtype=torch.float32, device=p.device),  # updates so far
        EXP_AVG: torch.zeros_like(p, memory_format=torch.preserve_format),  # first moment
        EXP_AVG_SQ: torch.zeros_like(p, memory_format=torch.preserve_format),  # second moment
    }


def follow_params(params: List[torch.Tensor], state) -> None:
    """Convert the state of parameters that were cast or moved since the last step."""
    for p in params:
        st = state.get(p)
        if st and (st[EXP_AVG].dtype != p.dtype or st[EXP_AVG].device != p.device):
            st[EXP_AVG] = st[EXP_AVG].to(device=p.device, dtype=p.dtype)
            st[EXP_AVG_SQ] = st[EXP_AVG_SQ].to(device=p.device, dtype=p.dtype)
            st[STEP] = st[STEP].to(device=p.device, dtype=torch.float32)


def adamw_group_step(
    group: Dict[str, Any],
    params: List[torch.Tensor],
    state,
    found_inf: Optional[torch.Tensor],
    local: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """One AdamW step of ``params`` (those of ``group`` with a gradient); ``local`` gives the part
    of a tensor this process steps (its shard under FSDP2)."""
    for p in params:
        if not state[p]:
            state[p].update(_fresh(p))
    ps = [local(p) for p in params]
    fused = all(p.device.type in _get_fused_kernels_supported_devices() and p.dtype in _FUSED_DTYPES for p in ps)
    if found_inf is not None and not fused and bool(found_inf.item()):
        return
    beta1, beta2 = group["betas"]
    by_device = {}
    for p, q in zip(params, ps):
        by_device.setdefault(q.device, []).append((p, q))
    for device, members in by_device.items():
        adamw(
            [q for _, q in members],
            [local(p.grad) for p, _ in members],
            [local(state[p][EXP_AVG]) for p, _ in members],
            [local(state[p][EXP_AVG_SQ]) for p, _ in members],
            [],
            [state[p][STEP] for p, _ in members],
            foreach=not fused,
            fused=fused,
            found_inf=found_inf.to(device=device, dtype=torch.float32) if fused and found_inf is not None else None,
            amsgrad=False,
            beta1=float(beta1),
            beta2=float(beta2),
            lr=float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
            maximize=False,
        )


def check_loaded(p: torch.Tensor, st: Dict[str, Any], name: str) -> None:
    """Validate and convert one parameter's loaded AdamW state in place (``ValueError`` naming it)."""
    for key in KEYS:
        if key not in st:
            raise ValueError(f"state_dict has no '{key}' for {name}")
    if tuple(st[EXP_AVG].shape) != tuple(p.shape):
        raise ValueError(
            f"state_dict does not match the model: state of {name} has shape {tuple(st[EXP_AVG].shape)}, "
            f"the parameter {tuple(p.shape)}"
        )
    for key in KEYS:
        value = torch.as_tensor(st[key])
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict holds a NaN or Inf in '{key}' of {name}; it cannot be resumed from")
    st[STEP] = torch.as_tensor(st[STEP], dtype=torch.float32).to(p.device, copy=True)
    st[EXP_AVG] = st[EXP_AVG].to(device=p.device, dtype=p.dtype, copy=True)
    st[EXP_AVG_SQ] = st[EXP_AVG_SQ].to(device=p.device, dtype=p.dtype, copy=True)
