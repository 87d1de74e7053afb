"""End-to-end training step of a Llama-shaped model with LoRA: AltLoRA vs LoRA + AdamW.

A ``transformers`` LlamaForCausalLM built from a config (random weights, nothing downloaded) with
PEFT LoRA (r 16, α 32) on q, k, v, o, gate, up, down. On CPU a small model; on CUDA 8B-like widths
(hidden 4096, MLP 14336, 32 heads, 8 KV heads) with a few layers, bf16. Compared: LoRA + AdamW
(fused on CUDA, foreach on CPU), AltLoRA, AltLoRA+, AltLoRA with ``freeze_inactive``, and that on
the fused LoRA linear (``altlora.fuse_peft``). Per optimizer: median step
time (forward + backward + step, over an even number of steps so AltLoRA's A and B phases count
equally), tokens/s, peak memory (CUDA: allocator peak; CPU: bytes saved for backward plus
parameters, gradients and optimizer state), optimizer-state bytes, and the compute floor
(matmul FLOPs of the step over the device's peak).
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Dict, List

import torch

import altlora

from .common import device_peak, print_table

DESCRIPTION = __doc__.strip().splitlines()[0]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _shapes(device: str, quick: bool) -> Dict:
    if device.startswith("cuda"):
        return dict(hidden=4096, inter=14336, heads=32, kv=8, layers=2 if quick else 4, vocab=32000,
                    batch=4, seq=512 if quick else 1024, dtype=torch.bfloat16, rank=16, steps=4 if quick else 10)
    return dict(hidden=256, inter=688, heads=8, kv=4, layers=2 if quick else 4, vocab=2048,
                batch=4, seq=64 if quick else 256, dtype=torch.float32, rank=16, steps=2 if quick else 6)


def _model(s: Dict, device: str):
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                   num_key_value_heads=s["kv"], max_position_embeddings=max(2048, s["seq"]))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=s["dtype"])
    return peft.get_peft_model(model, peft.LoraConfig(r=s["rank"], lora_alpha=2 * s["rank"], target_modules=TARGETS,
                                                      lora_dropout=0.0))


def _step_flops(s: Dict) -> float:
    """Matmul FLOPs of one step with a frozen base: forward + input gradients (2× forward), LoRA
    weight gradients, attention scores and values."""
    h, i, L, T = s["hidden"], s["inter"], s["layers"], s["batch"] * s["seq"]
    kv = h * s["kv"] // s["heads"]
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * s["vocab"]
    lora = L * s["rank"] * (4 * h + 2 * kv + 3 * (h + i) - (h + i) + (h + i))  # A and B of the 7 targets (approx.)
    attention = L * 2 * 2 * s["batch"] * s["seq"] * s["seq"] * h  # QKᵀ and AV
    forward = 2 * T * linear + 2 * T * lora + attention
    return 2 * forward + 2 * T * lora


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


OPTIMIZERS = ("LoRA + AdamW", "AltLoRA", "AltLoRA+", "AltLoRA, freeze_inactive", "AltLoRA, freeze_inactive + fuse_peft")


def _optimizer(index: int, model, device: str):
    name = OPTIMIZERS[index]
    if name == "LoRA + AdamW":
        trainable = [p for p in model.parameters() if p.requires_grad]
        fused = dict(fused=True) if device.startswith("cuda") else dict(foreach=True)
        return f"{name} ({next(iter(fused))})", torch.optim.AdamW(trainable, lr=1e-4, **fused)
    if name == "AltLoRA":
        return name, altlora.AltLoRA(model, lr=1e-2)
    if name == "AltLoRA+":
        return name, altlora.AltLoRAPlus(model, lr=1e-4)
    if name == "AltLoRA, freeze_inactive":
        return name, altlora.AltLoRA(model, lr=1e-2, freeze_inactive=True)
    # The fastest configuration: the fused LoRA linear (Triton on CUDA, torch elsewhere) computes
    # only the trained factor's weight gradient, and a B phase saves x·Aᵀ instead of x.
    altlora.fuse_peft(model)
    return name, altlora.AltLoRA(model, lr=1e-2, freeze_inactive=True)


def run(device: str, quick: bool) -> List[Dict]:
    warnings.filterwarnings("ignore", category=FutureWarning)
    s = _shapes(device, quick)
    peak = device_peak(device)
    flops_peak = peak.get("bf16_flops" if s["dtype"] == torch.bfloat16 else "fp32_flops")
    if not device.startswith("cuda"):
        flops_peak = _cpu_matmul_flops()
    tokens = s["batch"] * s["seq"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen).to(device)
    rows = []
    for index in range(len(OPTIMIZERS)):
        model = _model(s, device)  # a fresh model per optimizer: same weights, same start
        label, opt = _optimizer(index, model, device)
        rows.append(_measure(label, model, opt, ids, s, device, tokens, flops_peak))
        del model, opt
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio"] = r["median_ms"] / base
        r["ratio_to"] = rows[0]["impl"]
    return rows


def _measure(label, model, opt, ids, s, device, tokens, flops_peak) -> Dict:
    saved = {}

    def pack(t):  # each storage once: views of one tensor are saved several times
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step():
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: one B and one A phase
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, saved_max = [], 0
    for _ in range(s["steps"]):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        saved_max = max(saved_max, sum(saved.values()))
    median = statistics.median(times)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    row = {
        "case": f"L={s['layers']} h={s['hidden']} r={s['rank']} {s['batch']}x{s['seq']} {str(s['dtype']).split('.')[-1]}",
        "impl": label,
        "median_ms": median,
        "tokens_per_s": tokens / (median / 1e3),
        "state_mib": _state_bytes(opt) / 2**20,
    }
    if device.startswith("cuda"):
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_mib"] = (saved_max + param_bytes + grad_bytes + _state_bytes(opt)) / 2**20
        row["saved_activations_mib"] = saved_max / 2**20
    if flops_peak:
        row["floor_ms"] = _step_flops(s) / flops_peak * 1e3
        row["floor_fraction"] = row["floor_ms"] / median
    return row


_CPU_FLOPS = None


def _cpu_matmul_flops() -> float:
    """Achieved fp32 FLOP/s of a 1024³ matmul on this CPU: the floor's denominator here."""
    global _CPU_FLOPS
    if _CPU_FLOPS is None:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        for _ in range(2):
            a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        _CPU_FLOPS = 5 * 2 * 1024**3 / (time.perf_counter() - start)
    return _CPU_FLOPS


def main():
    import argparse

    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print_table(run(a.device, a.quick))


if __name__ == "__main__":
    main()
