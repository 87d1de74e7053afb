"""Optimizer step over many LoRA layers: every altlora backend, a naive per-layer loop, torch AdamW.

Same LoRA parameters (fp32, gradients fixed and small) for every implementation of a case:

* ``AltLoRA[<backend>]`` / ``AltLoRAPlus[<backend>]``: ``schedule="alternate"`` (one phase per
  ``step()``, B and A alternating: each timed call runs two steps and the row reports one step),
  ``nonfinite="skip"`` (no host sync), for every backend available on the device;
* ``naive loop``: the same AltLoRA / AltLoRA+ math as a Python loop over layers with one
  ``torch.inverse`` of the damped Gram per layer and copies of the previous factors, like the
  authors' code;
* ``AdamW(fused)`` / ``AdamW(foreach)``: ``torch.optim.AdamW`` over every A and B.

Cases: on CUDA, Llama-3-8B-shaped adapters (32 layers × q, k, v, o; q/o 4096→4096, k/v 4096→1024)
at r ∈ {8, 32, 128}; on the CPU, at r = 8: 64 layers of 384×384 (MiniLM width, many small layers),
a mixed MiniLM-shaped set (6 blocks × q, k, v, o 384→384, up 384→1536, down 1536→384), Llama
proportions at hidden 1024 (16 blocks × q, k, v, o; q/o 1024→1024, k/v 1024→256; also at r = 16
and 64: an AltLoRA phase does O(r) work per element, AdamW O(1)) and a many-layer
case: 224 layers at Llama-3-8B's own q, k, v, o shapes (56 blocks; 12 M adapter elements, about
200 MB for AdamW's parameters, gradients and moments).

Columns: ``bytes`` is the byte floor of one step (docs/kernels.md): an AltLoRA phase reads the
gradient, the momentum and the factor and writes the last two (AltLoRA+ also reads and writes V):
5 (7) × numel × 4 bytes in fp32, averaged over the B and A phases of an alternating step; AdamW
reads the gradient, m, v and the parameter of every A and B and writes all but the gradient
(7 × numel × 4). ``floor_ms`` = bytes / peak bandwidth (datasheet on GPUs, a measured copy rate on
the CPU), ``floor_fraction`` = floor_ms / median_ms, ``ratio`` = median / AdamW(fused) median,
``load_avg`` (CPU only) the 1-minute load average when the case started (above the thread count
the cores were shared and the medians are unreliable; ``min_ms`` suffers less).

Run: ``python bench/optimizer_step.py [--device cuda|cpu] [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import altlora  # noqa: E402
import altlora_kernels as K  # noqa: E402
from bench.common import device_peak, environment, print_table, time_fn  # noqa: E402

DESCRIPTION = __doc__.strip().splitlines()[0]
COLUMNS = ("case", "impl", "median_ms", "min_ms", "bytes", "floor_ms", "floor_fraction", "ratio", "load_avg", "note")
RATIO_TO = "AdamW(fused)"

LLAMA_3_8B_BLOCK = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)]  # (d_in, d_out) of q, k, v, o
MINILM_BLOCK = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]  # q, k, v, o, up, down
# Llama proportions (k/v a quarter of the hidden width, grouped-query attention) at hidden 1024.
LLAMA_LIKE_1024_BLOCK = [(1024, 1024), (1024, 256), (1024, 256), (1024, 1024)]

# Hyper-parameters: small steps so that repeated timing calls with a fixed gradient stay finite.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, DAMPING = 1e-6, 0.9, 0.999, 1e-8, 0.01, 1e-6
FP32_BYTES = 4


def cases(device: str, quick: bool) -> Dict[str, Tuple[List[Tuple[int, int]], int]]:
    """``{name: (layer shapes (d_in, d_out), rank)}``."""
    if device.startswith("cuda"):
        ranks = (8, 128) if quick else (8, 32, 128)
        blocks = 4 if quick else 32
        return {f"Llama-3-8B {blocks}×qkvo r={r}": (LLAMA_3_8B_BLOCK * blocks, r) for r in ranks}
    if quick:
        return {"16 × 96×96 r=8": ([(96, 96)] * 16, 8), "mixed 2 blocks/4 r=8": ([(96, 96)] * 4 + [(96, 384), (384, 96)], 8)}
    return {
        "64 × 384×384 r=8": ([(384, 384)] * 64, 8),
        "mixed MiniLM 6 blocks r=8": (MINILM_BLOCK * 6, 8),
        "Llama-like h1024 16×qkvo r=8": (LLAMA_LIKE_1024_BLOCK * 16, 8),
        "Llama-like h1024 16×qkvo r=16": (LLAMA_LIKE_1024_BLOCK * 16, 16),
        "Llama-like h1024 16×qkvo r=64": (LLAMA_LIKE_1024_BLOCK * 16, 64),
        "Llama-3-8B 56×qkvo r=8 (224 layers)": (LLAMA_3_8B_BLOCK * 56, 8),
    }


def make_pairs(shapes: Sequence[Tuple[int, int]], rank: int, device: str) -> List[altlora.LoRAPair]:
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i, (d, k) in enumerate(shapes):
        A = torch.nn.Parameter((torch.randn(rank, d, generator=gen) / math.sqrt(d)).to(device))
        B = torch.nn.Parameter((torch.randn(k, rank, generator=gen) * 0.01).to(device))
        A.grad = (torch.randn(rank, d, generator=gen) * 1e-3).to(device)
        B.grad = (torch.randn(k, rank, generator=gen) * 1e-3).to(device)
        pairs.append(altlora.LoRAPair(A, B, 2.0, f"layer{i}"))
    return pairs


class NaivePerLayerLoop:
    """AltLoRA / AltLoRA+ (alternating, B first) as a per-layer loop: ``torch.inverse`` of each damped
    Gram and copies of the factors at the other factor's last phase, as the authors' code does."""

    def __init__(self, pairs: Sequence[altlora.LoRAPair], adaptive: bool):
        self.pairs = list(pairs)
        self.adaptive = adaptive
        self.t = 0
        self.state = []
        for p in self.pairs:
            st = {"M_A": torch.zeros_like(p.A), "M_B": torch.zeros_like(p.B), "n_A": 0, "n_B": 0,
                  "A_prev": p.A.detach().clone(), "B_prev": p.B.detach().clone()}
            if adaptive:
                st["V_A"], st["V_B"] = torch.zeros_like(p.A), torch.zeros_like(p.B)
            self.state.append(st)

    def _direction(self, st, key, g):
        m = st["M_" + key]
        if not self.adaptive:
            return m
        n = st["n_" + key]
        v = st["V_" + key].mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        return (m / (1 - BETA1**n)) / ((v / (1 - BETA2**n)).sqrt() + EPS)

    @torch.no_grad()
    def step(self) -> None:
        b_phase = self.t % 2 == 0
        for p, st in zip(self.pairs, self.state):
            A, B, inv_s2 = p.A, p.B, 1.0 / (p.scaling * p.scaling)
            eye = torch.eye(A.shape[0], device=A.device)
            if b_phase:
                P = torch.inverse(A @ A.T + DAMPING * eye)
                g = (B.grad @ P) * inv_s2
                st["M_B"] = BETA1 * (st["M_B"] @ (st["A_prev"] @ A.T) @ P) + (1 - BETA1) * g
                st["n_B"] += 1
                B.sub_(LR * (self._direction(st, "B", g) + WEIGHT_DECAY * B))
                st["A_prev"] = A.detach().clone()
            else:
                P = torch.inverse(B.T @ B + DAMPING * eye)
                g = (P @ A.grad) * inv_s2
                st["M_A"] = BETA1 * (P @ (B.T @ st["B_prev"]) @ st["M_A"]) + (1 - BETA1) * g
                st["n_A"] += 1
                A.sub_(LR * (self._direction(st, "A", g) + WEIGHT_DECAY * A))
                st["B_prev"] = B.detach().clone()
        self.t += 1


def phase_bytes(pairs: Sequence[altlora.LoRAPair], adaptive: bool) -> float:
    """Byte floor of one alternating step: the mean of a B phase and an A phase."""
    per_element = FP32_BYTES * (7 if adaptive else 5)
    numel_a = sum(p.A.numel() for p in pairs)
    numel_b = sum(p.B.numel() for p in pairs)
    return per_element * (numel_a + numel_b) / 2


def adamw_bytes(pairs: Sequence[altlora.LoRAPair]) -> float:
    return 7 * FP32_BYTES * sum(p.A.numel() + p.B.numel() for p in pairs)


def _two_steps(opt):
    def run():
        opt.step()
        opt.step()

    return run


def run(device: str, quick: bool) -> List[Dict]:
    repeats, warmup = (15, 3) if quick else (30, 3)
    bandwidth = device_peak(device).get("bandwidth")
    dev = torch.device(device)
    backends = [b for b in K.BACKENDS if b != "auto"]
    rows = []
    for case, (shapes, rank) in cases(device, quick).items():
        case_rows = []
        # 1-minute load average at the start of the case: above the thread count, CPU timings were
        # taken on shared cores.
        load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
        for variant in ("AltLoRA", "AltLoRAPlus"):
            adaptive = variant == "AltLoRAPlus"
            for backend in backends:
                impl = f"{variant}[{backend}]"
                reason = K.unavailable_reason(backend, dev)
                if backend == "triton" and dev.type == "cpu":
                    reason = "needs a CUDA GPU (its CPU interpreter is for tests)"
                if reason is not None:
                    case_rows.append({"case": case, "impl": impl, "note": "not run: " + reason.split(";")[0]})
                    continue
                pairs = make_pairs(shapes, rank, device)
                opt = getattr(altlora, variant)(pairs, lr=LR, weight_decay=WEIGHT_DECAY, damping=DAMPING, backend=backend,
                                                nonfinite="skip")
                t = time_fn(_two_steps(opt), device, warmup=warmup, repeats=repeats)
                floor_bytes = phase_bytes(pairs, adaptive)
                case_rows.append({"case": case, "impl": impl, "median_ms": t["median_ms"] / 2, "min_ms": t["min_ms"] / 2,
                                  "bytes": floor_bytes})
                del opt, pairs
            pairs = make_pairs(shapes, rank, device)
            naive = NaivePerLayerLoop(pairs, adaptive)
            t = time_fn(_two_steps(naive), device, warmup=warmup, repeats=repeats)
            case_rows.append({"case": case, "impl": f"{variant}[naive loop]", "median_ms": t["median_ms"] / 2,
                              "min_ms": t["min_ms"] / 2, "bytes": phase_bytes(pairs, adaptive)})
            del naive, pairs
        for mode in ("fused", "foreach"):
            pairs = make_pairs(shapes, rank, device)
            params = [t for p in pairs for t in (p.A, p.B)]
            try:
                opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **{mode: True})
                opt.step()  # state initialization outside the timing
            except (RuntimeError, NotImplementedError) as err:
                case_rows.append({"case": case, "impl": f"AdamW({mode})", "note": f"not run: {err}".splitlines()[0]})
                continue
            t = time_fn(opt.step, device, warmup=warmup, repeats=repeats)
            case_rows.append({"case": case, "impl": f"AdamW({mode})", **t, "bytes": adamw_bytes(pairs)})
            del opt, pairs, params
        reference = next((r["median_ms"] for r in case_rows if r["impl"] == RATIO_TO and "median_ms" in r), None)
        for row in case_rows:
            if "median_ms" not in row:
                continue
            if dev.type == "cpu" and load is not None:
                row["load_avg"] = load
            if bandwidth:
                row["floor_ms"] = row["bytes"] / bandwidth * 1e3
                row["floor_fraction"] = row["floor_ms"] / row["median_ms"]
            if reference:
                row["ratio"] = row["median_ms"] / reference
        rows += case_rows
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small cases, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also save the rows and the environment to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    rows = run(args.device, args.quick)
    print_table(rows, COLUMNS, title=f"\n{DESCRIPTION} ({env['device']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
