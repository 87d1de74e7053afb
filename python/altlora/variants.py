"""The optimizer variants, each one declaration: hyper-parameters, their checks, state keys, and
how a LoRA param group's values become the phase's inputs (:class:`~altlora_kernels.PhaseHyperParams`).

A variant changes only what a phase does with the scaled gradient ``g̃`` and the carried momentum
(the math is in ``altlora_kernels/phase_update.py``); everything else (schedules, groups, state
layout, checkpoints) is shared. Adding one: a :class:`Variant` here and a short public class in
``optimizers.py``; if its phase needs new arithmetic, the backends learn it from
``PhaseHyperParams`` (a backend that cannot run it must say so in its capability check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import altlora_kernels as K

from .checks import check_betas, check_real
from .state import CROSS_GRAM, GRAM, MOMENTUM, STEP, VARIANCE

__all__ = ["Variant", "ALTLORA", "ALTLORA_PLUS", "VARIANTS"]


@dataclass(frozen=True)
class Variant:
    """One optimizer variant.

    ``name``: recorded in checkpoints (a state saved by another variant is refused).
    ``hparams``: the keys of a LoRA param group this variant reads.
    ``check``: validates a group's values (``where`` names the group in the message).
    ``state_keys``: the per-factor state entries (besides ``snapshot``, which the schedule adds).
    ``phase_inputs``: a group's values as the phase's hyper-parameters.
    ``other_adamw``: the defaults the AdamW group of the other parameters takes from the LoRA
    hyper-parameters (``betas``, ``eps``) when the user gives none.
    """

    name: str
    hparams: Tuple[str, ...]
    check: Callable[[Dict[str, Any], str], None]
    state_keys: Tuple[str, ...]
    phase_inputs: Callable[[Dict[str, Any]], K.PhaseHyperParams]
    other_adamw: Callable[[Dict[str, Any]], Dict[str, Any]]

    @property
    def adaptive(self) -> bool:
        return VARIANCE in self.state_keys


def _check_altlora(group: Dict[str, Any], where: str) -> None:
    check_real("lr" + where, group["lr"])
    check_real("momentum" + where, group["momentum"], 0.0, 1.0)
    check_real("weight_decay" + where, group["weight_decay"])
    check_real("damping" + where, group["damping"])


def _floats(group: Dict[str, Any], *keys: str) -> Dict[str, float]:
    return {key: float(group[key]) for key in keys}


def _altlora_inputs(group: Dict[str, Any]) -> K.PhaseHyperParams:
    return K.PhaseHyperParams(beta1=float(group["momentum"]), **_floats(group, "lr", "weight_decay", "damping"))


ALTLORA = Variant(
    name="AltLoRA",
    hparams=("lr", "momentum", "weight_decay", "damping"),
    check=_check_altlora,
    state_keys=(MOMENTUM, STEP, GRAM, CROSS_GRAM),
    phase_inputs=_altlora_inputs,
    other_adamw=lambda hp: {"betas": (0.9, 0.999), "eps": 1e-8},
)


def _check_plus(group: Dict[str, Any], where: str) -> None:
    check_real("lr" + where, group["lr"])
    check_betas("betas" + where, group["betas"])
    check_real("eps" + where, group["eps"])
    check_real("weight_decay" + where, group["weight_decay"])
    check_real("damping" + where, group["damping"])


def _plus_inputs(group: Dict[str, Any]) -> K.PhaseHyperParams:
    beta1, beta2 = group["betas"]
    return K.PhaseHyperParams(beta1=float(beta1), beta2=float(beta2), adaptive=True,
                              **_floats(group, "lr", "eps", "weight_decay", "damping"))


ALTLORA_PLUS = Variant(
    name="AltLoRAPlus",
    hparams=("lr", "betas", "eps", "weight_decay", "damping"),
    check=_check_plus,
    state_keys=(MOMENTUM, VARIANCE, STEP, GRAM, CROSS_GRAM),
    phase_inputs=_plus_inputs,
    other_adamw=lambda hp: {"betas": tuple(hp["betas"]), "eps": hp["eps"]},
)

VARIANTS = {v.name: v for v in (ALTLORA, ALTLORA_PLUS)}
