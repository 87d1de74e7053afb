"""QLoRA: PEFT LoRA layers over bitsandbytes 4-bit / 8-bit base layers.

PEFT wraps a quantized base in ``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``: the base
weight is packed integers (uint8 / int8, no gradient), the LoRA factors ``lora_A[name].weight`` /
``lora_B[name].weight`` are ordinary floating point parameters. ``find_lora_pairs`` must find them
like any PEFT LoRA layer, the optimizers must train them, and ``fuse_peft`` must leave them alone.

Two kinds of test:

* stand-ins (always run): base layers and PEFT LoRA layers with the class names, module paths and
  attributes of the real ones (the LoRA layers are built on PEFT's own ``LoraLayer``, as PEFT's are),
  put into a tiny Llama through PEFT's custom-module hook. Their quantized weights dequantize
  exactly, so a float model with the dequantized weights must train to the same factors.
* real (where bitsandbytes imports; its wheel carries a CPU library): a tiny Llama saved to disk and
  loaded with ``BitsAndBytesConfig`` 4-bit and 8-bit, and a check that the stand-ins still look like
  the real classes.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optional_packages import try_import

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import altlora  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

bnb, NO_BNB = try_import("bitsandbytes")
needs_bnb = pytest.mark.skipif(bnb is None, reason=NO_BNB or "")

VOCAB, SEQ, BATCH = 40, 9, 4
QUANT_BLOCK = 16  # values per absmax block of the 4-bit stand-in
CODE_4BIT = torch.linspace(-1.0, 1.0, 16)  # uniform, unlike bitsandbytes' NF4: discovery does not care


# --- stand-ins for the bitsandbytes base layers (same class names and module path, nn.Linear subclasses) ---


class Linear4bit(nn.Linear):
    """Packed 4-bit codes in a uint8 ``(k·d/2, 1)`` weight, as bitsandbytes stores them; one absmax
    per block. ``from_linear`` quantizes; ``dequantized()`` is exact for the quantized values."""

    def __init__(self, linear: nn.Linear, compute_dtype=torch.float32):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        blocks = linear.weight.detach().float().reshape(-1, QUANT_BLOCK)
        self.absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
        codes = ((blocks / self.absmax + 1.0) * 7.5).round().clamp(0, 15).to(torch.uint8)
        packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    def dequantized(self) -> torch.Tensor:
        packed = self.weight.reshape(-1, QUANT_BLOCK // 2)
        codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1, QUANT_BLOCK).long()
        return (CODE_4BIT[codes] * self.absmax).reshape(self.out_features, self.in_features)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized().to(self.compute_dtype), bias).to(x.dtype)


class Linear8bitLt(nn.Linear):
    """An int8 ``(k, d)`` weight with one scale per row (``SCB``, as bitsandbytes names it)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach().float()
        self.SCB = w.abs().amax(dim=1).clamp_min(1e-8)
        self.weight = nn.Parameter((w / self.SCB[:, None] * 127).round().to(torch.int8), requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.SCB[:, None] / 127

    def forward(self, x):
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


for _cls in (Linear4bit, Linear8bitLt):
    _cls.__module__ = "bitsandbytes.nn.modules"


# --- stand-ins for PEFT's LoRA layers over them (peft/tuners/lora/bnb.py) ---


class _QuantizedLoraStandIn(nn.Module, LoraLayer):
    """What PEFT's bnb LoRA layers share: PEFT's ``LoraLayer`` state over the quantized base, no
    fan_in_fan_out, and ``base(x) + Σ s·B(A(drop(x)))`` over the active adapters in the factors' dtype."""

    def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            A, B = self.lora_A[adapter], self.lora_B[adapter]
            lora = B(A(self.lora_dropout[adapter](x.to(A.weight.dtype)))) * self.scaling[adapter]
            result = result + lora.to(result.dtype)
        return result


class PeftLinear4bit(_QuantizedLoraStandIn):
    pass


class PeftLinear8bitLt(_QuantizedLoraStandIn):
    pass


for _cls, _name in ((PeftLinear4bit, "Linear4bit"), (PeftLinear8bitLt, "Linear8bitLt")):
    _cls.__name__ = _cls.__qualname__ = _name
    _cls.__module__ = "peft.tuners.lora.bnb"

TARGETS = ["q_proj", "v_proj", "o_proj"]  # 4-bit, 8-bit, and a plain nn.Linear for contrast


def tiny_llama(seed=0, hidden=32):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def quantize_standins(model):
    """q_proj → 4-bit stand-in, v_proj → 8-bit stand-in, in place; returns the model."""
    for layer in model.model.layers:
        layer.self_attn.q_proj = Linear4bit(layer.self_attn.q_proj)
        layer.self_attn.v_proj = Linear8bitLt(layer.self_attn.v_proj)
    return model


def dequantize_into(float_model, quantized_model):
    """Give ``float_model`` (plain nn.Linear) the quantized model's base weights, dequantized."""
    with torch.no_grad():
        for f_layer, q_layer in zip(float_model.model.layers, quantized_model.model.layers):
            for name in ("q_proj", "v_proj"):
                quantized = getattr(q_layer.self_attn, name).get_base_layer()  # under PEFT's LoRA wrapper
                getattr(f_layer.self_attn, name).weight.copy_(quantized.dequantized())


def lora_config(**overrides):
    settings = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    settings.update(overrides)
    return peft.LoraConfig(**settings)


def standin_peft_model(seed=0):
    config = lora_config()
    config._register_custom_module({Linear4bit: PeftLinear4bit, Linear8bitLt: PeftLinear8bitLt})
    return peft.get_peft_model(quantize_standins(tiny_llama(seed)), config)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def nonzero_B(model, seed=2):
    """B = 0 at init makes every A gradient zero; random B exercises both phases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in altlora.find_lora_pairs(model):
            pair.B.copy_(0.1 * torch.randn(pair.B.shape, generator=g))


def quantized_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


def train(model, opt, ids, steps):
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# --- stand-in tests ---


def test_standins_are_wrapped_in_peft_bnb_classes():
    modules = lora_modules(standin_peft_model())
    kinds = {name.rsplit(".", 1)[-1]: (type(m).__module__, type(m).__name__) for name, m in modules.items()}
    assert kinds == {"q_proj": ("peft.tuners.lora.bnb", "Linear4bit"),
                     "v_proj": ("peft.tuners.lora.bnb", "Linear8bitLt"),
                     "o_proj": ("peft.tuners.lora.layer", "Linear")}
    weights = {type(m).__name__: m.base_layer.weight.dtype for m in modules.values()}
    assert weights == {"Linear4bit": torch.uint8, "Linear8bitLt": torch.int8, "Linear": torch.float32}


def test_find_lora_pairs_finds_quantized_layers():
    model = standin_peft_model()
    modules = lora_modules(model)
    pairs = altlora.find_lora_pairs(model)
    assert [p.name for p in pairs] == [f"{name}[default]" for name in modules]  # module order, all three kinds
    for pair, module in zip(pairs, modules.values()):
        assert pair.A is module.lora_A["default"].weight and pair.B is module.lora_B["default"].weight
        assert pair.scaling == 2.0 and pair.A.dtype == torch.float32 and pair.rank == 4
        assert (pair.out_features, pair.in_features) == (module.out_features, module.in_features)
    factor_ids = {id(t) for p in pairs for t in (p.A, p.B)}
    assert not any(id(w) in factor_ids for w in quantized_weights(model).values())

    layers = altlora.find_lora_layers(model)
    assert [(layer.name, layer.pair.A) for layer in layers] == [(p.name, p.A) for p in pairs]
    assert [layer.module for layer in layers] == list(modules.values())
    for layer in layers:
        assert layer.is_peft and layer.kind == "linear" and layer.is_active() and layer.variant() is None
        if type(layer.module).__name__ != "Linear":
            with pytest.raises(ValueError, match="quantized"):
                layer.base_matrix()  # initializations that rewrite W0 must refuse, not misread the packed bytes


@pytest.mark.parametrize("variant", ["AltLoRA", "AltLoRAPlus"])
def test_quantized_model_trains_like_its_dequantized_float_twin(variant):
    """Every factor (quantized base or not) gets the update a plain PEFT lora.Linear gets."""
    quantized = standin_peft_model()
    twin_base = tiny_llama()
    dequantize_into(twin_base, quantized.base_model.model)
    twin = peft.get_peft_model(twin_base, lora_config())
    nonzero_B(quantized)
    with torch.no_grad():
        twin_params = dict(twin.named_parameters())
        for name, p in quantized.named_parameters():
            if p.requires_grad:
                twin_params[name].copy_(p)
    before = quantized_weights(quantized)
    ids = batch()
    kwargs = dict(lr=1e-2) if variant == "AltLoRAPlus" else dict(lr=0.1)
    opts = [getattr(altlora, variant)(m, **kwargs) for m in (quantized, twin)]
    losses_q = train(quantized, opts[0], ids, steps=6)
    losses_f = train(twin, opts[1], ids, steps=6)

    assert losses_q[-1] < losses_q[0] - 1e-3, losses_q
    torch.testing.assert_close(torch.tensor(losses_q), torch.tensor(losses_f), rtol=1e-5, atol=1e-6)
    twin_params = dict(twin.named_parameters())
    for name, p in quantized.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, twin_params[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    after = quantized_weights(quantized)
    assert before.keys() == after.keys() and len(before) == 4
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_bf16_factors_over_quantized_base():
    model = standin_peft_model()
    for module in lora_modules(model).values():
        module.lora_A.to(torch.bfloat16)
        module.lora_B.to(torch.bfloat16)
    nonzero_B(model)
    pairs = altlora.find_lora_pairs(model)
    assert len(pairs) == 6 and all(p.A.dtype == p.B.dtype == torch.bfloat16 for p in pairs)
    start = [p.B.detach().clone() for p in pairs]
    losses = train(model, altlora.AltLoRAPlus(model, lr=1e-2), batch(), steps=4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.B.dtype == torch.bfloat16 and not torch.equal(p.B, s) for p, s in zip(pairs, start))


def test_fuse_peft_skips_quantized_layers():
    model = standin_peft_model()
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    report = altlora.fuse_peft(model, backend="torch")
    assert sorted(n.rsplit(".", 1)[-1] for n in report.fused) == ["o_proj", "o_proj"]
    assert len(report.skipped) == 4
    for name, reason in report.skipped.items():
        assert name.endswith(("q_proj", "v_proj")) and "is not PEFT's lora.Linear" in reason, (name, reason)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_optimizer_state_round_trip_on_quantized_model():
    model = standin_peft_model()
    nonzero_B(model)
    ids = batch()
    opt = altlora.AltLoRA(model, lr=0.1)
    train(model, opt, ids, steps=3)
    resumed_model = copy.deepcopy(model)
    resumed = altlora.AltLoRA(resumed_model, lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    train(model, opt, ids, steps=3)
    train(resumed_model, resumed, ids, steps=3)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


# --- real bitsandbytes (CPU library) ---


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden=64).save_pretrained(path)  # bitsandbytes' 4-bit blocks are 64 values
    return path


def load_quantized(path, bits):
    if bits == 4:
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu",
                                                          dtype=torch.float32)
    model = peft.get_peft_model(model, lora_config(target_modules=["q_proj", "v_proj"]))
    # NOTE: train mode also keeps bitsandbytes 0.50 off its CPU inference repacking, which fails on
    # layers this small.
    return model.train()


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_real_bitsandbytes_layers_are_found_trained_and_not_fused(saved_llama, bits):
    model = load_quantized(saved_llama, bits)
    modules = lora_modules(model)
    expected_class = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert {(type(m).__module__, type(m).__name__) for m in modules.values()} == {("peft.tuners.lora.bnb", expected_class)}
    pairs = altlora.find_lora_pairs(model)
    assert [p.name for p in pairs] == [f"{name}[default]" for name in modules] and len(pairs) == 4
    assert all(p.A is m.lora_A["default"].weight and p.B is m.lora_B["default"].weight
               for p, m in zip(pairs, modules.values()))
    assert all(p.A.dtype == torch.float32 for p in pairs)

    nonzero_B(model)
    before = quantized_weights(model)
    assert len(before) == 14 and all(t.dtype in (torch.uint8, torch.int8) for t in before.values())  # 7 linears × 2
    losses = train(model, altlora.AltLoRAPlus(model, lr=1e-2), batch(), steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = quantized_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)

    report = altlora.fuse_peft(model)
    assert not report.fused and len(report.skipped) == 4
    assert all(f"{expected_class} is not PEFT's lora.Linear" in why for why in report.skipped.values())


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_standins_mirror_the_real_classes(saved_llama, bits):
    """If PEFT or bitsandbytes change what the stand-in tests rely on, this fails where they run."""
    real = next(iter(lora_modules(load_quantized(saved_llama, bits)).values()))
    standins = lora_modules(standin_peft_model())
    stand_in = next(m for m in standins.values() if type(m).__name__ == type(real).__name__)
    assert (type(stand_in).__module__, type(stand_in).__name__) == (type(real).__module__, type(real).__name__)
    assert type(stand_in.base_layer).__name__ == type(real.base_layer).__name__
    assert isinstance(real.base_layer, nn.Linear) and isinstance(real, LoraLayer)
    assert stand_in.base_layer.weight.dtype == real.base_layer.weight.dtype
    packed = (real.out_features * real.in_features // 2, 1) if bits == 4 else (real.out_features, real.in_features)
    assert tuple(real.base_layer.weight.shape) == packed
    standin_packed = (stand_in.out_features * stand_in.in_features // 2, 1) if bits == 4 else (
        stand_in.out_features, stand_in.in_features)
    assert tuple(stand_in.base_layer.weight.shape) == standin_packed
    assert dict(real.named_children()).keys() == dict(stand_in.named_children()).keys()
    missing = set(vars(real)) - set(vars(stand_in))
    assert not missing, f"the real {type(real).__name__} has attributes the stand-in lacks: {sorted(missing)}"
    assert real.fan_in_fan_out is False and real.scaling == stand_in.scaling
