"""Batched damped Cholesky in Triton: ``P = (G + λ_eff·I)⁻¹`` and ``P·C`` for every layer in one launch.

The numerical policy is the one of ``cholesky.py`` (same ``PIVOT_FLOOR``, same ladder built from
``ESCALATION`` and ``ABSOLUTE_FLOOR``): rung 0 is the requested damping λ, each further rung adds
more of ``μ = max(tr(G)/r, 0)``, and a matrix takes the first rung whose factorization has every
pivot ``L_jj² ≥ PIVOT_FLOOR·μ`` (a failed or NaN pivot fails the rung); the last rung is always
taken. The choice is made per matrix inside the kernel: no host sync. Later rungs are only
factored when the earlier ones failed.

One program per layer holds its r×r Gram in registers, padded to ``R`` (a power of two ≥ 16, see
``triton_phase_tables.padded_rank``) with an identity block in the padding, so the padding stays an
identity through the factorization and the inverse and never mixes with the real block:

1. Cholesky, right-looking: for each column k, ``L[:, k] = W[:, k] / sqrt(W[k, k])`` on and below
   the diagonal, then ``W ← W − L[:, k] L[:, k]ᵀ`` (masks pick columns: registers are not
   indexable); in the same loop ``Z ← L_k⁻¹ Z`` (L_k: the identity with column k of L), so that
   ``Z = L⁻¹`` at the end without keeping L. The pivots ``W[k, k] = L_kk²`` decide the rung.
2. The chosen ``Z`` goes to the output slot; ``P = Zᵀ Z`` and ``P·C`` are then summed over blocks
   of 16 rows read back from there, with ``tl.dot`` in IEEE fp32 (the GPU default is TF32).

``P`` is formed from the accepted Cholesky factor of the damped Gram, never by inverting a raw
Gram; the update kernel then applies it to gradient tiles with ``tl.dot``, which costs one r×r
product per tile instead of two triangular solves.
"""

from __future__ import annotations

import torch

from .cholesky import ABSOLUTE_FLOOR, ESCALATION, PIVOT_FLOOR
from .triton_phase_tables import FACTOR_WARPS, Field
from .triton_runtime import MIN_DOT_EXTENT, LazyKernel, Launch, tl

__all__ = ["NUM_RUNGS", "ladder_scales", "factor_launch", "factor_kernel"]

# Rung 0 (the requested damping) plus one rung per escalation step.
NUM_RUNGS = len(ESCALATION) + 1

if tl is not None:
    _RANK = tl.constexpr(Field.RANK)
    _OTHER_GRAM = tl.constexpr(Field.OTHER_GRAM)
    _OTHER_CROSS = tl.constexpr(Field.OTHER_CROSS)
    _INF = tl.constexpr(float("inf"))
    _K_BLOCK = tl.constexpr(MIN_DOT_EXTENT)  # rows of Z and C_Y per tl.dot
    # tl.sum's own combine function: tl.reduce with it is a sum that Triton's interpreter runs as
    # one numpy sum, while tl.sum itself is a jit function of triton.language.standard: ~3 ms per
    # call there, and not callable at all when Triton was imported before TRITON_INTERPRET was set
    # (see triton_runtime). For the same reason the kernels use tl.full, not tl.zeros.
    from triton.language.standard import _sum_combine as _add


_LADDERS = {}


def ladder_scales(device: torch.device) -> torch.Tensor:
    """Multiples of μ added to λ at each rung (rung 0: none), as the kernel reads them (cached per device)."""
    ladder = _LADDERS.get(device)
    if ladder is None:
        ladder = _LADDERS[device] = torch.tensor((0.0,) + tuple(ESCALATION), dtype=torch.float32, device=device)
    return ladder


def _factor_kernel(
    layers_ptr,
    ladder_ptr,
    precond_ptr,
    carry_ptr,
    damping,
    pivot_floor,
    absolute_floor,
    NUM_FIELDS: tl.constexpr,
    R: tl.constexpr,
    NUM_RUNGS: tl.constexpr,
):
    layer = tl.program_id(0)
    row = layers_ptr + layer * NUM_FIELDS
    r = tl.load(row + _RANK).to(tl.int32)
    gram_ptr = tl.load(row + _OTHER_GRAM).to(tl.pointer_type(tl.float32))
    cross_ptr = tl.load(row + _OTHER_CROSS).to(tl.pointer_type(tl.float32))

    idx = tl.arange(0, R)
    rows = idx[:, None]
    cols = idx[None, :]
    inside = (rows < r) & (cols < r)
    diag = rows == cols
    at_gram = rows * r + cols
    out = layer * R * R + rows * R + cols

    gram = tl.load(gram_ptr + at_gram, mask=inside, other=0.0)
    trace = tl.reduce(tl.reduce(tl.where(diag, gram, 0.0), 1, _add), 0, _add)
    mean_eig = tl.maximum(trace / r.to(tl.float32), 0.0)

    # Each rung that runs leaves its Z = L⁻¹ in the precond slot; the first passing rung is the
    # last to run, so the slot ends up holding the chosen one. Memory instead of a third live R×R
    # register tile keeps r = 128 within registers.
    found = r < 0  # a scalar False
    for rung in tl.static_range(NUM_RUNGS):
        if found == 0:
            scale = tl.load(ladder_ptr + rung)
            if rung == NUM_RUNGS - 1:
                shift = damping + scale * tl.maximum(mean_eig, absolute_floor)
            else:
                shift = damping + scale * mean_eig
            # Padding: identity, untouched by the loop below (its columns stay zero).
            work = tl.load(gram_ptr + at_gram, mask=inside, other=0.0) + tl.where(diag, tl.where(rows < r, shift, 1.0), 0.0)
            inverse = tl.where(diag, 1.0, 0.0)
            positive = r >= 0  # a scalar True
            smallest = tl.full([], _INF, tl.float32)
            for k in range(0, r):
                # Column k of L: the Schur complement's column k over the square root of its pivot.
                column = tl.reduce(tl.where(cols == k, work, 0.0), 1, _add)
                pivot = tl.reduce(tl.where(idx == k, column, 0.0), 0, _add)  # L_kk²
                positive = positive & (pivot > 0.0)  # NaN compares False
                smallest = tl.minimum(smallest, pivot)
                root = tl.sqrt(tl.where(pivot > 0.0, pivot, 1.0))
                lower = tl.where(idx >= k, column / root, 0.0)
                work = work - lower[:, None] * lower[None, :]
                # Z ← L_k⁻¹·Z, L_k the identity with column k of L: forward substitution by columns.
                z_row = tl.reduce(tl.where(rows == k, inverse, 0.0), 0, _add) / root
                below = tl.where(idx > k, lower, 0.0)
                inverse = tl.where(rows == k, z_row[None, :], inverse - below[:, None] * z_row[None, :])
            passes = positive & (smallest >= pivot_floor * mean_eig)
            if rung == NUM_RUNGS - 1:
                passes = r >= 0  # the last rung is positive definite by construction
            tl.store(precond_ptr + out, inverse)
            found = passes

    # P = Zᵀ Z and P·C_Y, K blocks of 16 rows read back from memory: an fp32 (IEEE) tl.dot runs
    # on CUDA cores and holds its operands' K extent in registers. Only the first r rows of Z and
    # C_Y are read, so the padding of P and P·C_Y is zero (it would only multiply zeros anyway).
    kdx = tl.arange(0, _K_BLOCK)
    tl.debug_barrier()  # Z in the slot was written by other threads of this program
    precond = tl.full((R, R), 0.0, tl.float32)
    for k0 in range(0, r, _K_BLOCK):
        krows = (k0 + kdx)[:, None]
        block = tl.load(precond_ptr + layer * R * R + krows * R + cols, mask=krows < r, other=0.0)
        precond += tl.dot(tl.trans(block), block, input_precision="ieee")
    tl.debug_barrier()  # every thread has read Z before P overwrites it
    tl.store(precond_ptr + out, precond)
    tl.debug_barrier()
    carry = tl.full((R, R), 0.0, tl.float32)
    for k0 in range(0, r, _K_BLOCK):
        krows = k0 + kdx
        p_block = tl.load(precond_ptr + layer * R * R + rows * R + krows[None, :])
        c_block = tl.load(cross_ptr + krows[:, None] * r + cols, mask=(krows[:, None] < r) & (cols < r), other=0.0)
        carry += tl.dot(p_block, c_block, input_precision="ieee")
    tl.store(carry_ptr + out, carry)


factor_kernel = LazyKernel(_factor_kernel)


def factor_launch(layers: torch.Tensor, padded: int, damping: float, precond: torch.Tensor, carry: torch.Tensor) -> Launch:
    """The launch that sets ``precond[i] = P``, ``carry[i] = P·C_Y`` (padded R×R) for every row of ``layers``."""
    return Launch(
        factor_kernel,
        (layers.shape[0],),
        (layers, ladder_scales(layers.device), precond, carry, float(damping), float(PIVOT_FLOOR), float(ABSOLUTE_FLOOR)),
        dict(NUM_FIELDS=layers.shape[1], R=padded, NUM_RUNGS=NUM_RUNGS),
        FACTOR_WARPS[padded],
    )
