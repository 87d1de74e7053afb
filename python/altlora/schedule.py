"""Which factor(s) a ``step()`` updates: the ``schedule`` / ``order`` / ``switch_every`` options.

* ``"alternate"`` (Algorithm 1): each step is one phase; the factor flips every ``switch_every``
  steps, starting with ``order[0]``. One backward per phase.
* ``"sequential"``: both phases in one step, ``order[0]`` first; the second phase uses the factor
  the first has just written, both gradients come from the same backward.
* ``"joint"``: both phases from the values at the start of the step (scaled GD / Riemannian-
  preconditioned LoRA); ``order`` does not change the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

__all__ = ["SCHEDULES", "ORDERS", "Schedule"]

SCHEDULES = ("alternate", "sequential", "joint")
ORDERS = ("BA", "AB")


@dataclass(frozen=True)
class Schedule:
    kind: str = "alternate"
    order: str = "BA"
    switch_every: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {self.kind!r} (expected one of {', '.join(SCHEDULES)})")
        if self.order not in ORDERS:
            raise ValueError(f"Invalid order: {self.order!r} (expected 'BA' or 'AB')")
        if isinstance(self.switch_every, bool) or not isinstance(self.switch_every, int) or self.switch_every < 1:
            raise ValueError(f"Invalid switch_every: {self.switch_every!r} (expected an integer >= 1)")
        if self.switch_every != 1 and self.kind != "alternate":
            raise ValueError(f"switch_every={self.switch_every} only applies to schedule='alternate'")

    def phases(self, step: int) -> Tuple[str, ...]:
        """Factors updated by step number ``step`` (0-based), in order."""
        if self.kind == "alternate":
            return (self.order[(step // self.switch_every) % 2],)
        return (self.order[0], self.order[1])

    def active_factor(self, step: int) -> str:
        return "".join(sorted(self.phases(step)))

    def starts_run(self, step: int) -> bool:
        """First of several consecutive phases of the same factor: its value must be snapshotted."""
        return self.kind == "alternate" and self.switch_every > 1 and step % self.switch_every == 0

    def ends_run(self, step: int) -> bool:
        return self.kind == "alternate" and self.switch_every > 1 and step % self.switch_every == self.switch_every - 1
