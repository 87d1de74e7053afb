"""Bad input found at the earliest point, with a message that says what to do."""

import copy
import math

import pytest
import torch
from torch import nn

import altlora
from altlora.lora_linear import LoRALinear
from problems import Problem


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(6, 4, r=2, alpha=4.0), nn.Linear(4, 2))
    return model


@pytest.mark.parametrize("kw,match", [
    (dict(lr=float("nan")), "Invalid lr"),
    (dict(lr=0.1, momentum=float("inf")), "Invalid momentum"),
    (dict(lr=0.1, schedule="bogus"), "Invalid schedule"),
    (dict(lr=0.1, other_lr=float("nan")), "Invalid other_lr"),
    (dict(lr=0.1, nonfinite="ignore"), "Invalid nonfinite"),
    (dict(lr=0.1, not_an_option=1), "unexpected keyword argument 'not_an_option'"),
])
def test_altlora_optimizer_checks_values_when_called(kw, match):
    with pytest.raises(ValueError, match=match):
        altlora.altlora_optimizer(**kw)


def test_altlora_optimizer_checks_the_plus_variant_too():
    with pytest.raises(ValueError, match=r"Invalid betas\[1\]"):
        altlora.altlora_optimizer(lr=1e-3, variant="altloraplus", betas=(0.9, 1.5))


def test_unknown_option_is_a_type_error_naming_the_class():
    with pytest.raises(TypeError, match="AltLoRA: got an unexpected keyword argument 'shedule'"):
        altlora.AltLoRA(_model(), lr=0.1, shedule="joint")


@pytest.mark.parametrize("key", ["momentum", "gram", "step"])
def test_load_state_dict_refuses_nan_state_and_changes_nothing(key):
    prob = Problem(seed=2)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05, backend="torch")
    for t in range(2):
        prob.set_grads(t, pairs)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    before = {k: v.clone() for k, v in opt.state[pairs[1].A].items()}
    index = 2  # pairs[1].A
    sd["state"][index][key] = torch.full_like(sd["state"][index][key], math.nan)
    with pytest.raises(ValueError, match=rf"NaN or Inf in '{key}' of layer1\.lora_A"):
        opt.load_state_dict(sd)
    assert all(torch.equal(v, opt.state[pairs[1].A][k]) for k, v in before.items())


def test_load_state_dict_refuses_nan_adamw_state():
    model = _model()
    opt = altlora.AltLoRA(model, lr=0.05)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    last = max(sd["state"])
    sd["state"][last]["exp_avg_sq"].fill_(math.inf)
    with pytest.raises(ValueError, match=r"NaN or Inf in 'exp_avg_sq' of 1\.bias"):
        opt.load_state_dict(sd)


def test_meta_device_model_fails_at_construction():
    with torch.device("meta"):
        model = nn.Sequential(LoRALinear(6, 4, r=2, alpha=4.0))
    with pytest.raises(ValueError, match=r"0\.lora_A is on the meta device.*to_empty"):
        altlora.AltLoRA(model, lr=0.1)


def test_frozen_lora_model_says_the_layers_are_frozen():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"has 1 LoRA layer\(s\) \(e\.g\. 0\), but all of them are frozen"):
        altlora.AltLoRA(model, lr=0.1)


def test_tuples_of_factors_are_told_to_become_pairs():
    A, B = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(A, B\) tuples.*LoRAPair\(A, B, scaling"):
        altlora.AltLoRA([(A, B)], lr=0.1)
