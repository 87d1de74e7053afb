"""The options every variant shares (schedule, backend, non-finite policy, the AdamW group), as one
typed dataclass validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

import altlora_kernels as K

from .checks import check_betas, check_choice, check_real
from .schedule import Schedule, make_schedule

__all__ = ["NONFINITE_MODES", "DEFAULT_OTHER_LR", "Options", "option_names"]

NONFINITE_MODES = ("raise", "skip")

# AdamW learning rate of the non-LoRA trainable parameters (classifier heads, biases, DoRA
# magnitudes). AdamW normalizes per element, so its good lr does not follow AltLoRA's;
# 1e-3 is the head lr measured with AltLoRA+ on the packaged MiniLM task (README, "Defaults").
DEFAULT_OTHER_LR = 1e-3


@dataclass
class Options:
    """``schedule``/``order``/``switch_every``: see :mod:`altlora.schedule`. ``backend``: ``"auto"``
    or a backend name of ``altlora_kernels``. ``nonfinite``: ``"raise"`` or ``"skip"``.
    ``other_lr``/``other_betas``/``other_eps``: AdamW of the non-LoRA parameters (betas and eps
    default to the variant's choice). ``freeze_inactive``: ``requires_grad=False`` on the factor the
    next step does not update (one-factor-per-step schedules only)."""

    schedule: str = "alternate"
    order: str = "BA"
    switch_every: int = 1
    backend: str = "auto"
    nonfinite: str = "raise"
    other_lr: float = DEFAULT_OTHER_LR
    other_betas: Optional[Tuple[float, float]] = None
    other_eps: Optional[float] = None
    freeze_inactive: bool = False
    plan: Schedule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.plan = make_schedule(self.schedule, self.order, self.switch_every)
        check_choice("backend", self.backend, K.BACKENDS)
        check_choice("nonfinite", self.nonfinite, NONFINITE_MODES)
        if not isinstance(self.freeze_inactive, bool):
            raise ValueError(f"Invalid freeze_inactive: {self.freeze_inactive!r} (expected True or False)")
        if self.freeze_inactive and not self.plan.one_factor_per_step:
            raise ValueError(
                f"freeze_inactive=True needs schedule='alternate': schedule={self.schedule!r} uses both gradients every step"
            )
        self.other_lr = check_real("other_lr", self.other_lr)
        if self.other_betas is not None:
            self.other_betas = check_betas("other_betas", self.other_betas)
        if self.other_eps is not None:
            self.other_eps = check_real("other_eps", self.other_eps)

    def adamw_defaults(self, variant_choice: Dict[str, Any]) -> Dict[str, Any]:
        """lr / betas / eps of an AdamW group: the user's, else the variant's (``variant_choice``)."""
        return {
            "lr": self.other_lr,
            "betas": tuple(variant_choice["betas"]) if self.other_betas is None else self.other_betas,
            "eps": variant_choice["eps"] if self.other_eps is None else self.other_eps,
        }


def option_names() -> Tuple[str, ...]:
    return tuple(f.name for f in fields(Options) if f.init)
