"""The parts of ``bash bench/gpu_check.sh --quick``: one GPU, at most 8 minutes, nothing to install.

    python -m bench.gpu_quick PART --out DIR [--dry-run]

Parts (the shell script runs each under its own ``timeout`` and then ``summary``):

* ``env``: versions, the device (name, compute capability, SMs, shared memory per block) and the
  first-use self-check of the Triton phase update at three kinds of phase.
* ``sweep``: every launch configuration the code can choose, run against a reference: the phase
  update at every padded rank (16, 32, 64, 128: one (BLOCK_N, warps) configuration each) and
  dtype against the torch backend; the fused LoRA linear with every candidate configuration of its
  three kernels (the shared-memory budget is lowered to make the launcher choose the smaller ones,
  as an A6000 would), every rank block and dtype, against float64. Configurations come first
  (each once), then the remaining dtypes, so a time-out still leaves every configuration tried.
  One JSON line per case in ``sweep.jsonl`` as it finishes.
* ``memcheck-step``: one small optimizer step (Triton phase update) and one fused LoRA linear
  forward and backward with dropout; the shell script runs it under ``compute-sanitizer``.
* ``optimizer``: the optimizer step at Llama-3-8B adapter shapes (32 layers × q, k, v, o; hidden
  4096, kv 1024) at r = 8 and 64: AltLoRA / AltLoRA+ on the triton and torch backends, AdamW(fused).
* ``linear``: the fused LoRA linear (Triton and torch backends) against the plain autograd
  equations at 8192 tokens × 4096 → 4096, bf16, r = 16 and 64, per trainable-factor pattern.
* ``e2e``: a Llama-shaped training step built from ``altlora.LoRALinear`` (no transformers or
  peft needed): 2 decoder blocks at 8B widths, bf16; LoRA + AdamW vs AltLoRA (fused linear and
  Triton phase update).
* ``e2e-hf``: ``bench/end_to_end.py``'s comparison (one 8B-wide layer) when transformers and
  peft are installed.
* ``summary``: one table of every part (status, time, headline numbers) in ``summary.md``.

``--dry-run`` runs every part on the CPU with tiny shapes, the Triton kernels in Triton's
interpreter and the GPU launch-configuration choice faked, so that each part's code runs before a
GPU is lent (``tests/test_triton_gpu_quick.py`` runs it). Each part writes ``<part>.json`` into DIR
and exits non-zero when a correctness check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARTS = ("env", "sweep", "memcheck-step", "optimizer", "linear", "e2e", "e2e-hf")
KERNELS = ("project", "matmul_plus_low_rank", "low_rank_grad")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Ranks of the phase-update sweep: padded to 16, 32, 64 and 128 (every update configuration),
# most of them not a power of two, so that the rank masks are exercised.
PHASE_RANKS = (8, 24, 64, 100)
# Ranks of the fused-linear sweep: rank blocks 16, 32, 64, and 64 looped twice.
LINEAR_RANKS = (8, 32, 64, 100)
# Normalized max errors (of the largest reference entry) accepted against the reference.
PHASE_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
LINEAR_TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
LLAMA_3_8B_BLOCK = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)]  # (d_in, d_out) of q, k, v, o


class Context:
    def __init__(self, out: str, dry_run: bool):
        self.out = out
        self.dry = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.elapsed: Optional[int] = None
        os.makedirs(out, exist_ok=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def write(self, name: str, payload: Dict) -> None:
        with open(os.path.join(self.out, f"{name}.json"), "w") as fh:
            json.dump(payload, fh, indent=1, default=str)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _normalized_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (inf when actual is not finite where expected is)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual[torch.isfinite(expected)]).all():
        return float("inf")
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((actual - expected).abs().max()) / (scale or 1.0) if expected.numel() else 0.0


# ------------------------------------------------------------------------------------------ env
def part_env(ctx: Context) -> int:
    from altlora_kernels import triton_phase_update as U
    from bench.common import environment

    info: Dict[str, object] = dict(environment(str(ctx.device)))
    info["numpy"] = _version("numpy")
    info["transformers"] = _version("transformers")
    info["peft"] = _version("peft")
    info["compute-sanitizer"] = shutil.which("compute-sanitizer") or "not on PATH"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info["capability"] = f"sm_{props.major}{props.minor}"
        info["sms"] = props.multi_processor_count
        info["shared_memory_per_block_optin"] = getattr(props, "shared_memory_per_block_optin", None)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    checks = []
    for dtype, rank, transposed in ((torch.float32, 8, False), (torch.bfloat16, 100, True), (torch.float16, 24, False)):
        start = time.time()
        verdict = U.self_check(ctx.device, rank=rank, transposed=transposed, dtype=dtype, with_flag=True)
        checks.append({"check": f"self-check r={rank} {'B' if transposed else 'A'} {_dtype_name(dtype)}",
                       "verdict": "ok" if verdict is None else verdict, "seconds": round(time.time() - start, 1)})
    info["self_check"] = checks
    for key, value in info.items():
        if key != "self_check":
            print(f"{key}: {value}")
    for row in checks:
        print(f"{row['check']}: {row['verdict']} ({row['seconds']} s)")
    failed = [c for c in checks if c["verdict"] != "ok"]
    ctx.write("env", {"environment": info, "failed": len(failed)})
    return 1 if failed else 0


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return str(getattr(__import__(module), "__version__", "installed"))
    except Exception as err:  # noqa: BLE001 - an install that fails to import is worth reporting
        return f"fails to import ({type(err).__name__})"


# ------------------------------------------------------------------------------------------ sweep
def phase_configurations() -> Dict[int, Dict[str, int]]:
    """Launch configuration of the phase update per padded rank: what the code can choose."""
    from altlora_kernels import triton_phase_tables as tables

    return {padded: {"BLOCK_N": tables.tile_shape(padded)[0], "update_warps": tables.UPDATE_WARPS[padded],
                     "factor_warps": tables.FACTOR_WARPS[padded]}
            for padded in sorted(tables.BLOCK_N_BY_PADDED_RANK)}


def linear_budgets(dtype: torch.dtype, device_limit: Optional[int]) -> List[Optional[int]]:
    """Shared-memory limits under which the fused linear's launchers choose each distinct set of
    configurations (None: the device's own), largest first; every candidate is chosen under one."""
    from altlora_kernels import triton_lora_linear as T

    budgets = sorted({b for k in KERNELS for _, _, b in T.launch_candidates(k, dtype)}, reverse=True)
    limits: List[Optional[int]] = [None]
    seen = {tuple(repr(T.launch_config(k, dtype, shared_memory=device_limit)) for k in KERNELS)}
    for budget in budgets:
        if device_limit is not None and budget > device_limit:
            continue
        chosen = tuple(repr(T.launch_config(k, dtype, shared_memory=budget)) for k in KERNELS)
        if chosen not in seen:
            seen.add(chosen)
            limits.append(budget)
    return limits


@contextlib.contextmanager
def _patched(obj, name, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def _linear_launch_limit(ctx: Context, limit: Optional[int]) -> Iterator[None]:
    """The fused linear's launchers choose configurations as for a device with ``limit`` bytes of
    shared memory per block (None: this device's). Dry run: they choose as on a GPU (the H100's
    228 KB when None) and the kernels run in the interpreter."""
    from altlora_kernels import triton_lora_linear as T

    with contextlib.ExitStack() as stack:
        if ctx.dry:
            stack.enter_context(_patched(T, "_gpu", lambda device: True))
            stack.enter_context(_patched(torch.cuda, "current_device", lambda: 0))
            limit = 232448 if limit is None else limit
        if limit is not None:
            stack.enter_context(_patched(T, "shared_memory_per_block", lambda index: limit))
        yield


def _phase_run(ctx: Context, backend: str, rank: int, dtype: torch.dtype, variant: str, steps: int):
    import altlora

    shapes = [(37, 29)] if ctx.dry else [(257, 129), (130, 300)]  # (d, k): several chunks per layer on a GPU
    gen = torch.Generator().manual_seed(rank)
    pairs = []
    for i, (d, k) in enumerate(shapes):
        A = torch.nn.Parameter((torch.randn(rank, d, generator=gen) / math.sqrt(d)).to(ctx.device, dtype))
        B = torch.nn.Parameter((0.3 * torch.randn(k, rank, generator=gen)).to(ctx.device, dtype))
        pairs.append(altlora.LoRAPair(A, B, 2.0 if i else 0.5, f"layer{i}"))
    # AltLoRA+ alternates in runs of two steps (a snapshot of the factor), AltLoRA runs both phases
    # per step (both orientations); nonfinite="skip" puts the non-finite flag into every kernel.
    if variant == "AltLoRAPlus":
        opt = altlora.AltLoRAPlus(pairs, lr=1e-3, damping=1e-3, weight_decay=0.01, schedule="alternate",
                                  switch_every=2, backend=backend, nonfinite="skip")
    else:
        opt = altlora.AltLoRA(pairs, lr=1e-2, damping=1e-3, weight_decay=0.01, schedule="sequential",
                              backend=backend, nonfinite="skip")
    for t in range(steps):
        g = torch.Generator().manual_seed(1000 + t)
        for p in pairs:
            p.A.grad = (0.1 * torch.randn(p.A.shape, generator=g)).to(ctx.device, dtype)
            p.B.grad = (0.1 * torch.randn(p.B.shape, generator=g)).to(ctx.device, dtype)
        opt.step()
    out = []
    for p in pairs:
        out += [p.A.detach(), p.B.detach()] + [v for t in (p.A, p.B) for v in opt.state[t].values()
                                               if isinstance(v, torch.Tensor)]
    return out


def _phase_case(ctx: Context, rank: int, dtype: torch.dtype, variant: str) -> Tuple[float, float]:
    steps = 2 if ctx.dry else 4
    got = _phase_run(ctx, "triton", rank, dtype, variant, steps)
    want = _phase_run(ctx, "torch", rank, dtype, variant, steps)
    return max(_normalized_error(a, b) for a, b in zip(got, want)), PHASE_TOL[dtype]


def _linear_case(ctx: Context, rank: int, dtype: torch.dtype, p: float, bias: bool) -> Tuple[float, float]:
    from altlora_kernels.lora_linear import dropout_keep_mask, lora_linear

    n, d, k = (20, 19, 23) if ctx.dry else (333, 200, 136)
    gen = torch.Generator().manual_seed(rank)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(ctx.device)

    x, w, A = rand(n, d), rand(k, d, scale=d**-0.5), rand(rank, d, scale=d**-0.5)
    B, dy, b = rand(k, rank, scale=rank**-0.5), rand(n, k), rand(k) if bias else None
    s, seed = 16.0 / rank, 1234
    keep = dropout_keep_mask(seed, (n, d), p, ctx.device) if p > 0 else None
    ref = [t.clone().requires_grad_(True) for t in (x, A, B)]
    dropped = ref[0] * keep / (1 - p) if keep is not None else ref[0]
    y_ref = ref[0] @ w.T + (b if bias else 0.0) + s * (dropped @ ref[1].T) @ ref[2].T
    y_ref.backward(dy)
    args = [t.to(dtype).requires_grad_(True) for t in (x, A, B)]
    y = lora_linear(args[0], w.to(dtype), b.to(dtype) if bias else None, args[1], args[2], s,
                    dropout_p=p, dropout_seed=seed if p > 0 else None, backend="triton")
    y.backward(dy.to(dtype))
    pairs = [(y, y_ref)] + [(a.grad, r.grad) for a, r in zip(args, ref)]
    return max(_normalized_error(got, want) for got, want in pairs), LINEAR_TOL[dtype]


def sweep_cases(ctx: Context) -> List[Dict]:
    """Every case of the sweep, configurations first: each phase-update configuration (padded rank)
    and each fused-linear configuration set (shared-memory budget) once in fp32, then the rest."""
    from altlora_kernels import triton_phase_tables as tables

    device_limit = None
    if ctx.device.type == "cuda":
        from altlora_kernels.triton_lora_linear import shared_memory_per_block

        device_limit = shared_memory_per_block(ctx.device.index or 0)
    first, rest = [], []
    configs = phase_configurations()
    for di, dtype in enumerate(DTYPES.values()):
        for ri, rank in enumerate(PHASE_RANKS):
            variant = "AltLoRAPlus" if (ri + di) % 2 else "AltLoRA"
            padded = tables.padded_rank(rank)
            case = dict(kind="phase", rank=rank, dtype=dtype, variant=variant,
                        config=f"R={padded} BLOCK_N={configs[padded]['BLOCK_N']} warps={configs[padded]['update_warps']}/"
                               f"{configs[padded]['factor_warps']}")
            (first if di == 0 else rest).append(case)
    for di, dtype in enumerate(DTYPES.values()):
        for li, limit in enumerate(linear_budgets(dtype, device_limit)):
            for ri, rank in enumerate(LINEAR_RANKS):
                p = 0.1 if (ri + li) % 2 else 0.0
                case = dict(kind="linear", rank=rank, dtype=dtype, p=p, bias=ri % 2 == 0, limit=limit,
                            config=f"shared memory {'device' if limit is None else limit}")
                (first if di == 0 or (ri == len(LINEAR_RANKS) - 1) else rest).append(case)
    cases = first + rest
    if ctx.dry:  # code paths, not coverage: one case per kind and dtype, the largest rank
        cases = [c for c in cases if c["rank"] == 100 and (c["kind"] == "phase" or c["limit"] is None)]
    return cases


def _case_label(case: Dict) -> str:
    if case["kind"] == "phase":
        return f"phase {case['variant']} r={case['rank']} {_dtype_name(case['dtype'])}"
    return (f"linear r={case['rank']} {_dtype_name(case['dtype'])} p={case['p']} bias={case['bias']}")


def part_sweep(ctx: Context) -> int:
    # The kernels' own numbers, not the first-use self-check's fallback (env checks that).
    os.environ["ALTLORA_TRITON_SELF_CHECK"] = "0"
    rows, failed = [], 0
    path = os.path.join(ctx.out, "sweep.jsonl")
    open(path, "w").close()
    for case in sweep_cases(ctx):
        start = time.time()
        try:
            if case["kind"] == "phase":
                error, tol = _phase_case(ctx, case["rank"], case["dtype"], case["variant"])
            else:
                with _linear_launch_limit(ctx, case["limit"]):
                    error, tol = _linear_case(ctx, case["rank"], case["dtype"], case["p"], case["bias"])
            status = "ok" if error <= tol else "FAIL"
            row = dict(case=_case_label(case), config=case["config"], status=status, error=f"{error:.2e}", tol=tol)
        except Exception as err:  # noqa: BLE001 - one failing configuration must not hide the others
            traceback.print_exc()
            status = "FAIL"
            row = dict(case=_case_label(case), config=case["config"], status=status,
                       error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}")
        row["seconds"] = round(time.time() - start, 2)
        failed += status != "ok"
        rows.append(row)
        print(f"{row['status']:4}  {row['case']:45}  {row['config']:40}  {row['error']}  ({row['seconds']} s)", flush=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    ctx.write("sweep", {"rows": rows, "failed": failed, "cases": len(rows)})
    print(f"sweep: {len(rows) - failed} of {len(rows)} cases within tolerance")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ memcheck step
def part_memcheck_step(ctx: Context) -> int:
    """A small step through every Triton kernel (run under compute-sanitizer by the shell script)."""
    import altlora
    from altlora_kernels.lora_linear import lora_linear

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    pairs = []
    for i, (r, d, k) in enumerate(((8, 130, 70), (24, 70, 130))):
        A = torch.nn.Parameter((torch.randn(r, d, generator=gen) / math.sqrt(d)).to(ctx.device, dtype))
        B = torch.nn.Parameter((0.3 * torch.randn(k, r, generator=gen)).to(ctx.device, dtype))
        A.grad, B.grad = torch.randn_like(A) * 0.1, torch.randn_like(B) * 0.1
        pairs.append(altlora.LoRAPair(A, B, 2.0, f"layer{i}"))
    opt = altlora.AltLoRAPlus(pairs, lr=1e-3, damping=1e-3, schedule="sequential", backend="triton", nonfinite="skip")
    opt.step()
    x = torch.randn(100, 64, generator=gen).to(ctx.device, dtype).requires_grad_(True)
    w = torch.randn(48, 64, generator=gen).to(ctx.device, dtype)
    A = torch.randn(16, 64, generator=gen).to(ctx.device, dtype).requires_grad_(True)
    B = torch.randn(48, 16, generator=gen).to(ctx.device, dtype).requires_grad_(True)
    y = lora_linear(x, w, None, A, B, 2.0, dropout_p=0.1, dropout_seed=7, backend="triton")
    y.backward(torch.ones_like(y))
    ctx.sync()
    finite = all(bool(torch.isfinite(t).all()) for t in (y, x.grad, A.grad, B.grad, pairs[0].A, pairs[1].B))
    ctx.write("memcheck-step", {"ran": True, "finite": finite})
    print(f"memcheck step ran; outputs finite: {finite}")
    return 0 if finite else 1


# ------------------------------------------------------------------------------------------ optimizer
def part_optimizer(ctx: Context) -> int:
    import altlora
    from bench.common import device_peak, print_table, time_fn

    if ctx.dry:
        blocks, ranks, warmup, repeats = [(64, 64), (64, 16), (64, 16), (64, 64)], (4,), 1, 2
    else:
        blocks, ranks, warmup, repeats = LLAMA_3_8B_BLOCK * 32, (8, 64), 2, 10
    bandwidth = None if ctx.dry else device_peak(str(ctx.device)).get("bandwidth")
    rows = []
    for rank in ranks:
        case = f"{len(blocks) // 4}×qkvo r={rank}"

        def make_pairs():
            gen = torch.Generator().manual_seed(0)
            pairs = []
            for i, (d, k) in enumerate(blocks):
                A = torch.nn.Parameter((torch.randn(rank, d, generator=gen) / math.sqrt(d)).to(ctx.device))
                B = torch.nn.Parameter((torch.randn(k, rank, generator=gen) * 0.01).to(ctx.device))
                A.grad = (torch.randn(rank, d, generator=gen) * 1e-3).to(ctx.device)
                B.grad = (torch.randn(k, rank, generator=gen) * 1e-3).to(ctx.device)
                pairs.append(altlora.LoRAPair(A, B, 2.0, f"layer{i}"))
            return pairs

        numel = sum(d * rank + k * rank for d, k in blocks)
        for variant in ("AltLoRA", "AltLoRAPlus"):
            for backend in ("triton", "torch"):
                pairs = make_pairs()
                opt = getattr(altlora, variant)(pairs, lr=1e-6, weight_decay=0.01, damping=1e-6, backend=backend,
                                                nonfinite="skip")

                def two_steps(opt=opt):
                    opt.step()
                    opt.step()

                t = time_fn(two_steps, str(ctx.device), warmup=warmup, repeats=repeats)
                # Byte floor of one alternating step: half the factors, 5 (7) fp32 passes each.
                floor_bytes = (7 if variant == "AltLoRAPlus" else 5) * 4 * numel / 2
                rows.append(dict(case=case, impl=f"{variant}[{backend}]", median_ms=t["median_ms"] / 2,
                                 min_ms=t["min_ms"] / 2, bytes=floor_bytes))
                del opt, pairs
        pairs = make_pairs()
        params = [t for p in pairs for t in (p.A, p.B)]
        adamw = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01, fused=True)
        adamw.step()
        t = time_fn(adamw.step, str(ctx.device), warmup=warmup, repeats=repeats)
        rows.append(dict(case=case, impl="AdamW(fused)", **t, bytes=7 * 4 * numel))
        del adamw, params, pairs
    for row in rows:
        if bandwidth:
            row["floor_fraction"] = row["bytes"] / bandwidth * 1e3 / row["median_ms"]
    print_table(rows, ["case", "impl", "median_ms", "min_ms", "bytes", "floor_fraction"],
                title="optimizer step at Llama-3-8B adapter shapes (fp32 LoRA parameters)")
    ctx.write("optimizer", {"rows": rows})
    return 0


# ------------------------------------------------------------------------------------------ fused linear
def part_linear(ctx: Context) -> int:
    from altlora_kernels.lora_linear import lora_linear
    from bench.common import print_table, time_fn

    if ctx.dry:
        tokens, d, k, ranks, dtype, warmup, repeats = 64, 32, 32, (4,), torch.float32, 1, 2
    else:
        tokens, d, k, ranks, dtype, warmup, repeats = 8192, 4096, 4096, (16, 64), torch.bfloat16, 3, 10
    tol = LINEAR_TOL[dtype]
    rows, failed = [], 0
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, d, generator=gen)).to(ctx.device, dtype).requires_grad_(True)
    dy = torch.randn(tokens, k, generator=gen).to(ctx.device, dtype)
    w = (torch.randn(k, d, generator=gen) / math.sqrt(d)).to(ctx.device, dtype)
    for rank in ranks:
        s = 2.0
        base_A = (torch.randn(rank, d, generator=gen) / math.sqrt(d)).to(ctx.device, dtype)
        base_B = (torch.randn(k, rank, generator=gen) * 0.02).to(ctx.device, dtype)
        for phase, (train_a, train_b) in {"AB": (True, True), "A": (True, False), "B": (False, True)}.items():
            A = base_A.clone().requires_grad_(train_a)
            B = base_B.clone().requires_grad_(train_b)

            def eager():
                return torch.nn.functional.linear(x, w) + s * (x @ A.T) @ B.T

            impls = {"eager autograd": eager,
                     "fused[triton]": lambda: lora_linear(x, w, None, A, B, s, backend="triton"),
                     "fused[torch]": lambda: lora_linear(x, w, None, A, B, s, backend="torch")}
            reference = eager().detach()
            for impl, forward in impls.items():
                error = _normalized_error(forward().detach(), reference)
                failed += error > tol

                def step(forward=forward):
                    forward().backward(dy)

                def clear():
                    x.grad = A.grad = B.grad = None

                t = time_fn(step, str(ctx.device), warmup=warmup, repeats=repeats, setup=clear)
                rows.append(dict(case=f"{tokens}x{d}->{k} r={rank} {phase}", impl=impl, **t,
                                 y_error=f"{error:.1e}", ok=error <= tol))
            base = next(r["median_ms"] for r in rows[-3:] if r["impl"] == "eager autograd")
            for row in rows[-3:]:
                row["ratio"] = row["median_ms"] / base
    print_table(rows, ["case", "impl", "median_ms", "min_ms", "ratio", "y_error", "ok"],
                title=f"fused LoRA linear, forward + backward ({_dtype_name(dtype)})")
    ctx.write("linear", {"rows": rows, "failed": failed})
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ end to end
class _Block(torch.nn.Module):
    """A Llama decoder block whose seven projections are altlora.LoRALinear (fused LoRA linear)."""

    def __init__(self, hidden, inter, heads, kv_heads, r, dtype, device):
        super().__init__()
        import altlora

        def lin(i, o):
            return altlora.LoRALinear(i, o, r=r, alpha=2 * r, bias=False, device=device, dtype=dtype)

        kv = hidden * kv_heads // heads
        self.heads, self.kv_heads = heads, kv_heads
        self.q, self.k, self.v, self.o = lin(hidden, hidden), lin(hidden, kv), lin(hidden, kv), lin(hidden, hidden)
        self.gate, self.up, self.down = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)
        with torch.no_grad():  # B = 0 at init would give the A phases nothing to do
            for module in self.modules():
                if isinstance(module, altlora.LoRALinear):
                    module.lora_B.normal_(0, 0.02)

    def forward(self, h):
        batch, seq, hidden = h.shape
        x = torch.nn.functional.rms_norm(h, (hidden,))
        q = self.q(x).view(batch, seq, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(batch, seq, self.kv_heads, -1).transpose(1, 2)
        v = self.v(x).view(batch, seq, self.kv_heads, -1).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(attention.transpose(1, 2).reshape(batch, seq, hidden))
        x = torch.nn.functional.rms_norm(h, (hidden,))
        return h + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def part_e2e(ctx: Context) -> int:
    import altlora
    from bench.common import print_table

    if ctx.dry:
        s = dict(hidden=64, inter=128, heads=4, kv=2, layers=1, batch=1, seq=16, r=4, dtype=torch.float32, steps=2)
    else:
        s = dict(hidden=4096, inter=14336, heads=32, kv=8, layers=2, batch=2, seq=512, r=16, dtype=torch.bfloat16, steps=6)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen).to(ctx.device, s["dtype"])
    target = torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen).to(ctx.device, s["dtype"])
    rows, failed = [], 0
    for name in ("LoRA + AdamW(fused)", "AltLoRA", "AltLoRA, freeze_inactive"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[_Block(s["hidden"], s["inter"], s["heads"], s["kv"], s["r"], s["dtype"], ctx.device)
                                      for _ in range(s["layers"])])
        if name.startswith("LoRA"):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        else:
            opt = altlora.AltLoRA(model, lr=1e-2, freeze_inactive="freeze" in name)
        losses, times = [], []
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(2 + s["steps"]):
            ctx.sync()
            start = time.perf_counter()
            loss = torch.nn.functional.mse_loss(model(inputs).float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctx.sync()
            if step >= 2:  # two warm-up steps: one B and one A phase, the kernels built
                times.append((time.perf_counter() - start) * 1e3)
            losses.append(float(loss))
        finite = all(math.isfinite(v) for v in losses)
        failed += not finite
        median = statistics.median(times)
        row = dict(impl=name, median_ms=median, tokens_per_s=s["batch"] * s["seq"] / (median / 1e3),
                   loss_first=losses[0], loss_last=losses[-1], finite=finite)
        if ctx.device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if not name.startswith("LoRA"):
            row["backends"] = ",".join(sorted(set(opt.backends.values())))
        rows.append(row)
        del model, opt
    print_table(rows, title=f"end-to-end step: {s['layers']} Llama blocks h={s['hidden']} r={s['r']} "
                            f"{s['batch']}x{s['seq']} {_dtype_name(s['dtype'])} (LoRALinear, no transformers)")
    ctx.write("e2e", {"rows": rows, "shapes": {k: str(v) for k, v in s.items()}, "failed": failed})
    return 1 if failed else 0


def part_e2e_hf(ctx: Context) -> int:
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: {' and '.join(missing)} not installed (the e2e part ran without them)")
        ctx.write("e2e-hf", {"skipped": f"{', '.join(missing)} not installed"})
        return 0
    from bench import end_to_end
    from bench.common import print_table

    # Its own quick shapes build five 2-layer 8B-wide models on the host (minutes with a 32k vocab
    # on a GPU machine; ~20 s on a CPU): one layer and shorter rows here fit the part's time box.
    if ctx.dry:
        shapes = dict(hidden=32, inter=64, heads=4, kv=2, layers=1, vocab=64, batch=2, seq=8,
                      dtype=torch.float32, rank=4, steps=2)
    else:
        shapes = dict(hidden=4096, inter=14336, heads=32, kv=8, layers=1, vocab=32000, batch=2, seq=256,
                      dtype=torch.bfloat16, rank=16, steps=3)
    with _patched(end_to_end, "_shapes", lambda device, quick: dict(shapes)):
        rows = end_to_end.run(str(ctx.device), quick=True)
    print_table(rows)
    ctx.write("e2e-hf", {"rows": rows})
    return 0


# ------------------------------------------------------------------------------------------ summary
def _headline(part: str, payload: Dict) -> str:
    if "skipped" in payload:
        return f"skipped: {payload['skipped']}"
    if part == "env":
        env = payload["environment"]
        checks = ", ".join(f"{c['check'].split(' ', 1)[1]} {c['verdict'] if c['verdict'] == 'ok' else 'FAILED'}"
                           for c in env.get("self_check", []))
        return f"{env.get('device')} torch {env.get('torch')} triton {env.get('triton')}; self-check: {checks}"
    if part == "sweep":
        return f"{payload['cases'] - payload['failed']} of {payload['cases']} cases within tolerance"
    if part in ("memcheck", "memcheck-step"):
        return f"step ran, outputs finite: {payload['finite']}"
    if part in ("optimizer", "linear", "e2e", "e2e-hf"):
        rows = payload.get("rows", [])
        best = [f"{r.get('case', '')} {r['impl']}: {r['median_ms']:.3g} ms".strip() for r in rows
                if "median_ms" in r and ("triton" in r["impl"] or "AltLoRA" in r["impl"] and part.startswith("e2e"))]
        return "; ".join(best[:4])
    return ""


def part_summary(ctx: Context) -> int:
    """Reads quick-parts.tsv (name, exit status, seconds, time box) and every part's JSON."""
    table = os.path.join(ctx.out, "quick-parts.tsv")
    lines = []
    status = 0
    with open(table) as fh:
        for line in fh:
            name, rc, seconds, limit = line.rstrip("\n").split("\t")
            rc = int(rc)
            if rc in (124, 137):
                state = f"TIMED OUT after {limit} s"
            elif rc == 0:
                state = "ok"
            elif rc == 3:
                state = "skipped"
            else:
                state = f"FAILED (exit {rc})"
            status |= rc not in (0, 3)
            payload_path = os.path.join(ctx.out, f"{'memcheck-step' if name == 'memcheck' else name}.json")
            headline = ""
            if rc == 3:
                headline = _skip_reason(os.path.join(ctx.out, f"quick-{name}.log"))
            if os.path.exists(payload_path):
                try:
                    with open(payload_path) as pf:
                        headline = "; ".join(h for h in (headline, _headline(name, json.load(pf))) if h)
                except Exception as err:  # noqa: BLE001 - a summary must not fail on one odd file
                    headline = f"(unreadable {name}.json: {err})"
            elif name == "tests":
                headline = _tests_headline(os.path.join(ctx.out, "quick-tests.log"))
            lines.append((name, state, seconds, headline))
    text = ["| part | status | seconds | result |", "|---|---|---|---|"]
    text += [f"| {n} | {s} | {sec} | {h} |" for n, s, sec, h in lines]
    if ctx.elapsed is not None:  # tests and sweep overlap: the parts' seconds add up to more
        text.append(f"\n{ctx.elapsed} s in all{' (dry run on the CPU)' if ctx.dry else ''}")
    with open(os.path.join(ctx.out, "summary.md"), "w") as fh:
        fh.write("\n".join(text) + "\n")
    print("\n".join(text))
    return 1 if status else 0


def _skip_reason(log: str) -> str:
    if os.path.exists(log):
        with open(log, errors="replace") as fh:
            for line in fh:
                if "skipped" in line:
                    return line.strip().strip("= ")
    return "skipped"


def _tests_headline(log: str) -> str:
    if not os.path.exists(log):
        return ""
    with open(log, errors="replace") as fh:
        tail = [line.strip() for line in fh if line.strip()]
    finals = [line for line in tail if ("passed" in line or "failed" in line or "skipped" in line) and " in " in line]
    return finals[-1].strip("= ") if finals else (tail[-1] if tail else "")


# ------------------------------------------------------------------------------------------ main
RUNNERS: Dict[str, Callable[[Context], int]] = {
    "env": part_env, "sweep": part_sweep, "memcheck-step": part_memcheck_step, "optimizer": part_optimizer,
    "linear": part_linear, "e2e": part_e2e, "e2e-hf": part_e2e_hf, "summary": part_summary,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_quick", description=__doc__.strip().splitlines()[0])
    parser.add_argument("part", choices=list(RUNNERS))
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--elapsed", type=int, default=None, help="summary: the wall time of the whole check, s")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated (they are, lazily, at launch)
    elif args.part != "summary" and not torch.cuda.is_available():
        print(f"{args.part}: no CUDA device (use --dry-run on a machine without one)", file=sys.stderr)
        return 2
    ctx = Context(args.out, args.dry_run)
    ctx.elapsed = args.elapsed
    print(f"[{args.part}] {'dry run, CPU' if ctx.dry else ctx.device} · python {platform.python_version()} "
          f"· torch {torch.__version__}", flush=True)
    return RUNNERS[args.part](ctx)


if __name__ == "__main__":
    sys.exit(main())
