"""AltLoRA, AltLoRA+ and AdamW on a tiny PEFT BERT, side by side (random weights, synthetic task).

The task: classify a sequence of random tokens by its first token (lower or upper half of the
vocabulary). LoRA r=8 on query/key/value/dense, the classifier head trained with AdamW. Prints the
training loss and held-out accuracy of each optimizer. About a minute on 2 CPU cores.
"""

import argparse
import time
import warnings

import torch

import altlora

warnings.filterwarnings("ignore", category=FutureWarning)


def build_model(seed):
    import peft
    import transformers

    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                      target_modules=["query", "key", "value", "dense"]))


def data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 200, (n, 16), generator=gen)
    return ids, (ids[:, 0] < 100).long()


def make_optimizer(name, model):
    if name == "altlora":
        return altlora.AltLoRA(model, lr=0.5, other_lr=3e-3)
    if name == "altloraplus":
        return altlora.AltLoRAPlus(model, lr=3e-3, other_lr=3e-3)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_ids, train_y = data(4096, 1)
    test_ids, test_y = data(1024, 2)
    print(f"{'optimizer':12s} {'first loss':>10s} {'last loss':>10s} {'accuracy':>9s} {'s/step':>7s}")
    for name in ("altlora", "altloraplus", "adamw"):
        model = build_model(args.seed)
        opt = make_optimizer(name, model)
        gen = torch.Generator().manual_seed(args.seed)
        losses = []
        start = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(0, len(train_ids), (32,), generator=gen)
            loss = model(input_ids=train_ids[idx], labels=train_y[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        seconds = (time.perf_counter() - start) / args.steps
        with torch.no_grad():
            accuracy = (model(input_ids=test_ids).logits.argmax(-1) == test_y).float().mean().item()
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        print(f"{name:12s} {first:10.3f} {last:10.3f} {accuracy:9.1%} {seconds:7.3f}")


if __name__ == "__main__":
    main()
