"""altlora in transformers.Trainer: the factory helper, the create_optimizer override, the LR
scheduler, checkpoint/resume, and DeepSpeed refused. Tiny random models built from a config."""

import types

import pytest
import torch

import altlora
from altlora import deepspeed_guard
from altlora.trainer import AltLoRAFactory, AltLoRATrainerMixin, altlora_optimizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, SEQ, EXAMPLES, BATCH, STEPS, SAVE_AT = 29, 7, 48, 12, 8, 4


def tiny_lora_bert(seed=0):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=3, lora_alpha=6, lora_dropout=0.0,
                                                      target_modules=["query", "value", "dense"]))


class TokenDataset(torch.utils.data.Dataset):
    """The label is whether the first token is in the lower half of the vocabulary."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (EXAMPLES, SEQ), generator=gen)
        self.labels = (self.ids[:, 0] < VOCAB // 2).long()

    def __len__(self):
        return EXAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def training_args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=BATCH, max_steps=STEPS, logging_steps=1,
                    save_strategy="steps", save_steps=SAVE_AT, report_to="none", use_cpu=True, seed=0,
                    disable_tqdm=True, dataloader_num_workers=0, warmup_steps=2, lr_scheduler_type="linear")
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def scrambled_adapters(model, seed=1):
    """The same frozen base model (a PEFT checkpoint holds only the adapters and the head) with other
    adapter and head values, which resuming must overwrite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    return model


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


FACTORY_KW = dict(lr=0.1, variant="altloraplus", other_lr=0.03)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One factory-form run of STEPS steps that saves a checkpoint at SAVE_AT."""
    out = tmp_path_factory.mktemp("uninterrupted")
    model = tiny_lora_bert()
    trainer = transformers.Trainer(model=model, args=training_args(out), train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=altlora_optimizer(**FACTORY_KW))
    trainer.train()
    return types.SimpleNamespace(out=out, trainer=trainer, params=trainable(model),
                                 losses=[h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_factory_form_trains_with_altlora_and_loss_decreases(uninterrupted):
    opt = uninterrupted.trainer.optimizer
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it in AcceleratedOptimizer
    assert isinstance(inner, altlora.AltLoRAPlus)
    assert [g["kind"] for g in inner.param_groups] == ["lora", "adamw"]
    assert len(inner.pairs()) == 2 * 5 + 1  # query, value and 3 dense layers per block, the pooler dense
    losses = uninterrupted.losses
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses


def test_trainer_scheduler_scales_every_param_group(uninterrupted):
    inner = getattr(uninterrupted.trainer.optimizer, "optimizer", uninterrupted.trainer.optimizer)
    # The Trainer's linear schedule (2 warmup steps, then down to 0 at STEPS) on both groups, each
    # from its own initial lr; the logged lr is the first (LoRA) group's at each step.
    assert [g["initial_lr"] for g in inner.param_groups] == [FACTORY_KW["lr"], FACTORY_KW["other_lr"]]
    assert [g["lr"] for g in inner.param_groups] == [0.0, 0.0]
    factors = [s / 2 if s < 2 else (STEPS - s) / (STEPS - 2) for s in range(STEPS)]
    logged = [h["learning_rate"] for h in uninterrupted.trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx([FACTORY_KW["lr"] * f for f in factors])


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    checkpoint = uninterrupted.out / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "optimizer.pt").exists()
    model = scrambled_adapters(tiny_lora_bert())
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=altlora_optimizer(**FACTORY_KW))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed = trainable(model)
    assert resumed.keys() == uninterrupted.params.keys()
    for name, value in uninterrupted.params.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert inner.state_dict()["altlora"]["step_index"] == STEPS


def test_create_optimizer_override_reads_training_arguments_and_resumes_alternation(tmp_path):
    args = training_args(tmp_path, learning_rate=0.05, weight_decay=0.01, max_steps=4, save_steps=2)
    trainer_cls = altlora.trainer.AltLoRATrainer
    assert issubclass(trainer_cls, transformers.Trainer)
    model = tiny_lora_bert()
    trainer = trainer_cls(model=model, args=args, train_dataset=TokenDataset(), altlora_kwargs={"other_lr": 3e-3})
    opt = trainer.create_optimizer()
    assert type(opt) is altlora.AltLoRA and opt.schedule.kind == "alternate"
    assert [(g["kind"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [("lora", 0.05, 0.01), ("adamw", 3e-3, 0.01)]
    trainer.train()
    full = trainable(model)
    assert trainer.optimizer.optimizer.state_dict()["altlora"]["step_index"] == 4

    model = scrambled_adapters(tiny_lora_bert())
    resumed = trainer_cls(model=model, args=training_args(tmp_path / "again", learning_rate=0.05, weight_decay=0.01,
                                                          max_steps=4, save_steps=2),
                          train_dataset=TokenDataset(), altlora_kwargs={"other_lr": 3e-3})
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # The alternation continues where it stopped: a B phase, an A phase, then B, A again.
    for name, value in full.items():
        torch.testing.assert_close(trainable(model)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_altlora_plus_override_takes_adam_settings_from_arguments(tmp_path):
    args = training_args(tmp_path, learning_rate=1e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7)
    trainer = altlora.trainer.AltLoRATrainer(model=tiny_lora_bert(), args=args, train_dataset=TokenDataset(),
                                             altlora_variant="altloraplus", altlora_kwargs={"schedule": "sequential"})
    opt = trainer.create_optimizer()
    assert type(opt) is altlora.AltLoRAPlus and opt.schedule.kind == "sequential"
    lora = opt.param_groups[0]
    assert (lora["lr"], lora["betas"], lora["eps"]) == (1e-3, (0.8, 0.95), 1e-7)


def test_helper_returns_a_factory_the_trainer_calls_with_the_model():
    cls, kwargs = altlora_optimizer(lr=0.1, momentum=0.8, schedule="sequential")
    assert cls is AltLoRAFactory and not issubclass(cls, torch.optim.Optimizer)
    from transformers.trainer_optimizer import is_optimizer_factory

    assert is_optimizer_factory(cls)
    opt = cls()(tiny_lora_bert(), **kwargs)
    assert type(opt) is altlora.AltLoRA and opt.param_groups[0]["momentum"] == 0.8


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: altlora_optimizer(lr=0.1, variant="adamw"), "variant"),
        (lambda: altlora_optimizer(lr=0.1, betas=(0.9, 0.99)), "betas"),  # AltLoRA has momentum, not betas
        (lambda: altlora_optimizer(lr=0.1, variant="altloraplus", momentum=0.9), "momentum"),
        (lambda: altlora_optimizer(lr=0.1, model=None), "model"),
    ],
)
def test_helper_rejects_bad_arguments_when_called(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- DeepSpeed (not installed: duck typing)


def test_factory_refuses_zero3_partitioned_parameters():
    model = tiny_lora_bert()
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.ds_id = 7  # what DeepSpeed ZeRO-3 sets on every parameter it partitions
    cls, kwargs = altlora_optimizer(lr=0.1)
    with pytest.raises(ValueError, match=r"lora_A.*ds_id.*DDP.*FSDP2.*single GPU"):
        cls()(model, **kwargs)


def test_override_refuses_training_arguments_with_deepspeed_set(tmp_path):
    fake_trainer = types.SimpleNamespace(optimizer=None, model=tiny_lora_bert(), altlora_variant="altlora",
                                         altlora_kwargs=None, is_deepspeed_enabled=False,
                                         args=types.SimpleNamespace(deepspeed="ds_config.json", learning_rate=0.1,
                                                                    weight_decay=0.0))
    with pytest.raises(ValueError, match=r"args.deepspeed.*ds_config.json.*does not support DeepSpeed ZeRO"):
        AltLoRATrainerMixin.create_optimizer(fake_trainer)
    fake_trainer.args.deepspeed, fake_trainer.is_deepspeed_enabled = None, True
    with pytest.raises(ValueError, match="DeepSpeed enabled"):
        AltLoRATrainerMixin.create_optimizer(fake_trainer)
    assert fake_trainer.optimizer is None


def test_factory_refuses_an_active_deepspeed_config_or_accelerate_flag(monkeypatch):
    from transformers.integrations import deepspeed as hf_deepspeed

    cls, kwargs = altlora_optimizer(lr=0.1)
    model = tiny_lora_bert()

    class FakeHfDeepSpeedConfig:  # what TrainingArguments(deepspeed=...) registers process-wide
        config = {"zero_optimization": {"stage": 2}}

        def is_zero3(self):
            return False

    fake = FakeHfDeepSpeedConfig()
    hf_deepspeed.set_hf_deepspeed_config(fake)
    try:
        with pytest.raises(ValueError, match="transformers DeepSpeed config"):
            cls()(model, **kwargs)
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # `accelerate launch --use_deepspeed`
    with pytest.raises(ValueError, match="ACCELERATE_USE_DEEPSPEED"):
        cls()(model, **kwargs)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert isinstance(cls()(model, **kwargs), altlora.AltLoRA)


def test_guard_notices_param_groups_replaced_by_a_flat_partition():
    model = tiny_lora_bert()
    opt = altlora.AltLoRA(model, lr=0.1)
    lora = opt.param_groups[0]
    expected = [id(p) for p in lora["params"]]
    deepspeed_guard.check_lora_params_in_place(0, lora["params"], expected)  # untouched: fine
    flat = torch.cat([p.detach().flatten() for p in lora["params"]])
    with pytest.raises(ValueError, match=r"param_groups\[0\].*1 other tensor.*ZeRO-1/2.*DDP"):
        deepspeed_guard.check_lora_params_in_place(0, [flat], expected)
    swapped = [p.detach().clone() for p in lora["params"]]
    with pytest.raises(ValueError, match="swapped one for one.*fully_shard"):
        deepspeed_guard.check_lora_params_in_place(0, swapped, expected)


# ------------------------------------------- checks inside the optimizer (the proposed base.py calls)


@pytest.mark.parametrize("attribute, where", [("ds_id", "lora_B"), ("ds_numel", "classifier"), ("ds_status", "lora_A")])
def test_optimizer_refuses_zero3_partitioned_parameters(attribute, where):
    model = tiny_lora_bert()
    name, p = next((n, p) for n, p in model.named_parameters() if where in n and p.requires_grad)
    setattr(p, attribute, 3)
    with pytest.raises(ValueError, match=rf"{name}.*{attribute}.*ZeRO-3.*DDP.*FSDP2.*single GPU"):
        altlora.AltLoRA(model, lr=0.1)
    pairs = altlora.find_lora_pairs(model)
    if where != "classifier":
        with pytest.raises(ValueError, match=rf"{attribute}.*ZeRO-3"):
            altlora.AltLoRAPlus(pairs, lr=0.1)


def test_step_refuses_param_groups_flattened_by_zero():
    model = tiny_lora_bert()
    opt = altlora.AltLoRA(model, lr=0.1)
    data = TokenDataset()
    model(input_ids=data.ids[:BATCH], labels=data.labels[:BATCH]).loss.backward()
    before = trainable(model)
    lora = opt.param_groups[0]
    flat = torch.cat([p.detach().flatten() for p in lora["params"]]).requires_grad_(True)  # as ZeRO-1/2 do
    lora["params"] = [flat]
    with pytest.raises(ValueError, match=r"param_groups\[0\].*ZeRO-1/2"):
        opt.step()
    after = trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "nothing may change"


def test_optimizer_class_form_without_the_model_is_refused(tmp_path):
    # (AltLoRA, kwargs) is not a factory: the Trainer passes plain parameter groups, with no pairs.
    trainer = transformers.Trainer(model=tiny_lora_bert(), args=training_args(tmp_path), train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=(altlora.AltLoRA, {"lr": 0.1}))
    with pytest.raises(ValueError, match="no LoRA pairs.*altlora_optimizer"):
        trainer.create_optimizer()
