"""Fused LoRA linear (``fuse_peft``) vs PEFT's ``lora.Linear``, eager and ``torch.compile``: forward+backward.

One PEFT ``lora.Linear`` over a bias-free ``nn.Linear`` (as in LLM projections), input requiring
grad (a mid-network activation), per trainable-factor pattern: ``AB`` (both factors, as with
AdamW), ``A`` (an AltLoRA A phase with ``freeze_inactive``: B frozen) and ``B`` (A frozen). The
same layer is timed as PEFT runs it (``peft``), compiled (``peft+compile``), and after
``altlora.fuse_peft`` (``fused``, backend ``auto``: Triton on CUDA, torch elsewhere).
CUDA: 8192 tokens, 4096→4096 and 4096→14336, r ∈ {8, 16, 64}, bf16. CPU: 2048 tokens,
384→384 and 384→1536, r = 8, fp32. Columns: median/min ms of forward+backward, ``ratio`` =
median / the ``peft`` row of the same case (below 1 is faster), ``saved_mib`` = activations saved
for the backward (parameters excluded), ``peak_mib`` (CUDA allocator peak over the step) and, on a
known GPU, ``floor_ms`` = the two frozen-weight GEMMs (forward, dx) at the datasheet bf16 peak.
The implementations of a case are timed round-robin (one call each per round), so that a change
of machine load during the run affects them alike.

Run: ``python bench/lora_linear.py [--device cpu|cuda] [--quick] [--no-compile] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from altlora.peft_fusion import fuse_peft  # noqa: E402
from bench.common import device_peak, environment, print_table  # noqa: E402

DESCRIPTION = __doc__.strip().splitlines()[0]
PHASES = {"AB": (True, True), "A": (True, False), "B": (False, True)}
IMPLS = ("peft", "peft+compile", "fused")


def cases(device: str, quick: bool) -> List[Dict]:
    if device.startswith("cuda"):
        shapes, ranks, tokens, dtype = [(4096, 4096), (4096, 14336)], [8, 16, 64], 8192, torch.bfloat16
        if quick:
            shapes, ranks = shapes[:1], [16]
    else:
        shapes, ranks, tokens, dtype = [(384, 384), (384, 1536)], [8], 2048, torch.float32
        if quick:
            shapes, tokens = shapes[:1], 512
    return [{"tokens": tokens, "d_in": d, "d_out": k, "r": r, "dtype": dtype} for d, k in shapes for r in ranks]


def _peft_layer(case: Dict, device: str):
    import peft

    torch.manual_seed(0)
    base = torch.nn.Linear(case["d_in"], case["d_out"], bias=False, device=device, dtype=case["dtype"])
    config = peft.LoraConfig(r=case["r"], lora_alpha=2 * case["r"], lora_dropout=0.0)
    layer = peft.tuners.lora.Linear(base, "default", config=config, r=case["r"], lora_alpha=2 * case["r"])
    layer.to(device=device, dtype=case["dtype"])
    base.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)  # non-zero, as after a few steps
    return layer


def _saved_bytes(fn, exclude: set) -> int:
    storages: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _interleaved_times(steps: Dict[str, tuple], device: str, warmup: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Median/min ms of each ``(step, clear)`` pair, timed round-robin so that load drifts hit all alike."""
    cuda = device.startswith("cuda")
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, (step, clear) in steps.items():
            clear()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def run(device: str, quick: bool, compile_peft: bool = True) -> List[Dict]:
    warnings.filterwarnings("ignore")
    peak = device_peak(device)
    cuda = device.startswith("cuda")
    repeats = 5 if quick else (20 if cuda else 15)
    rows: List[Dict] = []
    for case in cases(device, quick):
        n, d, k, r = case["tokens"], case["d_in"], case["d_out"], case["r"]
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(n, d, device=device, dtype=case["dtype"], generator=g).requires_grad_(True)
        dy = torch.randn(n, k, device=device, dtype=case["dtype"], generator=g)
        for phase, (train_a, train_b) in PHASES.items():
            label = f"{n}x{d}->{k} r={r} {phase}"
            impl_rows, steps = {}, {}
            for impl in IMPLS:
                if impl == "peft+compile" and not compile_peft:
                    continue
                layer = _peft_layer(case, device)
                layer.lora_A["default"].weight.requires_grad_(train_a)
                layer.lora_B["default"].weight.requires_grad_(train_b)
                if impl == "fused":
                    fuse_peft(layer)
                fn_layer = torch.compile(layer) if impl == "peft+compile" else layer

                def step(fn_layer=fn_layer):
                    fn_layer(x).backward(dy)

                def clear(layer=layer):
                    x.grad = None
                    layer.zero_grad(set_to_none=True)

                row = {"benchmark": "lora_linear", "case": label, "impl": impl, "phase": phase,
                       "dtype": str(case["dtype"]).replace("torch.", "")}
                impl_rows[impl] = row
                params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
                try:
                    # Saved activations (parameters and x itself excluded), and whether x is among them.
                    row["saved_mib"] = _saved_bytes(lambda: fn_layer(x), params | {x.untyped_storage().data_ptr()}) / 2**20
                    row["saves_x"] = _saved_bytes(lambda: fn_layer(x), params) > row["saved_mib"] * 2**20
                    if cuda:
                        clear()
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        start_mem = torch.cuda.memory_allocated()
                        step()
                        torch.cuda.synchronize()
                        row["peak_mib"] = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
                    steps[impl] = (step, clear)
                except Exception as err:  # e.g. torch.compile without a working compiler
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            for impl, timing in _interleaved_times(steps, device, warmup=3, repeats=repeats).items():
                impl_rows[impl].update(timing)
            base = impl_rows["peft"].get("median_ms")
            for row in impl_rows.values():
                if "median_ms" in row and base:
                    row["ratio"] = row["median_ms"] / base
                    row["ratio_to"] = "peft"
                if "median_ms" in row and "bf16_flops" in peak and case["dtype"] == torch.bfloat16:
                    row["floor_ms"] = 2 * 2 * n * d * k / peak["bf16_flops"] * 1e3
                    row["floor_fraction"] = row["floor_ms"] / row["median_ms"]
                rows.append(row)
            del impl_rows, steps
            if cuda:
                torch.cuda.empty_cache()
    return rows


COLUMNS = ["case", "impl", "median_ms", "min_ms", "ratio", "saved_mib", "saves_x", "peak_mib", "floor_fraction", "error"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also save rows and environment as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    print(", ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    rows = run(args.device, args.quick, compile_peft=not args.no_compile)
    present = [c for c in COLUMNS if any(c in row for row in rows)]
    print_table(rows, present, title=DESCRIPTION)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
