"""Bad input gets a ValueError naming what is wrong; non-finite gradients change nothing."""

import pytest
import torch
from torch import nn

import altlora
from problems import Problem


def _pair(r=3, d=5, k=4, name="p", **kw):
    return altlora.LoRAPair(nn.Parameter(torch.randn(r, d)), nn.Parameter(torch.randn(k, r)), 2.0, name, **kw)


def test_rank_mismatch():
    with pytest.raises(ValueError, match=r"layer\.q: rank mismatch.*r = 3.*r = 2"):
        altlora.LoRAPair(nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(4, 2)), 1.0, "layer.q")


def test_mixed_devices_in_a_pair():
    with pytest.raises(ValueError, match=r"layer\.v: A is on cpu but B is on meta"):
        altlora.LoRAPair(nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(4, 3, device="meta")), 1.0, "layer.v")


@pytest.mark.parametrize("scaling", [0.0, float("nan"), "x"])
def test_bad_scaling(scaling):
    with pytest.raises(ValueError, match="scaling"):
        altlora.LoRAPair(nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(4, 3)), scaling, "l")


def test_parameter_in_two_pairs():
    a = nn.Parameter(torch.randn(3, 5))
    p1 = altlora.LoRAPair(a, nn.Parameter(torch.randn(4, 3)), 1.0, "first")
    p2 = altlora.LoRAPair(a, nn.Parameter(torch.randn(6, 3)), 1.0, "second")
    with pytest.raises(ValueError, match=r"first\.lora_A appears in two places"):
        altlora.AltLoRA([p1, p2], lr=0.1)


def test_parameter_in_a_pair_and_in_params():
    p = _pair(name="q")
    with pytest.raises(ValueError, match=r"q\.lora_B appears in two places"):
        altlora.AltLoRA([{"pairs": [p], "params": [p.B]}], lr=0.1)


@pytest.mark.parametrize("cls,kw,match", [
    (altlora.AltLoRA, dict(lr=-1.0), "Invalid lr"),
    (altlora.AltLoRA, dict(lr=0.1, damping=-1e-3), "Invalid damping"),
    (altlora.AltLoRA, dict(lr=0.1, momentum=1.0), "Invalid momentum"),
    (altlora.AltLoRA, dict(lr=0.1, weight_decay=-0.1), "Invalid weight_decay"),
    (altlora.AltLoRA, dict(lr=float("nan")), "Invalid lr"),
    (altlora.AltLoRAPlus, dict(lr=0.1, betas=(0.9, 1.0)), r"Invalid betas\[1\]"),
    (altlora.AltLoRAPlus, dict(lr=0.1, betas=(-0.1, 0.9)), r"Invalid betas\[0\]"),
    (altlora.AltLoRAPlus, dict(lr=0.1, betas=0.9), "Invalid betas"),
    (altlora.AltLoRAPlus, dict(lr=0.1, eps=-1.0), "Invalid eps"),
    (altlora.AltLoRA, dict(lr=0.1, schedule="random"), "Invalid schedule"),
    (altlora.AltLoRA, dict(lr=0.1, order="BB"), "Invalid order"),
    (altlora.AltLoRA, dict(lr=0.1, switch_every=0), "Invalid switch_every"),
    (altlora.AltLoRA, dict(lr=0.1, schedule="joint", switch_every=2), "switch_every=2 only applies"),
    (altlora.AltLoRA, dict(lr=0.1, backend="cuda"), "Invalid backend"),
    (altlora.AltLoRA, dict(lr=0.1, nonfinite="ignore"), "Invalid nonfinite"),
    (altlora.AltLoRA, dict(lr=0.1, other_lr=-1), "Invalid other_lr"),
    (altlora.AltLoRA, dict(lr=0.1, schedule="joint", freeze_inactive=True), "freeze_inactive=True needs"),
])
def test_bad_hyperparameters(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls([_pair()], **kw)


def test_bad_value_in_a_param_group_is_named():
    with pytest.raises(ValueError, match=r"Invalid lr \(param_groups\[0\]\)"):
        altlora.AltLoRA([{"pairs": [_pair()], "lr": -0.1}], lr=0.1)


def test_bad_value_set_later_is_caught_at_step():
    p = _pair()
    opt = altlora.AltLoRA([p], lr=0.1)
    opt.param_groups[0]["damping"] = -1.0
    p.A.grad, p.B.grad = torch.randn_like(p.A), torch.randn_like(p.B)
    with pytest.raises(ValueError, match="Invalid damping"):
        opt.step()


def test_module_without_lora_layers():
    with pytest.raises(ValueError, match="Sequential has no trainable LoRA layers"):
        altlora.AltLoRA(nn.Sequential(nn.Linear(3, 4)), lr=0.1)


def test_plain_tensors_are_rejected_with_advice():
    with pytest.raises(ValueError, match="pass the model itself"):
        altlora.AltLoRA(nn.Linear(3, 4).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="single tensor"):
        altlora.AltLoRA(torch.zeros(3), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        altlora.AltLoRA([], lr=0.1)


def test_triton_backend_unavailable_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="backend='torch'"):
        altlora.AltLoRA([_pair()], lr=0.1, backend="triton")


def test_state_dict_from_another_model():
    prob = Problem(seed=0)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.1, backend="torch")
    prob.set_grads(0, pairs)
    opt.step()
    sd = opt.state_dict()

    other = Problem([(3, 7, 5, 6.0), (1, 9, 11, 2.0), (8, 13, 17, 16.0), (3, 9, 5, 12.0)], seed=0).pairs()
    with pytest.raises(ValueError, match=r"layer3\.lora_A.*shape \(3, 7\), expected \(3, 9\)"):
        altlora.AltLoRA(other, lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="param groups|tensors"):
        altlora.AltLoRA(pairs[:2], lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="saved by AltLoRA, not AltLoRAPlus"):
        altlora.AltLoRAPlus(prob.pairs(), lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="schedule"):
        altlora.AltLoRA(prob.pairs(), lr=0.1, schedule="joint").load_state_dict(sd)
    with pytest.raises(ValueError, match="not saved by an altlora optimizer"):
        altlora.AltLoRA(prob.pairs(), lr=0.1).load_state_dict(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1).state_dict())
    rescaled = prob.pairs()
    rescaled[1] = altlora.LoRAPair(rescaled[1].A, rescaled[1].B, 3.0, "layer1")
    with pytest.raises(ValueError, match="layer1: state_dict was saved with scaling 2.0"):
        altlora.AltLoRA(rescaled, lr=0.1).load_state_dict(sd)


def test_failed_load_changes_nothing():
    prob = Problem(seed=0)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.1, backend="torch")
    prob.set_grads(0, pairs)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[pairs[3].A].items()}
    sd = opt.state_dict()
    sd = {**sd, "state": {**sd["state"], 6: {**sd["state"][6], "gram": torch.zeros(2, 2)}}}
    with pytest.raises(ValueError, match="gram"):
        opt.load_state_dict(sd)
    after = opt.state[pairs[3].A]
    assert all(torch.equal(before[k], after[k]) for k in before)


# The non-finite policy (raise and skip, each factor and the AdamW group, every backend): test_nonfinite.py.


def test_channels_last_conv_lora_gets_a_clear_error_not_a_silent_copy():
    # A channels-last conv A cannot be viewed as (r, d); a reshape would copy it and the optimizer's
    # in-place updates would never reach the parameter. The torch backend (every backend) refuses it.
    A = torch.nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
    B = torch.nn.Parameter(torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last))
    pair = altlora.LoRAPair(A, B, 1.0, "conv")
    with pytest.raises(ValueError, match=r"conv: .*channels-last.*contiguous\(\)"):
        altlora.AltLoRA([pair], lr=0.1, backend="torch")
    # The advice works: the same factors in the default memory format train.
    for p in (A, B):
        p.data = p.data.contiguous()
    opt = altlora.AltLoRA([altlora.LoRAPair(A, B, 1.0, "conv")], lr=0.1, backend="torch")
    before = (A.detach().clone(), B.detach().clone())
    A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
    opt.step()
    assert not torch.equal(A.detach(), before[0]) or not torch.equal(B.detach(), before[1])
