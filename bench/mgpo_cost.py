"""What LoRA-MGPO and the SVD initializations cost.

``mgpo`` rows: a BERT built from a config (random weights; full: MiniLM-shaped, 6 layers, hidden
384, batch 16×64; quick: 2 layers, hidden 128, batch 8×32), PEFT LoRA r=8 on
query/key/value/dense, AdamW with first moments in place. One forward + backward (+ MGPO's enter/exit) per call:

* ``plain``            no perturbation;
* ``altlora.MGPO``     the low-rank forward hook (nothing k×d, no parameter written);
* ``dense add/sub``    the authors' scheme, transcribed here for comparison: form ε (k×d) per
                       layer, add it to the base weight before the forward, recompute and subtract
                       it after the backward.

Columns: ``median_ms`` / ``min_ms`` of the step, timed round-robin across the schemes (a shared
machine's load hits all alike); ``ratio`` to ``plain``; ``enter_exit_ms`` an empty context
(entry computes every layer's perturbation); ``saved_mib`` what autograd saves in the forward
(saved-tensor hooks; MGPO's U and V included); ``extra_mib`` what the scheme holds while a
context is open beyond ``plain`` (MGPO: U, V of every layer and the captured factor gradients;
dense: one layer's fp32 D and ε, k×d each, at a time); ``peak_mib`` (CUDA only) the step's peak allocation. bf16 only:
``eps_in_W`` the share ‖ΔW‖/‖ε‖ of ε that adding it to the bf16 base weight actually applies
(MGPO applies ε through the output and writes nothing: 0), ``drift`` the largest |change| of any
base weight after 10 enter/exit cycles with no optimizer step; ``_x10`` the same at 10·ρ, the
perturbation size once the adaptive factor reaches its cap.

``svd`` rows: ``top_singular`` (used by ``init_lora``) on matrices with a pretrained-like
power-law spectrum (σᵢ ∝ i^-0.5), full ``torch.linalg.svd`` against ``torch.svd_lowrank``
(q = r + 10, niter = 4), with ``energy_missed``, the fraction of the exact top-r energy Σσᵢ²
that each misses (float64 reference); ``init_lora pissa`` rows time the whole model (svd="auto", "full").

Run: ``python bench/mgpo_cost.py [--device cpu|cuda] [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, time_fn  # noqa: E402

from altlora.initialization import init_lora, top_singular  # noqa: E402
from altlora.layers import find_lora_layers  # noqa: E402
from altlora.mgpo import MGPO  # noqa: E402

RANK = 8
RHO = 0.05  # the authors' default ρ


def _model(quick: bool, device: str, dtype: torch.dtype):
    import peft
    import transformers

    if quick:
        cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.BertForSequenceClassification(cfg),
        peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["query", "key", "value", "dense"]),
    )
    return model.to(device=device, dtype=dtype), cfg


class DenseAddSubtract:
    """The authors' scheme, for comparison only: ε = −ρ·D/‖D‖ formed k×d, added to W0 on entry,
    recomputed and subtracted on exit (the adaptive factor is left at 1: it costs nothing)."""

    def __init__(self, layers, optimizer, rho: float):
        self.layers, self.optimizer, self.rho = layers, optimizer, rho

    def eps(self, layer):
        A, B = (t.detach().float() for t in layer.pair.matrices())
        MA = self.optimizer.state[layer.pair.A]["exp_avg"].float().reshape(A.shape)
        MB = self.optimizer.state[layer.pair.B]["exp_avg"].float().reshape(B.shape)
        D = layer.pair.scaling * (MB @ A + B @ MA)
        return (-self.rho * D / D.norm()).to(layer.base_matrix().dtype)

    @torch.no_grad()
    def __enter__(self):
        for layer in self.layers:
            layer.base_matrix().add_(self.eps(layer))

    @torch.no_grad()
    def __exit__(self, *exc):
        for layer in self.layers:
            layer.base_matrix().sub_(self.eps(layer))
        return False


class NoPerturbation:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _saved_mib(fn) -> float:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved_times(fns: Dict[str, callable], device: str, warmup: int, repeats: int, setup) -> Dict[str, Dict]:
    """Median/min ms of each fn, timed round-robin so that a shared machine's load hits all alike."""
    times = {name: [] for name in fns}
    for rep in range(warmup + repeats):
        for name, fn in fns.items():
            setup()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def _bf16_effect(layers, ctx, optimizer, rho) -> Dict[str, float]:
    """What ten enter/exit cycles leave in the base weights, and how much of ε one entry applies."""
    before = [layer.base_matrix().detach().clone() for layer in layers]
    with ctx:
        applied = [layer.base_matrix().float() - b.float() for layer, b in zip(layers, before)]
    intended = DenseAddSubtract(layers, optimizer, rho)
    eps_norm = math.sqrt(sum(intended.eps(layer).float().square().sum().item() for layer in layers))
    for _ in range(9):
        with ctx:
            pass
    drift = max((layer.base_matrix().float() - b.float()).abs().max().item() for layer, b in zip(layers, before))
    for layer, b in zip(layers, before):
        with torch.no_grad():
            layer.base_matrix().copy_(b)
    return {"drift": drift, "eps_in_W": math.sqrt(sum(a.square().sum().item() for a in applied)) / eps_norm}


def bench_mgpo(device: str, quick: bool, dtype: torch.dtype) -> List[Dict]:
    model, cfg = _model(quick, device, dtype)
    batch, seq = (8, 32) if quick else (16, 64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (batch,), generator=gen).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()  # first moments exist
    opt.zero_grad(set_to_none=True)
    layers = find_lora_layers(model)
    elem = torch.finfo(dtype).bits // 8
    lora_numel = sum(layer.pair.A.numel() + layer.pair.B.numel() for layer in layers)
    schemes = {
        "plain": (NoPerturbation(), 0),
        # U and V (2r wide: twice the adapter) and the captured factor gradients (the adapter's size).
        "altlora.MGPO": (MGPO(model, opt, rho=RHO), 3 * lora_numel * elem),
        # One layer at a time (on entry, and again on exit): D in fp32 and ε in the weight dtype, k×d each.
        "dense add/sub": (DenseAddSubtract(layers, opt, rho=RHO),
                          max(layer.pair.out_features * layer.pair.in_features for layer in layers) * (4 + elem)),
    }

    def zero():
        model.zero_grad(set_to_none=True)

    def make_step(ctx):
        def step():
            with ctx:
                model(input_ids=ids, labels=labels).loss.backward()
        return step

    def make_enter_exit(ctx):
        def enter_exit():
            with ctx:
                pass
        return enter_exit

    repeats = 3 if quick else 9
    steps = _interleaved_times({impl: make_step(ctx) for impl, (ctx, _) in schemes.items()}, device, 2, repeats, zero)
    enter_exit = _interleaved_times({impl: make_enter_exit(ctx) for impl, (ctx, _) in schemes.items()}, device, 2,
                                    3 * repeats, lambda: None)
    case = f"{len(layers)} LoRA layers, batch {batch}x{seq}, {str(dtype)[6:]}"
    rows = []
    for impl, (ctx, extra_bytes) in schemes.items():
        with ctx:
            saved = _saved_mib(lambda: model(input_ids=ids, labels=labels).loss)
        row = {"benchmark": "mgpo", "case": case, "impl": impl, **steps[impl],
               "ratio": steps[impl]["median_ms"] / steps["plain"]["median_ms"], "ratio_to": "plain",
               "enter_exit_ms": enter_exit[impl]["median_ms"], "saved_mib": saved, "extra_mib": extra_bytes / 2**20}
        if device.startswith("cuda"):
            step = make_step(ctx)
            zero()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if dtype == torch.bfloat16 and impl != "plain":
            # ρ·10: the adaptive factor's cap, reached whenever ḡ < 0.1.
            big = MGPO(model, opt, rho=10 * RHO) if impl == "altlora.MGPO" else DenseAddSubtract(layers, opt, 10 * RHO)
            for label, c in (("", ctx), ("_x10", big)):
                effect = _bf16_effect(layers, c, opt, RHO if not label else 10 * RHO)
                if impl == "altlora.MGPO":
                    effect["eps_in_W"] = 0.0  # applied through the output, never written into W
                row.update({key + label: value for key, value in effect.items()})
        rows.append(row)
        print(f"  measured {case} / {impl}: {row['median_ms']:.1f} ms", flush=True)
    return rows


def _power_law(k: int, d: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    n = min(k, d)
    U = torch.linalg.qr(torch.randn(k, n, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(d, n, generator=gen))[0]
    sigma = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
    return (U * sigma) @ V.T


def bench_svd(device: str, quick: bool) -> List[Dict]:
    shapes = [(384, 384), (384, 1536), (768, 768)] if quick else [(768, 768), (1024, 4096), (4096, 4096)]
    rows = []
    for k, d in shapes:
        M = _power_law(k, d, device).to(device)
        exact = torch.linalg.svdvals(M.double())[:RANK].square().sum().item()
        big = k * d > 4_000_000  # a full SVD of these takes long on a CPU: one timed run
        for mode in ("full", "lowrank"):
            t = time_fn(lambda: top_singular(M, RANK, svd=mode), device, warmup=0 if big else 1, repeats=1 if big else 3)
            _, S, _ = top_singular(M, RANK, svd=mode)
            rows.append({"benchmark": "svd", "case": f"{k}x{d}, r={RANK}", "impl": mode, **t,
                         "energy_missed": 1.0 - S.double().square().sum().item() / exact})
            print(f"  measured {k}x{d} / {mode}: {t['median_ms']:.1f} ms", flush=True)
    for mode in ("auto", "full"):
        model, _ = _model(quick, device, torch.float32)
        n = len(find_lora_layers(model))
        t = time_fn(lambda: init_lora(model, "pissa", svd=mode), device, warmup=0, repeats=1)
        rows.append({"benchmark": "svd", "case": f"init_lora pissa, {n} layers", "impl": f"svd={mode}", **t})
    return rows


def run(device: str, quick: bool) -> List[Dict]:
    warnings.filterwarnings("ignore")
    rows = bench_mgpo(device, quick, torch.float32)
    rows += bench_mgpo(device, quick, torch.bfloat16)
    rows += bench_svd(device, quick)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    rows = run(args.device, args.quick)
    print_table([r for r in rows if r["benchmark"] == "mgpo"],
                ["case", "impl", "median_ms", "min_ms", "ratio", "enter_exit_ms", "saved_mib", "extra_mib", "peak_mib",
                 "eps_in_W", "drift", "eps_in_W_x10", "drift_x10"],
                title="\nLoRA-MGPO: one forward + backward")
    print_table([r for r in rows if r["benchmark"] == "svd"], ["case", "impl", "median_ms", "min_ms", "energy_missed"],
                title="\ninit_lora factorizations")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
