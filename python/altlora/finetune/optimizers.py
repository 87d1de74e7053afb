"""The optimizers ``altlora finetune`` compares, with their default learning rates.

Default lrs come from ``experiments/study.py`` (results in ``experiments/results/study/``): the best
**dev** accuracy of each optimizer under the default protocol (one epoch, cosine lr with 3%
warm-up; AltLoRA/AltLoRA+ with the ``sequential`` schedule), seed 0, on a half-decade grid. The classifier head (and anything
else that is not a LoRA factor) is trained with AdamW at ``HEAD_LR`` by the LoRA-specific
optimizers; ``adamw`` and ``loraplus`` train it with their own lr, as LoRA users do today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

import altlora

from .errors import CLIError

__all__ = ["OPTIMIZERS", "DEFAULT_OPTIMIZERS", "HEAD_LR", "LORAPLUS_RATIO", "build_optimizer", "state_bytes"]

HEAD_LR = 1e-3
LORAPLUS_RATIO = 16.0  # LoRA+: B's lr is this times A's (Hayou et al., 2024)


@dataclass(frozen=True)
class OptimizerSpec:
    description: str
    default_lr: float
    build: Callable[..., torch.optim.Optimizer]


class _Together:
    """Two optimizers stepped as one (plain SGD on the LoRA factors, AdamW on the head)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
        self.state = {}
        for opt in optimizers:
            self.state.update(opt.state)

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            self.state.update(opt.state)


def _lora_and_rest(model):
    pairs = altlora.find_lora_pairs(model)
    ids = {id(t) for p in pairs for t in (p.A, p.B)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return pairs, rest


def _damping(damping):
    return {} if damping is None else {"damping": damping}


def _altlora(model, lr, schedule, order, damping=None, head_lr=None, **_):
    return altlora.AltLoRA(model, lr=lr, schedule=schedule, order=order, other_lr=head_lr or HEAD_LR, **_damping(damping))


def _altloraplus(model, lr, schedule, order, damping=None, head_lr=None, beta2=None, **_):
    extra = {} if beta2 is None else {"betas": (0.9, beta2)}
    return altlora.AltLoRAPlus(model, lr=lr, schedule=schedule, order=order, other_lr=head_lr or HEAD_LR,
                               **_damping(damping), **extra)


def _adamw(model, lr, **_):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def _loraplus(model, lr, **_):
    pairs, rest = _lora_and_rest(model)
    return torch.optim.AdamW([
        {"params": [p.A for p in pairs], "lr": lr},
        {"params": [p.B for p in pairs], "lr": lr * LORAPLUS_RATIO},
        {"params": rest, "lr": lr},
    ])


def _sgd(model, lr, head_lr=None, **_):
    pairs, rest = _lora_and_rest(model)
    lora = torch.optim.SGD([t for p in pairs for t in (p.A, p.B)], lr=lr)
    return _Together(lora, torch.optim.AdamW(rest, lr=head_lr or HEAD_LR)) if rest else lora


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    "altlora": OptimizerSpec("AltLoRA (head: AdamW)", 1e-1, _altlora),
    "altloraplus": OptimizerSpec("AltLoRA+ (head: AdamW)", 1e-3, _altloraplus),
    "adamw": OptimizerSpec("LoRA with AdamW", 1e-3, _adamw),
    "loraplus": OptimizerSpec(f"LoRA+ (AdamW, B's lr ×{LORAPLUS_RATIO:g})", 1e-4, _loraplus),
    "sgd": OptimizerSpec("plain LoRA gradient descent (head: AdamW)", 3e-1, _sgd),
}
DEFAULT_OPTIMIZERS = ("altlora", "altloraplus", "adamw", "loraplus")


def build_optimizer(name: str, model, lr: float, schedule: str = "alternate", order: str = "BA", damping=None,
                    head_lr=None, beta2=None):
    """``beta2``: AltLoRA+'s second-moment decay (None = its default 0.999); ignored by the others."""
    if name not in OPTIMIZERS:
        raise CLIError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[name].build(model, lr=lr, schedule=schedule, order=order, damping=damping, head_lr=head_lr,
                                      beta2=beta2)
    except ValueError as err:
        raise CLIError(f"{name}: {err}") from None


def state_bytes(optimizer) -> int:
    """Bytes held in optimizer state tensors (views of one buffer counted once each, as slices)."""
    total = 0
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def names(text: str) -> List[str]:
    out = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in out if n not in OPTIMIZERS]
    if unknown or not out:
        raise CLIError(f"unknown optimizer {', '.join(unknown) or repr(text)}; choose from {', '.join(OPTIMIZERS)}")
    return out
