"""Work tables of the Triton phase update: which program works on what, read from device memory.

One phase over many layers of different shapes runs as a fixed number of launches: every program
reads what it works on from int64 tables in device memory.

* ``layers``: one row of ``NUM_FIELDS`` int64 per layer: the ``data_ptr()`` of each of its tensors
  (kernels cast them with ``.to(tl.pointer_type(...))``), its rank ``r``, its row length ``n``,
  leading strides, and which rows of ``chunks`` are its. Stacked state buffers give one pointer
  per layer (``base + i·stride``).
* ``grads``: ``(layer, 2)``: gradient pointer and leading stride. Kept apart from ``layers`` because
  ``zero_grad(set_to_none=True)`` gives gradients new storage every step.
* ``chunks``: ``(chunk, 3)``: ``(layer, first column, end column)``: one update program each. A
  chunk is wide enough that its r×r Gram partials are a small fraction of the bytes it moves
  (see :func:`tile_shape`).

Every table is cached under a key made of every pointer, shape, stride and dtype it holds, so a
cache hit is the same table by construction; it is rebuilt only when storage changes. The
gradient table is compared and re-sent on its own.

The cache is bounded: at most ``CACHE_SIZE`` entries and ``CACHE_MAX_BYTES`` of tables, least
recently used first out. Storage that moves every step (FSDP2 gathers into fresh buffers, the
joint schedule's clones, ``p.data = ...``) then costs a rebuild per phase (Python time and one
small host→device copy), never memory that grows: an evicted entry is rebuilt from the same
tensors into the same table. The float32 workspaces of a phase (``P``, ``P·C_Y``, Gram partials:
up to tens of MB at r = 128) are not cached at all: :func:`workspaces` allocates them for each
phase from torch's caching allocator, which reuses them stream-ordered, so they are held only
while a phase runs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .triton_runtime import dot_extent

__all__ = [
    "MAX_RANK",
    "NUM_FIELDS",
    "CHUNK_FIELDS",
    "GRAD_FIELDS",
    "Field",
    "Bucket",
    "padded_rank",
    "tile_shape",
    "FACTOR_WARPS",
    "UPDATE_WARPS",
    "plan_buckets",
    "workspaces",
    "clear_cache",
    "cache_bytes",
    "CACHE_SIZE",
    "CACHE_MAX_BYTES",
]

# Largest rank the kernels take: an r×r fp32 tile lives in one program's registers, and r = 128
# (R² = 16K values) is what one program can still hold; larger ranks go to the torch backend.
MAX_RANK = 128

# Columns per update tile, by padded rank. An fp32 (IEEE) tl.dot runs on CUDA cores and holds
# its operands' K extent in registers: the Gram products X·Xᵀ have K = BLOCK_N, so it stays small.
# Chosen from sm_80/86/90 builds by register spills (ptxas -v; docs/kernels.md); not yet timed on
# a GPU. R = 64 takes 16 columns: with 32 the plain AltLoRA update spilled up to 1.5 KB.
BLOCK_N_BY_PADDED_RANK = {16: 32, 32: 32, 64: 16, 128: 16}

# Warps per program, by padded rank, for the per-layer kernels (factor, reduce: a few R×R fp32
# tiles) and the update (R×BLOCK_N tiles and two R×R accumulators); same provenance. Register
# spills (ptxas -v, sm_80/86/90, docs/kernels.md): none at R ≤ 64 (the factor kernel at R = 16
# takes 2 warps: 4 spilled 16 bytes on sm_80/86); at R = 128 every kernel spills at every warp
# count tried (8–32): its R×R fp32 tiles (64 KB each) outgrow the register file. The update takes
# 32 warps there (a whole SM's registers either way, as 16 warps of 128 registers): its largest
# spill fell from 11.9 KB (16 warps) to ~2.4 KB.
FACTOR_WARPS = {16: 2, 32: 4, 64: 8, 128: 16}
UPDATE_WARPS = {16: 8, 32: 8, 64: 8, 128: 32}

# A chunk (one update program) spans at least this many columns per padded rank row. Its two R×R
# Gram partials (written once, read once: 16·R² bytes) then cost ≤ 16·R²/(20·r·16·R) ≈ 5% of the
# ≈ 20·r bytes per column a phase moves at r = R.
MIN_CHUNK_COLUMNS_PER_RANK = 16

# Tables kept per distinct key: a training loop alternates between a few (A phase, B phase, the
# second phase of "joint", several param groups), so 16 entries hold every steady state we know;
# storage that moves every step evicts the oldest instead of growing the cache.
CACHE_SIZE = 16
# And at most this many bytes of device tables (16·8 bytes per layer, 3·8 per chunk, 2·8 per
# gradient: 16 MiB are ~100k layers); the entry just built is kept even if it alone is larger.
CACHE_MAX_BYTES = 16 * 2**20


class Field:
    """Columns of the ``layers`` table (kernels use the same numbers as constexprs)."""

    PARAM = 0  # the factor as stored (A: (r, d), B: (k, r)), its own dtype
    PARAM_LEAD = 1  # stride of its first dimension (the second is 1)
    MOMENTUM = 2  # float32, stored shape, contiguous
    VARIANCE = 3  # float32 (AltLoRA+), same layout as MOMENTUM; 0 when absent
    SNAPSHOT = 4  # the run's snapshot (param dtype, layout of MOMENTUM); 0 when absent
    STATE_LEAD = 5  # leading stride of MOMENTUM / VARIANCE / SNAPSHOT
    GRAM = 6  # r×r float32, row-major, contiguous: X Xᵀ in row form
    CROSS = 7  # r×r: X Xrefᵀ
    OTHER_GRAM = 8  # r×r: Y Yᵀ of the other factor
    OTHER_CROSS = 9  # r×r: C_Y of the other factor
    STEP = 10  # float32 scalar: n, the update count of X
    INV_SCALE_SQ = 11  # float32 scalar: 1/s²
    RANK = 12  # r
    ROW_LENGTH = 13  # n: d for A, k for B
    FIRST_CHUNK = 14  # this layer's first row in ``chunks``
    NUM_CHUNKS = 15


NUM_FIELDS = 16
CHUNK_FIELDS = 3  # layer, first column, end column
GRAD_FIELDS = 2  # pointer, leading stride


def padded_rank(r: int) -> int:
    """The power of two ≥ ``MIN_DOT_EXTENT`` (16) the kernels pad rank ``r`` to."""
    return dot_extent(r)


def tile_shape(padded: int) -> Tuple[int, int]:
    """``(BLOCK_N, chunk columns)`` for padded rank ``padded``; the chunk is a multiple of BLOCK_N."""
    block_n = BLOCK_N_BY_PADDED_RANK[padded]
    chunk = block_n * max(1, math.ceil(MIN_CHUNK_COLUMNS_PER_RANK * padded / block_n))
    return block_n, chunk


@dataclass
class Bucket:
    """Layers that share one set of launches: same padded rank, dtypes, layout, snapshot or not."""

    padded: int
    transposed: bool
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    has_snapshot: bool
    block_n: int
    layers: torch.Tensor  # (L, NUM_FIELDS) int64 on the device
    chunks: torch.Tensor  # (C, CHUNK_FIELDS) int64 on the device
    grads: Optional[torch.Tensor]  # (L, GRAD_FIELDS) int64 on the device
    grad_key: Optional[tuple]
    members: List[Tuple[int, int]]  # (group index, number of layers) in table order

    @property
    def num_layers(self) -> int:
        return self.layers.shape[0]

    @property
    def num_chunks(self) -> int:
        return self.chunks.shape[0]

    @property
    def nbytes(self) -> int:
        """Device bytes the cached tables of this bucket hold."""
        tables = (self.layers, self.chunks, self.grads)
        return sum(t.numel() * t.element_size() for t in tables if t is not None)


def workspaces(bucket: Bucket) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh float32 workspaces of one phase over ``bucket``: ``P`` (L, R, R), ``P·C_Y`` (L, R, R)
    and the per-chunk Gram and cross-Gram partials (C, 2, R, R).

    Every element is written before it is read (the factor kernel writes all of P and P·C_Y, each
    update program its chunk's partials), so ``empty`` is enough. Allocated per phase rather than
    cached with the tables: the caching allocator makes this cheap, reuses the memory in stream
    order once the launches that hold them are enqueued, and the cache never holds it.
    """
    device, padded = bucket.layers.device, bucket.padded
    square = dict(dtype=torch.float32, device=device)
    return (torch.empty(bucket.num_layers, padded, padded, **square),
            torch.empty(bucket.num_layers, padded, padded, **square),
            torch.empty(bucket.num_chunks, 2, padded, padded, **square))


_CACHE: "OrderedDict[tuple, List[Bucket]]" = OrderedDict()


def clear_cache() -> None:
    """Forget every cached table (they are rebuilt on the next phase)."""
    _CACHE.clear()


def cache_bytes() -> int:
    """Device bytes held by the cached tables."""
    return sum(b.nbytes for buckets in _CACHE.values() for b in buckets)


def _evict() -> None:
    # Least recently used first; the newest entry (the one being used) always stays.
    while len(_CACHE) > 1 and (len(_CACHE) > CACHE_SIZE or cache_bytes() > CACHE_MAX_BYTES):
        _CACHE.popitem(last=False)


def _ptr_or_zero(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _group_key(g) -> tuple:
    """Everything a ``layers`` table row depends on, for one FactorGroup."""
    first = g.params[0]
    buffers = (g.momentum, g.variance, g.snapshot, g.gram, g.cross, g.other_gram, g.other_cross, g.step, g.inv_scale_sq)
    return (
        g.transposed,
        tuple(first.shape),
        first.dtype,
        g.grads[0].dtype,
        tuple((_ptr_or_zero(b), None if b is None else tuple(b.stride())) for b in buffers),
        tuple((p.data_ptr(), p.stride(0)) for p in g.params),
    )


def _stacked_ptrs(buf: Optional[torch.Tensor], count: int) -> torch.Tensor:
    if buf is None:
        return torch.zeros(count, dtype=torch.int64)
    step = buf.stride(0) * buf.element_size()
    return buf.data_ptr() + step * torch.arange(count, dtype=torch.int64)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return table
    # Pinned staging lets the copy run asynchronously; the caching host allocator keeps the
    # staging block alive until the copy has finished.
    return table.pin_memory().to(device, non_blocking=True)


def _build(groups: Sequence, bucket_of: List[tuple]) -> List[Bucket]:
    device = groups[0].params[0].device
    by_key: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for index, key in enumerate(bucket_of):
        by_key.setdefault(key, []).append(index)
    buckets = []
    for (padded, transposed, param_dtype, grad_dtype, has_snapshot), members in by_key.items():
        block_n, chunk_cols = tile_shape(padded)
        rows, chunks = [], []
        for gi in members:
            g = groups[gi]
            count = len(g.params)
            shape = tuple(g.params[0].shape)
            r = shape[1] if transposed else shape[0]
            n = shape[0] if transposed else shape[1]
            table = torch.zeros(count, NUM_FIELDS, dtype=torch.int64)
            table[:, Field.PARAM] = torch.tensor([p.data_ptr() for p in g.params], dtype=torch.int64)
            table[:, Field.PARAM_LEAD] = torch.tensor([p.stride(0) for p in g.params], dtype=torch.int64)
            table[:, Field.MOMENTUM] = _stacked_ptrs(g.momentum, count)
            table[:, Field.VARIANCE] = _stacked_ptrs(g.variance, count)
            table[:, Field.SNAPSHOT] = _stacked_ptrs(g.snapshot, count)
            table[:, Field.STATE_LEAD] = shape[1]
            table[:, Field.GRAM] = _stacked_ptrs(g.gram, count)
            table[:, Field.CROSS] = _stacked_ptrs(g.cross, count)
            table[:, Field.OTHER_GRAM] = _stacked_ptrs(g.other_gram, count)
            table[:, Field.OTHER_CROSS] = _stacked_ptrs(g.other_cross, count)
            table[:, Field.STEP] = _stacked_ptrs(g.step, count)
            table[:, Field.INV_SCALE_SQ] = _stacked_ptrs(g.inv_scale_sq, count)
            table[:, Field.RANK] = r
            table[:, Field.ROW_LENGTH] = n
            per_layer = math.ceil(n / chunk_cols)
            base_layer = sum(len(rows_) for rows_ in rows)
            first_chunk = len(chunks)
            table[:, Field.FIRST_CHUNK] = first_chunk + per_layer * torch.arange(count, dtype=torch.int64)
            table[:, Field.NUM_CHUNKS] = per_layer
            for i in range(count):
                for c in range(per_layer):
                    chunks.append((base_layer + i, c * chunk_cols, min(n, (c + 1) * chunk_cols)))
            rows.append(table)
        layers = torch.cat(rows)
        buckets.append(
            Bucket(
                padded=padded,
                transposed=transposed,
                param_dtype=param_dtype,
                grad_dtype=grad_dtype,
                has_snapshot=has_snapshot,
                block_n=block_n,
                layers=_to_device(layers, device),
                chunks=_to_device(torch.tensor(chunks, dtype=torch.int64).reshape(-1, CHUNK_FIELDS), device),
                grads=None,
                grad_key=None,
                members=[(gi, len(groups[gi].params)) for gi in members],
            )
        )
    return buckets


def _refresh_grads(bucket: Bucket, grads: Sequence[Sequence[torch.Tensor]]) -> None:
    flat = [t for gi, _ in bucket.members for t in grads[gi]]
    key = tuple((t.data_ptr(), t.stride(0)) for t in flat)
    if key == bucket.grad_key:
        return
    table = torch.tensor(key, dtype=torch.int64).reshape(-1, GRAD_FIELDS)
    bucket.grads = _to_device(table, bucket.layers.device)
    bucket.grad_key = key


def plan_buckets(groups: Sequence, grads: Sequence[Sequence[torch.Tensor]]) -> List[Bucket]:
    """The (cached) buckets for ``groups``, with gradient tables pointing at ``grads``.

    ``grads[i]`` are group i's gradients as 2-D tensors of the parameters' shape with unit inner
    stride and one dtype per group (the caller makes them so).
    """
    keys = [_group_key(g) for g in groups]
    bucket_of = []
    for g, gr in zip(groups, grads):
        first = g.params[0]
        r = first.shape[1] if g.transposed else first.shape[0]
        bucket_of.append((padded_rank(r), g.transposed, first.dtype, gr[0].dtype, g.snapshot is not None))
    key = (tuple(keys), tuple(bucket_of), MIN_CHUNK_COLUMNS_PER_RANK)
    buckets = _CACHE.get(key)
    if buckets is None:
        buckets = _build(groups, bucket_of)
        _CACHE[key] = buckets
    else:
        _CACHE.move_to_end(key)
    for bucket in buckets:
        _refresh_grads(bucket, grads)
    _evict()  # after the gradient tables, which count too
    return buckets
