"""altlora on Hugging Face PEFT models built from a config (random weights, nothing downloaded)."""

import pytest
import torch

import altlora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, SEQ, BATCH = 40, 8, 32


def tiny_bert(seed=0, dtype=torch.float32):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).to(dtype)


def two_adapter_model(dtype=torch.float32):
    """Adapter 'default' (r 4, on query/value and the word embeddings) and adapter 'second'
    (r 3, rsLoRA, DoRA, on key/dense), both active; the classifier head trained in full."""
    model = peft.get_peft_model(
        tiny_bert(dtype=dtype),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], lora_dropout=0.0),
    )
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=6, use_rslora=True, use_dora=True,
                                               target_modules=["key", "dense"], lora_dropout=0.0))
    model.base_model.set_adapter(["default", "second"])
    model.base_model.model.classifier.requires_grad_(True)
    return model.to(dtype)


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
        yield ids, (ids[:, 0] < VOCAB // 2).long()  # the pooled position decides


def train(model, opt, steps, seed=0):
    losses = []
    for ids, labels in batches(steps, seed):
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def test_discovery_finds_every_adapter_by_module():
    model = two_adapter_model()
    pairs = altlora.find_lora_pairs(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_adapter = {}
    for pair in pairs:
        module_path, adapter = pair.name[:-1].split("[")
        by_adapter.setdefault(adapter, []).append(pair)
        a_name, b_name = names[id(pair.A)], names[id(pair.B)]
        if "word_embeddings" in module_path:
            assert a_name == f"{module_path}.lora_embedding_A.{adapter}" and b_name == f"{module_path}.lora_embedding_B.{adapter}"
            assert tuple(pair.A.shape) == (4, VOCAB) and tuple(pair.B.shape) == (16, 4)  # (r, num_embeddings), (dim, r)
        else:
            assert a_name == f"{module_path}.lora_A.{adapter}.weight" and b_name == f"{module_path}.lora_B.{adapter}.weight"
    assert len(by_adapter["default"]) == 1 + 2 * 2  # embeddings + query, value in 2 layers
    assert len(by_adapter["second"]) == 2 * 4 + 1  # key, attention/intermediate/output dense, pooler dense
    assert all(p.scaling == pytest.approx(2.0) for p in by_adapter["default"])
    assert all(p.scaling == pytest.approx(6 / 3**0.5) for p in by_adapter["second"])  # rsLoRA: α/√r


def test_other_trainable_parameters_go_to_adamw():
    model = two_adapter_model()
    opt = altlora.AltLoRA(model, lr=0.05, other_lr=1e-3)
    assert [g["kind"] for g in opt.param_groups] == ["lora", "adamw"]
    names = {id(p): n for n, p in model.named_parameters()}
    other = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {n for n in other if "classifier" in n} == {
        "base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert sum("lora_magnitude_vector" in n for n in other) == 9  # DoRA magnitudes
    assert opt.param_groups[1]["lr"] == 1e-3
    assert len(opt.pairs()) == 14


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("variant,lr", [(altlora.AltLoRA, 2.0), (altlora.AltLoRAPlus, 1e-2)])
@pytest.mark.parametrize("schedule", ["alternate", "sequential", "joint"])
def test_lora_factors_alone_lower_the_loss(variant, lr, schedule):
    # Head frozen (other_lr = 0): whatever the loss does is the LoRA factors' doing.
    # (AltLoRA takes no per-element normalization: on this tiny random model ∇W is small and
    # its good lr is large; see the `lr` row of the README's Options table.)
    model = two_adapter_model()
    opt = variant(model, lr=lr, schedule=schedule, other_lr=0.0)
    losses = train(model, opt, 40)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert _mean(losses[-10:]) < _mean(losses[:10]) - 0.02, losses


@pytest.mark.parametrize("variant,lr", [(altlora.AltLoRA, 0.5), (altlora.AltLoRAPlus, 3e-3)])
def test_two_adapter_peft_model_with_head_trains(variant, lr):
    model = two_adapter_model()
    head_before = model.base_model.model.classifier.weight.detach().clone()
    opt = variant(model, lr=lr, other_lr=1e-2)
    losses = train(model, opt, 40)
    assert _mean(losses[-10:]) < 0.5 * _mean(losses[:10]), losses
    assert not torch.equal(model.base_model.model.classifier.weight, head_before)  # the head was stepped


def test_bf16_peft_model_trains():
    model = two_adapter_model(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opt = altlora.AltLoRAPlus(model, lr=3e-3, other_lr=3e-3)
    losses = train(model, opt, 40)
    pair = opt.pairs()[1]
    assert pair.A.dtype == torch.bfloat16 and opt.state[pair.A]["momentum"].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(losses)))
    assert _mean(losses[-10:]) < 0.85 * _mean(losses[:10]), losses


def test_peft_model_checkpoint_resume_is_bit_exact():
    def run(stop_and_resume):
        model = two_adapter_model()
        opt = altlora.AltLoRA(model, lr=0.05, other_lr=3e-3)
        data = list(batches(10))
        for i, (ids, labels) in enumerate(data):
            if stop_and_resume and i == 5:
                sd_model, sd_opt = model.state_dict(), opt.state_dict()
                model = two_adapter_model()
                model.load_state_dict(sd_model)
                opt = altlora.AltLoRA(model, lr=0.05, other_lr=3e-3)
                opt.load_state_dict(sd_opt)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
