"""Small synthetic LoRA problems with closed-form gradients, and the runs that compare a backend with the oracle.

Each layer has ``W = s·B·A`` and the loss ``½‖W − T‖² + ⟨N_t, W⟩`` with a fixed target T and a
fresh seeded noise N_t every step, so ``∇W = W − T + N_t``, ``∇A = s·Bᵀ∇W``, ``∇B = s·∇W·Aᵀ``.
Both the optimizer under test and the oracle compute their gradients from their own current
values, so the comparison covers whole trajectories, not single updates.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Sequence, Tuple

import torch

import altlora
from oracle import Oracle, OracleLayer

# (r, d, k, alpha): odd shapes, r ∈ {1, 3, 8}, one shape twice so that a group holds two layers.
ODD_LAYERS = [(3, 7, 5, 6.0), (1, 9, 11, 2.0), (8, 13, 17, 16.0), (3, 7, 5, 12.0)]
# For the Triton interpreter, which runs every program in Python: r ∈ {1, 3}.
SMALL_LAYERS = [(3, 7, 5, 6.0), (1, 9, 11, 2.0)]

# The oracle matrix: variant × schedule × order, and switch_every 3 for "alternate".
CASES = [
    (variant, schedule, order, switch_every)
    for variant, schedule, order in itertools.product(("AltLoRA", "AltLoRAPlus"), ("alternate", "sequential", "joint"), ("BA", "AB"))
    for switch_every in ((1, 3) if schedule == "alternate" else (1,))
]

# Steps of one oracle run: long enough for several A and B phases with switch_every = 3 and for
# momentum carried through several subspace changes.
STEPS = 24


def layers_for(backend: str, *, with_rank_8: bool = False):
    """``ODD_LAYERS``, or for the interpreter (triton on CPU) ``SMALL_LAYERS`` (plus an r = 8 layer if asked)."""
    if backend != "triton":
        return ODD_LAYERS
    return SMALL_LAYERS + [(8, 13, 17, 16.0)] if with_rank_8 else SMALL_LAYERS


class Problem:
    def __init__(self, layers: Sequence[Tuple[int, int, int, float]] = ODD_LAYERS, seed: int = 0,
                 zero_B: bool = False, b_scale: float = 0.5, dtype: torch.dtype = torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.init: List[Tuple[torch.Tensor, torch.Tensor, float]] = []
        self.targets: List[torch.Tensor] = []
        for r, d, k, alpha in layers:
            A = torch.randn(r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
            B = torch.zeros(k, r, dtype=torch.float64) if zero_B else b_scale * torch.randn(k, r, generator=gen, dtype=torch.float64)
            self.init.append((A, B, alpha / r))
            self.targets.append(torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(d))
        self.dtype = dtype

    def pairs(self) -> List[altlora.LoRAPair]:
        out = []
        for i, (A, B, s) in enumerate(self.init):
            a = torch.nn.Parameter(A.to(self.dtype).clone())
            b = torch.nn.Parameter(B.to(self.dtype).clone())
            out.append(altlora.LoRAPair(a, b, s, name=f"layer{i}"))
        return out

    def oracle(self, **kw) -> Oracle:
        layers = [OracleLayer(A.to(self.dtype).to(torch.float64), B.to(self.dtype).to(torch.float64), s) for A, B, s in self.init]
        return Oracle(layers, **kw)

    def noise(self, t: int, i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1_000_003 * self.seed + 7919 * t + i)
        T = self.targets[i]
        return 0.3 * torch.randn(T.shape, generator=gen, dtype=torch.float64) / math.sqrt(T.shape[1])

    def grads(self, t: int, i: int, A: torch.Tensor, B: torch.Tensor, s: float):
        """(∇A, ∇B) at (A, B), in the dtype of A."""
        dtype = torch.float32 if A.dtype in (torch.bfloat16, torch.float16) else A.dtype
        A_, B_ = A.to(dtype), B.to(dtype)
        gW = s * B_ @ A_ - self.targets[i].to(dtype) + self.noise(t, i).to(dtype)
        return s * B_.T @ gW, s * gW @ A_.T

    def loss(self, i: int, A: torch.Tensor, B: torch.Tensor, s: float) -> float:
        W = s * B.double() @ A.double()
        return 0.5 * float(((W - self.targets[i]) ** 2).sum())

    def set_grads(self, t: int, pairs: Sequence[altlora.LoRAPair]) -> None:
        for i, p in enumerate(pairs):
            gA, gB = self.grads(t, i, p.A.detach(), p.B.detach(), p.scaling)
            p.A.grad = gA.to(p.A.dtype)
            p.B.grad = gB.to(p.B.dtype)

    def oracle_grads(self, t: int, oracle: Oracle):
        return [self.grads(t, i, lay.A, lay.B, lay.s) for i, lay in enumerate(oracle.layers)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30)) if ref.norm() > 1e-12 else float((x - ref).norm())


def compare_with_oracle(opt, pairs, oracle: Oracle, tol: float, where: str = "", moment_tol: float = None) -> None:
    """Parameters and every state entry of every pair against the oracle (moments with ``moment_tol``)."""
    moment_tol = tol if moment_tol is None else moment_tol
    for p, lay in zip(pairs, oracle.layers):
        st_A, st_B = opt.state[p.A], opt.state[p.B]
        checks = [
            ("A", p.A, lay.A),
            ("B", p.B, lay.B),
            ("M_A", st_A["momentum"], lay.M_A),
            ("M_B", st_B["momentum"], lay.M_B),
            ("gram_A", st_A["gram"], lay.A @ lay.A.T),
            ("gram_B", st_B["gram"], lay.B.T @ lay.B),
            ("cross_A = A·A_prevᵀ", st_A["cross_gram"], lay.A @ lay.A_prev.T),
            ("cross_B = Bᵀ·B_prev", st_B["cross_gram"], lay.B.T @ lay.B_prev),
        ]
        if oracle.adaptive:
            checks += [("V_A", st_A["variance"], lay.V_A), ("V_B", st_B["variance"], lay.V_B)]
        for label, got, want in checks:
            err = rel_err(got, want)
            limit = moment_tol if label[:2] in ("M_", "V_") else tol
            assert err <= limit, f"{where} {p.name} {label}: relative error {err:.2e} > {limit:.0e}"
        assert float(st_A["step"]) == lay.n_A, f"{where} {p.name} n_A {float(st_A['step'])} != {lay.n_A}"
        assert float(st_B["step"]) == lay.n_B, f"{where} {p.name} n_B {float(st_B['step'])} != {lay.n_B}"


def make(variant, pairs, prob, *, schedule, order, switch_every=1, lr=None, weight_decay=0.01, damping=1e-3,
         backend="torch", param_dtype=None, **extra):
    """``(optimizer, oracle)`` with the same hyper-parameters (AltLoRA: lr 0.05, β1 0.9; AltLoRA+: lr 0.01, β 0.9/0.99)."""
    if variant == "AltLoRA":
        lr = 0.05 if lr is None else lr
        opt = altlora.AltLoRA(pairs, lr=lr, momentum=0.9, weight_decay=weight_decay, damping=damping,
                              schedule=schedule, order=order, switch_every=switch_every, backend=backend, **extra)
        orc = prob.oracle(lr=lr, beta1=0.9, weight_decay=weight_decay, damping=damping, schedule=schedule,
                          order=order, switch_every=switch_every, param_dtype=param_dtype)
    else:
        lr = 0.01 if lr is None else lr
        opt = altlora.AltLoRAPlus(pairs, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, damping=damping,
                                  schedule=schedule, order=order, switch_every=switch_every, backend=backend, **extra)
        orc = prob.oracle(lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, adaptive=True, weight_decay=weight_decay,
                          damping=damping, schedule=schedule, order=order, switch_every=switch_every, param_dtype=param_dtype)
    return opt, orc


def run_against_oracle(variant, schedule, order, switch_every, *, seed=0, steps=STEPS, tol=1e-4, layers=ODD_LAYERS, **kw):
    """Train ``steps`` steps beside the oracle, comparing parameters and state after every step."""
    prob = Problem(layers, seed=seed, dtype=kw.pop("dtype", torch.float32))
    pairs = prob.pairs()
    opt, orc = make(variant, pairs, prob, schedule=schedule, order=order, switch_every=switch_every, **kw)
    for t in range(steps):
        prob.set_grads(t, pairs)
        grads = prob.oracle_grads(t, orc)
        opt.step()
        orc.step(grads)
        compare_with_oracle(opt, pairs, orc, tol, where=f"step {t}")
    return prob, pairs, opt, orc


def rank_one_B_problem(seed: int = 3) -> Problem:
    """Two layers whose B has rank 1 < r: BᵀB is singular, so λ = 0 must be escalated."""
    prob = Problem([(3, 7, 5, 6.0), (8, 13, 17, 16.0)], seed=seed)
    for i, (A, B, s) in enumerate(prob.init):
        gen = torch.Generator().manual_seed(i)
        u = torch.randn(B.shape[0], 1, generator=gen, dtype=torch.float64)
        v = torch.randn(1, B.shape[1], generator=gen, dtype=torch.float64)
        prob.init[i] = (A, u @ v, s)
    return prob


def params_and_state(pairs, opt) -> List[torch.Tensor]:
    """Copies of every factor and every state tensor, in a fixed order."""
    out = []
    for p in pairs:
        out += [p.A.detach().clone(), p.B.detach().clone()]
        for t in (p.A, p.B):
            out += [v.clone() for v in opt.state[t].values()]
    return out
