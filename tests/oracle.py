"""A plain, per-layer float64 transcription of docs/math.md: the oracle every backend is tested against.

Deliberately naive: it keeps explicit copies ``A_prev`` / ``B_prev`` of the factors instead of the
cross-Grams the optimizers keep, inverts with a Cholesky per layer, and loops over layers, so that
it shares no bookkeeping with the code under test. Only the damping-escalation constants are
imported (they are a numerical policy, not math).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from altlora_kernels.cholesky import ABSOLUTE_FLOOR, ESCALATION, PIVOT_FLOOR

F64 = torch.float64


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(G + λI)⁻¹, λ escalated along the ladder until G + λI is numerically PD (docs/math.md, "Damping escalation"), in float64."""
    r = gram.shape[0]
    eye = torch.eye(r, dtype=F64)
    mu = max(float(torch.trace(gram)) / r, 0.0)
    ladder = [damping] + [damping + rel * (max(mu, ABSOLUTE_FLOOR) if i == len(ESCALATION) - 1 else mu) for i, rel in enumerate(ESCALATION)]
    for i, lam in enumerate(ladder):
        L, info = torch.linalg.cholesky_ex(gram + lam * eye)
        numerically_pd = int(info) == 0 and float(torch.diagonal(L).square().min()) >= PIVOT_FLOOR * mu
        if numerically_pd or i == len(ladder) - 1:
            return torch.cholesky_inverse(L)


@dataclass
class OracleLayer:
    A: torch.Tensor
    B: torch.Tensor
    s: float
    M_A: torch.Tensor = None
    M_B: torch.Tensor = None
    V_A: torch.Tensor = None
    V_B: torch.Tensor = None
    n_A: int = 0
    n_B: int = 0
    A_prev: torch.Tensor = None  # A at the last B phase (what M_B is aligned to)
    B_prev: torch.Tensor = None  # B at the last A phase (what M_A is aligned to)

    def __post_init__(self):
        self.A = self.A.to(F64).clone()
        self.B = self.B.to(F64).clone()
        self.M_A = torch.zeros_like(self.A)
        self.M_B = torch.zeros_like(self.B)
        self.V_A = torch.zeros_like(self.A)
        self.V_B = torch.zeros_like(self.B)
        self.A_prev = self.A.clone()
        self.B_prev = self.B.clone()


@dataclass
class Oracle:
    layers: List[OracleLayer]
    lr: float
    beta1: float
    weight_decay: float
    damping: float
    adaptive: bool = False
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "alternate"
    order: str = "BA"
    switch_every: int = 1
    param_dtype: Optional[torch.dtype] = None  # emulate storage rounding (e.g. bfloat16)
    t: int = 0
    history: list = field(default_factory=list)

    def phases(self):
        if self.schedule == "alternate":
            return [self.order[(self.t // self.switch_every) % 2]]
        return [self.order[0], self.order[1]]

    def _round(self, x):
        return x if self.param_dtype is None else x.to(self.param_dtype).to(F64)

    def _direction(self, M, V, g, n):
        if not self.adaptive:
            return M, V
        V = self.beta2 * V + (1 - self.beta2) * g * g
        m_hat = M / (1 - self.beta1**n)
        v_hat = V / (1 - self.beta2**n)
        return m_hat / (v_hat.sqrt() + self.eps), V

    def b_phase(self, lay: OracleLayer, gB: torch.Tensor, A_now: torch.Tensor):
        P = damped_inverse(A_now @ A_now.T, self.damping)
        g = gB @ P / lay.s**2
        M_tilde = lay.M_B @ (lay.A_prev @ A_now.T) @ P
        lay.M_B = self.beta1 * M_tilde + (1 - self.beta1) * g
        lay.n_B += 1
        d, lay.V_B = self._direction(lay.M_B, lay.V_B, g, lay.n_B)
        new_B = self._round(lay.B - self.lr * (d + self.weight_decay * lay.B))
        lay.A_prev = A_now.clone()
        return new_B

    def a_phase(self, lay: OracleLayer, gA: torch.Tensor, B_now: torch.Tensor):
        P = damped_inverse(B_now.T @ B_now, self.damping)
        g = P @ gA / lay.s**2
        M_tilde = P @ (B_now.T @ lay.B_prev) @ lay.M_A
        lay.M_A = self.beta1 * M_tilde + (1 - self.beta1) * g
        lay.n_A += 1
        d, lay.V_A = self._direction(lay.M_A, lay.V_A, g, lay.n_A)
        new_A = self._round(lay.A - self.lr * (d + self.weight_decay * lay.A))
        lay.B_prev = B_now.clone()
        return new_A

    def step(self, grads):
        """``grads``: per layer ``(∇A, ∇B)`` computed at the values at the start of the step."""
        phases = self.phases()
        for lay, (gA, gB) in zip(self.layers, grads):
            gA, gB = gA.to(F64), gB.to(F64)
            if self.schedule == "joint":
                A0, B0 = lay.A, lay.B
                new_B = self.b_phase(lay, gB, A0)
                new_A = self.a_phase(lay, gA, B0)
                lay.A, lay.B = new_A, new_B
                continue
            for f in phases:
                if f == "B":
                    lay.B = self.b_phase(lay, gB, lay.A)
                else:
                    lay.A = self.a_phase(lay, gA, lay.B)
        self.t += 1
