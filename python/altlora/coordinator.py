"""The seam between the optimizer's step and how its parameters are distributed.

The step (``base.py``) calls the same coordinator methods whatever the parallelism; the
coordinator decides what each of them means. :class:`Coordinator` is the local one: every
parameter is a whole tensor in this process, nothing is communicated (DDP needs nothing more:
its gradients arrive averaged). ``altlora.distributed.FSDP2Coordinator`` is the one for FSDP2's
DTensor factors. A new parallelism is a new subclass; the step does not change.

A step's LoRA *work* is a list of ``(group_index, pair_group, grads)`` with ``grads[factor]`` the
2-D gradients of that factor's layers (None where a layer got none).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .pairs import LoRAPair
from .schedule import Schedule
from .state import PairGroup, group_pairs, refresh_grams

__all__ = ["Coordinator", "coordinator_for"]


class Coordinator:
    """No communication: one process (or DDP)."""

    def make_groups(self, pairs: Sequence[LoRAPair], schedule: Schedule) -> List[PairGroup]:
        """The pair groups (same shapes, dtypes, device) of one LoRA param group."""
        return group_pairs(pairs)

    def check_step(self, freeze_inactive: bool) -> None:
        # Measured (tests/test_ddp.py): with DDP built first, a frozen factor makes DDP fail with
        # "Expected to have finished reduction"; with the optimizer built first, DDP's buckets
        # miss the factor frozen at that time and the ranks silently drift apart.
        if freeze_inactive and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"freeze_inactive=True cannot be used with {dist.get_world_size()} processes: "
                f"DistributedDataParallel (and FSDP) expect the set of parameters with gradients to stay the "
                f"same from step to step. Use freeze_inactive=False (the default)."
            )

    def local(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The part of ``t`` this process steps element-wise (AdamW, the non-finite check)."""
        return t

    def local_all(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        return tensors

    def gather(self, work) -> None:
        """Make every factor and gradient of ``work`` whole where the phase needs it."""

    def agree(self, work, found_inf: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], List[List[bool]]]:
        """The non-finite flag and, per work item, which factors were written outside the
        optimizer (:meth:`PairGroup.modified_flags`), as every process must see them."""
        return found_inf, [pg.modified_flags() for _, pg, _ in work]

    def refresh(self, work, modified: List[List[bool]], state_keys: Sequence[str], state) -> None:
        """Fresh state for new groups; Grams of factors written outside the optimizer recomputed."""
        changed = []
        for (_, pg, _), flags in zip(work, modified):
            if pg.initialized:
                changed.append((pg, flags))
            else:
                pg.initialize(state_keys, state)
        refresh_grams(changed)

    def phase(self, work, factor: str, found_inf: Optional[torch.Tensor], run: Callable[[], None]) -> None:
        """Run one phase (``run``) of ``factor`` over ``work``, with whatever must surround it."""
        run()


def coordinator_for(pairs: Sequence[LoRAPair], current: Coordinator) -> Coordinator:
    """The coordinator an optimizer needs once it holds ``pairs`` too (FSDP2 for DTensor factors)."""
    from . import distributed  # noqa: PLC0415 - it imports this module

    if distributed.has_dtensor(pairs) and not isinstance(current, distributed.FSDP2Coordinator):
        return distributed.FSDP2Coordinator()
    return current
