"""Optimizer state of the LoRA factors: key names, the precision rule, and the stacked per-shape buffers.

Per factor X (A or B) of every pair, ``optimizer.state[X]`` holds:

* ``momentum``   M, the first moment of the scaled gradient, aligned to the other factor's value
                 at X's last phase; shaped like X.
* ``variance``   V (AltLoRA+ only), second moment of the scaled gradient; never reprojected.
* ``step``       n, the number of updates of X (bias correction of AltLoRA+), a scalar.
* ``gram``       the r×r Gram of X's current value: ``A·Aᵀ`` or ``Bᵀ·B``.
* ``cross_gram`` the r×r ``X_cur·X_prevᵀ`` in row form (``A·A_prevᵀ``, ``Bᵀ·B_prev``), X_prev being
                 X's value at the other factor's last phase: the other factor's phase carries its
                 momentum into the new subspace with it (Theorem 2), so no copy of X is kept.
* ``snapshot``   X's value at the start of its current run, only while a run of several
                 consecutive phases of X is in progress (``schedule="alternate"``,
                 ``switch_every > 1``): then X_prev is no longer the value before the last write.

**Precision.** Every entry but ``snapshot`` (kept in the parameter's dtype) is in
:func:`state_dtype` of the parameter, ``torch.promote_types(param.dtype, torch.float32)``: float32
for float32, bfloat16 and float16 parameters, float64 for float64 ones. The phase math runs in
that dtype too.

The tensors are views into one stacked buffer per (pair group, factor, key) so that a phase
works on all same-shaped layers with batched ops; ``state_dict`` / ``load_state_dict`` see
ordinary per-parameter tensors.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import altlora_kernels as K

from .pairs import LoRAPair

__all__ = [
    "MOMENTUM", "VARIANCE", "STEP", "GRAM", "CROSS_GRAM", "SNAPSHOT", "FACTORS", "PARAM_SHAPED",
    "state_dtype", "rows", "PairGroup", "group_pairs", "refresh_grams",
]

MOMENTUM = "momentum"
VARIANCE = "variance"
STEP = "step"
GRAM = "gram"
CROSS_GRAM = "cross_gram"
SNAPSHOT = "snapshot"
FACTORS = ("A", "B")

# Keys whose per-parameter view has the parameter's own shape (the rest are (r, r) or scalars).
PARAM_SHAPED = (MOMENTUM, VARIANCE, SNAPSHOT)


# Unbound readers for the per-step tracking of every factor (faster through map() than attribute
# lookups in a comprehension).
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer math and state for parameters of ``param_dtype``."""
    return torch.promote_types(param_dtype, torch.float32)


def rows(matrix: torch.Tensor, factor: str) -> torch.Tensor:
    """A factor's matrix (or a stack of them) in row form: ``A`` itself, ``Bᵀ`` for B."""
    return matrix.mT if factor == "B" else matrix


class PairGroup:
    """Pairs of one param group whose factors share shapes, dtypes and device, and their state."""

    #: Whether the optimizer may rebuild this group when a parameter gets a new dtype or device.
    rebuild_allowed = True

    def __init__(self, pairs: Sequence[LoRAPair]):
        self.pairs: List[LoRAPair] = list(pairs)
        mats = [self._matrices_of(p) for p in self.pairs]
        self.matrices: Dict[str, List[torch.Tensor]] = {"A": [m[0] for m in mats], "B": [m[1] for m in mats]}
        self.params: Dict[str, List[torch.Tensor]] = {"A": [p.A for p in self.pairs], "B": [p.B for p in self.pairs]}
        self._flat = self.params["A"] + self.params["B"]  # FACTORS × pair order
        self._matrix_shaped = all(p.dim() == 2 for p in self._flat)
        self.rank = self.pairs[0].rank
        self.device = self.pairs[0].A.device
        self.param_dtype = self.pairs[0].A.dtype
        self.dtype = state_dtype(torch.promote_types(self.pairs[0].A.dtype, self.pairs[0].B.dtype))
        self.inv_scale_sq = torch.tensor(
            [1.0 / (p.scaling * p.scaling) for p in self.pairs], dtype=self.dtype, device=self.device
        )
        self.buffers: Dict[str, Dict[str, torch.Tensor]] = {"A": {}, "B": {}}
        self.identity = self.current_identity()
        self.backend = "torch"  # the concrete backend that runs this group's phases (set by the optimizer)
        # What _tracked() gave for every factor (FACTORS × pair order) after our last write, and at
        # this step's observe(); _seen None = trust the state.
        self._seen = None
        self._now = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def matrix_shaped(self) -> bool:
        """Every factor is 2-D: its gradient is the matrix a phase works on."""
        return self._matrix_shaped

    # Hooks for sharded parameters (altlora.distributed overrides them): the matrices a phase
    # works on, the per-parameter view of a state buffer, a saved state value as a buffer row,
    # and what tells that a parameter was written outside the optimizer.
    def _matrices_of(self, pair: LoRAPair):
        return pair.matrices()

    def _expose(self, factor: str, i: int, key: str, row: torch.Tensor) -> torch.Tensor:
        p = self.params[factor][i]
        return row.view(p.shape) if key in PARAM_SHAPED else row

    def _from_saved(self, factor: str, i: int, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    @staticmethod
    def _tracked(p: torch.Tensor):
        return p._version, p.data_ptr()

    def _tracked_all(self, params: Sequence[torch.Tensor]) -> List:
        # _tracked over every factor, twice a step: map/zip instead of a comprehension (about half
        # the time: ~8 µs for 128 factors).
        return list(zip(map(_VERSION, params), map(_DATA_PTR, params)))

    def current_identity(self) -> List:
        """What tells that the views are stale: every factor's storage. (A new dtype or device is a
        new storage; the old one cannot be reused meanwhile, since our views keep it alive.)"""
        return [p.data_ptr() for p in self._flat]

    def observe(self) -> bool:
        """Look at every factor, once per step, before anything else: True when one has a new
        storage (the views are stale: rebuild). What it saw is what :meth:`modified_flags`
        compares with our last write."""
        pointers = list(map(_DATA_PTR, self._flat))
        self._now = list(zip(map(_VERSION, self._flat), pointers))  # _tracked_all, sharing the pointers
        return pointers != self.identity

    def grad_matrices(self, factor: str) -> List[Optional[torch.Tensor]]:
        """The gradients of ``factor``'s layers shaped like the matrices a phase works on (None
        where a layer has none)."""
        if self._matrix_shaped:  # 2-D factors: their gradients are the matrices already
            return [p.grad for p in self.params[factor]]
        return [None if (g := p.grad) is None else self.grad_matrix(factor, i, g) for i, p in enumerate(self.params[factor])]

    def grad_matrix(self, factor: str, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of ``params[factor][i]`` shaped like the matrix a phase works on."""
        return grad.reshape(self.matrices[factor][i].shape)

    @property
    def initialized(self) -> bool:
        return bool(self.buffers["A"])

    def gram_of_current(self, factor: str) -> torch.Tensor:
        x = rows(torch.stack(self.matrices[factor]).to(self.dtype), factor)
        return torch.bmm(x, x.mT)

    def initialize(self, state_keys: Sequence[str], state) -> None:
        """Fresh state: zero moments, counters at 0, Grams of the current values, X_prev = X."""
        L = len(self)
        for factor in FACTORS:
            shape = (L,) + tuple(self.matrices[factor][0].shape)
            gram = self.gram_of_current(factor)
            fresh = {
                MOMENTUM: lambda: torch.zeros(shape, dtype=self.dtype, device=self.device),
                VARIANCE: lambda: torch.zeros(shape, dtype=self.dtype, device=self.device),
                STEP: lambda: torch.zeros(L, dtype=self.dtype, device=self.device),
                GRAM: lambda: gram,
                CROSS_GRAM: lambda: gram.clone(),
            }
            self.buffers[factor] = {key: fresh[key]() for key in state_keys}
        self.bind(state)

    def bind(self, state) -> None:
        """Point ``state[param][key]`` at this group's buffers."""
        for factor in FACTORS:
            for i, p in enumerate(self.params[factor]):
                entry = state[p]
                entry.clear()
                for key, buf in self.buffers[factor].items():
                    entry[key] = self._expose(factor, i, key, buf[i])

    def load(self, state, state_keys: Sequence[str], names: Dict[int, str]) -> None:
        """Rebuild the buffers from per-parameter state (``load_state_dict``, or a cast or move of
        the parameters), converted to this group's device and dtypes; every value must be finite."""
        r = self.rank
        for factor in FACTORS:
            mats = self.matrices[factor]
            params = self.params[factor]
            keys = list(state_keys) + ([SNAPSHOT] if SNAPSHOT in state[params[0]] else [])
            buf = {}
            for key in keys:
                stacked = []
                for i, (p, m) in enumerate(zip(params, mats)):
                    name = names.get(id(p), "a LoRA factor")
                    if key not in state[p]:
                        raise ValueError(f"state_dict has no '{key}' for {name}: it was saved by another optimizer or model")
                    t = state[p][key]
                    if not isinstance(t, torch.Tensor):
                        t = torch.as_tensor(t)
                    want = tuple(p.shape) if key in PARAM_SHAPED else (() if key == STEP else (r, r))
                    if tuple(t.shape) != want:
                        raise ValueError(
                            f"state_dict does not match the model: '{key}' of {name} has shape "
                            f"{tuple(t.shape)}, expected {want}"
                        )
                    t = self._from_saved(factor, i, key, t)
                    if not bool(torch.isfinite(t).all()):
                        raise ValueError(f"state_dict holds a NaN or Inf in '{key}' of {name}; it cannot be resumed from")
                    t = t.to(device=self.device, dtype=p.dtype if key == SNAPSHOT else self.dtype)
                    stacked.append(t.reshape(m.shape) if key in PARAM_SHAPED else t)
                buf[key] = torch.stack(stacked)
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

    def activate_snapshot(self, factor: Optional[str], state) -> None:
        """After a load: ``factor`` is in the middle of a run (its snapshot is live), or None."""

    def record_seen(self) -> None:
        self._seen = self._tracked_all(self._flat)

    def tracked(self) -> Optional[Tuple[List[torch.Tensor], List[int], List[int]]]:
        """``(factors, storage addresses, versions)`` as of our last write, every factor in
        FACTORS × pair order, for a step plan (``step_plan.py``) that takes over the tracking; None
        when not known (nothing written yet, or a factor has a new storage since)."""
        if self._seen is None or [ptr for _, ptr in self._seen] != self.identity:
            return None
        return list(self._flat), list(self.identity), [version for version, _ in self._seen]

    def adopt_seen(self, versions: Sequence[int]) -> None:
        """The versions of our last write, as a step plan recorded them (storage unchanged)."""
        self._seen = list(zip(versions, self.identity))

    def carry_seen(self, old: Sequence["PairGroup"]) -> None:
        """After a rebuild on new tensors: a factor with its old dtype and device (only the storage
        is new) keeps what was tracked, so the next refresh compares values; one cast or moved is
        taken as it is, its state converted (as a save, cast and load would do)."""
        before = {}
        for pg in old:
            for position, (p, m) in enumerate(zip(pg._flat, pg.matrices["A"] + pg.matrices["B"])):
                # m is still the old tensor
                before[id(p)] = ((m.dtype, m.device), None if pg._seen is None else pg._seen[position])
        self._seen = []
        for p in self._flat:
            where, seen = before.get(id(p), (None, None))
            self._seen.append(seen if seen is not None and where == (p.dtype, p.device) else self._tracked(p))
        self._now = self._tracked_all(self._flat)

    def modified_flags(self) -> List[bool]:
        """Per (factor, layer), in FACTORS × pair order: was it written outside the optimizer since
        our last write? (As seen by this step's :meth:`observe`.)"""
        if self._seen is None or self._now == self._seen:  # the usual case, compared in C
            return [False] * (2 * len(self))
        return [now != seen for now, seen in zip(self._now, self._seen)]

    def phase_input(self, factor: str, grads: List[torch.Tensor], other: Optional[tuple] = None) -> K.FactorGroup:
        """The compute layer's view of one phase of ``factor``; ``other`` replaces the other
        factor's (Gram, cross-Gram) by start-of-step copies."""
        own, theirs = self.buffers[factor], self.buffers["A" if factor == "B" else "B"]
        other_gram, other_cross = other if other is not None else (theirs[GRAM], theirs[CROSS_GRAM])
        return K.FactorGroup(
            params=self.matrices[factor],
            grads=grads,
            transposed=factor == "B",
            momentum=own[MOMENTUM],
            variance=own.get(VARIANCE),
            step=own[STEP],
            gram=own[GRAM],
            cross=own[CROSS_GRAM],
            other_gram=other_gram,
            other_cross=other_cross,
            inv_scale_sq=self.inv_scale_sq,
            snapshot=own.get(SNAPSHOT),
        )


def group_pairs(pairs: Sequence[LoRAPair]) -> List[PairGroup]:
    """Split pairs into groups of equal factor shapes, dtypes and device, in first-seen order."""
    buckets: Dict[tuple, List[LoRAPair]] = {}
    for pair in pairs:
        A, B = pair.matrices()
        key = (tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device)
        buckets.setdefault(key, []).append(pair)
    return [PairGroup(group) for group in buckets.values()]


# How far (in units of the Gram's dtype epsilon, relative to its largest entry) a recomputed Gram
# may differ from the cached one and still be taken as the Gram of unchanged values: products of
# r ≤ 128 terms summed in another order differ by far less; a real write moves it by far more.
_SAME_VALUES_ULPS = 64

Reduce = Callable[[List[Tuple[PairGroup, str, int, torch.Tensor]]], None]


def refresh_grams(changed: Sequence[Tuple[PairGroup, List[bool]]], reduce: Optional[Reduce] = None) -> None:
    """Recompute the cached Gram of every factor written outside the optimizer since our last write.

    ``changed``: per group, its :meth:`PairGroup.modified_flags`. ``reduce`` (sharded factors) sums
    the partial Grams of a rank's columns over the ranks, in place. If the values really changed,
    the cross-Gram restarts at the new Gram: the momentum of the other factor is taken as aligned
    to the new value. A write of identical values (a reload of the same weights) changes nothing.
    (One host sync per factor flagged, which only a write outside the optimizer causes.)
    """
    refreshed = []
    for pg, flags in changed:
        if not any(flags):
            continue
        for position, flag in enumerate(flags):
            if flag:
                f, i = FACTORS[position // len(pg)], position % len(pg)
                x = rows(pg.matrices[f][i].to(pg.dtype), f)
                refreshed.append((pg, f, i, x @ x.mT))
    if reduce is not None and refreshed:
        reduce(refreshed)
    for pg, f, i, gram in refreshed:
        buf = pg.buffers[f]
        # NOTE: the cached Gram came from the backend's own products, which round differently
        # from this one: a difference within a few ulps of the Gram is the same values.
        noise = _SAME_VALUES_ULPS * torch.finfo(gram.dtype).eps * buf[GRAM][i].abs().max()
        if bool(((gram - buf[GRAM][i]).abs().max() > noise)):
            buf[GRAM][i].copy_(gram)
            buf[CROSS_GRAM][i].copy_(gram)
