"""How the optimizer behaves around the math: launches, missing gradients, freezing, schedule."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import altlora
from problems import Problem


class CountOps(TorchDispatchMode):
    """Counts dispatched ATen ops that compute (views and metadata ops excluded)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if not is_view:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _layers(n):
    # two distinct shapes, n layers in all
    return [(3, 7, 5, 6.0) if i % 2 else (8, 13, 17, 16.0) for i in range(n)]


@pytest.mark.parametrize("variant", [altlora.AltLoRA, altlora.AltLoRAPlus])
@pytest.mark.parametrize("schedule", ["alternate", "sequential", "joint"])
def test_op_count_depends_on_shapes_not_layers(variant, schedule):
    counts = []
    for n in (2, 40):
        prob = Problem(_layers(n), seed=0)
        pairs = prob.pairs()
        heads = [nn.Parameter(torch.randn(4)) for _ in range(n)]
        opt = variant([{"pairs": pairs, "params": heads}], lr=0.01, schedule=schedule, backend="torch")
        per_step = []
        for t in range(3):  # the first step initializes state; count the later ones
            prob.set_grads(t, pairs)
            for h in heads:
                h.grad = torch.randn(4)
            with CountOps() as c:
                opt.step()
            per_step.append(len(c.ops))
        counts.append(per_step[1:])
    assert counts[0] == counts[1], f"ops per step with 2 vs 40 layers: {counts}"


def test_step_without_gradients_does_nothing():
    prob = Problem(seed=0)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05)
    before = [p.A.detach().clone() for p in pairs]
    opt.step()
    assert opt.active_factor == "B" and not opt.state[pairs[0].A]
    assert all(torch.equal(a, p.A) for a, p in zip(before, pairs))


def test_layer_without_gradient_gets_zero_gradient():
    # A layer that took no part in the forward pass: momentum still carries it, bookkeeping holds.
    prob = Problem(seed=0)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05)
    ref_pairs = prob.pairs()
    ref = altlora.AltLoRA(ref_pairs, lr=0.05)
    for t in range(4):
        for ps in (pairs, ref_pairs):
            prob.set_grads(t, ps)
        if t == 2:
            pairs[1].A.grad = pairs[1].B.grad = None
            ref_pairs[1].A.grad = torch.zeros_like(ref_pairs[1].A)
            ref_pairs[1].B.grad = torch.zeros_like(ref_pairs[1].B)
        opt.step()
        ref.step()
    for p, q in zip(pairs, ref_pairs):
        assert torch.equal(p.A, q.A) and torch.equal(p.B, q.B)


def test_active_factor_follows_the_schedule():
    prob = Problem(seed=0)

    def sequence(**kw):
        pairs = prob.pairs()
        opt = altlora.AltLoRA(pairs, lr=0.01, **kw)
        out = []
        for t in range(6):
            out.append(opt.active_factor)
            prob.set_grads(t, pairs)
            opt.step()
        return "".join(out)

    assert sequence() == "BABABA"
    assert sequence(order="AB") == "ABABAB"
    assert sequence(switch_every=2) == "BBAABB"
    assert sequence(schedule="sequential") == "AB" * 6
    assert sequence(schedule="joint") == "AB" * 6


def test_alternate_updates_only_the_active_factor():
    prob = Problem(seed=0)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05)
    prob.set_grads(0, pairs)
    A0 = [p.A.detach().clone() for p in pairs]
    opt.step()  # a B phase
    assert all(torch.equal(a, p.A) for a, p in zip(A0, pairs))


def test_freeze_inactive_toggles_requires_grad_and_matches_unfrozen_run():
    torch.manual_seed(0)

    def model():
        torch.manual_seed(0)
        lin = nn.Linear(6, 5)
        A = nn.Parameter(torch.randn(2, 6) * 0.3)
        B = nn.Parameter(torch.randn(5, 2) * 0.1)
        return lin, A, B

    x, y = torch.randn(16, 6), torch.randn(16, 5)
    results = []
    for freeze in (False, True):
        lin, A, B = model()
        lin.requires_grad_(False)
        opt = altlora.AltLoRA([altlora.LoRAPair(A, B, 1.0, "l")], lr=0.05, freeze_inactive=freeze)
        for t in range(6):
            if freeze:
                assert B.requires_grad == ("B" in opt.active_factor)
                assert A.requires_grad == ("A" in opt.active_factor)
            loss = ((lin(x) + x @ A.T @ B.T - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            if freeze:
                frozen = A if opt.active_factor == "B" else B
                assert frozen.grad is None  # backward skipped its weight gradient
            opt.step()
        results.append((A.detach().clone(), B.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_one_factor_trainable_is_an_error():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Parameter(torch.randn(2, 4))
            self.lora_B = nn.Parameter(torch.randn(3, 2))
            self.scaling = 1.0

    m = nn.Sequential(Layer())
    m[0].lora_A.requires_grad_(False)
    with pytest.raises(ValueError, match="lora_B requires grad but lora_A does not"):
        altlora.AltLoRA(m, lr=0.1)


def test_conv_shaped_factors_are_read_as_matrices():
    A = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.2)  # (r, c_in, kh, kw)
    B = nn.Parameter(torch.randn(4, 3, 1, 1) * 0.2)  # (c_out, r, 1, 1)
    pair = altlora.LoRAPair(A, B, 1.0, "conv")
    assert pair.matrices()[0].shape == (3, 18) and pair.matrices()[1].shape == (4, 3)
    opt = altlora.AltLoRA([pair], lr=0.05, schedule="sequential")
    target = torch.randn(4, 18)

    def loss():
        return ((B.view(4, 3) @ A.view(3, 18) - target) ** 2).sum()

    start = float(loss().detach())
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert opt.state[A]["momentum"].shape == A.shape
    assert float(loss().detach()) < 0.5 * start
