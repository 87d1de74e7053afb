"""The LoRA side of an optimizer's param groups: for each LoRA param group, its pair groups (same
shapes, dtype and device, stepped together), the backend each one runs on, and the coordinator
that formed them. Rebuilding them (a cast or moved model, ``load_state_dict``) happens here.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import altlora_kernels as K

from .coordinator import Coordinator, coordinator_for
from .deepspeed_guard import check_lora_params_in_place
from .pairs import LoRAPair
from .schedule import Schedule
from .state import FACTORS, PairGroup

__all__ = ["LoRAGroups"]


class LoRAGroups:
    def __init__(self, backend_name: str, schedule: Schedule, names: Dict[int, str]):
        self.backend_name = backend_name
        self.schedule = schedule
        self.names = names
        self.coordinator: Coordinator = Coordinator()
        self.by_index: Dict[int, List[PairGroup]] = {}
        # id()s of each LoRA group's factors, fixed at construction: the step checks that the group
        # still holds them (engines such as DeepSpeed ZeRO swap parameters under the optimizer).
        self._factor_ids: Dict[int, List[int]] = {}

    def __iter__(self) -> Iterator[PairGroup]:
        return (pg for index in sorted(self.by_index) for pg in self.by_index[index])

    def add(self, index: int, pairs: List[LoRAPair], params) -> None:
        self.coordinator = coordinator_for(pairs, self.coordinator)
        self.by_index[index] = self._formed(index, pairs)
        self._factor_ids[index] = [id(t) for t in params]

    def _formed(self, index: int, pairs: Sequence[LoRAPair]) -> List[PairGroup]:
        """Pair groups of ``pairs``, each with the backend that runs its dtype and device:
        ``auto``'s choice, or the named one, which must be able to (``RuntimeError`` naming the
        param group, the first layer, dtype, device and why)."""
        groups = self.coordinator.make_groups(pairs, self.schedule)
        for pg in groups:
            try:
                pg.backend = K.resolve_backend(self.backend_name, pg.device, pg.param_dtype)
            except RuntimeError as err:
                more = f" and {len(pg) - 1} more layer(s)" if len(pg) > 1 else ""
                dtype = str(pg.param_dtype).replace("torch.", "")
                raise RuntimeError(f"param_groups[{index}] ({pg.pairs[0].name or 'pair 0'}{more}: {dtype} on {pg.device}): {err}") from None
        return groups

    def pairs(self) -> List[LoRAPair]:
        return [pair for pg in self for pair in pg.pairs]

    def check_in_place(self, param_groups: List[dict]) -> None:
        for index, ids in self._factor_ids.items():
            # DeepSpeed ZeRO-1/2 (or accelerate's FSDP2 preparation) swap in other tensors.
            check_lora_params_in_place(index, param_groups[index]["params"], ids)

    def follow_moved(self, state, state_keys: Sequence[str]) -> None:
        """Rebuild the groups of a param group in which a factor has a new storage, dtype or device
        (``model.to(...)``, ``p.data = ...``) on the new tensors, its state converted (``state.py``)."""
        for index, old in self.by_index.items():
            if not any([pg.observe() for pg in old]):  # a list: every group observes
                continue
            blocked = next((pg for pg in old if not pg.rebuild_allowed), None)
            if blocked is not None:
                raise RuntimeError(
                    f"param_groups[{index}] ({blocked.pairs[0].name}): a LoRA factor changed dtype or device after the "
                    f"optimizer was built; with sharded (FSDP2) factors this cannot be followed mid-run. Cast or move "
                    f"the model first, then build the optimizer."
                )
            fresh = self._formed(index, [pair for pg in old for pair in pg.pairs])
            for pg in fresh:
                if all(state.get(p) for f in FACTORS for p in pg.params[f]):
                    pg.load(state, state_keys, self.names)
                    pg.carry_seen(old)
            self.by_index[index] = fresh

    def loaded(self, state, state_keys: Sequence[str]) -> Dict[int, List[PairGroup]]:
        """Fresh groups holding ``state`` (a loaded state_dict), so that a failure changes nothing."""
        rebuilt = {}
        for index, old in self.by_index.items():
            rebuilt[index] = self._formed(index, [pair for pg in old for pair in pg.pairs])
            for pg in rebuilt[index]:
                with_state = [bool(state.get(p)) for f in FACTORS for p in pg.params[f]]
                if all(with_state):
                    pg.load(state, state_keys, self.names)
                elif any(with_state):
                    raise ValueError(f"state_dict has state for only some factors of {pg.pairs[0].name} and its group")
        return rebuilt
