"""Triton kernels of the fused LoRA linear op (the math and the autograd wiring: ``lora_linear.py``).

Three kernels cover the forward and the backward (``keep`` is the optional dropout keep-mask):

* :func:`project`               ``out = scale · (keep ⊙ x) · mᵀ``            (N×C)·(R×C)ᵀ → N×R
  ``h = drop(x)·Aᵀ`` in the forward and ``g = dy·B`` in the backward.
* :func:`matmul_plus_low_rank`  ``out = x·w + bias + scaling · [keep ⊙] (h·l)``   → N×C
  the forward ``y`` (w = W0ᵀ, l = Bᵀ) and ``dx`` (w = W0, h = g, l = A). The low-rank product of
  an output tile is computed in registers and added to the GEMM's fp32 accumulator after its K
  loop (through the tile's keep-mask in dx with dropout), so no N×C intermediate exists.
* :func:`low_rank_grad`         ``out = scale · hᵀ · (keep ⊙ x)``              (N×R)ᵀ·(N×C) → R×C
  ``dA`` (h = g) and ``dBᵀ`` (h = drop(x)·Aᵀ, x = dy), split over N for parallelism; partial sums
  are added by torch in a fixed order, so the result is deterministic.

Every kernel accumulates in fp32 and takes arbitrary strides, so transposed views need no copy.
Every index that multiplies a stride (rows, columns, K, ranks, splits) is int64: a column-major
x (column stride N), a transposed weight (W0ᵀ has column stride K) or a split stride R·C would
overflow int32 products past 2³¹ elements (tests/test_triton_launch_safety.py reads the compiled
address arithmetic).

Compile rules that the interpreter (``TRITON_INTERPRET=1``) does not enforce are kept here:
``tl.dot`` needs every dimension ≥ 16, so the rank is processed in blocks of a power of two
≥ 16 with masked loads (r = 8 is the paper's default); fp32 ``tl.dot`` uses TF32 on a GPU unless
``input_precision="ieee"``, which we ask for with fp32 inputs to match torch's fp32 matmul; the
interpreter has no bf16 arithmetic, so there tiles are cast to fp32 right after loading; block
sizes come from a fixed table (no ``@triton.autotune``, which the interpreter cannot run), the
first entry that fits the device's shared memory per block (:func:`launch_config`); kernels are
``triton_runtime.LazyKernel``s and use only builtins of ``triton.language`` (see there why).
Launches run with the tensors' device made current (``triton_runtime.device_guard``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .triton_runtime import LazyKernel, Launch, device_reason, dot_extent, interpreter_enabled, tl, triton

__all__ = [
    "SUPPORTED_DTYPES",
    "unavailable_reason",
    "launch_candidates",
    "launch_config",
    "shared_memory_per_block",
    "split_count",
    "project",
    "matmul_plus_low_rank",
    "low_rank_grad",
    "PROJECT_KERNEL",
    "MATMUL_PLUS_LOW_RANK_KERNEL",
    "LOW_RANK_GRAD_KERNEL",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest rank block held in registers at once; larger ranks loop (or get more programs). fp32
# products are IEEE FMAs on CUDA cores, which hold a dot's K extent in registers: a rank block of
# 64 spilled up to 48 KB per thread in the low-rank term on sm_80, 32 does not (docs/kernels.md).
MAX_RANK_BLOCK = 64
MAX_RANK_BLOCK_FP32 = 32
# Programs the split-N reduction of low_rank_grad aims at, to fill a GPU: about 4 per SM on the
# GPUs we target (A100 108 SMs, H100 132, A6000 84). A constant on purpose, not the device's SM
# count: the split count decides how dA/dB are summed (see split_count), and a count that followed
# the SM count would give other bits on every GPU model.
TARGET_PROGRAMS = 512


def _project_kernel(
    x_ptr, m_ptr, keep_ptr, out_ptr,
    n_rows, n_cols, rank,
    stride_xm, stride_xc, stride_mr, stride_mc, stride_km, stride_kc, stride_om, stride_or,
    scale,
    HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RANK_BLOCK: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ranks = (tl.program_id(1) * RANK_BLOCK + tl.arange(0, RANK_BLOCK)).to(tl.int64)
    acc = tl.full((BLOCK_M, RANK_BLOCK), 0.0, tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        x_ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=x_ok, other=0.0)
        # mᵀ tile (BLOCK_C, RANK_BLOCK) read through swapped strides
        mt = tl.load(m_ptr + ranks[None, :] * stride_mr + cols[:, None] * stride_mc,
                     mask=(ranks[None, :] < rank) & (cols[:, None] < n_cols), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            mt = mt.to(tl.float32)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + rows[:, None] * stride_km + cols[None, :] * stride_kc, mask=x_ok, other=0)
            x = tl.where(keep != 0, x, tl.full((BLOCK_M, BLOCK_C), 0.0, x.dtype))
        acc = tl.dot(x, mt, acc, input_precision=PRECISION)
    out = acc * scale
    tl.store(out_ptr + rows[:, None] * stride_om + ranks[None, :] * stride_or, out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


def _matmul_plus_low_rank_kernel(
    x_ptr, w_ptr, h_ptr, l_ptr, bias_ptr, keep_ptr, out_ptr,
    n_rows, n_cols, n_inner, rank,
    stride_xm, stride_xk, stride_wk, stride_wc, stride_hm, stride_hr, stride_lr, stride_lc,
    stride_km, stride_kc, stride_om, stride_oc,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, RANK_BLOCK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row blocks share each column block of w while it is in L2.
    pid = tl.program_id(0)
    blocks_m = (n_rows + BLOCK_M - 1) // BLOCK_M
    blocks_c = (n_cols + BLOCK_C - 1) // BLOCK_C
    per_group = GROUP_M * blocks_c
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_c = (pid % per_group) // group_rows
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols

    acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    for k0 in range(0, n_inner, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < n_inner), other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wc,
                    mask=(ks[:, None] < n_inner) & col_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)

    # The low-rank term joins the accumulator in registers, after the K loop so that its tiles do
    # not hold registers during it; the rank loop runs once for r ≤ MAX_RANK_BLOCK.
    low_rank = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    for r0 in range(0, rank, RANK_BLOCK):
        ranks = (r0 + tl.arange(0, RANK_BLOCK)).to(tl.int64)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr,
                    mask=row_ok[:, None] & (ranks[None, :] < rank), other=0.0)
        lt = tl.load(l_ptr + ranks[:, None] * stride_lr + cols[None, :] * stride_lc,
                     mask=(ranks[:, None] < rank) & col_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            lt = lt.to(tl.float32)
        low_rank = tl.dot(h, lt, low_rank, input_precision=PRECISION)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_KEEP:
        keep = tl.load(keep_ptr + rows[:, None] * stride_km + cols[None, :] * stride_kc, mask=out_ok, other=0)
        acc += tl.where(keep != 0, low_rank * scaling, tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32))
    else:
        acc += low_rank * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oc, acc.to(out_ptr.dtype.element_ty),
             mask=out_ok)


def _low_rank_grad_kernel(
    h_ptr, x_ptr, keep_ptr, out_ptr,
    n_rows, n_cols, rank, rows_per_split,
    stride_hm, stride_hr, stride_xm, stride_xc, stride_km, stride_kc, stride_os, stride_or, stride_oc,
    scale,
    HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RANK_BLOCK: tl.constexpr,
):
    cols = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    split = tl.program_id(1)
    ranks = (tl.program_id(2) * RANK_BLOCK + tl.arange(0, RANK_BLOCK)).to(tl.int64)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.full((RANK_BLOCK, BLOCK_C), 0.0, tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < row_end
        # hᵀ tile (RANK_BLOCK, BLOCK_M) read through swapped strides
        ht = tl.load(h_ptr + ranks[:, None] * stride_hr + rows[None, :] * stride_hm,
                     mask=(ranks[:, None] < rank) & row_ok[None, :], other=0.0)
        x_ok = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=x_ok, other=0.0)
        if UPCAST:
            ht = ht.to(tl.float32)
            x = x.to(tl.float32)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + rows[:, None] * stride_km + cols[None, :] * stride_kc, mask=x_ok, other=0)
            x = tl.where(keep != 0, x, tl.full((BLOCK_M, BLOCK_C), 0.0, x.dtype))
        acc = tl.dot(ht, x, acc, input_precision=PRECISION)
    out = acc * scale
    tl.store(out_ptr + split.to(tl.int64) * stride_os + ranks[:, None] * stride_or + cols[None, :] * stride_oc,
             out.to(out_ptr.dtype.element_ty), mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols))


PROJECT_KERNEL = LazyKernel(_project_kernel)
MATMUL_PLUS_LOW_RANK_KERNEL = LazyKernel(_matmul_plus_low_rank_kernel)
LOW_RANK_GRAD_KERNEL = LazyKernel(_low_rank_grad_kernel)


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why these kernels cannot run on ``device``, or None if they can."""
    return device_reason(device)


# --------------------------------------------------------------------------------------------
# Launch configuration


def _rank_block(rank: int, dtype: torch.dtype) -> int:
    return dot_extent(rank, cap=MAX_RANK_BLOCK_FP32 if dtype == torch.float32 else MAX_RANK_BLOCK)


def _dtype_options(dtype: torch.dtype) -> dict:
    # The interpreter cannot do bf16/fp16 arithmetic: tiles are cast to fp32 right after loading.
    return {"UPCAST": interpreter_enabled(), "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreter_enabled()


# Fixed tiles (no autotuning: the interpreter cannot run it). Per kernel and dtype class, launch
# configurations in order of preference, each with the most shared memory per block it needs at any
# rank block, with or without dropout and bias (measured by ahead-of-time builds for sm_80, sm_86 and
# sm_90 with Triton 3.9; tests/test_triton_launch_safety.py rebuilds them and fails if a build needs
# more, or spills more registers than tests/triton_aot.py's SPILL_BOUNDS). A device takes the first
# that fits its shared memory per block (launch_config); every configuration here fits all three
# targets (the A6000's 99 KB included), so today each list has one entry and the choice matters only
# for smaller GPUs, where the launcher also retries with fewer stages (_run): fewer stages keep the
# tiles, so results (the split count of low_rank_grad included) do not change.
#
# Registers (ptxas -v, docs/kernels.md "Register spills"): 8 warps everywhere, which spreads the same
# tiles over twice the threads of 4 (a block's register footprint, and so its occupancy, is the same;
# spills of the 4-warp builds went up to 2 KB in bf16 and 54 KB in fp32). fp32 takes smaller tiles
# than the two-byte dtypes: its products run as IEEE FMAs on CUDA cores, which hold operand K extents
# in registers, and the tiles used before (128×128 GEMM, 64×128 low_rank_grad) spilled 0.5–54 KB per
# thread. Two-byte dtypes keep the 128×128 GEMM tile: it spills 0.2–0.6 KB in the low-rank epilogue
# on some targets, where a 64-row tile (no spills) would halve the GEMM's reuse of each W0 tile.
KIB = 1024
_GPU_CONFIGS = {
    "project": {
        "two_byte": [({"BLOCK_M": 64, "BLOCK_C": 128}, {"num_warps": 8, "num_stages": 3}, 32 * KIB)],
        "four_byte": [({"BLOCK_M": 64, "BLOCK_C": 64}, {"num_warps": 8, "num_stages": 3}, 64 * KIB)],
    },
    "matmul_plus_low_rank": {
        "two_byte": [({"BLOCK_M": 128, "BLOCK_C": 128, "BLOCK_K": 64, "GROUP_M": 8},
                      {"num_warps": 8, "num_stages": 3}, 32 * KIB)],
        "four_byte": [({"BLOCK_M": 64, "BLOCK_C": 128, "BLOCK_K": 16, "GROUP_M": 8},
                       {"num_warps": 8, "num_stages": 3}, 48 * KIB)],
    },
    "low_rank_grad": {
        "two_byte": [({"BLOCK_M": 64, "BLOCK_C": 128}, {"num_warps": 8, "num_stages": 3}, 24 * KIB)],
        "four_byte": [({"BLOCK_M": 32, "BLOCK_C": 64}, {"num_warps": 8, "num_stages": 3}, 32 * KIB)],
    },
}
# Under the interpreter bigger tiles mean fewer (slow, Python-level) programs.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_C": 32, "BLOCK_K": 32, "GROUP_M": 8}


def launch_candidates(kernel: str, dtype: torch.dtype):
    """``[(constexpr block sizes, launch options, shared-memory bytes needed)]`` of ``kernel`` for ``dtype``, preferred first."""
    table = _GPU_CONFIGS[kernel]
    return table["two_byte"] if dtype in (torch.bfloat16, torch.float16) else table["four_byte"]


def launch_config(kernel: str, dtype: torch.dtype, gpu: bool = True, shared_memory: Optional[int] = None):
    """``(constexpr block sizes, launch options)`` of ``kernel`` for ``dtype`` (GPU or interpreter).

    ``shared_memory``: the device's shared memory per block in bytes (:func:`shared_memory_per_block`);
    the first configuration that fits is chosen, else the smallest (None: the first, for H100/A100).
    """
    candidates = launch_candidates(kernel, dtype)
    if not gpu:
        return {k: _INTERPRETER_BLOCKS[k] for k in candidates[0][0]}, {}
    chosen = candidates[-1]
    for candidate in candidates:
        if shared_memory is None or candidate[2] <= shared_memory:
            chosen = candidate
            break
    return dict(chosen[0]), dict(chosen[1])


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(index: int) -> int:
    """Bytes of shared memory one block of CUDA device ``index`` may use (the opt-in maximum)."""
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    # Older torch: ask Triton's driver, which checks its launches against the same number.
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def _device_launch_config(kernel: str, dtype: torch.dtype, device: torch.device):
    if not _gpu(device):
        return launch_config(kernel, dtype, gpu=False)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return launch_config(kernel, dtype, gpu=True, shared_memory=shared_memory_per_block(index))


def _keep_args(keep: Optional[torch.Tensor], fallback: torch.Tensor):
    # A bool mask is read as bytes; without one, any pointer does (HAS_KEEP=False never loads it).
    if keep is None:
        return fallback, 0, 0
    keep = keep.view(torch.uint8)
    return keep, keep.stride(0), keep.stride(1)


def _launch(kernel: LazyKernel, device: torch.device, grid, args: tuple, constexprs: dict, options: dict) -> Launch:
    # Every launch of this module goes through here, with the tensors' device made current for it.
    options = dict(options)
    return Launch(kernel, tuple(grid), args, constexprs, options.pop("num_warps", None), options, device=device)


def _out_of_shared_memory(error: Exception) -> bool:
    errors = getattr(getattr(triton, "runtime", None), "errors", None)
    kind = getattr(errors, "OutOfResources", None)
    return kind is not None and isinstance(error, kind) and getattr(error, "name", "") == "shared memory"


def _run(launch: Launch) -> None:
    """Run ``launch``; if the device refuses it for shared memory, retry with one stage fewer.

    The budgets of _GPU_CONFIGS were measured with one Triton version; another may lay out shared
    memory differently. Triton checks a kernel's shared memory when it loads it, before it runs,
    so a retry is safe, and fewer stages keep the tiles (and the results).
    """
    while True:
        try:
            launch()
            return
        except Exception as error:  # noqa: BLE001 - only the shared-memory refusal is retried
            stages = launch.options.get("num_stages", 3)
            if not _out_of_shared_memory(error) or stages <= 1:
                raise
            launch.options["num_stages"] = stages - 1


# --------------------------------------------------------------------------------------------
# Launchers (2-D inputs, any strides; shapes are checked by the caller in lora_linear.py)


def project(x: torch.Tensor, m: torch.Tensor, scale: float, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale · (keep ⊙ x) · mᵀ`` for ``x`` (N, C) and ``m`` (R, C), in ``x.dtype``."""
    n_rows, n_cols = x.shape
    rank = m.shape[0]
    out = torch.empty((n_rows, rank), device=x.device, dtype=x.dtype)
    if n_rows == 0:
        return out
    if n_cols == 0:
        return out.zero_()
    rank_block = _rank_block(rank, x.dtype)
    blocks, launch = _device_launch_config("project", x.dtype, x.device)
    keep_t, stride_km, stride_kc = _keep_args(keep, x)
    grid = (triton.cdiv(n_rows, blocks["BLOCK_M"]), triton.cdiv(rank, rank_block))
    _run(_launch(PROJECT_KERNEL, x.device, grid, (
        x, m, keep_t, out, n_rows, n_cols, rank,
        x.stride(0), x.stride(1), m.stride(0), m.stride(1), stride_km, stride_kc, out.stride(0), out.stride(1),
        float(scale),
    ), dict(HAS_KEEP=keep is not None, RANK_BLOCK=rank_block, **blocks, **_dtype_options(x.dtype)), launch))
    return out


def matmul_plus_low_rank(
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x·w + bias + scaling·[keep ⊙](h·l)`` for ``x`` (N, K), ``w`` (K, C), ``h`` (N, R), ``l`` (R, C)."""
    n_rows, n_inner = x.shape
    n_cols = w.shape[1]
    rank = h.shape[1]
    out = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    if n_rows == 0 or n_cols == 0:
        return out
    blocks, launch = _device_launch_config("matmul_plus_low_rank", x.dtype, x.device)
    keep_t, stride_km, stride_kc = _keep_args(keep, x)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads the bias with unit stride (C values: a cheap copy)
    bias_t = bias if bias is not None else x
    grid = (triton.cdiv(n_rows, blocks["BLOCK_M"]) * triton.cdiv(n_cols, blocks["BLOCK_C"]),)
    _run(_launch(MATMUL_PLUS_LOW_RANK_KERNEL, x.device, grid, (
        x, w, h, l, bias_t, keep_t, out, n_rows, n_cols, n_inner, rank,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), h.stride(0), h.stride(1), l.stride(0), l.stride(1),
        stride_km, stride_kc, out.stride(0), out.stride(1),
        float(scaling),
    ), dict(HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, RANK_BLOCK=_rank_block(rank, x.dtype),
            **blocks, **_dtype_options(x.dtype)), launch))
    return out


def split_count(n_rows: int, n_cols: int, rank: int, block_m: int, block_c: int, rank_block: int) -> int:
    """Row ranges ``low_rank_grad`` reduces in separate programs on a GPU: a function of the shapes only.

    Each split sums its rows in a fixed order and torch adds the splits' fp32 partials in order, so
    the split count fixes the summation order of dA and dB. It depends on the shapes and the tiles
    (the same on every target: fewer pipeline stages on a 99 KB GPU keep the tiles), never on the
    device, so the same inputs give the same bits on an A100, an A6000 and an H100 with one Triton
    version, as far as the split reduction goes (docs/kernels.md: what can still differ).
    """
    col_programs = triton.cdiv(n_cols, block_c) * triton.cdiv(rank, rank_block)
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, col_programs), triton.cdiv(n_rows, 4 * block_m)))


def low_rank_grad(h: torch.Tensor, x: torch.Tensor, scale: float, keep: Optional[torch.Tensor] = None,
                  splits: Optional[int] = None) -> torch.Tensor:
    """``scale · hᵀ · (keep ⊙ x)`` for ``h`` (N, R) and ``x`` (N, C): an (R, C) tensor in ``x.dtype``.

    ``splits``: how many row ranges are reduced by separate programs (default: :func:`split_count`
    on a GPU, enough programs to fill one whatever its SM count; 1 under the interpreter).
    """
    n_rows, n_cols = x.shape
    rank = h.shape[1]
    if n_rows == 0 or n_cols == 0:
        return torch.zeros((rank, n_cols), device=x.device, dtype=x.dtype)
    rank_block = _rank_block(rank, x.dtype)
    blocks, launch = _device_launch_config("low_rank_grad", x.dtype, x.device)
    block_m, block_c = blocks["BLOCK_M"], blocks["BLOCK_C"]
    if splits is None:
        splits = split_count(n_rows, n_cols, rank, block_m, block_c, rank_block) if _gpu(x.device) else 1
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_m) * block_m
    splits = triton.cdiv(n_rows, rows_per_split)
    # One split writes the result directly; several write fp32 partials that torch adds in order.
    if splits == 1:
        out = torch.empty((1, rank, n_cols), device=x.device, dtype=x.dtype)
    else:
        out = torch.empty((splits, rank, n_cols), device=x.device, dtype=torch.float32)
    keep_t, stride_km, stride_kc = _keep_args(keep, x)
    grid = (triton.cdiv(n_cols, block_c), splits, triton.cdiv(rank, rank_block))
    _run(_launch(LOW_RANK_GRAD_KERNEL, x.device, grid, (
        h, x, keep_t, out, n_rows, n_cols, rank, rows_per_split,
        h.stride(0), h.stride(1), x.stride(0), x.stride(1), stride_km, stride_kc,
        out.stride(0), out.stride(1), out.stride(2),
        float(scale),
    ), dict(HAS_KEEP=keep is not None, RANK_BLOCK=rank_block, **blocks, **_dtype_options(x.dtype)), launch))
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)
