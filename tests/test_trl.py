"""altlora in TRL's SFTTrainer (examples/sft_example.py): the factory form and the mixin, the loss
going down, and checkpoint / resume reproducing the uninterrupted run. Tiny Llama, synthetic text.

trl is pinned in requirements.txt: without it these tests skip, except in CI, where that is an error.
"""

import importlib.util
import pathlib
import types

import pytest
import torch

from optional_packages import import_optional

trl = import_optional("trl")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import altlora  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sft_example.py"
STEPS, SAVE_AT = 8, 4


def load_example():
    spec = importlib.util.spec_from_file_location("sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sft = load_example()


def lora_params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """STEPS steps of AltLoRA+ with a checkpoint at SAVE_AT."""
    transformers.logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("sft")
    trainer = sft.sft_trainer(out, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT, logging_steps=1)
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora_before = lora_params(trainer)
    trainer.train()
    return types.SimpleNamespace(out=out, trainer=trainer, base_before=base_before, lora_before=lora_before,
                                 params=lora_params(trainer),
                                 losses=[h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_sft_trainer_trains_the_lora_factors_with_altlora(uninterrupted):
    trainer = uninterrupted.trainer
    opt = inner(trainer.optimizer)
    assert isinstance(opt, altlora.AltLoRAPlus)
    pairs = opt.pairs()
    assert len(pairs) == 4 * 2  # q, k, v, o in each of the two layers
    lora_ids = {id(t) for p in pairs for t in (p.A, p.B)}
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == lora_ids  # SFTTrainer's PEFT model trains only the factors
    assert all(not torch.equal(uninterrupted.params[n], uninterrupted.lora_before[n]) for n in uninterrupted.params)
    frozen = {n: p for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(frozen[n], v) for n, v in uninterrupted.base_before.items())


def test_sft_trainer_loss_goes_down(tmp_path):
    trainer = sft.sft_trainer(tmp_path, max_steps=30, logging_steps=5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.1, losses  # 3.57 → 3.39 when measured


def test_sft_resume_from_checkpoint_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    checkpoint = uninterrupted.out / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "adapter_model.safetensors").exists()
    trainer = sft.sft_trainer(tmp_path, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT, logging_steps=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # other adapter values, which resuming must overwrite
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed = lora_params(trainer)
    assert resumed.keys() == uninterrupted.params.keys()
    for name, value in uninterrupted.params.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The log history is the checkpoint's (steps 1..SAVE_AT) and then the steps run here.
    resumed_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert resumed_losses == pytest.approx(uninterrupted.losses, rel=1e-5)
    assert inner(trainer.optimizer).state_dict()["altlora"]["step_index"] == STEPS


def test_mixin_on_sft_trainer_reads_training_arguments(tmp_path):
    class AltLoRASFTTrainer(altlora.AltLoRATrainerMixin, trl.SFTTrainer):
        altlora_variant = "altlora"
        altlora_kwargs = {"schedule": "sequential"}

    texts = sft.synthetic_text(64, seed=0)
    tokenizer = sft.word_tokenizer(texts)
    import datasets

    trainer = AltLoRASFTTrainer(
        model=sft.tiny_llama(tokenizer), args=sft.sft_config(tmp_path, max_steps=2, learning_rate=0.05),
        train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tokenizer,
        peft_config=sft.lora_config(),
    )
    trainer.train()
    opt = inner(trainer.optimizer)
    assert type(opt) is altlora.AltLoRA and opt.schedule.kind == "sequential"
    assert opt.param_groups[0]["initial_lr"] == 0.05 and len(opt.pairs()) == 8
    assert opt.state_dict()["altlora"]["step_index"] == 2
