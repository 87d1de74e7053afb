"""The compute layer's small ops: damped Cholesky, the non-finite flag, AdamW."""

import pytest
import torch

from altlora_kernels import adamw_step, damped_cholesky, nonfinite_flag
from altlora_kernels.cholesky import ABSOLUTE_FLOOR, ESCALATION


def _reconstruct(L):
    return L @ L.mT


def test_damped_cholesky_keeps_requested_damping_when_positive_definite():
    X = torch.randn(4, 5, 9, dtype=torch.float32)
    G = X @ X.mT
    L = damped_cholesky(G, 1e-3)
    torch.testing.assert_close(_reconstruct(L), G + 1e-3 * torch.eye(5), rtol=1e-5, atol=1e-5)


def test_damped_cholesky_escalates_per_matrix():
    good = torch.diag(torch.tensor([2.0, 1.0, 3.0]))
    zero = torch.zeros(3, 3)
    nearly_singular = torch.diag(torch.tensor([1.0, 1.0, 1e-9]))  # factorizes, but not usefully in fp32
    u = torch.tensor([[1.0], [2.0], [-1.0]])
    rank_one = u @ u.T
    G = torch.stack([good, zero, nearly_singular, rank_one])
    L = damped_cholesky(G, 0.0)
    assert torch.isfinite(L).all()
    R = _reconstruct(L)
    torch.testing.assert_close(R[0], good)  # untouched
    torch.testing.assert_close(R[1], ABSOLUTE_FLOOR * torch.eye(3), rtol=1e-4, atol=0)  # last rung: floor
    mu = 2.0 / 3.0 + 1e-9 / 3
    torch.testing.assert_close(R[2], nearly_singular + ESCALATION[0] * mu * torch.eye(3), rtol=1e-5, atol=1e-7)
    mu1 = float(torch.trace(rank_one)) / 3
    torch.testing.assert_close(R[3], rank_one + ESCALATION[0] * mu1 * torch.eye(3), rtol=1e-5, atol=1e-5)


def test_damped_cholesky_sync_free_path_picks_the_same_rungs():
    # Off the CPU every rung is factored at once without a host check; same choice per matrix.
    u = torch.randn(6, 4, 1)
    G = torch.cat([u @ u.mT, torch.eye(4).expand(2, 4, 4), torch.zeros(1, 4, 4)])
    for damping in (0.0, 1e-3):
        checked = damped_cholesky(G, damping, host_check=True)
        free = damped_cholesky(G, damping, host_check=False)
        assert torch.equal(checked, free)


def test_nonfinite_flag():
    ts = [torch.randn(3, 4), torch.randn(5).bfloat16(), torch.randn(2, 2)]
    assert float(nonfinite_flag(ts)) == 0.0
    big = torch.full((4,), 3e38).bfloat16()  # finite, would overflow a 2-norm
    assert float(nonfinite_flag(ts + [big])) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(7)
        t[3] = bad
        assert float(nonfinite_flag(ts + [t])) == 1.0
    assert nonfinite_flag([]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_step_equals_torch_adamw(dtype):
    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (2, 3, 4)]
    ref = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    ours = [p.detach().clone() for p in ref]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    n = [torch.zeros((), dtype=torch.float32) for _ in ours]
    for _ in range(5):
        grads = [torch.randn(s).to(dtype) for s in shapes]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        adamw_step(ours, grads, m, v, n, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.detach(), **tol)
    assert [float(x) for x in n] == [5.0, 5.0, 5.0]


def test_adamw_step_skips_on_found_inf_without_touching_anything():
    ps = [torch.randn(4, 3)]
    before = ps[0].clone()
    m, v, n = [torch.zeros(4, 3)], [torch.zeros(4, 3)], [torch.zeros(())]
    adamw_step(ps, [torch.randn(4, 3)], m, v, n, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
               found_inf=torch.tensor(1.0))
    assert torch.equal(ps[0], before) and not m[0].any() and not v[0].any() and float(n[0]) == 0.0
