"""AltLoRA in TRL's ``SFTTrainer``: ``optimizer_cls_and_kwargs=altlora_optimizer(...)``, as in a Trainer.

A tiny Llama built from a config (random weights, nothing downloaded), a word-level tokenizer built
from the synthetic text itself, and PEFT LoRA from ``peft_config``: SFTTrainer tokenizes the "text"
column, wraps the model in PEFT and trains it; AltLoRA steps the LoRA factors. The text is made of
short sentences from a tiny grammar, so the loss has something to learn. Seconds on CPU:

    python examples/sft_example.py                          # AltLoRA+
    python examples/sft_example.py --variant altlora --lr 0.5
"""

import argparse
import random
import tempfile
import warnings

import torch

from altlora.trainer import altlora_optimizer

warnings.filterwarnings("ignore", category=FutureWarning)

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a bird", "the child"]
VERBS = ["sees", "likes", "finds", "draws", "follows"]
OBJECTS = ["the ball", "a tree", "the river", "a small house", "the red car", "an old book"]
PLACES = ["in the park", "at home", "near the school", "by the sea"]
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def synthetic_text(n, seed):
    """``n`` sentences ``<subject> <verb> <object> <place> .`` drawn with a seeded generator."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} ."
            for _ in range(n)]


def word_tokenizer(texts):
    """A word-level fast tokenizer over the words of ``texts`` (built here, nothing downloaded)."""
    import tokenizers
    import transformers

    words = sorted({w for t in texts for w in t.split()})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<bos>", eos_token="<eos>")


def tiny_llama(tokenizer, seed=0):
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def lora_config():
    import peft

    return peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def sft_config(output_dir, **overrides):
    import trl

    settings = dict(output_dir=str(output_dir), max_steps=30, per_device_train_batch_size=16, logging_steps=5,
                    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                    max_length=16, dataset_text_field="text", packing=False, dataloader_num_workers=0,
                    lr_scheduler_type="constant")
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def sft_trainer(output_dir, variant="altloraplus", lr=0.02, examples=256, **config_overrides):
    """An SFTTrainer on the tiny Llama and the synthetic sentences, with AltLoRA as its optimizer."""
    import datasets
    import trl

    texts = synthetic_text(examples, seed=0)
    tokenizer = word_tokenizer(texts)
    return trl.SFTTrainer(
        model=tiny_llama(tokenizer), args=sft_config(output_dir, **config_overrides),
        train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tokenizer,
        peft_config=lora_config(),
        # The one line, as with a plain Trainer: AltLoRA(+) on the LoRA factors of the PEFT model
        # that SFTTrainer builds from peft_config.
        optimizer_cls_and_kwargs=altlora_optimizer(lr=lr, variant=variant),
    )


def main():
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["altlora", "altloraplus"], default="altloraplus")
    parser.add_argument("--lr", type=float, default=0.02, help="LoRA lr (AltLoRA+'s scale; ~0.5 for AltLoRA)")
    parser.add_argument("--steps", type=int, default=30)
    cli = parser.parse_args()

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = sft_trainer(output_dir, cli.variant, cli.lr, max_steps=cli.steps)
        trainer.train()
        losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        print(f"{type(optimizer).__name__}: {len(optimizer.pairs())} LoRA layers, training loss every 5 steps {losses}")


if __name__ == "__main__":
    main()
