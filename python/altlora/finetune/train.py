"""One fine-tuning run: an optimizer, a learning rate, a seed; curves and final numbers."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import torch

from . import lr_schedule
from .data import TokenizedSet, batches, eval_batches
from .model import build_lora_model
from .optimizers import build_optimizer, state_bytes

__all__ = ["RunConfig", "RunResult", "train_run", "evaluate"]


@dataclass
class RunConfig:
    optimizer: str
    lr: float
    seed: int
    steps: int
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 32
    eval_every: int = 50
    schedule: str = "alternate"
    order: str = "BA"
    damping: Optional[float] = None  # AltLoRA / AltLoRA+ only; None = the optimizer's default
    head_lr: Optional[float] = None  # AdamW lr of the head for altlora/altloraplus/sgd; None = HEAD_LR
    beta2: Optional[float] = None  # AltLoRA+ only; None = the optimizer's default
    lr_schedule: str = "constant"  # see lr_schedule.py
    warmup_ratio: float = 0.0
    batching: str = "random"  # see data.BATCHING
    eval_split: str = "validation"  # which held-out split ``evals`` were measured on (a label)


@dataclass
class RunResult:
    config: RunConfig
    losses: List[float] = field(default_factory=list)
    evals: List[Tuple[int, float]] = field(default_factory=list)  # (step, validation accuracy)
    seconds_per_step: float = float("nan")
    state_bytes: int = 0
    diverged_at: Optional[int] = None
    error: str = ""

    @property
    def final_accuracy(self) -> float:
        return self.evals[-1][1] if self.evals else float("nan")

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last 20 steps (one batch is noisy)."""
        tail = self.losses[-20:]
        return sum(tail) / len(tail) if tail else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(final_accuracy=self.final_accuracy, final_loss=self.final_loss)
        return d


@torch.no_grad()
def evaluate(model, data: TokenizedSet, batch_size: int = 64) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for input_ids, mask, labels in eval_batches(data, batch_size):
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(data)


def train_run(cfg: RunConfig, train: TokenizedSet, val: TokenizedSet, progress=None) -> RunResult:
    """Train; evaluate every ``eval_every`` steps and at the end. A diverging run (non-finite loss
    or gradient) stops and is reported as diverged instead of aborting the comparison."""
    model = build_lora_model(cfg.rank, cfg.alpha, cfg.seed)
    model.train()
    opt = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.schedule, cfg.order, cfg.damping, cfg.head_lr, cfg.beta2)
    schedulers = lr_schedule.attach(opt, cfg.steps, cfg.warmup_ratio, cfg.lr_schedule)
    result = RunResult(cfg)
    if progress is not None:
        progress.set_postfix_str(f"evaluating on {len(val)} {cfg.eval_split} snippets before step 1")
    result.evals.append((0, evaluate(model, val)))
    train_time = 0.0
    data = batches(train, cfg.batch_size, cfg.steps, cfg.seed, cfg.batching)
    for step, (input_ids, mask, labels) in enumerate(data, start=1):
        start = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            result.diverged_at, result.error = step, f"loss became {value}"
            break
        try:
            opt.step()
        except FloatingPointError as err:
            result.diverged_at, result.error = step, str(err).split(";")[0]
            break
        for scheduler in schedulers:
            scheduler.step()
        train_time += time.perf_counter() - start
        result.losses.append(value)
        if progress is not None:
            progress.update(1)
            # the accuracy shown is that of the last evaluation, at the step it names
            last_step, last_acc = result.evals[-1]
            progress.set_postfix_str(f"loss={value:.3f} {cfg.eval_split} acc@{last_step}={last_acc:.3f}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            result.evals.append((step, evaluate(model, val)))
    result.seconds_per_step = train_time / max(len(result.losses), 1)
    result.state_bytes = state_bytes(opt)
    return result
