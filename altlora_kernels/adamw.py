"""AdamW for the trainable parameters that are not LoRA factors (heads, biases, DoRA magnitudes).

Uses PyTorch's fused multi-tensor kernel (``torch._fused_adamw_``, one launch per device and
dtype) with the same decoupled weight decay as ``torch.optim.AdamW``:

    p ← p·(1 − η·γ) − η · (m/(1−β1ⁿ)) / (sqrt(v/(1−β2ⁿ)) + ε)

``found_inf`` skips the step on the device (no host sync), as ``GradScaler`` does with fused
optimizers. Where the fused kernel is unavailable a ``torch._foreach_*`` version is used; it
checks ``found_inf`` on the host.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

__all__ = ["adamw_step"]


def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One AdamW step; ``steps`` are float32 0-dim tensors on each parameter's device."""
    buckets = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    for (device, _), idx in buckets.items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        ns = [steps[i] for i in idx]
        inf = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
        torch._foreach_add_(ns, 1.0)
        try:
            torch._fused_adamw_(
                ps, gs, ms, vs, [], ns,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                amsgrad=False, maximize=False, grad_scale=None, found_inf=inf,
            )
        except (RuntimeError, NotImplementedError):
            if inf is not None and bool(inf.item()):
                pass
            else:
                _foreach_adamw(ps, gs, ms, vs, ns, lr, beta1, beta2, eps, weight_decay)
        if inf is not None:
            torch._foreach_sub_(ns, [inf] * len(ns))


def _foreach_adamw(ps, gs, ms, vs, ns, lr, beta1, beta2, eps, weight_decay) -> None:
    torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, 1.0 - beta2)
    for p, m, v, n in zip(ps, ms, vs, ns):
        step = float(n)
        denom = (v / (1.0 - beta2**step)).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))
