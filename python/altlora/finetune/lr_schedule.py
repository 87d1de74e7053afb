"""The learning-rate schedule of a fine-tuning run, applied the same way to every optimizer.

``constant``: the optimizer's lr at every step (after the warm-up, if any).
``cosine`` (the AltLoRA paper's protocol, with ``warmup_ratio`` 0.03): a linear warm-up over the
first ``round(warmup_ratio · steps)`` steps, then a half cosine from the lr down to 0 at the last
step. Step ``k`` (1-based) trains with ``lr · factor(k)``:

    warm-up, k ≤ w:  factor = k / w
    after it:        factor = ½ (1 + cos(π (k − w) / (steps − w)))     (constant: 1)

The schedule is a standard ``torch.optim.lr_scheduler.LambdaLR`` on each optimizer, so it scales
every param group's ``lr`` — the LoRA factors and the classifier head alike — and the run shows that
our optimizers read their lr from ``param_groups`` at every step.
"""

from __future__ import annotations

import math
from typing import List

import torch

__all__ = ["LR_SCHEDULES", "lr_factor", "warmup_steps", "attach"]

LR_SCHEDULES = ("constant", "cosine")


def warmup_steps(steps: int, warmup_ratio: float) -> int:
    return int(round(warmup_ratio * steps))


def lr_factor(step: int, steps: int, warmup: int, kind: str) -> float:
    """The multiplier of the lr at 1-based training step ``step`` of ``steps``."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
    if step <= warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def attach(optimizer, steps: int, warmup_ratio: float, kind: str) -> List[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per torch optimizer in ``optimizer`` (which may bundle several in
    ``.optimizers``). Call ``.step()`` on each after every optimizer step."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = warmup_steps(steps, warmup_ratio)
    # LambdaLR calls the lambda with the number of scheduler steps taken so far (0 before the first
    # optimizer step), so training step k = that count + 1.
    factor = lambda done: lr_factor(done + 1, steps, warmup, kind)  # noqa: E731
    inner = getattr(optimizer, "optimizers", (optimizer,))
    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in inner]
