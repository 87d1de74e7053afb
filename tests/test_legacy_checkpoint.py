"""state_dicts written before the optimizer-core redesign still load and resume exactly.

``fixtures/legacy_checkpoint.pt`` was written by ``fixtures/make_legacy_checkpoint.py`` with the
code of commit d49a9a6: for each configuration, the model and optimizer state after a few steps,
and the parameters and LoRA state after the next steps. Loading the old state into today's
optimizer and taking the same steps must reproduce them.
"""

import os

import pytest
import torch

import altlora
from problems import Problem

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_checkpoint.pt")
DATA = torch.load(FIXTURE, weights_only=True)


def _head_grad(t):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(4, 3, generator=gen)


@pytest.mark.parametrize("index", range(len(DATA["configs"])))
def test_legacy_state_dict_loads_and_resumes(index):
    variant, kw, before, after = DATA["configs"][index]
    run = DATA["runs"][index]
    prob = Problem([tuple(layer) for layer in DATA["layers"]], seed=11)
    pairs = prob.pairs()
    head = torch.nn.Parameter(torch.zeros(4, 3))
    with torch.no_grad():
        for p, (A, B) in zip(pairs, run["model"][:-1]):
            p.A.copy_(A)
            p.B.copy_(B)
        head.copy_(run["model"][-1])
    opt = getattr(altlora, variant)([{"pairs": pairs, "params": [head]}], backend="torch", other_lr=3e-3, **kw)
    opt.load_state_dict(run["optimizer"])
    for t in range(before, before + after):
        prob.set_grads(t, pairs)
        head.grad = _head_grad(t)
        opt.step()
    for p, (A, B) in zip(pairs, run["after"][:-1]):
        torch.testing.assert_close(p.A.detach(), A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.B.detach(), B, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.detach(), run["after"][-1], rtol=1e-6, atol=1e-7)
    tensors = [t for p in pairs for t in (p.A, p.B)]
    for t, want in zip(tensors, run["state_after"]):
        for key, value in want.items():
            torch.testing.assert_close(opt.state[t][key], value, rtol=1e-5, atol=1e-6, msg=f"state '{key}'")
