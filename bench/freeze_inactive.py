"""What ``freeze_inactive=True`` saves: forward+backward time and saved activations per phase.

A MiniLM-shaped BERT built from a config (random weights: 6 layers, hidden 384, intermediate
1536), PEFT LoRA r=8 on query/key/value/dense, batch 32 × 64 tokens. For each phase the
inactive factor is frozen, so autograd skips its weight gradient and, for a B phase, does not
save the layer input. Run: ``python bench/freeze_inactive.py [--threads N] [--repeats N]``.
"""

import argparse
import time
import warnings

import torch

import altlora


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import peft
    import transformers

    torch.set_num_threads(args.threads)
    cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.BertForSequenceClassification(cfg),
        peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]),
    )
    ids = torch.randint(0, cfg.vocab_size, (32, 64))
    labels = torch.randint(0, 2, (32,))
    pairs = altlora.find_lora_pairs(model)

    def saved_bytes_of_forward():
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
        return loss, sum(storages.values())

    print(f"torch {torch.__version__}, {args.threads} threads, {len(pairs)} LoRA layers")
    print(f"{'trainable factors':22s} {'fwd+bwd ms':>11s} {'saved MiB':>10s}")
    for label, a, b in (("A and B", True, True), ("B (A frozen)", False, True), ("A (B frozen)", True, False)):
        for p in pairs:
            p.A.requires_grad_(a)
            p.B.requires_grad_(b)
        times = []
        for _ in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss, saved = saved_bytes_of_forward()
            loss.backward()
            times.append(time.perf_counter() - start)
        times = sorted(times[1:])
        print(f"{label:22s} {1e3 * times[len(times) // 2]:11.0f} {saved / 2**20:10.1f}")


if __name__ == "__main__":
    main()
