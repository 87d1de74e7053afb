"""fuse_peft / unfuse_peft: PEFT models give the same outputs and gradients through the fused op.

Models are tiny BERTs built from configs (random weights, nothing downloaded).
"""

import copy
import io
import logging
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import altlora  # noqa: E402
from altlora.peft_fusion import FusionReport, fuse_peft, is_fused, unfuse_peft  # noqa: E402
from altlora_kernels.lora_linear import (  # noqa: E402
    draw_dropout_seed,
    dropout_keep_mask,
    lora_linear_unavailable_reason,
)

TARGETS = ["query", "key", "value", "dense"]


@pytest.fixture(autouse=True)
def _quiet_and_interpreted(monkeypatch):
    if not torch.cuda.is_available():  # the Triton case runs in Triton's interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _bert(seed=0, **lora_kwargs):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=36, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=52, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    lora = {"task_type": "SEQ_CLS", "r": 3, "lora_alpha": 6, "target_modules": TARGETS, **lora_kwargs}
    model = peft.get_peft_model(transformers.BertForSequenceClassification(cfg), peft.LoraConfig(**lora))
    with torch.no_grad():  # B = 0 at init would make every A gradient zero
        for pair in altlora.find_lora_pairs(model):
            pair.B.normal_(0, 0.3)
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (3, 7), generator=g), torch.tensor([0, 1, 1])


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _assert_same(before, after, rtol=1e-5, atol=1e-6):
    (logits0, grads0), (logits1, grads1) = before, after
    torch.testing.assert_close(logits1, logits0, rtol=rtol, atol=atol)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_outputs_gradients_state_dict_and_parameters(backend, caplog):
    if lora_linear_unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(lora_linear_unavailable_reason(backend, torch.device("cpu")))
    model = _bert()
    ids, labels = _batch()
    before = _loss_and_grads(model, ids, labels)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())

    with caplog.at_level(logging.INFO, logger="altlora.peft_fusion"):
        report = fuse_peft(model, backend=backend)
    assert isinstance(report, FusionReport)
    assert len(report.fused) == 2 * 6 + 1 and not report.skipped  # q, k, v, 3 dense per layer + pooler
    assert "fused 13 of 13" in caplog.text
    assert all(is_fused(model.get_submodule(name)) for name in report.fused)

    after = _loss_and_grads(model, ids, labels)
    _assert_same(before, after)
    fused_params = dict(model.named_parameters())
    assert list(fused_params) == list(params) and all(fused_params[n] is p for n, p in params.items())
    fused_state = model.state_dict()
    assert list(fused_state) == list(state)
    assert all(torch.equal(fused_state[k], v) for k, v in state.items())

    assert len(unfuse_peft(model)) == 13
    assert not any(is_fused(m) for m in model.modules())
    _assert_same(before, _loss_and_grads(model, ids, labels))


def test_optimizer_built_before_fusing_trains_identically():
    ids, labels = _batch()
    trained = []
    for fuse in (False, True):
        model = _bert(seed=3)
        opt = altlora.AltLoRA(model, lr=0.05, freeze_inactive=True)
        if fuse:
            fuse_peft(model)
        for _ in range(4):
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or "lora" in n})
    assert trained[0].keys() == trained[1].keys()
    for name in trained[0]:
        torch.testing.assert_close(trained[1][name], trained[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_runtime_conditions_fall_back_to_peft():
    model = _bert()
    model.eval()
    ids, _ = _batch()
    reference = model(input_ids=ids).logits
    with model.disable_adapter():
        base_only = model(input_ids=ids).logits
    fuse_peft(model)
    torch.testing.assert_close(model(input_ids=ids).logits, reference)
    with model.disable_adapter():  # disabled adapters: PEFT's forward runs the base layer
        torch.testing.assert_close(model(input_ids=ids).logits, base_only)
    model.merge_adapter()  # merged: PEFT's forward (the adapter is in the weight)
    torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(2, 36)
    torch.testing.assert_close(layer(x, adapter_names=["default", "default"]), layer(x))  # extra kwargs: PEFT
    # serialization keeps the fused forward bound to the copy
    clone = copy.deepcopy(model)
    assert is_fused(clone.base_model.model.bert.encoder.layer[0].attention.self.query)
    assert clone.base_model.model.bert.encoder.layer[0].attention.self.query.forward.module is not layer
    torch.testing.assert_close(clone(input_ids=ids).logits, reference)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(input_ids=ids).logits, reference)


def test_dropout_uses_the_ops_reproducible_mask():
    model = _bert(lora_dropout=0.25)
    layer = model.base_model.model.bert.encoder.layer[1].attention.self.value
    x = torch.randn(4, 5, 36)
    model.eval()
    expected_eval = layer(x)
    fuse_peft(model)
    torch.testing.assert_close(layer(x), expected_eval)  # eval: no dropout, same as PEFT
    model.train()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    keep = dropout_keep_mask(draw_dropout_seed(), (20, 36), 0.25, "cpu").reshape(x.shape)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    expected = base(x) + layer.scaling["default"] * ((x * keep / 0.75) @ A.T) @ B.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


class _QuantizedStandIn(torch.nn.Linear):
    """A Linear subclass, as quantized base layers are: PEFT wraps it in lora.Linear."""


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = torch.nn.Linear(8, 8)
        self.quant = _QuantizedStandIn(8, 8)
        self.emb = torch.nn.Embedding(10, 8)

    def forward(self, ids):
        return self.quant(self.plain(self.emb(ids)))


def test_layers_it_cannot_serve_stay_as_they_were():
    dora = _bert(use_dora=True)
    report = fuse_peft(dora)
    assert not report.fused and set(report.skipped.values()) == {"DoRA"}
    assert not any(is_fused(m) for m in dora.modules())

    torch.manual_seed(0)
    net = peft.get_peft_model(_Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["plain", "quant", "emb"]))
    report = fuse_peft(net)
    assert report.fused == ["base_model.model.plain"]
    assert "not a plain nn.Linear" in report.skipped["base_model.model.quant"]
    assert "is not PEFT's lora.Linear" in report.skipped["base_model.model.emb"]
    assert "fused 1 of 3" in str(report)
    assert fuse_peft(net).skipped["base_model.model.plain"] == "already fused"

    two = peft.get_peft_model(_Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["plain"]))
    two.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["plain"]))
    two.base_model.set_adapter(["default", "second"])
    report = fuse_peft(two)
    assert report.skipped == {"base_model.model.plain": "2 active adapters"}
    two.base_model.set_adapter("second")  # one active adapter again: fusable, and it is that one
    torch.nn.init.normal_(two.base_model.model.plain.lora_B["second"].weight)
    assert fuse_peft(two).fused == ["base_model.model.plain"]
    ids = torch.tensor([[1, 2, 3]])
    fused_out = two(ids)
    unfuse_peft(two)
    torch.testing.assert_close(fused_out, two(ids))

    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        fuse_peft(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="backend"):
        fuse_peft(dora, backend="gpu")


def test_fan_in_fan_out_is_not_fused():
    cfg = transformers.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    report = fuse_peft(model)
    assert not report.fused and list(report.skipped.values()) == ["fan_in_fan_out"]
