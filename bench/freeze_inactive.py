"""What ``freeze_inactive=True`` saves: forward+backward time and saved activations per phase.

A MiniLM-shaped BERT built from a config (random weights: 6 layers, hidden 384, intermediate
1536), PEFT LoRA r=8 on query/key/value/dense, batch 32 × 64 tokens. For each phase the
inactive factor is frozen, so autograd skips its weight gradient and, for a B phase, does not
save the layer input. Run: ``python -m bench --only freeze_inactive`` or
``python bench/freeze_inactive.py [--repeats N]``.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List

import torch

import altlora

DESCRIPTION = __doc__.strip().splitlines()[0]


def run(device: str, quick: bool, repeats: int = None) -> List[Dict]:
    warnings.filterwarnings("ignore")
    import peft
    import transformers

    repeats = repeats or (3 if quick else 15)
    cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=2 if quick else 6, num_attention_heads=12,
                                  intermediate_size=1536)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.BertForSequenceClassification(cfg),
        peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]),
    ).to(device)
    ids = torch.randint(0, cfg.vocab_size, (32, 64), device=device)
    labels = torch.randint(0, 2, (32,), device=device)
    pairs = altlora.find_lora_pairs(model)

    def fwd_bwd():
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return sum(storages.values())

    rows = []
    for label, a, b in (("A and B", True, True), ("B (A frozen)", False, True), ("A (B frozen)", True, False)):
        for p in pairs:
            p.A.requires_grad_(a)
            p.B.requires_grad_(b)
        times, saved = [], 0
        for i in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            saved = fwd_bwd()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first is a warm-up
                times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        rows.append({"case": f"BERT L={cfg.num_hidden_layers} h=384 r=8 32x64", "impl": f"trainable: {label}",
                     "median_ms": times[len(times) // 2], "saved_mib": saved / 2**20})
    for r in rows:
        r["ratio"] = r["median_ms"] / rows[0]["median_ms"]
    return rows


def main():
    import argparse

    from .common import print_table

    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(run(args.device, False, args.repeats))


if __name__ == "__main__":
    main()
