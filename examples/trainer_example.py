"""AltLoRA in a Hugging Face ``Trainer``, in one line: ``optimizer_cls_and_kwargs=altlora_optimizer(...)``.

A tiny BERT built from a config (random weights, nothing downloaded) with PEFT LoRA learns to
classify random token sequences by their first token. The Trainer runs its usual loop (linear LR
schedule, checkpoints); AltLoRA steps the LoRA factors and AdamW the classifier head. A few
seconds on CPU:

    python examples/trainer_example.py                      # AltLoRA
    python examples/trainer_example.py --variant altloraplus --lr 0.05
"""

import argparse
import tempfile
import warnings

import torch

from altlora.trainer import altlora_optimizer

warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB, SEQ = 16, 8


class FirstTokenTask(torch.utils.data.Dataset):
    """Label 1 when the first token is in the lower half of the vocabulary."""

    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
        self.labels = (self.ids[:, 0] < VOCAB // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main():
    import peft
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["altlora", "altloraplus"], default="altlora")
    parser.add_argument("--lr", type=float, default=1.0, help="LoRA lr (AltLoRA's scale; ~0.05 for AltLoRA+)")
    parser.add_argument("--steps", type=int, default=40)
    cli = parser.parse_args()

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config),
                                peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                target_modules=["query", "key", "value", "dense"]))

    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(output_dir=output_dir, max_steps=cli.steps, per_device_train_batch_size=32,
                                              logging_steps=5, save_strategy="no", report_to="none", use_cpu=True,
                                              disable_tqdm=True, warmup_steps=3, seed=0)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=FirstTokenTask(512, seed=0), eval_dataset=FirstTokenTask(128, seed=1),
            # The one line: AltLoRA on the LoRA factors, AdamW (other_lr) on the classifier head.
            optimizer_cls_and_kwargs=altlora_optimizer(lr=cli.lr, variant=cli.variant, other_lr=3e-2),
        )
        trainer.train()
        losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        print(f"{type(optimizer).__name__}: {len(optimizer.pairs())} LoRA layers, training loss every 5 steps {losses}")
        print(f"held-out loss {trainer.evaluate()['eval_loss']:.3f}")


if __name__ == "__main__":
    main()
