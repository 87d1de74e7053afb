"""Optimizer state of the LoRA factors: key names and the stacked per-shape buffers.

Per factor X (A or B) of every pair, ``optimizer.state[X]`` holds:

* ``momentum``   M, the first moment of the scaled gradient, aligned to the other factor's value
                 at X's last phase; shaped like X, float32.
* ``variance``   V (AltLoRA+ only), second moment of the scaled gradient; never reprojected.
* ``step``       n, the number of updates of X (bias correction of AltLoRA+), float32 scalar.
* ``gram``       the r×r Gram of X's current value: ``A·Aᵀ`` or ``Bᵀ·B``.
* ``cross_gram`` the r×r ``X_cur·X_prevᵀ`` in row form (``A·A_prevᵀ``, ``Bᵀ·B_prev``), X_prev being
                 X's value at the other factor's last phase: the other factor's phase carries its
                 momentum into the new subspace with it (Theorem 2), so no copy of X is kept.
* ``snapshot``   X's value at the start of its current run, only while a run of several
                 consecutive phases of X is in progress (``schedule="alternate"``,
                 ``switch_every > 1``): then X_prev is no longer the value before the last write.

The tensors are views into one stacked buffer per (pair group, factor, key) so that a phase
works on all same-shaped layers with batched ops; ``state_dict`` / ``load_state_dict`` see
ordinary per-parameter tensors.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .pairs import LoRAPair

__all__ = ["MOMENTUM", "VARIANCE", "STEP", "GRAM", "CROSS_GRAM", "SNAPSHOT", "FACTORS", "PairGroup", "group_pairs"]

MOMENTUM = "momentum"
VARIANCE = "variance"
STEP = "step"
GRAM = "gram"
CROSS_GRAM = "cross_gram"
SNAPSHOT = "snapshot"
FACTORS = ("A", "B")

# Keys whose per-parameter view has the parameter's own shape (the rest are (r, r) or scalars).
_PARAM_SHAPED = (MOMENTUM, VARIANCE, SNAPSHOT)


def _rows(stacked: torch.Tensor, factor: str) -> torch.Tensor:
    return stacked.mT if factor == "B" else stacked


class PairGroup:
    """Pairs of one param group whose factors share shapes, dtypes and device, and their state."""

    def __init__(self, pairs: Sequence[LoRAPair]):
        self.pairs: List[LoRAPair] = list(pairs)
        mats = [self._matrices_of(p) for p in self.pairs]
        self.matrices: Dict[str, List[torch.Tensor]] = {"A": [m[0] for m in mats], "B": [m[1] for m in mats]}
        self.params: Dict[str, List[torch.Tensor]] = {"A": [p.A for p in self.pairs], "B": [p.B for p in self.pairs]}
        self.rank = self.pairs[0].rank
        self.device = self.pairs[0].A.device
        self.inv_scale_sq = torch.tensor(
            [1.0 / (p.scaling * p.scaling) for p in self.pairs], dtype=torch.float32, device=self.device
        )
        self.buffers: Dict[str, Dict[str, torch.Tensor]] = {"A": {}, "B": {}}
        # (_version, data_ptr) of every parameter after our last write; None = trust the state.
        self._seen = None

    def __len__(self) -> int:
        return len(self.pairs)

    # Hooks for sharded parameters (altlora.distributed overrides them): the matrices a phase
    # works on, the per-parameter view of a state buffer, and a saved state value as a buffer row.
    def _matrices_of(self, pair: LoRAPair):
        return pair.matrices()

    def _expose(self, factor: str, i: int, key: str, row: torch.Tensor) -> torch.Tensor:
        p = self.params[factor][i]
        return row.view(p.shape) if key in _PARAM_SHAPED else row

    def _from_saved(self, factor: str, i: int, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def grad_matrix(self, factor: str, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of ``params[factor][i]`` shaped like the matrix a phase works on."""
        return grad.reshape(self.matrices[factor][i].shape)

    @property
    def initialized(self) -> bool:
        return bool(self.buffers["A"])

    def gram_of_current(self, factor: str) -> torch.Tensor:
        rows = _rows(torch.stack(self.matrices[factor]).float(), factor)
        return torch.bmm(rows, rows.mT)

    def initialize(self, adaptive: bool, state) -> None:
        """Fresh state: zero moments, counters at 0, Grams of the current values, X_prev = X."""
        L = len(self)
        for factor in FACTORS:
            shape = (L,) + tuple(self.matrices[factor][0].shape)
            gram = self.gram_of_current(factor)
            buf = {
                MOMENTUM: torch.zeros(shape, dtype=torch.float32, device=self.device),
                STEP: torch.zeros(L, dtype=torch.float32, device=self.device),
                GRAM: gram,
                CROSS_GRAM: gram.clone(),
            }
            if adaptive:
                buf[VARIANCE] = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.buffers[factor] = buf
        self.bind(state)

    def bind(self, state) -> None:
        """Point ``state[param][key]`` at this group's buffers."""
        for factor in FACTORS:
            for i, p in enumerate(self.params[factor]):
                entry = state[p]
                entry.clear()
                for key, buf in self.buffers[factor].items():
                    entry[key] = self._expose(factor, i, key, buf[i])

    def load(self, state, adaptive: bool, names: Dict[int, str]) -> None:
        """Rebuild the buffers from per-parameter state (after ``load_state_dict``)."""
        required = [MOMENTUM, STEP, GRAM, CROSS_GRAM] + ([VARIANCE] if adaptive else [])
        r = self.rank
        for factor in FACTORS:
            mats = self.matrices[factor]
            params = self.params[factor]
            has_snapshot = SNAPSHOT in state[params[0]]
            keys = required + ([SNAPSHOT] if has_snapshot else [])
            buf = {}
            for key in keys:
                rows = []
                for i, (p, m) in enumerate(zip(params, mats)):
                    name = names.get(id(p), "a LoRA factor")
                    if key not in state[p]:
                        raise ValueError(f"state_dict has no '{key}' for {name}: it was saved by another optimizer or model")
                    t = state[p][key]
                    if key in _PARAM_SHAPED:
                        want, dtype = tuple(p.shape), (p.dtype if key == SNAPSHOT else torch.float32)
                    elif key == STEP:
                        want, dtype = (), torch.float32
                    else:
                        want, dtype = (r, r), torch.float32
                    if tuple(t.shape) != want:
                        raise ValueError(
                            f"state_dict does not match the model: '{key}' of {name} has shape "
                            f"{tuple(t.shape)}, expected {want}"
                        )
                    t = self._from_saved(factor, i, key, t).to(device=self.device, dtype=dtype)
                    rows.append(t.reshape(m.shape) if key in _PARAM_SHAPED else t)
                buf[key] = torch.stack(rows)
            self.buffers[factor] = buf
        self.bind(state)
        self._seen = None

    def take_snapshot(self, factor: str, state) -> None:
        self.buffers[factor][SNAPSHOT] = torch.stack(self.matrices[factor])
        self.bind(state)

    def drop_snapshot(self, factor: str, state) -> None:
        if self.buffers[factor].pop(SNAPSHOT, None) is not None:
            for p in self.params[factor]:
                state[p].pop(SNAPSHOT, None)

    def record_seen(self) -> None:
        self._seen = {f: [(p._version, p.data_ptr()) for p in self.params[f]] for f in FACTORS}

    def refresh_modified(self) -> None:
        """Recompute the cached Gram of any factor changed outside the optimizer since our last write.

        If the values really changed, the cross-Gram restarts at the new Gram: the momentum of
        the other factor is taken as aligned to the new value. A write of identical values (a
        checkpoint reload of the same weights) changes nothing.
        """
        if self._seen is None:
            return
        for factor in FACTORS:
            for i, p in enumerate(self.params[factor]):
                if (p._version, p.data_ptr()) == self._seen[factor][i]:
                    continue
                # `p.data = ...` replaces the storage: re-take the matrix view first.
                self.matrices[factor][i] = p.view(self.matrices[factor][i].shape)
                rows = self.matrices[factor][i].float()
                rows = rows.mT if factor == "B" else rows
                gram = rows @ rows.mT
                buf = self.buffers[factor]
                if not torch.equal(gram, buf[GRAM][i]):
                    buf[GRAM][i].copy_(gram)
                    buf[CROSS_GRAM][i].copy_(gram)


def group_pairs(pairs: Sequence[LoRAPair]) -> List[PairGroup]:
    """Split pairs into groups of equal factor shapes, dtypes and device, in first-seen order."""
    buckets: Dict[tuple, List[LoRAPair]] = {}
    for pair in pairs:
        A, B = pair.matrices()
        key = (tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device)
        buckets.setdefault(key, []).append(pair)
    return [PairGroup(group) for group in buckets.values()]
