"""The public optimizers: :class:`AltLoRA` and :class:`AltLoRAPlus`."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import altlora_kernels as K

from .base import AltLoRAOptimizerBase, _check_betas, _check_real

__all__ = ["AltLoRA", "AltLoRAPlus", "DEFAULT_DAMPING", "DEFAULT_OTHER_LR"]

# λ of (G + λI). Small enough to leave a well-conditioned Gram's inverse unchanged to fp32
# precision, large enough to tame a nearly rank-deficient one; a singular Gram escalates it anyway
# (altlora_kernels/cholesky.py). DESIGN.md §5 measured 1e-6 on the packaged MiniLM task.
DEFAULT_DAMPING = 1e-6

# AdamW learning rate of the non-LoRA trainable parameters (classifier heads, biases, DoRA
# magnitudes). AdamW normalizes per element, so its good lr does not follow AltLoRA's;
# 1e-3 is the head lr measured with AltLoRA+ on the packaged MiniLM task (DESIGN.md §5).
DEFAULT_OTHER_LR = 1e-3


class AltLoRA(AltLoRAOptimizerBase):
    r"""AltLoRA: alternating projected-gradient steps on LoRA factors, with momentum carried
    between subspaces (Yu, Wang, Chen, Xue, 2025).

    For a layer ``W = W0 + s·B·A`` (``A`` r×d, ``B`` k×r) a **B phase** is::

        P   = (A Aᵀ + λI)⁻¹                    Cholesky of the r×r Gram
        g̃   = (1/s²) · ∇B · P                   the best rank-r approximation of ∇W in row(A)
        M̃   = M_B · (A_prev Aᵀ) · P             momentum carried from row(A_prev) into row(A)
        M_B = β1·M̃ + (1−β1)·g̃
        B  ← B − η·(M_B + γ·B)

    and an **A phase** the mirror image: ``P = (BᵀB + λI)⁻¹``, ``g̃ = (1/s²)·P·∇A``,
    ``M̃ = P·(Bᵀ B_prev)·M_A``, ``A ← A − η·(M_A + γ·A)``. ``A_prev`` is A's value at the last
    B phase (and vice versa); only r×r products of it are kept, never a copy. With λ = γ = 0
    the product ``B·A`` does not depend on how it is factored (transformation invariance).

    Args:
        params: an ``nn.Module`` (its trainable LoRA pairs and, for AdamW, every other trainable
            parameter), an iterable of :class:`~altlora.LoRAPair`, or param-group dicts with
            ``"pairs"`` and/or ``"params"``.
        lr: η for the LoRA factors (required: its good value is on another scale than AdamW's).
        momentum: β1 (default 0.9).
        weight_decay: γ, for the LoRA factors and the AdamW group (default 0).
        damping: λ ≥ 0 (default 1e-6), escalated where ``G + λI`` does not factorize.
        schedule: ``"alternate"`` (one phase per step), ``"sequential"`` (both, one after the
            other) or ``"joint"`` (both from the same start values). Default ``"alternate"``.
        order: ``"BA"`` (B first, default) or ``"AB"``.
        switch_every: steps between factor switches for ``"alternate"`` (default 1).
        backend: ``"auto"`` (default), ``"torch"`` or ``"triton"``.
        nonfinite: ``"raise"`` (default): a NaN/Inf gradient raises ``FloatingPointError`` before
            anything changes; ``"skip"``: the step is skipped on the device and counted in
            ``skipped_steps``.
        other_lr, other_betas, other_eps: AdamW settings of the non-LoRA parameters
            (defaults 1e-3, (0.9, 0.999), 1e-8).
        freeze_inactive: set ``requires_grad=False`` on the factor the next step will not update,
            so that backward skips its weight gradient (``"alternate"`` only; default False).
    """

    _variant = "AltLoRA"
    _adaptive = False

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = DEFAULT_DAMPING,
        *,
        schedule: str = "alternate",
        order: str = "BA",
        switch_every: int = 1,
        backend: str = "auto",
        nonfinite: str = "raise",
        other_lr: float = DEFAULT_OTHER_LR,
        other_betas: Tuple[float, float] = (0.9, 0.999),
        other_eps: float = 1e-8,
        freeze_inactive: bool = False,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(
            params,
            defaults,
            other_lr=other_lr,
            other_betas=other_betas,
            other_eps=other_eps,
            schedule=schedule,
            order=order,
            switch_every=switch_every,
            backend=backend,
            nonfinite=nonfinite,
            freeze_inactive=freeze_inactive,
        )

    def _check_lora_hparams(self, group: Dict[str, Any], where: str) -> None:
        _check_real("lr" + where, group["lr"])
        _check_real("momentum" + where, group["momentum"], 0.0, 1.0)
        _check_real("weight_decay" + where, group["weight_decay"])
        _check_real("damping" + where, group["damping"])

    def _phase_hparams(self, group: Dict[str, Any]) -> K.PhaseHyperParams:
        return K.PhaseHyperParams(
            lr=float(group["lr"]),
            beta1=float(group["momentum"]),
            weight_decay=float(group["weight_decay"]),
            damping=float(group["damping"]),
        )


class AltLoRAPlus(AltLoRAOptimizerBase):
    r"""AltLoRA+: AltLoRA's scaled gradient and carried momentum with an Adam-style second moment.

    Each phase computes ``g̃`` and ``M`` as :class:`AltLoRA` does, then, for the factor X it updates::

        V  = β2·V + (1−β2)·g̃⊙g̃                 elementwise, not carried between subspaces
        n += 1                                   X's own update count
        X ← X − η·( (M/(1−β1ⁿ)) / (sqrt(V/(1−β2ⁿ)) + ε) + γ·X )

    The second moment makes it not transformation-invariant, unlike AltLoRA; its lr is on
    AdamW's scale.

    Args:
        params: as for :class:`AltLoRA`.
        lr: η (required).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε (default 1e-8).
        weight_decay, damping, schedule, order, switch_every, backend, nonfinite, other_lr,
        freeze_inactive: as for :class:`AltLoRA`. ``other_betas`` / ``other_eps`` default to
        ``betas`` / ``eps``.
    """

    _variant = "AltLoRAPlus"
    _adaptive = True

    def __init__(
        self,
        params,
        lr: float,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        damping: float = DEFAULT_DAMPING,
        *,
        schedule: str = "alternate",
        order: str = "BA",
        switch_every: int = 1,
        backend: str = "auto",
        nonfinite: str = "raise",
        other_lr: float = DEFAULT_OTHER_LR,
        other_betas: Tuple[float, float] = None,
        other_eps: float = None,
        freeze_inactive: bool = False,
    ):
        _check_betas("betas", betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, damping=damping)
        super().__init__(
            params,
            defaults,
            other_lr=other_lr,
            other_betas=tuple(betas) if other_betas is None else other_betas,
            other_eps=eps if other_eps is None else other_eps,
            schedule=schedule,
            order=order,
            switch_every=switch_every,
            backend=backend,
            nonfinite=nonfinite,
            freeze_inactive=freeze_inactive,
        )

    def _check_lora_hparams(self, group: Dict[str, Any], where: str) -> None:
        _check_real("lr" + where, group["lr"])
        _check_betas("betas" + where, group["betas"])
        _check_real("eps" + where, group["eps"])
        _check_real("weight_decay" + where, group["weight_decay"])
        _check_real("damping" + where, group["damping"])

    def _phase_hparams(self, group: Dict[str, Any]) -> K.PhaseHyperParams:
        beta1, beta2 = group["betas"]
        return K.PhaseHyperParams(
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            damping=float(group["damping"]),
            adaptive=True,
        )
