"""The fine-tuning lr schedule: the factor, and that every optimizer the CLI builds follows it."""

import math

import pytest
import torch

import altlora
from altlora.finetune import lr_schedule
from altlora.finetune.optimizers import build_optimizer


def test_cosine_with_warmup_factor():
    f = lambda k: lr_schedule.lr_factor(k, 100, 3, "cosine")  # noqa: E731
    assert [f(1), f(2), f(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 97)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(k) >= f(k + 1) for k in range(3, 100))
    assert lr_schedule.lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_schedule.warmup_steps(338, 0.03) == 10
    with pytest.raises(ValueError, match="lr schedule"):
        lr_schedule.lr_factor(1, 10, 0, "linear")


class _Tiny(torch.nn.Module):
    """Two LoRA layers (our LoRALinear) and a head: what build_optimizer sees in a real run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = altlora.LoRALinear(6, 5, r=2, alpha=4)
        self.l2 = altlora.LoRALinear(5, 3, r=2, alpha=4)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.l2(self.l1(x)))


@pytest.mark.parametrize("name", ["altlora", "altloraplus", "adamw", "loraplus", "sgd"])
def test_every_optimizer_follows_the_schedule_in_every_group(name):
    model = _Tiny()
    opt = build_optimizer(name, model, lr=0.01, head_lr=0.002)
    inner = getattr(opt, "optimizers", (opt,))
    base = [g["lr"] for o in inner for g in o.param_groups]
    schedulers = lr_schedule.attach(opt, steps=10, warmup_ratio=0.2, kind="cosine")
    assert len(base) >= (1 if name == "adamw" else 2)  # LoRA factors and head apart, except in plain AdamW
    for k in range(1, 11):
        factor = lr_schedule.lr_factor(k, 10, 2, "cosine")
        now = [g["lr"] for o in inner for g in o.param_groups]
        assert now == pytest.approx([b * factor for b in base]), f"step {k}"
        loss = model(torch.randn(4, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for s in schedulers:
            s.step()


def test_altlora_moves_by_the_scheduled_lr():
    """A zero lr factor (the end of the cosine) means the LoRA factors and the head do not move:
    the optimizer reads lr from param_groups at every step."""
    model = _Tiny()
    opt = build_optimizer("altloraplus", model, lr=0.01)
    schedulers = lr_schedule.attach(opt, steps=3, warmup_ratio=0.0, kind="cosine")
    for k in range(1, 4):
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        loss = model(torch.randn(4, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for s in schedulers:
            s.step()
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        moved = any(not torch.equal(a, b) for a, b in zip(before, after))
        assert moved == (k < 3), f"step {k}"
