"""What users do to a model after building the optimizer: cast it, move it, give a parameter new
storage. The optimizer follows (its stacked views and state rebuilt on the new tensors, the state
converted by the precision rule) or raises; it never steps stale tensors silently.
"""

import copy

import pytest
import torch
from torch import nn

import altlora
from problems import Problem

LAYERS = [(3, 7, 5, 6.0), (2, 5, 4, 4.0), (3, 7, 5, 12.0)]


class Model(nn.Module):
    """The problem's pairs as module parameters (so that ``.to()`` reaches them) and a head."""

    def __init__(self, pairs):
        super().__init__()
        self.pairs = pairs
        for i, p in enumerate(pairs):
            self.register_parameter(f"A{i}", p.A)
            self.register_parameter(f"B{i}", p.B)
        self.head = nn.Parameter(torch.linspace(-1.0, 1.0, 6).view(2, 3))


def _build(backend, variant="AltLoRAPlus", schedule=None):
    prob = Problem(LAYERS, seed=3)
    model = Model(prob.pairs())
    cls = getattr(altlora, variant)
    schedule = schedule or {"schedule": "sequential"}
    opt = cls([{"pairs": model.pairs, "params": [model.head]}], lr=0.01, backend=backend, **schedule)
    return prob, model, opt


def _steps(prob, model, opt, start, stop):
    for t in range(start, stop):
        prob.set_grads(t, model.pairs)
        gen = torch.Generator().manual_seed(t)
        model.head.grad = torch.randn(2, 3, generator=gen).to(model.head.dtype)
        opt.step()


def _values(model, opt):
    out = [t.detach().clone() for p in model.pairs for t in (p.A, p.B)] + [model.head.detach().clone()]
    for t in [t for p in model.pairs for t in (p.A, p.B)] + [model.head]:
        out += [v.clone() for v in opt.state[t].values()]
    return out


def _can_run(backend, dtype):
    import altlora_kernels as K

    return K.unsupported_reason(backend, dtype, torch.device("cpu")) is None


# switch_every=3 stopped after 4 steps: mid-run of A phases, a live snapshot to convert too.
SCHEDULES = [{"schedule": "sequential"}, {"switch_every": 3}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("when", [0, 4], ids=["before-first-step", "mid-run"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["sequential", "switch_every=3"])
def test_cast_after_building_keeps_training_and_equals_a_rebuilt_optimizer(backend, dtype, when, schedule):
    if not _can_run(backend, dtype):
        prob, model, opt = _build(backend, schedule=schedule)
        _steps(prob, model, opt, 0, when)
        model.to(dtype)
        prob.set_grads(when, model.pairs)
        with pytest.raises(RuntimeError, match=r"param_groups\[0\].*float64"):
            opt.step()
        return
    total = when + 4
    prob, model, opt = _build(backend, schedule=schedule)
    _steps(prob, model, opt, 0, when)
    if when and "switch_every" in schedule:
        assert "snapshot" in opt.state[model.pairs[0].A]
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model.to(dtype)
    before = [p.B.detach().clone() for p in model.pairs]
    _steps(prob, model, opt, when, total)
    for p, b in zip(model.pairs, before):
        assert p.B.dtype == dtype and not torch.equal(p.B.detach(), b), "the cast model must keep training"
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert all(v.dtype == (dtype if k == "snapshot" else want) for k, v in opt.state[p.B].items())
    assert opt.state[model.head]["exp_avg"].dtype == dtype  # AdamW state follows the parameter, as in torch

    # The same state, loaded into an optimizer built on the cast model.
    prob2 = Problem(LAYERS, seed=3)
    model2 = Model(prob2.pairs())
    model2.load_state_dict(weights)
    model2.to(dtype)
    opt2 = altlora.AltLoRAPlus([{"pairs": model2.pairs, "params": [model2.head]}], lr=0.01, backend=backend, **schedule)
    if when:
        opt2.load_state_dict(saved)
    _steps(prob2, model2, opt2, when, total)
    for got, want in zip(_values(model, opt), _values(model2, opt2)):
        assert torch.equal(got, want)


def test_cast_down_and_back_up_keeps_training(backend):
    prob, model, opt = _build(backend, "AltLoRA")
    _steps(prob, model, opt, 0, 2)
    model.to(torch.bfloat16)
    _steps(prob, model, opt, 2, 4)
    model.to(torch.float32)
    a = model.pairs[0].A.detach().clone()
    _steps(prob, model, opt, 4, 6)
    assert model.pairs[0].A.dtype == torch.float32 and not torch.equal(model.pairs[0].A.detach(), a)
    assert opt.state[model.pairs[0].A]["momentum"].dtype == torch.float32


def test_new_storage_with_the_same_values_changes_nothing(backend):
    prob, model, opt = _build(backend, "AltLoRA")
    prob_ref, model_ref, ref = _build(backend, "AltLoRA")
    _steps(prob, model, opt, 0, 3)
    _steps(prob_ref, model_ref, ref, 0, 3)
    for p in model.pairs:
        p.A.data = p.A.data.clone()  # what a module conversion to the same dtype can do
    _steps(prob, model, opt, 3, 6)
    _steps(prob_ref, model_ref, ref, 3, 6)
    for got, want in zip(_values(model, opt), _values(model_ref, ref)):
        assert torch.equal(got, want)


def test_new_storage_with_new_values_is_trained_from_the_new_values():
    # p.data = other values: the views follow, and the Grams are those of the new values.
    prob, model, opt = _build("torch", "AltLoRA")
    _steps(prob, model, opt, 0, 2)
    new_A = torch.randn(3, 7, generator=torch.Generator().manual_seed(9))
    model.pairs[0].A.data = new_A.clone()
    _steps(prob, model, opt, 2, 3)
    A = model.pairs[0].A.detach()
    assert not torch.equal(A, new_A)  # the step wrote into the new storage
    torch.testing.assert_close(opt.state[model.pairs[0].A]["gram"], A @ A.T, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("when", [0, 3])
def test_move_to_cuda_after_building(when):
    prob, model, opt = _build("auto")
    _steps(prob, model, opt, 0, when)
    model.cuda()
    for t in range(when, when + 3):
        for i, p in enumerate(model.pairs):
            gA, gB = prob.grads(t, i, p.A.detach().cpu(), p.B.detach().cpu(), p.scaling)
            p.A.grad, p.B.grad = gA.float().cuda(), gB.float().cuda()
        model.head.grad = torch.ones_like(model.head)
        opt.step()
    for p in model.pairs:
        assert all(v.device.type == "cuda" for v in opt.state[p.A].values())


def test_rebuild_refused_where_it_is_not_sound():
    # Sharded (FSDP2) groups cannot be rebuilt mid-run: a clear error, not a silent no-op.
    prob, model, opt = _build("torch")
    _steps(prob, model, opt, 0, 2)
    for pg in opt._lora:
        pg.rebuild_allowed = False
    model.to(torch.float64)
    prob.set_grads(2, model.pairs)
    with pytest.raises(RuntimeError, match="changed dtype or device after the optimizer was built.*build the optimizer"):
        opt.step()


def test_casting_some_layers_regroups_them_and_auto_rechooses():
    prob, model, opt = _build("auto", "AltLoRA")
    _steps(prob, model, opt, 0, 2)
    cast = model.pairs[1]
    cast.A.data = cast.A.data.double()
    cast.B.data = cast.B.data.double()
    _steps(prob, model, opt, 2, 4)
    assert opt.backends["layer1"] == "torch"  # float64: the backend that computes in it
    assert opt.state[cast.A]["momentum"].dtype == torch.float64
    assert opt.state[model.pairs[0].A]["momentum"].dtype == torch.float32
    assert cast.A.dtype == torch.float64 and model.pairs[0].A.dtype == torch.float32
