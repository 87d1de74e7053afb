"""The public optimizers: :class:`AltLoRA` and :class:`AltLoRAPlus` (declared in ``variants.py``)."""

from __future__ import annotations

from typing import Tuple

from .base import AltLoRAOptimizerBase
from .options import DEFAULT_OTHER_LR
from .variants import ALTLORA, ALTLORA_PLUS

__all__ = ["AltLoRA", "AltLoRAPlus", "OPTIMIZERS", "DEFAULT_DAMPING", "DEFAULT_OTHER_LR"]

# λ of (G + λI). Small enough to leave a well-conditioned Gram's inverse unchanged to fp32
# precision, large enough to tame a nearly rank-deficient one; a singular Gram escalates it anyway
# (altlora_kernels/cholesky.py). 1e-6 was measured on the packaged MiniLM task (README, "Defaults").
DEFAULT_DAMPING = 1e-6

_OPTIONS_DOC = """
    Options (keyword-only, shared by every variant; ``altlora/options.py``):
        schedule: ``"alternate"`` (one phase per step), ``"sequential"`` (both, one after the
            other) or ``"joint"`` (both from the same start values). Default ``"alternate"``.
        order: ``"BA"`` (B first, default) or ``"AB"``.
        switch_every: steps between factor switches for ``"alternate"`` (default 1).
        backend: ``"auto"`` (default: per group of layers, the fastest backend that runs their
            dtype and device), ``"torch"``, ``"triton"`` or ``"native"``.
        nonfinite: ``"raise"`` (default): a NaN/Inf in any gradient the step was given (both
            factors, the other parameters) raises ``FloatingPointError`` before anything changes;
            ``"skip"``: the whole step is skipped on the device and counted in ``skipped_steps``.
        other_lr, other_betas, other_eps: AdamW settings of the non-LoRA parameters
            (default lr 1e-3; betas and eps: see the variant).
        freeze_inactive: set ``requires_grad=False`` on the factor the next step will not update,
            so that backward skips its weight gradient (``"alternate"`` only; default False).
"""


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
    Math and state are in ``promote_types(param.dtype, float32)``.

    Args:
        params: an ``nn.Module`` (its trainable LoRA pairs and, for AdamW, every other trainable
            parameter), an iterable of :class:`~altlora.LoRAPair`, or param-group dicts with
            ``"pairs"`` and/or ``"params"``.
        lr: η for the LoRA factors (required: its good value is on another scale than AdamW's).
        momentum: β1 (default 0.9).
        weight_decay: γ, for the LoRA factors and the AdamW group (default 0).
        damping: λ ≥ 0 (default 1e-6), escalated where ``G + λI`` does not factorize.
    """ + _OPTIONS_DOC + """
        The AdamW group's betas and eps default to (0.9, 0.999) and 1e-8.
    """

    variant = ALTLORA

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 damping: float = DEFAULT_DAMPING, **options):
        hparams = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(params, hparams, options)


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
        weight_decay, damping: as for :class:`AltLoRA`.
    """ + _OPTIONS_DOC + """
        The AdamW group's betas and eps default to ``betas`` and ``eps``.
    """

    variant = ALTLORA_PLUS

    def __init__(self, params, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, damping: float = DEFAULT_DAMPING, **options):
        hparams = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay, damping=damping)
        super().__init__(params, hparams, options)


#: The optimizers by the short name integrations use (``altlora.trainer``: ``variant="altloraplus"``).
OPTIMIZERS = {"altlora": AltLoRA, "altloraplus": AltLoRAPlus}
