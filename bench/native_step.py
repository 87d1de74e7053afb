"""The native (C++) backend on CPU vs the torch backend vs ``torch.optim.AdamW(foreach=True)``.

Same LoRA parameters (fp32, gradients fixed and small), per case: one ``optimizer.step()`` of
AdamW(foreach) over every A and B; of AltLoRA / AltLoRA+ with ``schedule="alternate"`` (one phase
per step, A and B alternating, so the median covers both) and ``"sequential"`` (both phases per
step: the same parameters touched as AdamW's step); and the phase update alone
(``altlora_kernels.phase_update`` on one B phase of every layer, no optimizer around it; for the
native backend also with B as a strided view, which it runs in its tile form instead of the
column form: the two forms side by side on the same values).
Cases: 64 layers of 384×384, r = 8 (MiniLM width, many small layers), and a mixed set of
MiniLM-shaped blocks (q, k, v, o 384→384, up 384→1536, down 1536→384; 6 blocks, 36 layers, r = 8), and
Llama proportions at hidden 1024 (16 blocks × q, k, v, o; q/o 1024→1024, k/v 1024→256).
Every implementation of a case is timed round-robin (one call each per round). Columns: median/min
ms over the rounds; ``ratio`` = median / the AdamW(foreach) step of the case; ``bytes`` the byte
floor of the row (:func:`floor_bytes`), ``floor_ms`` = bytes / a measured copy rate of this CPU,
``floor_fraction`` = floor_ms / median; ``threads`` (torch intra-op threads) and
``load_avg`` (1-minute load average when the case started: above ``threads`` the cores were shared
with other work, and OpenMP's spin-waiting makes multi-threaded timings unreliable). CPU only: the
native backend has no GPU code; this script builds its library first if needed.

Run: ``python bench/native_step.py [--threads 2] [--quick] [--repeats N] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import altlora  # noqa: E402
import altlora_kernels as K  # noqa: E402
from altlora_kernels.native_phase_update import load_extension  # noqa: E402
from bench.common import environment, measure_cpu_bandwidth, print_table  # noqa: E402

DESCRIPTION = __doc__.strip().splitlines()[0]
COLUMNS = ("case", "impl", "layers", "median_ms", "min_ms", "ratio", "bytes", "floor_ms", "floor_fraction", "threads",
           "load_avg")
FP32_BYTES = 4
RANK = 8
MINILM_BLOCK = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]  # (d_in, d_out) of q, k, v, o, up, down
LLAMA_LIKE_1024_BLOCK = [(1024, 1024), (1024, 256), (1024, 256), (1024, 1024)]  # q, k, v, o at hidden 1024


def cases(quick: bool) -> Dict[str, List[Tuple[int, int]]]:
    if quick:
        return {"16 × 96×96": [(96, 96)] * 16, "mixed 2 blocks/4": [(96, 96)] * 4 + [(96, 384), (384, 96)]}
    return {"64 × 384×384": [(384, 384)] * 64, "mixed MiniLM 6 blocks": MINILM_BLOCK * 6,
            "Llama-like h1024 16×qkvo": LLAMA_LIKE_1024_BLOCK * 16}


def floor_bytes(impl: str, shapes: Sequence[Tuple[int, int]]) -> float:
    """Bytes a step of ``impl`` must move at least (docs/kernels.md): an AltLoRA phase reads the
    gradient, momentum and factor and writes the last two (AltLoRA+ also reads and writes V), so 5
    (7) fp32 values per element of the factor; AdamW 7 per element of every A and B."""
    numel_a = sum(RANK * d for d, _ in shapes)
    numel_b = sum(k * RANK for _, k in shapes)
    per_element = 7 if impl.startswith("AltLoRAPlus") else 5
    if impl.startswith("AdamW"):
        return 7 * FP32_BYTES * (numel_a + numel_b)
    if impl.startswith("B phase"):
        return per_element * FP32_BYTES * numel_b
    if " alternate " in impl:  # one phase per step, A and B alike over the timed steps
        return per_element * FP32_BYTES * (numel_a + numel_b) / 2
    return per_element * FP32_BYTES * (numel_a + numel_b)  # sequential: both phases


def _pairs(shapes: Sequence[Tuple[int, int]]) -> List[altlora.LoRAPair]:
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i, (d, k) in enumerate(shapes):
        A = torch.nn.Parameter(torch.randn(RANK, d, generator=gen) / math.sqrt(d))
        B = torch.nn.Parameter(torch.randn(k, RANK, generator=gen) * 0.01)
        A.grad = torch.randn(RANK, d, generator=gen) * 1e-3
        B.grad = torch.randn(k, RANK, generator=gen) * 1e-3
        pairs.append(altlora.LoRAPair(A, B, 2.0, f"layer{i}"))
    return pairs


def _phase_groups(shapes: Sequence[Tuple[int, int]], strided: bool = False) -> List[K.FactorGroup]:
    """One B phase of every layer as FactorGroups (one per shape), state as the optimizer keeps it.

    ``strided``: B and its gradient as views with column stride 2 (the same values), which the
    native backend runs in its tile form instead of the column form (csrc/README.md)."""
    gen = torch.Generator().manual_seed(1)
    by_shape: Dict[Tuple[int, int], int] = {}
    for shape in shapes:
        by_shape[shape] = by_shape.get(shape, 0) + 1
    groups = []
    for (d, k), L in by_shape.items():
        A = torch.randn(L, RANK, d, generator=gen) / math.sqrt(d)
        gram = A @ A.mT
        params = torch.randn(L, k, RANK, generator=gen).mul_(0.01)
        grads = torch.randn(L, k, RANK, generator=gen).mul_(1e-3)
        if strided:
            params = torch.zeros(L, k, 2 * RANK)[..., ::2].copy_(params)
            grads = torch.zeros(L, k, 2 * RANK)[..., ::2].copy_(grads)
        groups.append(K.FactorGroup(
            params=list(params.unbind(0)),
            grads=list(grads.unbind(0)),
            transposed=True,
            momentum=torch.zeros(L, k, RANK),
            variance=None,
            step=torch.zeros(L),
            gram=torch.eye(RANK).repeat(L, 1, 1),
            cross=torch.eye(RANK).repeat(L, 1, 1),
            other_gram=gram,
            other_cross=gram.clone(),
            inv_scale_sq=torch.full((L,), 0.25),
        ))
    return groups


def _interleaved(fns: Dict[str, object], repeats: int, warmup: int = 4) -> Dict[str, Dict[str, float]]:
    """Median/min ms per callable, timed round-robin (one call of each per round), so that a
    change of load on a shared machine hits every implementation alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def run(device: str, quick: bool, repeats: int = None) -> List[Dict]:
    if not device.startswith("cpu"):
        raise ValueError(f"native_step measures the CPU backend; got device={device!r}")
    load_extension(build=True)  # a first-time compile must not land inside a timing
    repeats = 2 * ((repeats or (20 if quick else 100)) // 2)  # even: alternate steps count A and B alike
    hp = K.PhaseHyperParams(lr=1e-3, beta1=0.9, weight_decay=0.0, damping=1e-6)
    rows = []
    for case, shapes in cases(quick).items():
        params = [t for p in _pairs(shapes) for t in (p.A, p.B)]
        fns = {"AdamW(foreach) step": torch.optim.AdamW(params, lr=1e-3, foreach=True).step}
        for variant in ("AltLoRA", "AltLoRAPlus"):
            for schedule in ("alternate", "sequential"):
                for backend in ("native", "torch"):
                    opt = getattr(altlora, variant)(_pairs(shapes), lr=1e-3, schedule=schedule, backend=backend)
                    opt.step()  # state initialization outside the timing
                    fns[f"{variant} {schedule} step ({backend})"] = opt.step
        for backend in ("native", "torch"):
            groups = _phase_groups(shapes)
            fns[f"B phase only ({backend})"] = functools.partial(K.phase_update, backend, groups, hp)
        fns["B phase only, strided B: tile form (native)"] = functools.partial(
            K.phase_update, "native", _phase_groups(shapes, strided=True), hp)
        load = os.getloadavg()[0]
        timings = _interleaved(fns, repeats)
        base = timings["AdamW(foreach) step"]["median_ms"]
        bandwidth = measure_cpu_bandwidth()
        for impl, timing in timings.items():
            moved = floor_bytes(impl, shapes)
            floor_ms = moved / bandwidth * 1e3
            rows.append({"case": case, "impl": impl, "layers": len(shapes), **timing,
                         "ratio": timing["median_ms"] / base, "bytes": moved, "floor_ms": floor_ms,
                         "floor_fraction": floor_ms / timing["median_ms"], "threads": torch.get_num_threads(),
                         "load_avg": round(load, 1)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="also save rows and environment as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(", ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    rows = run("cpu", args.quick, args.repeats)
    print_table(rows, COLUMNS, title=DESCRIPTION)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
