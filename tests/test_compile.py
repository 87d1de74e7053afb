"""torch.compile: a compiled model, a compiled ``LoRALinear``, and a compiled ``opt.step``.

Each compiled run is compared with the same run eager. What is supported:

* ``torch.compile(model)`` with an eager ``opt.step()``: the forward and backward are compiled,
  the step updates the same parameter objects; results equal eager to float rounding.
* ``torch.compile(LoRALinear)``: forward and backward equal the eager layer's.
* ``torch.compile(opt.step)`` or a compiled function that calls ``opt.step()``: the step is
  excluded from compilation (``torch.compiler.disable``) and runs eagerly. Traced, its Python
  bookkeeping (the schedule position) was lost and every step repeated the first phase: a wrong
  result without an error; the tests below would catch that again.

Tiny sizes: Inductor compiles each graph with a C++ compiler, seconds per graph on a small CPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import altlora

STEPS = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class LoRANet(nn.Module):
    """Two LoRALinear layers (odd sizes) and an ordinary head (stepped by the AdamW group)."""

    def __init__(self):
        super().__init__()
        self.l1 = altlora.LoRALinear(13, 17, r=3, alpha=6, backend="torch")
        self.l2 = altlora.LoRALinear(17, 7, r=3, alpha=6, backend="torch")
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.relu(self.l1(x)))))


def peft_mlp():
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("up", nn.Linear(13, 17))
    base.add_module("act", nn.ReLU())
    base.add_module("down", nn.Linear(17, 3))
    return peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"],
                                                     modules_to_save=None))


def with_random_B(model, seed=2):
    """B = 0 at init makes every A gradient zero; random B exercises both phases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in altlora.find_lora_pairs(model):
            pair.B.copy_(0.2 * torch.randn(pair.B.shape, generator=g))
    return model


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 13, generator=g), torch.randint(0, 3, (8,), generator=g)


def train(forward, opt, steps=STEPS, step=None):
    x, y = data()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        (step or opt.step)()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_same_training(eager, compiled, eager_losses, compiled_losses, exact=False):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), **tol)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, **tol, msg=lambda m: f"{name}: {m}")


def test_compiled_lora_linear_forward_and_backward_match_eager():
    torch.manual_seed(0)
    layer = with_random_B(altlora.LoRALinear(13, 11, r=3, alpha=6, backend="torch"))
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer)
    x = torch.randn(5, 7, 13)
    outputs, input_grads = [], []
    for module in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.square().sum().backward()
        outputs.append(y.detach())
        input_grads.append(xi.grad)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(input_grads[1], input_grads[0], rtol=1e-6, atol=1e-6)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(eager, name).grad, rtol=1e-6, atol=1e-6)
        assert getattr(layer, name).grad.abs().sum() > 0
    assert layer.weight.grad is None  # the frozen base stays without a gradient


@pytest.mark.parametrize("make_model, variant, kwargs", [
    (LoRANet, "AltLoRAPlus", dict(lr=0.05)),
    (peft_mlp, "AltLoRA", dict(lr=0.2, schedule="sequential")),
], ids=["LoRALinear-altloraplus-alternate", "peft-altlora-sequential"])
def test_step_with_compiled_model_matches_eager(make_model, variant, kwargs):
    torch.manual_seed(0)
    model = with_random_B(make_model())
    eager, compiled = model, copy.deepcopy(model)
    opt_eager = getattr(altlora, variant)(eager, **kwargs)
    opt_compiled = getattr(altlora, variant)(compiled, **kwargs)
    eager_losses = train(eager, opt_eager)
    compiled_losses = train(torch.compile(compiled), opt_compiled)
    assert eager_losses[-1] < eager_losses[0]
    assert_same_training(eager, compiled, eager_losses, compiled_losses)
    assert opt_compiled.active_factor == opt_eager.active_factor


def test_compiled_step_runs_eagerly_with_the_same_result():
    torch.manual_seed(0)
    model = with_random_B(LoRANet())
    eager, compiled = model, copy.deepcopy(model)
    opt_eager, opt_compiled = altlora.AltLoRAPlus(eager, lr=0.05), altlora.AltLoRAPlus(compiled, lr=0.05)
    eager_factors, compiled_factors = [], []
    eager_losses = train(eager, opt_eager, step=lambda: (eager_factors.append(opt_eager.active_factor), opt_eager.step()))
    compiled_step = torch.compile(opt_compiled.step)
    compiled_losses = train(compiled, opt_compiled,
                            step=lambda: (compiled_factors.append(opt_compiled.active_factor), compiled_step()))
    assert eager_factors == ["B", "A"] * (STEPS // 2)
    assert compiled_factors == eager_factors  # traced, the schedule stood still at "B"
    assert_same_training(eager, compiled, eager_losses, compiled_losses, exact=True)


def test_compiled_training_step_that_calls_opt_step():
    torch.manual_seed(0)
    model = with_random_B(LoRANet())
    eager, compiled = model, copy.deepcopy(model)
    opt_eager, opt_compiled = altlora.AltLoRA(eager, lr=0.2), altlora.AltLoRA(compiled, lr=0.2)

    def training_step(net, opt, x, y):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    compiled_step = torch.compile(training_step)
    x, y = data()
    eager_losses = [training_step(eager, opt_eager, x, y).item() for _ in range(STEPS)]
    compiled_losses = [compiled_step(compiled, opt_compiled, x, y).item() for _ in range(STEPS)]
    assert eager_losses[-1] < eager_losses[0]
    assert_same_training(eager, compiled, eager_losses, compiled_losses)
    assert opt_compiled.state_dict()["state"].keys() == opt_eager.state_dict()["state"].keys()
