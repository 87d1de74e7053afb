"""The ``triton`` backend: one AltLoRA / AltLoRA+ phase for every layer in three launches.

Same semantics as ``torch_phase_update.py`` (its module docstring carries the math in row form,
with the Gram / cross-Gram bookkeeping and the ``found_inf`` no-op); this module runs it with a
number of launches that does not depend on the number of layers:

1. ``triton_cholesky.factor_kernel``, one program per layer: ``P = (Y Yᵀ + λ_eff I)⁻¹`` and
   ``P·C_Y`` with the damping escalated on the device.
2. ``_update_kernel``, one program per (layer, chunk of columns) of the work table: for each
   ``R × BLOCK_N`` tile of the row form, ``g̃ = (1/s²)·P·∇X``, ``M ← β1·(P C_Y)·M + (1−β1)·g̃``,
   AltLoRA+'s ``V`` and bias correction (a constexpr switch), weight decay, and the write of ``X``
   in its own dtype (fp32 math, fp32 state); then the chunk's partial ``X_new X_newᵀ`` and
   ``X_new X_refᵀ`` (of the values as stored) go to a workspace.
3. ``_reduce_kernel``, one program per layer: sums its chunks' partials in a fixed order (so two
   identical runs give identical bits; no atomics), writes ``gram``, ``cross``,
   ``other_cross ← other_gram`` and ``n ← n + 1``.

Layers are bucketed by padded rank, dtypes and layout (``triton_phase_tables``); each bucket is
three launches, so a model whose factors share one rank and dtype pays three launches per phase
whatever its number of layers. ``found_inf`` is read by the kernels: when it is non-zero nothing
is written (parameters, moments, counters, Grams), with no host sync.

Groups the kernels do not take (rank > ``MAX_RANK``, a factor whose last dimension is not
contiguous, non-contiguous state) are handed to the torch backend, which computes the same thing.

**First-use self-check.** These kernels were written and tested without a GPU (CI runs them in
Triton's CPU interpreter and compiles them ahead of time). So the first time they run on a CUDA
device with a given Triton version, one tiny phase of the same kind (rank, dtypes, orientation,
AltLoRA/AltLoRA+, snapshot, non-finite flag) runs through them and through the torch backend in
float64 (:func:`self_check`); if the results disagree, or the kernels fail to build or launch, a
``RuntimeWarning`` says so once and the torch backend runs every phase on that device for the rest
of the process. ``ALTLORA_TRITON_SELF_CHECK=0`` turns the check off (trust the kernels).
:func:`self_check_results` lists the verdicts.

**CUDA graphs.** A phase cannot be captured: the work tables are built on the host and copied
host→device whenever storage changes (a replay would read the captured step's tables), and the
self-check compares on the host. Under capture :func:`phase_update` raises ``RuntimeError``
before doing anything (``graph_capture.py``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .graph_capture import refuse_capture
from .phase_types import FactorGroup, PhaseHyperParams
from .torch_phase_update import phase_update_torch
from .triton_cholesky import factor_launch
from .triton_phase_tables import FACTOR_WARPS, GRAD_FIELDS, MAX_RANK, NUM_FIELDS, UPDATE_WARPS, Field, plan_buckets, workspaces
from .triton_runtime import MIN_DOT_EXTENT, LazyKernel, Launch, device_guard, device_reason, tl, triton

__all__ = [
    "unavailable_reason",
    "phase_update",
    "phase_launches",
    "update_kernel",
    "reduce_kernel",
    "SUPPORTED_DTYPES",
    "SELF_CHECK_ENV",
    "self_check",
    "self_check_enabled",
    "self_check_results",
]

# Parameter dtypes the kernels take (fp32 math and state); other groups go to the torch backend.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if tl is not None:
    _PARAM = tl.constexpr(Field.PARAM)
    _PARAM_LEAD = tl.constexpr(Field.PARAM_LEAD)
    _MOMENTUM = tl.constexpr(Field.MOMENTUM)
    _VARIANCE = tl.constexpr(Field.VARIANCE)
    _SNAPSHOT = tl.constexpr(Field.SNAPSHOT)
    _STATE_LEAD = tl.constexpr(Field.STATE_LEAD)
    _GRAM = tl.constexpr(Field.GRAM)
    _CROSS = tl.constexpr(Field.CROSS)
    _OTHER_GRAM = tl.constexpr(Field.OTHER_GRAM)
    _OTHER_CROSS = tl.constexpr(Field.OTHER_CROSS)
    _STEP = tl.constexpr(Field.STEP)
    _INV_SCALE_SQ = tl.constexpr(Field.INV_SCALE_SQ)
    _RANK = tl.constexpr(Field.RANK)
    _FIRST_CHUNK = tl.constexpr(Field.FIRST_CHUNK)
    _NUM_CHUNKS = tl.constexpr(Field.NUM_CHUNKS)
    # Rows of ∇X and M per tl.dot in the update.
    _K_BLOCK = tl.constexpr(MIN_DOT_EXTENT)
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the Triton backend can run on ``device``, else a one-line reason."""
    # The kernels read device pointers from the work tables: never on CUDA tensors in the interpreter.
    return device_reason(device, cuda_in_interpreter=False)


def _update_kernel(
    layers_ptr,
    grads_ptr,
    chunks_ptr,
    precond_ptr,
    carry_ptr,
    partials_ptr,
    found_inf_ptr,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    log2_beta1,
    log2_beta2,
    NUM_FIELDS: tl.constexpr,
    GRAD_FIELDS: tl.constexpr,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_SNAPSHOT: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
):
    chunk = tl.program_id(0)
    layer = tl.load(chunks_ptr + chunk * 3)
    start = tl.load(chunks_ptr + chunk * 3 + 1)
    end = tl.load(chunks_ptr + chunk * 3 + 2)
    row = layers_ptr + layer * NUM_FIELDS
    r = tl.load(row + _RANK)
    param_ptr = tl.load(row + _PARAM).to(tl.pointer_type(PARAM_DTYPE))
    param_lead = tl.load(row + _PARAM_LEAD)
    grad_ptr = tl.load(grads_ptr + layer * GRAD_FIELDS).to(tl.pointer_type(GRAD_DTYPE))
    grad_lead = tl.load(grads_ptr + layer * GRAD_FIELDS + 1)
    momentum_ptr = tl.load(row + _MOMENTUM).to(tl.pointer_type(tl.float32))
    state_lead = tl.load(row + _STATE_LEAD)
    inv_scale_sq = tl.load(tl.load(row + _INV_SCALE_SQ).to(tl.pointer_type(tl.float32)))
    # Row form X[i, j] of a tensor stored with strides (lead, 1) is at i·row_step + j·col_step:
    # A itself (lead, 1), or Bᵀ (1, lead). The constant 1 is folded by the compiler.
    if TRANSPOSED:
        param_row, param_col = 1, param_lead
        grad_row, grad_col = 1, grad_lead
        state_row, state_col = 1, state_lead
    else:
        param_row, param_col = param_lead, 1
        grad_row, grad_col = grad_lead, 1
        state_row, state_col = state_lead, 1

    # Rows that are written: all r, or none when found_inf is set (a scalar bool can't be ANDed
    # into a block mask in the interpreter, a bound can).
    written_rows = r
    if HAS_FOUND_INF:
        written_rows = tl.where(tl.load(found_inf_ptr) != 0.0, 0, r)

    idx = tl.arange(0, R)
    rows = idx[:, None]
    kdx = tl.arange(0, _K_BLOCK)
    square = precond_ptr + layer * R * R  # this layer's P; its P·C_Y is at the same offset in carry

    if ADAPTIVE:
        variance_ptr = tl.load(row + _VARIANCE).to(tl.pointer_type(tl.float32))
        count = tl.load(tl.load(row + _STEP).to(tl.pointer_type(tl.float32))) + 1.0
        bias1 = 1.0 - tl.exp2(count * log2_beta1)  # 1 − β1ⁿ
        bias2 = 1.0 - tl.exp2(count * log2_beta2)
    if HAS_SNAPSHOT:
        snapshot_ptr = tl.load(row + _SNAPSHOT).to(tl.pointer_type(PARAM_DTYPE))

    gram = tl.full((R, R), 0.0, tl.float32)
    cross = tl.full((R, R), 0.0, tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)[None, :]
        mask = (rows < r) & (cols < end)

        # P·∇X and (P C_Y)·M over K blocks of 16 rows read straight from memory: an fp32 (IEEE)
        # tl.dot runs on CUDA cores and holds its operands' K extent in registers, so K stays
        # small; ∇X and the old M are needed only through these products.
        scaled_grad = tl.full((R, BLOCK_N), 0.0, tl.float32)
        carried = tl.full((R, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, r, _K_BLOCK):
            krows = k0 + kdx[:, None]
            kmask = (krows < r) & (cols < end)
            grad = tl.load(grad_ptr + krows * grad_row + cols * grad_col, mask=kmask, other=0.0).to(tl.float32)
            momentum = tl.load(momentum_ptr + krows * state_row + cols * state_col, mask=kmask, other=0.0)
            at_square = rows * R + (k0 + kdx)[None, :]
            scaled_grad += tl.dot(tl.load(square + at_square), grad, input_precision="ieee")
            carried += tl.dot(tl.load(carry_ptr + layer * R * R + at_square), momentum, input_precision="ieee")

        at_param = rows * param_row + cols * param_col
        at_state = rows * state_row + cols * state_col
        scaled_grad = scaled_grad * inv_scale_sq
        momentum = beta1 * carried + (1.0 - beta1) * scaled_grad
        x_old = tl.load(param_ptr + at_param, mask=mask, other=0.0).to(tl.float32)
        if ADAPTIVE:
            variance = tl.load(variance_ptr + at_state, mask=mask, other=0.0)
            variance = beta2 * variance + (1.0 - beta2) * scaled_grad * scaled_grad
            direction = (momentum / bias1) / (tl.sqrt(variance / bias2) + eps)
        else:
            direction = momentum
        # Decay as a factor (as the torch backend does): an Inf parameter stays Inf (Inf − Inf and
        # 0·Inf would make it NaN) and weight_decay = 0 leaves x_old exact.
        x_new = x_old * (1.0 - lr * weight_decay) - lr * direction
        if PARAM_DTYPE == tl.bfloat16:
            # Round to nearest even on the bits: Triton's interpreter truncates fp32 → bf16 casts
            # (a GPU rounds), and both must write what torch's .to(torch.bfloat16) writes.
            # NOTE: the carry of that addition runs through a NaN's mantissa into its exponent and
            # sign (the GPU's NaN 0x7FFFFFFF became −0.0, a silent zero), so a NaN is written as
            # torch's bf16 NaN 0x7FC0 instead. ±Inf (zero mantissa) and finite values that round
            # up to ±Inf come out of the addition as torch's do.
            bits = x_new.to(tl.int32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            bits = tl.where(x_new != x_new, 0x7FC00000, rounded)
            x_new = bits.to(tl.float32, bitcast=True)
        x_new = x_new.to(PARAM_DTYPE)

        write = (rows < written_rows) & (cols < end)
        tl.store(param_ptr + at_param, x_new, mask=write)
        tl.store(momentum_ptr + at_state, momentum, mask=write)
        if ADAPTIVE:
            tl.store(variance_ptr + at_state, variance, mask=write)

        # Grams of the values as stored; padding zeroed (eps = 0 would make it 0/0 there).
        written = tl.where(mask, x_new.to(tl.float32), 0.0)
        if HAS_SNAPSHOT:
            reference = tl.load(snapshot_ptr + at_state, mask=mask, other=0.0).to(tl.float32)
        else:
            reference = x_old
        gram += tl.dot(written, tl.trans(written), input_precision="ieee")
        cross += tl.dot(written, tl.trans(reference), input_precision="ieee")

    out = chunk * 2 * R * R + rows * R + idx[None, :]
    tl.store(partials_ptr + out, gram)
    tl.store(partials_ptr + out + R * R, cross)


def _reduce_kernel(
    layers_ptr,
    partials_ptr,
    found_inf_ptr,
    NUM_FIELDS: tl.constexpr,
    R: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    layer = tl.program_id(0)
    row = layers_ptr + layer * NUM_FIELDS
    r = tl.load(row + _RANK)
    first = tl.load(row + _FIRST_CHUNK)
    count = tl.load(row + _NUM_CHUNKS)

    idx = tl.arange(0, R)
    square = idx[:, None] * R + idx[None, :]
    gram = tl.full((R, R), 0.0, tl.float32)
    cross = tl.full((R, R), 0.0, tl.float32)
    for c in range(first, first + count):  # fixed order: deterministic sums
        gram += tl.load(partials_ptr + c * 2 * R * R + square)
        cross += tl.load(partials_ptr + c * 2 * R * R + R * R + square)

    written_rows = r  # all, or none when found_inf is set (see _update_kernel)
    if HAS_FOUND_INF:
        written_rows = tl.where(tl.load(found_inf_ptr) != 0.0, 0, r)
    rows = idx[:, None]
    cols = idx[None, :]
    inside = (rows < r) & (cols < r)
    write = (rows < written_rows) & (cols < r)
    at = rows * r + cols
    tl.store(tl.load(row + _GRAM).to(tl.pointer_type(tl.float32)) + at, gram, mask=write)
    tl.store(tl.load(row + _CROSS).to(tl.pointer_type(tl.float32)) + at, cross, mask=write)
    other_gram = tl.load(tl.load(row + _OTHER_GRAM).to(tl.pointer_type(tl.float32)) + at, mask=inside, other=0.0)
    tl.store(tl.load(row + _OTHER_CROSS).to(tl.pointer_type(tl.float32)) + at, other_gram, mask=write)
    step_ptr = tl.load(row + _STEP).to(tl.pointer_type(tl.float32))
    tl.store(step_ptr, tl.load(step_ptr) + 1.0, mask=written_rows > 0)


update_kernel = LazyKernel(_update_kernel)
reduce_kernel = LazyKernel(_reduce_kernel)


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0.0 else float("-inf")  # β⁰ = 1 is never needed: n ≥ 1


def _rank(g: FactorGroup) -> int:
    shape = g.params[0].shape
    return int(shape[1] if g.transposed else shape[0])


def _kernels_take(g: FactorGroup) -> bool:
    """Whether the kernels handle this group (else the torch backend does)."""
    shape = tuple(g.params[0].shape)
    state = (g.momentum, g.variance, g.snapshot, g.gram, g.cross, g.other_gram, g.other_cross, g.step, g.inv_scale_sq)
    return (
        1 <= _rank(g) <= MAX_RANK
        and g.params[0].dtype in SUPPORTED_DTYPES
        and all(p.dim() == 2 and p.stride(1) == 1 for p in g.params)
        and all(t is None or t.is_contiguous() for t in state)
        and all(t is None or t.dtype == torch.float32 for t in state if t is not g.snapshot)
        and tuple(g.momentum.shape[1:]) == shape
        and (g.snapshot is None or (g.snapshot.dtype == g.params[0].dtype and tuple(g.snapshot.shape[1:]) == shape))
    )


def _check(groups: Sequence[FactorGroup], hp: PhaseHyperParams, found_inf: Optional[torch.Tensor]) -> torch.device:
    device = groups[0].params[0].device
    for i, g in enumerate(groups):
        if not g.params or len(g.params) != len(g.grads):
            raise ValueError(f"groups[{i}]: {len(g.params)} params but {len(g.grads)} grads")
        shape, dtype = g.params[0].shape, g.params[0].dtype
        for p in g.params:
            if p.shape != shape or p.dtype != dtype or p.device != device:
                raise ValueError(f"groups[{i}].params: every factor of a group needs one shape, dtype and device")
        for gr in g.grads:
            if gr.shape != shape or gr.device != device:
                raise ValueError(f"groups[{i}].grads: a gradient does not match its parameter's shape {tuple(shape)} or device")
        if hp.adaptive and g.variance is None:
            raise ValueError(f"groups[{i}].variance is None but hp.adaptive is set (AltLoRA+)")
    if found_inf is not None and found_inf.device != device:
        raise ValueError(f"found_inf is on {found_inf.device}, the factors on {device}")
    return device


def _kernel_grad_dtype(g: FactorGroup) -> torch.dtype:
    return g.grads[0].dtype if g.grads[0].dtype in SUPPORTED_DTYPES else torch.float32


def _kernel_grads(g: FactorGroup) -> List[torch.Tensor]:
    """Gradients as the kernels read them: unit inner stride, one dtype for the whole group."""
    dtype = _kernel_grad_dtype(g)
    out = []
    for gr in g.grads:
        if gr.dtype != dtype:
            gr = gr.to(dtype)
        if gr.stride(1) != 1:
            gr = gr.contiguous()
        out.append(gr)
    return out


def phase_launches(groups: Sequence[FactorGroup], hp: PhaseHyperParams, found_inf: Optional[torch.Tensor]) -> List[Launch]:
    """The launches of one phase over ``groups`` (all taken by the kernels), in order: three per bucket."""
    grads = [_kernel_grads(g) for g in groups]
    has_flag = found_inf is not None
    flag = found_inf.to(torch.float32) if has_flag else groups[0].step  # a placeholder pointer, never read
    launches = []
    for bucket in plan_buckets(groups, grads):
        # The gradient table holds raw addresses: the update launch keeps the tensors behind them
        # (casts and contiguous copies are temporaries of this call) until it has been enqueued;
        # once it has, freeing them is stream-ordered by the caching allocator.
        bucket_grads = tuple(t for gi, _ in bucket.members for t in grads[gi])
        # Workspaces of this phase only (see triton_phase_tables.workspaces): the launches hold them.
        precond, carry, partials = workspaces(bucket)
        launches.append(factor_launch(bucket.layers, bucket.padded, hp.damping, precond, carry))
        launches.append(
            Launch(
                update_kernel,
                (bucket.num_chunks,),
                (
                    bucket.layers, bucket.grads, bucket.chunks, precond, carry, partials, flag,
                    float(hp.lr), float(hp.beta1), float(hp.beta2), float(hp.eps), float(hp.weight_decay),
                    _log2(hp.beta1), _log2(hp.beta2),
                ),
                dict(
                    NUM_FIELDS=NUM_FIELDS,
                    GRAD_FIELDS=GRAD_FIELDS,
                    R=bucket.padded,
                    BLOCK_N=bucket.block_n,
                    TRANSPOSED=bucket.transposed,
                    ADAPTIVE=bool(hp.adaptive),
                    HAS_SNAPSHOT=bucket.has_snapshot,
                    HAS_FOUND_INF=has_flag,
                    PARAM_DTYPE=_TL_DTYPES[bucket.param_dtype],
                    GRAD_DTYPE=_TL_DTYPES[bucket.grad_dtype],
                ),
                UPDATE_WARPS[bucket.padded],
                keep_alive=bucket_grads,
            )
        )
        launches.append(
            Launch(
                reduce_kernel,
                (bucket.num_layers,),
                (bucket.layers, partials, flag),
                dict(NUM_FIELDS=NUM_FIELDS, R=bucket.padded, HAS_FOUND_INF=has_flag),
                FACTOR_WARPS[bucket.padded],
            )
        )
    return launches


_NOT_CAPTURABLE = (
    "its work tables are built on the host and copied host→device whenever a factor's or gradient's "
    "storage changes, so a replayed graph would read the captured step's tables; run the phase outside the graph"
)


def phase_update(
    groups: Sequence[FactorGroup],
    hp: PhaseHyperParams,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One phase for every group (semantics: ``torch_phase_update.py``); three launches per bucket."""
    refuse_capture("backend='triton' (the phase update)", _NOT_CAPTURABLE)
    groups = list(groups)
    if not groups:
        return
    device = _check(groups, hp, found_inf)
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)
    taken = [g for g in groups if _kernels_take(g)]
    fallback = [g for g in groups if not _kernels_take(g)]
    if fallback:
        phase_update_torch(fallback, hp, found_inf)
    if taken:
        # Triton launches on the current CUDA device; make it the factors' one.
        with device_guard(device):
            if not _trusted(device, taken[0], hp, found_inf):
                phase_update_torch(taken, hp, found_inf)
                return
            for launch in phase_launches(taken, hp, found_inf):
                launch()


# ----------------------------------------------------------------------------- first-use self-check
SELF_CHECK_ENV = "ALTLORA_TRITON_SELF_CHECK"
# Device types whose first use is checked: CUDA, the hardware no test of this repository has run
# the kernels on. The CPU interpreter is what CI tests (tests switch the check on there).
SELF_CHECK_DEVICE_TYPES: Tuple[str, ...] = ("cuda",)
# (device, Triton version) → None when the check passed, else why it failed. Per process.
_VERDICTS: Dict[Tuple[str, str], Optional[str]] = {}
# Relative tolerances (of the largest reference entry) against the float64 torch backend: fp32 math
# on a well-conditioned problem is ~1e-6 off; a half-precision factor is rounded once (2⁻⁸ for
# bf16). A kernel that reads or writes the wrong place is off by O(1).
_SELF_CHECK_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def self_check_enabled() -> bool:
    """False when ``ALTLORA_TRITON_SELF_CHECK`` is 0 / false / off / no."""
    return os.environ.get(SELF_CHECK_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def self_check_results() -> Dict[str, Optional[str]]:
    """``{"<device> (Triton <version>)": None if the check passed, else why not}`` for this process."""
    return {f"{device} (Triton {version})": verdict for (device, version), verdict in _VERDICTS.items()}


def _check_key(device: torch.device) -> Tuple[str, str]:
    return str(device), str(getattr(triton, "__version__", "unknown"))


def _tiny_problem(device, *, rank, transposed, dtype, grad_dtype, adaptive, snapshot, seed=0):
    """Two layers of rank ``rank`` with 37 columns and state as after a few phases, as a FactorGroup
    with float32 state on ``device`` (what the kernels get) and one in float64 (the reference),
    from the same values (the half-precision ones rounded first)."""
    gen = torch.Generator().manual_seed(seed)
    layers, n, m = 2, 37, 29

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    def stored(rows):  # row form (L, r, n) -> the factor as stored: A (r, n) or B (n, r)
        return rows.transpose(1, 2).contiguous() if transposed else rows

    x = rand(layers, rank, n, scale=n**-0.5)
    grad = rand(layers, rank, n, scale=0.1)
    y = rand(layers, rank, m, scale=m**-0.5)
    eye = torch.eye(rank, dtype=torch.float64)
    values = {
        "params": stored(x).to(dtype).double(),
        "grads": stored(grad).to(grad_dtype).double(),
        "momentum": stored(rand(layers, rank, n, scale=0.01)),
        "variance": stored(rand(layers, rank, n, scale=1e-2) ** 2 + 1e-6) if adaptive else None,
        "snapshot": stored(x + rand(layers, rank, n, scale=1e-2)).to(dtype).double() if snapshot else None,
        "gram": x @ x.mT,
        "cross": x @ x.mT,
        "other_gram": y @ y.mT + 0.1 * eye,  # well-conditioned: fp32 rounding is not amplified
        "other_cross": (y + rand(layers, rank, m, scale=0.05)) @ y.mT,
        "step": torch.full((layers,), 3.0, dtype=torch.float64),
        "inv_scale_sq": torch.full((layers,), 0.25, dtype=torch.float64),
    }

    def group(param_dtype, grad_dt, state_dtype):
        def cast(name, to):
            t = values[name]
            return None if t is None else t.to(device=device, dtype=to).contiguous()

        state = {k: cast(k, state_dtype) for k in ("momentum", "variance", "gram", "cross", "other_gram",
                                                   "other_cross", "step", "inv_scale_sq")}
        params = cast("params", param_dtype)
        grads = cast("grads", grad_dt)
        return FactorGroup(params=list(params.unbind(0)), grads=list(grads.unbind(0)), transposed=transposed,
                           snapshot=cast("snapshot", param_dtype), **state)

    return group(dtype, grad_dtype, torch.float32), group(torch.float64, torch.float64, torch.float64)


def _group_tensors(g: FactorGroup) -> Dict[str, torch.Tensor]:
    out = {"params": torch.stack(list(g.params))}
    for name in ("momentum", "variance", "gram", "cross", "other_cross", "step"):
        if getattr(g, name) is not None:
            out[name] = getattr(g, name)
    return out


def _reference_phase(groups: Sequence[FactorGroup], hp: PhaseHyperParams, found_inf: Optional[torch.Tensor]) -> None:
    """The reference of the self-check: the torch backend (its own function, so tests can alter it)."""
    phase_update_torch(groups, hp, found_inf)


def self_check(
    device,
    *,
    rank: int = 8,
    transposed: bool = False,
    dtype: torch.dtype = torch.float32,
    grad_dtype: Optional[torch.dtype] = None,
    adaptive: bool = True,
    snapshot: bool = False,
    with_flag: bool = False,
) -> Optional[str]:
    """One tiny phase through the kernels and through the torch backend in float64 on ``device``.

    None when they agree within a tolerance that rounding explains, else what disagreed (or the
    error that building or launching the kernels raised). The kernels compiled for it are those of
    a real phase of the same kind, so on first use the check costs no extra build.
    """
    device = torch.device(device)
    grad_dtype = dtype if grad_dtype is None else grad_dtype
    hp = PhaseHyperParams(lr=0.05, beta1=0.9, weight_decay=0.01, damping=1e-3, adaptive=adaptive, beta2=0.99)
    kernel_group, reference = _tiny_problem(device, rank=rank, transposed=transposed, dtype=dtype,
                                            grad_dtype=grad_dtype, adaptive=adaptive, snapshot=snapshot)
    flag = torch.zeros((), dtype=torch.float32, device=device) if with_flag else None
    try:
        with device_guard(device):
            for launch in phase_launches([kernel_group], hp, flag):
                launch()
        _reference_phase([reference], hp, None if flag is None else flag.double())
        got, want = _group_tensors(kernel_group), _group_tensors(reference)
    except Exception as error:  # noqa: BLE001 - a kernel that cannot build or launch fails the check
        first = (str(error).strip().splitlines() or [""])[0]
        return f"the kernels raised {type(error).__name__}: {first[:300]}"
    tol = _SELF_CHECK_TOL.get(dtype, 1e-3)
    for name, expected in want.items():
        actual = got[name].double().cpu()
        expected = expected.cpu()
        scale = float(expected.abs().max()) or 1.0
        bad = ~torch.isfinite(actual)
        error = float((actual - expected).abs().max()) / scale if not bad.any() else float("inf")
        if not error <= (tol if name in ("params", "gram", "cross") else _SELF_CHECK_TOL[torch.float32]):
            return (f"{name} of a rank-{rank} {'B' if transposed else 'A'} phase ({str(dtype).replace('torch.', '')}, "
                    f"{'AltLoRA+' if adaptive else 'AltLoRA'}) is {error:.3g} × its largest value away from the torch backend")
    return None


def _trusted(device: torch.device, like: FactorGroup, hp: PhaseHyperParams, found_inf: Optional[torch.Tensor]) -> bool:
    """Whether the kernels may run on ``device``: the first-use self-check passed (or is off)."""
    if device.type not in SELF_CHECK_DEVICE_TYPES or not self_check_enabled():
        return True
    key = _check_key(device)
    if key not in _VERDICTS:
        verdict = self_check(device, rank=_rank(like), transposed=like.transposed, dtype=like.params[0].dtype,
                             grad_dtype=_kernel_grad_dtype(like), adaptive=bool(hp.adaptive),
                             snapshot=like.snapshot is not None, with_flag=found_inf is not None)
        _VERDICTS[key] = verdict
        if verdict is not None:
            warnings.warn(
                f"altlora: the Triton phase update failed its first-use self-check on {device} (Triton {key[1]}): "
                f"{verdict}. The torch backend runs every phase on this device for the rest of the process "
                f"(slower, same results). Please report this with the output of `bash bench/gpu_check.sh --quick`. "
                f"{SELF_CHECK_ENV}=0 skips the check and runs the kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _VERDICTS[key] is None
