"""AltLoRA / AltLoRA+ on FSDP2 (``torch.distributed.fsdp.fully_shard``), whose parameters are DTensors.

In row form (``altlora_kernels/phase_update.py``) a factor is an ``r × n`` matrix X: ``A`` itself or
``Bᵀ``. Every operation of a phase (P·∇X, P·C·M, the moments, the update) acts on each column of
X separately; only the r×r Grams ``X Xᵀ`` and cross-Grams ``X X_refᵀ`` are sums over columns. So
each factor is handled according to how it is split across ranks (its *layout*):

``columns``  X is split along n: ``lora_A`` sharded on a dim ≥ 1 (see :func:`lora_shard_placement_fn`),
             ``lora_B`` on dim 0 (FSDP's default). The phase runs on the local columns with the
             ordinary backends; the Grams it writes are partial sums that are all-reduced (SUM),
             **one collective per phase for all layers**. Momentum, variance and snapshot are
             sharded like the parameter.
``rows``     X is split along r: ``lora_A`` with FSDP's default ``Shard(0)`` (r may be smaller than
             the world size, so a rank can hold no row at all). The factor (and its gradient, on
             its phase) is all-gathered, **one collective per step for all such factors**; every
             rank runs the phase on the full factor with full (replicated) state, O(r·n) like the
             factor itself, and writes back its own rows. No Gram needs a reduction then.
``full``     a plain tensor or a DTensor replicated on every mesh dimension.

Every rank must issue the same collectives in the same order. The pair groups are formed from
global shapes and layouts (identical on all ranks, even with uneven shards), buffers are packed
in the optimizer's pair order, and everything that could differ between ranks is agreed on first:
one all-reduce (MAX) per step carries the non-finite-gradient flag (a NaN may sit in one rank's
shard only) and the "changed outside the optimizer" flags of every factor; the Grams of changed
factors are then recomputed and reduced together.

Checkpoints (``torch.distributed.checkpoint``, with ``get_optimizer_state_dict`` /
``set_optimizer_state_dict``): in ``optimizer.state`` the parameter-shaped entries are DTensors
with the parameter's placements (``columns``) or replicated (``rows``), built as views of the
optimizer's buffers; r×r matrices and counters are plain tensors, equal on every rank.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .coordinator import Coordinator
from .pairs import LoRAPair, find_lora_pairs
from .schedule import Schedule
from .state import CROSS_GRAM, FACTORS, GRAM, PARAM_SHAPED, SNAPSHOT, PairGroup, group_pairs, refresh_grams

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # a torch build without distributed support: no DTensor can reach us
    dist = None
    DTensor = None

__all__ = [
    "lora_shard_placement_fn",
    "is_dtensor",
    "local_tensor",
    "has_dtensor",
    "ShardedPairGroup",
    "FSDP2Coordinator",
    "group_sharded_pairs",
    "COLUMNS",
    "ROWS",
    "FULL",
]

COLUMNS = "columns"
ROWS = "rows"
FULL = "full"

# Where r lies in a factor's 2-D matrix: A is (r, n), B is (k, r).
_RANK_DIM = {"A": 0, "B": 1}


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's part of ``t`` (the tensor itself when it is not a DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def has_dtensor(pairs: Sequence[LoRAPair]) -> bool:
    return any(is_dtensor(p.A) or is_dtensor(p.B) for p in pairs)


# ---------------------------------------------------------------------------------------------
# The placement helper


def lora_shard_placement_fn(model: nn.Module, mesh) -> Callable[[nn.Parameter], Optional["Shard"]]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every ``lora_A`` on its columns.

    ``fully_shard(module, mesh=mesh, shard_placement_fn=lora_shard_placement_fn(model, mesh))``.
    Build it **before** the first ``fully_shard`` call (it recognizes the factors by identity).
    ``lora_A`` (r, d, ...) gets ``Shard(1)`` (or the first dim ≥ 1 FSDP can split evenly: FSDP
    requires a non-zero shard dim to divide by the shard group size); when no dim divides, and for
    every other parameter, it returns None: FSDP's default ``Shard(0)``, which altlora also
    handles (the ``rows`` layout, module docstring). ``lora_B`` is already column-sharded by that
    default. ``mesh`` is the mesh given to ``fully_shard`` (its last dimension shards) or the
    shard group size as an int.
    """
    if isinstance(mesh, bool) or not (isinstance(mesh, int) or hasattr(mesh, "size")):
        raise ValueError(f"Invalid mesh: {mesh!r} (expected the DeviceMesh given to fully_shard, or its shard size)")
    shard_size = mesh if isinstance(mesh, int) else mesh.size(mesh.ndim - 1)
    if shard_size < 1:
        raise ValueError(f"Invalid mesh: shard size {shard_size} (expected >= 1)")
    lora_A = {id(pair.A) for pair in find_lora_pairs(model)}
    if not lora_A:
        raise ValueError("lora_shard_placement_fn: the model has no LoRA layers (no lora_A / lora_B found)")

    def placement(param: nn.Parameter):
        if id(param) not in lora_A:
            return None
        for dim in range(1, param.dim()):
            if param.shape[dim] % shard_size == 0:
                return Shard(dim)
        return None

    return placement


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class FactorLayout:
    """How one factor is split: ``kind`` (COLUMNS / ROWS / FULL) and, when split, over which mesh dim."""

    kind: str
    mesh: object = None
    mesh_dim: Optional[int] = None
    placements: tuple = ()

    @property
    def group_key(self):
        return (self.mesh, self.mesh_dim)

    def process_group(self):
        return self.mesh.get_group(self.mesh_dim)


def factor_layout(param: torch.Tensor, factor: str, name: str) -> FactorLayout:
    """The layout of ``param`` (``factor`` "A" or "B"); ValueError naming it if altlora cannot handle it."""
    if not is_dtensor(param):
        return FactorLayout(FULL)
    placements = tuple(param.placements)
    shard_dims = []
    for mesh_dim, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            continue
        if type(pl) is not Shard:
            raise ValueError(
                f"{name} has placement {pl} on mesh dim {mesh_dim}; altlora handles DTensor factors that "
                f"are replicated or split with Shard(dim) on one mesh dimension (FSDP2), not {type(pl).__name__}"
            )
        shard_dims.append(mesh_dim)
    if not shard_dims:
        return FactorLayout(FULL, param.device_mesh, None, placements)
    if len(shard_dims) > 1:
        raise ValueError(
            f"{name} is sharded on {len(shard_dims)} mesh dimensions {placements}; altlora supports one "
            f"sharded mesh dimension (FSDP2 / HSDP), not tensor parallelism on top of it"
        )
    mesh_dim = shard_dims[0]
    dim = placements[mesh_dim].dim % param.dim()
    if dim == _RANK_DIM[factor]:
        kind = ROWS
    elif factor == "A" or dim == 0:
        kind = COLUMNS
    else:
        raise ValueError(
            f"{name} is sharded on dim {dim} of shape {tuple(param.shape)}; lora_B can be sharded on "
            f"dim 0 (its rows) or dim 1 (its rank), not on a trailing size-1 dim"
        )
    return FactorLayout(kind, param.device_mesh, mesh_dim, placements)


def _matrix(local: torch.Tensor, factor: str) -> torch.Tensor:
    """2-D view of a factor's local tensor: (r_local, n_local) for A, (k_local, r_local) for B."""
    if factor == "A":
        return local.view(local.shape[0], math.prod(local.shape[1:]))
    return local.view(local.shape[0], local.shape[1])


def _full_matrix_shape(pair: LoRAPair, factor: str) -> Tuple[int, int]:
    return (pair.rank, pair.in_features) if factor == "A" else (pair.out_features, pair.rank)


def _chunk_sizes(size: int, world: int) -> List[int]:
    """Rows each rank holds of a dim of ``size`` split over ``world``: DTensor's / FSDP's torch.chunk rule."""
    sizes = [len(c) for c in torch.arange(size).chunk(world)]
    return sizes + [0] * (world - len(sizes))


# ---------------------------------------------------------------------------------------------
# Pair groups


class ShardedPairGroup(PairGroup):
    """A :class:`~altlora.state.PairGroup` whose factors may be DTensors.

    ``matrices`` are the tensors a phase works on: views of the local shards (``columns``,
    ``full``), or full factors gathered at every step (``rows``; written back after the phase).

    ``snapshot_slots`` (``switch_every > 1``): ``torch.distributed.checkpoint`` loads into the
    structure of a freshly initialized optimizer, so the set of state keys must not depend on the
    step. Both factors then always have a ``snapshot`` entry; it is used only while a run of
    that factor is in progress (``activate_snapshot`` after a load says which one is).
    """

    def __init__(self, pairs: Sequence[LoRAPair], snapshot_slots: bool = False):
        pairs = list(pairs)
        self.snapshot_slots = snapshot_slots
        self._slots: Dict[str, torch.Tensor] = {}
        self.layouts: Dict[str, List[FactorLayout]] = {
            f: [factor_layout(getattr(p, f), f, p.factor_name(f)) for p in pairs] for f in FACTORS
        }
        self._index = {id(p): i for i, p in enumerate(pairs)}
        super().__init__(pairs)
        self.rebuild_allowed = False  # ranks would have to agree on it mid-run: build the optimizer after casting
        self._matrix_shaped = False  # gradients are DTensors: grad_matrix takes the local part
        # All factors of one kind in a group share a layout (the grouping key includes it).
        self.kind = {f: self.layouts[f][0].kind for f in FACTORS}

    def _matrices_of(self, pair: LoRAPair):
        i = self._index[id(pair)]
        out = []
        for f in FACTORS:
            param = getattr(pair, f)
            if self.layouts[f][i].kind == ROWS:
                # Placeholder until the first gather; its shape is what the state is built from.
                out.append(torch.zeros(_full_matrix_shape(pair, f), dtype=param.dtype, device=param.device))
            else:
                out.append(_matrix(local_tensor(param), f))
        return tuple(out)

    # -- snapshots in fixed slots (see the class docstring)
    def initialize(self, state_keys, state) -> None:
        if self.snapshot_slots:
            self._slots = {f: torch.zeros_like(torch.stack(self.matrices[f])) for f in FACTORS}
        super().initialize(state_keys, state)

    def bind(self, state) -> None:
        super().bind(state)
        for f, slot in self._slots.items():
            if SNAPSHOT not in self.buffers[f]:
                for i, p in enumerate(self.params[f]):
                    state[p][SNAPSHOT] = self._expose(f, i, SNAPSHOT, slot[i])

    def take_snapshot(self, factor: str, state) -> None:
        if factor not in self._slots:
            return super().take_snapshot(factor, state)
        self._slots[factor].copy_(torch.stack(self.matrices[factor]))
        self.buffers[factor][SNAPSHOT] = self._slots[factor]
        self.bind(state)

    def drop_snapshot(self, factor: str, state) -> None:
        if factor not in self._slots:
            return super().drop_snapshot(factor, state)
        self.buffers[factor].pop(SNAPSHOT, None)  # the slot stays in the state, unused

    def load(self, state, state_keys, names: Dict[int, str]) -> None:
        super().load(state, state_keys, names)
        if self.snapshot_slots:
            self._slots = {}
            for f in FACTORS:
                slot = self.buffers[f].pop(SNAPSHOT, None)
                self._slots[f] = torch.zeros_like(torch.stack(self.matrices[f])) if slot is None else slot
            self.bind(state)

    def activate_snapshot(self, factor: Optional[str], state) -> None:
        """After a load: ``factor`` is in the middle of a run (its snapshot is live), or None."""
        if factor is not None and factor in self._slots:
            self.buffers[factor][SNAPSHOT] = self._slots[factor]
            self.bind(state)

    def refresh_views(self) -> None:
        """Re-take the local views: FSDP may swap a shard's tensor (lazy init, ``load_state_dict``)."""
        for f in FACTORS:
            if self.kind[f] != ROWS:
                self.matrices[f] = [_matrix(local_tensor(p), f) for p in self.params[f]]

    def grad_matrix(self, factor: str, i: int, grad: torch.Tensor) -> torch.Tensor:
        return _matrix(local_tensor(grad), factor)

    def _expose(self, factor: str, i: int, key: str, row: torch.Tensor) -> torch.Tensor:
        p = self.params[factor][i]
        if key not in PARAM_SHAPED or not is_dtensor(p):
            return super()._expose(factor, i, key, row)
        if self.kind[factor] == ROWS:
            placements = [Replicate()] * p.device_mesh.ndim
            view = row.view(p.shape)
        else:
            placements = p.placements
            view = row.view(local_tensor(p).shape)
        return DTensor.from_local(view, p.device_mesh, placements, run_check=False, shape=p.shape, stride=p.stride())

    def _from_saved(self, factor: str, i: int, key: str, value: torch.Tensor) -> torch.Tensor:
        p = self.params[factor][i]
        if key not in PARAM_SHAPED or self.kind[factor] != COLUMNS:
            return value.full_tensor() if is_dtensor(value) else value
        if is_dtensor(value):
            if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
                value = value.redistribute(p.device_mesh, p.placements)
            return value.to_local()
        try:  # a full tensor (same on every rank): keep this rank's part without communication
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
        except TypeError:  # torch without src_data_rank
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements).to_local()

    # -- "modified outside the optimizer", decided together with the other ranks (FSDP2Coordinator.agree)
    @staticmethod
    def _tracked(p: torch.Tensor):
        # An in-place op on the DTensor bumps the DTensor's version only (the op on its local
        # tensor runs below autograd); our own writes go to the local tensor. Track both.
        local = local_tensor(p)
        return p._version, local._version, local.data_ptr()

    def _tracked_all(self, params):
        return [self._tracked(p) for p in params]

    def observe(self) -> bool:
        self._now = self._tracked_all(self._flat)
        return self.current_identity() != self.identity

    def current_identity(self):
        # FSDP swaps a shard's local tensor by itself (lazy init, load_state_dict): refresh_views
        # follows that. A new dtype or device of the DTensor is what cannot be followed here.
        return [(p.dtype, p.device) for p in self._flat]


def group_sharded_pairs(pairs: Sequence[LoRAPair], snapshot_slots: bool = False) -> List[ShardedPairGroup]:
    """Like :func:`~altlora.state.group_pairs`, keyed by global shapes and layouts.

    Local shapes follow from those, so every rank forms the same groups in the same order even
    when shards are uneven.
    """
    buckets: Dict[tuple, List[LoRAPair]] = OrderedDict()
    for pair in pairs:
        layouts = tuple(factor_layout(getattr(pair, f), f, pair.factor_name(f)) for f in FACTORS)
        key = (
            tuple(pair.A.shape), tuple(pair.B.shape), pair.A.dtype, pair.B.dtype, pair.A.device,
            tuple((lay.kind, lay.mesh, lay.placements) for lay in layouts),
        )
        buckets.setdefault(key, []).append(pair)
    return [ShardedPairGroup(group, snapshot_slots) for group in buckets.values()]


def _sharded(lora_work) -> List[Tuple[ShardedPairGroup, dict]]:
    """The (group, gradients) of a step's work list that need the collective path, in order."""
    return [(pg, grads) for _, pg, grads in lora_work if isinstance(pg, ShardedPairGroup)]


# ---------------------------------------------------------------------------------------------
# Collectives (each batched over all layers, one per process group, in a rank-independent order)


def _by_process_group(items):
    """[(layout, payload)] -> OrderedDict group_key -> (layout, [payload]) in first-seen order."""
    out: Dict[tuple, Tuple[FactorLayout, list]] = OrderedDict()
    for layout, payload in items:
        out.setdefault(layout.group_key, (layout, []))[1].append(payload)
    return out


def _all_reduce_sum(items) -> None:
    """All-reduce (SUM) float32 tensors in place, one flat buffer per process group."""
    for layout, tensors in _by_process_group(items).values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=layout.process_group())
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _gather_rows(lora_work) -> None:
    """All-gather the ``rows`` factors (every step) and their gradients (on their phase).

    Sets ``pg.matrices`` to the full factors and replaces the local gradient rows in the work list
    by full gradients. Missing gradients (None) stay None: they are missing on every rank.
    """
    items = []
    for pg, grads in _sharded(lora_work):
        pg.refresh_views()
        for f in FACTORS:
            if pg.kind[f] != ROWS:
                continue
            for i, (pair, p) in enumerate(zip(pg.pairs, pg.params[f])):
                layout = pg.layouts[f][i]
                items.append((layout, (pg.matrices[f], i, _matrix(local_tensor(p), f), pair, f)))
                if f in grads and grads[f][i] is not None:
                    items.append((layout, (grads[f], i, grads[f][i], pair, f)))
    for layout, entries in _by_process_group(items).values():
        group = layout.process_group()
        world, me = dist.get_world_size(group), dist.get_rank(group)
        dtype = entries[0][2].dtype
        for e in entries:
            dtype = torch.promote_types(dtype, e[2].dtype)
        device = entries[0][2].device
        segments, packed = [], []
        for target, i, local, pair, f in entries:
            full_shape = _full_matrix_shape(pair, f)
            rank_dim = _RANK_DIM[f]
            sizes = _chunk_sizes(full_shape[rank_dim], world)
            if local.shape[rank_dim] != sizes[me]:
                raise RuntimeError(
                    f"{pair.factor_name(f)}: local shard has {local.shape[rank_dim]} of {full_shape[rank_dim]} "
                    f"rank rows on rank {me} of {world}, expected {sizes[me]} (an unknown sharding rule)"
                )
            other = full_shape[1 - rank_dim]
            length = max(sizes) * other
            piece = torch.zeros(length, dtype=dtype, device=device)
            piece[: local.numel()].copy_(local.reshape(-1))
            packed.append(piece)
            segments.append((target, i, local.dtype, full_shape, rank_dim, sizes, other, length))
        send = torch.cat(packed)
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send, group=group)
        offset = 0
        for target, i, out_dtype, full_shape, rank_dim, sizes, other, length in segments:
            parts = []
            for j in range(world):
                chunk = received[j][offset: offset + sizes[j] * other]
                shape = (sizes[j], other) if rank_dim == 0 else (other, sizes[j])
                parts.append(chunk.view(shape))
            target[i] = torch.cat(parts, dim=rank_dim).to(out_dtype)
            offset += length


def _agreement_groups(groups) -> List[FactorLayout]:
    layouts = OrderedDict()
    for pg, _ in groups:
        for f in FACTORS:
            for lay in pg.layouts[f]:
                if lay.kind != FULL:
                    layouts.setdefault(lay.group_key, lay)
    return list(layouts.values())


def _agree(groups, found_inf: Optional[torch.Tensor]):
    """One all-reduce (MAX) of the non-finite flag and every factor's "modified" flag.

    Returns ``(found_inf, modified)``: the flag every rank now shares (a 0-dim float32 tensor)
    and, per group, the list of :meth:`ShardedPairGroup.modified_flags` OR-ed over ranks.
    """
    device = groups[0][0].device
    local = [pg.modified_flags() for pg, _ in groups]
    flags = torch.tensor([0.0] + [float(x) for fl in local for x in fl], dtype=torch.float32, device=device)
    if found_inf is not None:
        flags[0] = found_inf.to(device=device, dtype=torch.float32)
    for layout in _agreement_groups(groups):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=layout.process_group())
    values = flags[1:].tolist()  # one host sync per step, to take the same branch everywhere
    modified, offset = [], 0
    for fl in local:
        modified.append([v != 0.0 for v in values[offset: offset + len(fl)]])
        offset += len(fl)
    return flags[0], modified


def _initialize_and_refresh(groups, modified, state_keys, state) -> None:
    """Fresh state for new groups; Grams of factors changed outside the optimizer recomputed
    (:func:`altlora.state.refresh_grams`), the partial Grams of ``columns`` factors reduced in one
    collective per process group."""
    to_reduce, changed = [], []
    for (pg, _), flags in zip(groups, modified):
        if pg.initialized:
            changed.append((pg, flags))
            continue
        pg.initialize(state_keys, state)
        for f in FACTORS:
            if pg.kind[f] == COLUMNS:
                for i, layout in enumerate(pg.layouts[f]):
                    to_reduce += [(layout, pg.buffers[f][GRAM][i]), (layout, pg.buffers[f][CROSS_GRAM][i])]
    _all_reduce_sum(to_reduce)

    def reduce(refreshed) -> None:
        _all_reduce_sum([(pg.layouts[f][i], gram) for pg, f, i, gram in refreshed if pg.kind[f] == COLUMNS])

    refresh_grams(changed, reduce)


def _before_phase(groups, factor: str, found_inf: Optional[torch.Tensor]):
    """With a device-side skip flag, keep the reduced Grams: a skipped phase leaves them in place,
    and summing them over ranks again would multiply them by the world size."""
    if found_inf is None:
        return None
    return [(pg.buffers[factor][GRAM].clone(), pg.buffers[factor][CROSS_GRAM].clone())
            if pg.kind[factor] == COLUMNS else None for pg, _ in groups]


def _after_phase(groups, factor: str, found_inf: Optional[torch.Tensor], saved) -> None:
    """Reduce the Grams the phase wrote from local columns; write gathered factors back to their shards."""
    items = []
    for pg, _ in groups:
        if pg.kind[factor] == COLUMNS:
            layout = pg.layouts[factor][0]
            items += [(layout, pg.buffers[factor][GRAM]), (layout, pg.buffers[factor][CROSS_GRAM])]
    _all_reduce_sum(items)
    if saved is not None:
        skip = found_inf != 0
        for (pg, _), old in zip(groups, saved):
            if old is not None:
                pg.buffers[factor][GRAM].copy_(torch.where(skip, old[0], pg.buffers[factor][GRAM]))
                pg.buffers[factor][CROSS_GRAM].copy_(torch.where(skip, old[1], pg.buffers[factor][CROSS_GRAM]))
    for pg, _ in groups:
        if pg.kind[factor] != ROWS:
            continue
        rank_dim = _RANK_DIM[factor]
        for i, p in enumerate(pg.params[factor]):
            layout = pg.layouts[factor][i]
            group = layout.process_group()
            world, me = dist.get_world_size(group), dist.get_rank(group)
            full = pg.matrices[factor][i]
            sizes = _chunk_sizes(full.shape[rank_dim], world)
            local = _matrix(local_tensor(p), factor)
            if sizes[me]:
                local.copy_(full.narrow(rank_dim, sum(sizes[:me]), sizes[me]))


# ---------------------------------------------------------------------------------------------
# The coordinator


class FSDP2Coordinator(Coordinator):
    """The step's seam (:mod:`altlora.coordinator`) for FSDP2: groups with DTensor factors take the
    collective path of this module; groups of plain tensors behave as with the local coordinator."""

    def make_groups(self, pairs: Sequence[LoRAPair], schedule: Schedule) -> List[PairGroup]:
        if has_dtensor(pairs):
            return group_sharded_pairs(pairs, snapshot_slots=schedule.has_runs)
        return group_pairs(pairs)

    def local(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return local_tensor(t)  # AdamW is element-wise: each rank steps its own shard

    def local_all(self, tensors):
        return [local_tensor(t) for t in tensors]

    def gather(self, work) -> None:
        _gather_rows(work)

    def agree(self, work, found_inf):
        sharded = _sharded(work)
        if not sharded:
            return super().agree(work, found_inf)
        found_inf, agreed = _agree(sharded, found_inf)
        agreed = iter(agreed)
        return found_inf, [next(agreed) if isinstance(pg, ShardedPairGroup) else pg.modified_flags() for _, pg, _ in work]

    def refresh(self, work, modified, state_keys, state) -> None:
        plain = [(item, flags) for item, flags in zip(work, modified) if not isinstance(item[1], ShardedPairGroup)]
        super().refresh([item for item, _ in plain], [flags for _, flags in plain], state_keys, state)
        sharded = [(item, flags) for item, flags in zip(work, modified) if isinstance(item[1], ShardedPairGroup)]
        if sharded:
            _initialize_and_refresh([(pg, grads) for (_, pg, grads), _ in sharded], [f for _, f in sharded], state_keys, state)

    def phase(self, work, factor, found_inf, run) -> None:
        sharded = _sharded(work)
        saved = _before_phase(sharded, factor, found_inf) if sharded else None
        run()
        if sharded:
            _after_phase(sharded, factor, found_inf, saved)
