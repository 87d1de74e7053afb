"""The non-finite policy: every gradient the step was given is checked (both factors of every pair,
including the one the phase does not use, and the AdamW group), as ``GradScaler`` does.
``"raise"``: ``FloatingPointError`` naming the parameter, nothing changed; ``"skip"``: nothing
changed, the skip counted, training goes on. Every backend.
"""

import pytest
import torch
from torch import nn

import altlora
from problems import Problem, layers_for


def _setup(backend, variant, nonfinite, schedule="alternate"):
    prob = Problem(layers_for(backend), seed=1)
    pairs = prob.pairs()
    head = nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(0)))
    cls = getattr(altlora, variant)
    opt = cls([{"pairs": pairs, "params": [head]}], lr=0.01, nonfinite=nonfinite, backend=backend, schedule=schedule)
    for t in range(3):
        prob.set_grads(t, pairs)
        head.grad = torch.full((3,), 0.1 * (t + 1))
        opt.step()
    return prob, pairs, head, opt


def _everything(pairs, head, opt):
    tensors = [t for p in pairs for t in (p.A, p.B)] + [head]
    return [t.detach().clone() for t in tensors] + [v.clone() for t in tensors for v in opt.state[t].values()]


def _poison(prob, pairs, head, opt, where):
    prob.set_grads(3, pairs)
    head.grad = torch.full((3,), 0.4)
    phase = opt.active_factor[0]  # "alternate": one factor per step
    other = "A" if phase == "B" else "B"
    target = {"phase": getattr(pairs[-1], phase), "other": getattr(pairs[-1], other), "head": head}[where]
    target.grad.view(-1)[1] = float("nan") if where != "head" else float("inf")
    return target


@pytest.mark.parametrize("variant", ["AltLoRA", "AltLoRAPlus"])
@pytest.mark.parametrize("where", ["phase", "other", "head"])
@pytest.mark.parametrize("schedule", ["alternate", "sequential"])
def test_raise_names_the_parameter_and_changes_nothing(backend, variant, where, schedule):
    prob, pairs, head, opt = _setup(backend, variant, "raise", schedule)
    before = _everything(pairs, head, opt)
    _poison(prob, pairs, head, opt, where)
    name = r"param_groups\[1\]\['params'\]\[0\]" if where == "head" else rf"layer{len(pairs) - 1}\.lora_[AB]"
    with pytest.raises(FloatingPointError, match=f"non-finite gradient in {name}"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _everything(pairs, head, opt)))


@pytest.mark.parametrize("variant", ["AltLoRA", "AltLoRAPlus"])
@pytest.mark.parametrize("where", ["phase", "other", "head"])
def test_skip_skips_everything_counts_and_goes_on(backend, variant, where):
    prob, pairs, head, opt = _setup(backend, variant, "skip")
    before = _everything(pairs, head, opt)
    phase = opt.active_factor
    _poison(prob, pairs, head, opt, where)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _everything(pairs, head, opt)))
    assert opt.active_factor != phase  # a skipped step still advances the schedule
    prob.set_grads(4, pairs)
    head.grad = torch.full((3,), 0.5)
    opt.step()
    assert opt.skipped_steps == 1
    assert not torch.equal(head.detach(), before[2 * len(pairs)])
