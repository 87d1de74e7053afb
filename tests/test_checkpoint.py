"""state_dict round trips, LR schedulers, and hyper-parameters read from param_groups."""

import copy
import io

import pytest
import torch

import altlora
from problems import Problem, compare_with_oracle
from test_oracle import make


def _opt(variant, pairs, **kw):
    if variant == "AltLoRA":
        return altlora.AltLoRA(pairs, lr=0.05, weight_decay=0.01, damping=1e-3, backend="torch", **kw)
    return altlora.AltLoRAPlus(pairs, lr=0.01, weight_decay=0.01, damping=1e-3, backend="torch", **kw)


def _snapshot(pairs, opt):
    out = [p.A.detach().clone() for p in pairs] + [p.B.detach().clone() for p in pairs]
    for p in pairs:
        for t in (p.A, p.B):
            out += [v.clone() for v in opt.state[t].values()]
    return out


@pytest.mark.parametrize("variant", ["AltLoRA", "AltLoRAPlus"])
@pytest.mark.parametrize("kw,stop", [
    (dict(), 7),
    (dict(switch_every=3), 4),        # stops mid-run: the snapshot must travel too
    (dict(schedule="sequential"), 5),
    (dict(schedule="joint", order="AB"), 6),
])
def test_state_dict_round_trip_resumes_bit_exactly(variant, kw, stop):
    total = 12
    prob = Problem(seed=4)
    ref_pairs = prob.pairs()
    ref = _opt(variant, ref_pairs, **kw)
    for t in range(total):
        prob.set_grads(t, ref_pairs)
        ref.step()

    pairs = prob.pairs()
    opt = _opt(variant, pairs, **kw)
    for t in range(stop):
        prob.set_grads(t, pairs)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": [(p.A.detach(), p.B.detach()) for p in pairs], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    # A fresh process: new parameters, new optimizer, then load both.
    new_pairs = prob.pairs()
    with torch.no_grad():
        for p, (A, B) in zip(new_pairs, saved["model"]):
            p.A.copy_(A)
            p.B.copy_(B)
    resumed = _opt(variant, new_pairs, **kw)
    resumed.load_state_dict(saved["opt"])
    assert resumed.active_factor == opt.active_factor
    for t in range(stop, total):
        prob.set_grads(t, new_pairs)
        resumed.step()
    for a, b in zip(_snapshot(new_pairs, resumed), _snapshot(ref_pairs, ref)):
        assert torch.equal(a, b)


def test_state_dict_has_everything_and_loads_into_itself():
    prob = Problem(seed=4)
    pairs = prob.pairs()
    opt = _opt("AltLoRAPlus", pairs, switch_every=2)
    for t in range(3):
        prob.set_grads(t, pairs)
        opt.step()
    sd = opt.state_dict()
    keys = set(sd["state"][0])
    assert {"momentum", "variance", "step", "gram", "cross_gram", "snapshot"} <= keys
    assert sd["altlora"]["step_index"] == 3
    before = copy.deepcopy(sd)
    opt.load_state_dict(before)
    prob.set_grads(3, pairs)
    opt.step()  # still works after loading its own state


def test_lr_scheduler_is_honoured():
    # A LambdaLR halves lr every step; the oracle gets the same lr sequence.
    prob = Problem(seed=6)
    pairs = prob.pairs()
    opt, orc = make("AltLoRA", pairs, prob, schedule="alternate", order="BA")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    for t in range(8):
        prob.set_grads(t, pairs)
        grads = prob.oracle_grads(t, orc)
        orc.lr = opt.param_groups[0]["lr"]
        opt.step()
        orc.step(grads)
        sched.step()
        compare_with_oracle(opt, pairs, orc, 1e-4, where=f"step {t}")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**8)


def test_hyperparameters_are_read_from_param_groups_every_step():
    prob = Problem(seed=6)
    pairs = prob.pairs()
    opt, orc = make("AltLoRAPlus", pairs, prob, schedule="sequential", order="BA")
    for t in range(6):
        if t == 3:
            opt.param_groups[0].update(betas=(0.5, 0.9), weight_decay=0.1, damping=1e-2, eps=1e-4)
            orc.beta1, orc.beta2, orc.weight_decay, orc.damping, orc.eps = 0.5, 0.9, 0.1, 1e-2, 1e-4
        prob.set_grads(t, pairs)
        grads = prob.oracle_grads(t, orc)
        opt.step()
        orc.step(grads)
        compare_with_oracle(opt, pairs, orc, 1e-4, where=f"step {t}")


def test_changing_factors_outside_the_optimizer_refreshes_the_grams():
    prob = Problem(seed=7)
    pairs = prob.pairs()
    opt = _opt("AltLoRA", pairs)
    for t in range(3):
        prob.set_grads(t, pairs)
        opt.step()
    with torch.no_grad():
        pairs[0].A.mul_(2.0)  # e.g. a user re-initializing or loading a layer
    prob.set_grads(3, pairs)
    opt.step()
    A = pairs[0].A.detach()
    torch.testing.assert_close(opt.state[pairs[0].A]["gram"], A @ A.T, rtol=1e-5, atol=1e-6)


def test_rewriting_identical_values_changes_nothing():
    prob = Problem(seed=7)
    runs = []
    for rewrite in (False, True):
        pairs = prob.pairs()
        opt = _opt("AltLoRA", pairs)
        for t in range(6):
            if rewrite and t == 3:
                with torch.no_grad():
                    for p in pairs:
                        p.A.copy_(p.A.clone())  # a checkpoint reload of the same weights
            prob.set_grads(t, pairs)
            opt.step()
        runs.append(_snapshot(pairs, opt))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
