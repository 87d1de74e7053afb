"""Which factor(s) a ``step()`` updates: the ``schedule`` / ``order`` / ``switch_every`` options.

* ``"alternate"`` (Algorithm 1): each step is one phase; the factor flips every ``switch_every``
  steps, starting with ``order[0]``. One backward per phase.
* ``"sequential"``: both phases in one step, ``order[0]`` first; the second phase uses the factor
  the first has just written, both gradients come from the same backward.
* ``"joint"``: both phases from the values at the start of the step (scaled GD / Riemannian-
  preconditioned LoRA); ``order`` does not change the result.

A schedule answers every question the optimizer asks about it (which phases a step runs, whether
the second phase reads start-of-step values, where a run of phases of one factor starts and
ends); nothing outside this module looks at a schedule's name. Adding one is a subclass of
:class:`Schedule` here plus its entry in ``_KINDS``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

__all__ = ["SCHEDULES", "ORDERS", "Schedule", "make_schedule"]

ORDERS = ("BA", "AB")


class Schedule:
    """Base class: the answers of a schedule that updates both factors at every step."""

    name = ""

    def __init__(self, order: str = "BA", switch_every: int = 1):
        if order not in ORDERS:
            raise ValueError(f"Invalid order: {order!r} (expected 'BA' or 'AB')")
        if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
            raise ValueError(f"Invalid switch_every: {switch_every!r} (expected an integer >= 1)")
        if switch_every != 1 and not self.takes_switch_every:
            raise ValueError(f"switch_every={switch_every} only applies to schedule='alternate'")
        self.order = order
        self.switch_every = switch_every

    takes_switch_every = False
    #: The second phase of a step reads the other factor's values from the start of the step.
    reads_start_values = False

    @property
    def kind(self) -> str:
        return self.name

    def phases(self, step: int) -> Tuple[str, ...]:
        """Factors updated by step number ``step`` (0-based), in order."""
        return (self.order[0], self.order[1])

    def active_factor(self, step: int) -> str:
        return "".join(sorted(self.phases(step)))

    @property
    def one_factor_per_step(self) -> bool:
        """Each step updates one factor (so the other one needs no gradient: ``freeze_inactive``)."""
        return False

    @property
    def has_runs(self) -> bool:
        """Several consecutive phases of one factor: a snapshot of it is kept during the run."""
        return False

    def starts_run(self, step: int) -> bool:
        return False

    def ends_run(self, step: int) -> bool:
        return False

    def factor_in_run(self, step: int) -> Optional[str]:
        """The factor whose run step ``step`` continues (its snapshot is live), else None."""
        return None

    def describe(self) -> Dict[str, object]:
        """What a checkpoint records to refuse a state saved with another schedule."""
        return {"schedule": self.name, "order": self.order, "switch_every": self.switch_every}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order!r}, switch_every={self.switch_every})"


class Alternate(Schedule):
    name = "alternate"
    takes_switch_every = True

    def phases(self, step: int) -> Tuple[str, ...]:
        return (self.order[(step // self.switch_every) % 2],)

    @property
    def one_factor_per_step(self) -> bool:
        return True

    @property
    def has_runs(self) -> bool:
        return self.switch_every > 1

    def starts_run(self, step: int) -> bool:
        return self.has_runs and step % self.switch_every == 0

    def ends_run(self, step: int) -> bool:
        return self.has_runs and step % self.switch_every == self.switch_every - 1

    def factor_in_run(self, step: int) -> Optional[str]:
        if self.has_runs and step % self.switch_every != 0:
            return self.phases(step)[0]
        return None


class Sequential(Schedule):
    name = "sequential"


class Joint(Schedule):
    name = "joint"
    reads_start_values = True


_KINDS: Dict[str, Type[Schedule]] = {cls.name: cls for cls in (Alternate, Sequential, Joint)}

#: The schedule names, for argument parsers and tests.
SCHEDULES = tuple(_KINDS)


def make_schedule(name: str, order: str = "BA", switch_every: int = 1) -> Schedule:
    if name not in _KINDS:
        raise ValueError(f"Invalid schedule: {name!r} (expected one of {', '.join(SCHEDULES)})")
    return _KINDS[name](order, switch_every)
