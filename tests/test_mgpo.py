"""MGPO: exact restoration, the perturbation against a float64 transcription of its formula, the
gradient-norm EMA, training with AltLoRA / AltLoRA+ / AdamW, and bad input."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import altlora
from altlora.base import AltLoRAOptimizerBase
from altlora.layers import find_lora_layers
from altlora.mgpo import MGPO

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, SEQ, BATCH = 40, 8, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny matmuls: one thread is faster, and immune to a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(dtype=torch.float32, seed=0):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        transformers.BertForSequenceClassification(config),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["query", "key", "value", "dense", "word_embeddings"]),
    )
    return model.to(dtype)


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
        yield ids, (ids[:, 0] < VOCAB // 2).long()  # the first token decides


OPTIMIZERS = {
    "AltLoRA": lambda model: altlora.AltLoRA(model, lr=0.3, other_lr=1e-2),
    "AltLoRAPlus": lambda model: altlora.AltLoRAPlus(model, lr=1e-2, other_lr=1e-2),
    "AdamW": lambda model: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
}


def mgpo_steps(model, opt, mgpo, n, seed=0):
    losses = []
    for ids, labels in batches(n, seed):
        with mgpo:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot_state(opt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in st.items()}
            for p, st in opt.state.items()}


def assert_state_equal(opt, saved):
    assert {id(p) for p in opt.state} == set(saved)
    for p, st in opt.state.items():
        assert set(st) == set(saved[id(p)])
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, saved[id(p)][key]), key
            else:
                assert value == saved[id(p)][key], key


# --------------------------------------------------------------------------- exact restoration
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_restores_everything_exactly_and_perturbs_the_forward(dtype, opt_name):
    model = tiny_bert(dtype)
    opt = OPTIMIZERS[opt_name](model)
    mgpo = MGPO(model, opt, rho=0.05, beta=0.9)
    mgpo_steps(model, opt, mgpo, 3)  # first moments and ḡ exist from here on
    ids, labels = next(batches(1, seed=5))

    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    versions = {name: p._version for name, p in model.named_parameters()}
    state = snapshot_state(opt)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    with mgpo:
        perturbed = model(input_ids=ids, labels=labels)
        perturbed.loss.backward()
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name  # bit-identical, base weights included
        assert p._version == versions[name], name  # never written: AltLoRA's cached Grams stay valid
    assert_state_equal(opt, state)
    assert not torch.equal(perturbed.logits.detach(), clean)
    assert (perturbed.logits.detach().float() - clean.float()).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, clean)  # the hooks are gone
    opt.step()  # and the optimizer goes on from the unperturbed parameters


def test_no_perturbation_before_a_first_moment_exists():
    model = tiny_bert()
    opt = OPTIMIZERS["AdamW"](model)
    mgpo = MGPO(model, opt)
    ids, _ = next(batches(1))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with mgpo:
            inside = model(input_ids=ids).logits
    assert torch.equal(inside, clean)


# --------------------------------------------------------------------------- the formula
class OwnLoRALinear(nn.Module):
    """A module owning its factors, like altlora's LoRALinear."""

    def __init__(self, d, k, r, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d) / math.sqrt(d), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(k), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d) / math.sqrt(d))
        self.lora_B = nn.Parameter(0.1 * torch.randn(k, r))
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


class Conv1DNet(nn.Module):
    """GPT-2's Conv1D (W stored (d, k)): PEFT adapts it with fan_in_fan_out=True."""

    def __init__(self, d, k):
        super().__init__()
        self.proj = transformers.pytorch_utils.Conv1D(k, d)
        nn.init.normal_(self.proj.weight, std=d**-0.5)

    def forward(self, x):
        return self.proj(x)


def single_layer_model(kind, d=7, k=5, r=3, alpha=6.0):
    torch.manual_seed(0)
    if kind == "own":
        return OwnLoRALinear(d, k, r, alpha)
    if kind == "peft-linear":
        base, target, extra = nn.Sequential(nn.Linear(d, k)), ["0"], {}
    else:
        base, target, extra = Conv1DNet(d, k), ["proj"], {"fan_in_fan_out": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target, **extra))
    with torch.no_grad():
        find_lora_layers(model)[0].pair.B.normal_(0, 0.1)  # B ≠ 0: both terms of D count
    return model


class Reference:
    """Float64 transcription of MGPO for one layer: ḡ from the gradients, ε from the moments."""

    def __init__(self, rho, beta):
        self.rho, self.beta, self.gbar = rho, beta, None

    def observe(self, A, B, gA, gB, s):
        n = torch.linalg.norm(s * (gB.double() @ A.double() + B.double() @ gA.double())).item()
        self.gbar = n if self.gbar is None else self.beta * self.gbar + (1 - self.beta) * n

    def epsilon(self, A, B, MA, MB, s):
        D = s * (MB.double() @ A.double() + B.double() @ MA.double())
        adaptive = 1.0 if self.gbar is None else min(1.0 / (self.gbar + 1e-12), 10.0)
        return -self.rho * D / torch.linalg.norm(D) * adaptive


def moments(opt, pair):
    key = "momentum" if isinstance(opt, AltLoRAOptimizerBase) else "exp_avg"
    return opt.state[pair.A][key].reshape(pair.A.shape), opt.state[pair.B][key].reshape(pair.B.shape)


@pytest.mark.parametrize("kind", ["peft-linear", "peft-conv1d-fan_in_fan_out", "own"])
@pytest.mark.parametrize("opt_name", ["AltLoRA", "AdamW"])
@pytest.mark.parametrize("loss_scale", [1.0, 1e-5], ids=["adaptive", "capped"])
def test_perturbation_and_ema_match_a_float64_transcription(kind, opt_name, loss_scale):
    model = single_layer_model(kind)
    layer = find_lora_layers(model)[0]
    pair, s = layer.pair, layer.pair.scaling
    d, k = pair.in_features, pair.out_features
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (altlora.AltLoRA([pair], lr=0.1, schedule="sequential") if opt_name == "AltLoRA"
           else torch.optim.AdamW(params, lr=1e-2))
    rho, beta = 0.3, 0.8
    mgpo = MGPO(model, opt, rho=rho, beta=beta)
    ref = Reference(rho, beta)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, d, generator=gen), torch.randn(32, k, generator=gen)
    probe = torch.eye(d)
    for step in range(6):
        with torch.no_grad():
            outside = model(probe) - model(torch.zeros(1, d))  # rows: (W0 + s·B·A)ᵀ
        with mgpo:
            with torch.no_grad():
                inside = model(probe) - model(torch.zeros(1, d))
            loss = loss_scale * ((model(x) - y) ** 2).sum()
            loss.backward()
        A, B = pair.A.detach(), pair.B.detach()
        W = layer.base_matrix().double() + s * B.double() @ A.double()
        # The fp32 forward rounds the r products s·B·A term by term: with AltLoRA at this lr, A
        # grows to hundreds within 6 steps (while B stays small), so the bound scales with them.
        forward = 1e-5 + 4 * torch.finfo(torch.float32).eps * abs(s) * A.shape[0] * B.abs().max().item() * A.abs().max().item()
        torch.testing.assert_close(outside.T.double(), W, rtol=0, atol=forward)
        if step == 0:
            assert torch.equal(inside, outside)  # no moment yet
        else:
            eps = ref.epsilon(A, B, *moments(opt, pair), s)
            # The effective weight inside the context is W + ε ...
            torch.testing.assert_close(inside.T.double(), W + eps, rtol=0, atol=forward)
            # ... and the difference is ε itself, up to fp32 rounding of the outputs it is taken from.
            rounding = 2 * torch.finfo(torch.float32).eps * outside.abs().max().item()
            torch.testing.assert_close((inside - outside).T.double(), eps, rtol=0, atol=2e-6 * eps.abs().max().item() + rounding)
        ref.observe(A, B, pair.A.grad, pair.B.grad, s)
        assert mgpo.grad_ema[layer.name] == pytest.approx(ref.gbar, rel=1e-5)
        opt.step()
        opt.zero_grad()
    capped = 1.0 / (ref.gbar + 1e-12) > 10.0
    assert capped == (loss_scale < 1)  # both branches of min(1/(ḡ + 1e-12), 10) are exercised


def test_ema_reads_each_context_s_own_gradient_under_accumulation():
    """Two micro-batches per step, one context each, no zero_grad between: ḡ sees each
    micro-batch's gradient, not the running sum in .grad."""
    model = single_layer_model("peft-linear")
    layer = find_lora_layers(model)[0]
    pair, s = layer.pair, layer.pair.scaling
    opt = torch.optim.AdamW([pair.A, pair.B], lr=1e-2)
    mgpo = MGPO(model, opt, rho=0.1, beta=0.5)
    ref = Reference(0.1, 0.5)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for _ in range(2):
            x, y = torch.randn(8, 7, generator=gen), torch.randn(8, 5, generator=gen)
            before = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in (pair.A, pair.B)]
            with mgpo:
                ((model(x) - y) ** 2).sum().backward()
            ref.observe(pair.A, pair.B, pair.A.grad - before[0], pair.B.grad - before[1], s)
            assert mgpo.grad_ema[layer.name] == pytest.approx(ref.gbar, rel=1e-5)
        opt.step()
        opt.zero_grad()


def test_before_any_gradient_norm_the_factor_is_one_and_backwards_in_a_context_add_up():
    model = single_layer_model("peft-linear")
    layer = find_lora_layers(model)[0]
    pair, s = layer.pair, layer.pair.scaling
    opt = torch.optim.AdamW([pair.A, pair.B], lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 7, generator=gen), torch.randn(8, 5, generator=gen)
    ((model(x) - y) ** 2).sum().backward()  # a step without MGPO: a moment exists, ḡ does not
    opt.step()
    opt.zero_grad()
    mgpo = MGPO(model, opt, rho=0.1, beta=0.5)
    ref = Reference(0.1, 0.5)
    probe, zero = torch.eye(7), torch.zeros(1, 7)
    with torch.no_grad():
        outside = model(probe) - model(zero)
    with mgpo:
        with torch.no_grad():
            inside = model(probe) - model(zero)
        ((model(x) - y) ** 2).sum().backward()
        ((model(2 * x) - y) ** 2).sum().backward()  # two backward passes in one context
    eps = ref.epsilon(pair.A.detach(), pair.B.detach(), *moments(opt, pair), s)
    assert torch.linalg.norm(eps).item() == pytest.approx(0.1)  # ρ·D/‖D‖ with the factor 1
    rounding = 2 * torch.finfo(torch.float32).eps * outside.abs().max().item()
    torch.testing.assert_close((inside - outside).T.double(), eps, rtol=0, atol=2e-6 * eps.abs().max().item() + rounding)
    ref.observe(pair.A, pair.B, pair.A.grad, pair.B.grad, s)  # .grad holds the sum of both
    assert mgpo.grad_ema[layer.name] == pytest.approx(ref.gbar, rel=1e-5)


def test_every_layer_of_a_model_matches_the_transcription():
    """Layers of several shapes (computed in stacked groups): each its own ε and ḡ."""
    model = tiny_bert()
    opt = OPTIMIZERS["AdamW"](model)
    mgpo = MGPO(model, opt, rho=0.1, beta=0.7)
    layers = find_lora_layers(model)
    assert len({(layer.pair.A.shape, layer.pair.B.shape) for layer in layers}) >= 3
    refs = {layer.name: Reference(0.1, 0.7) for layer in layers}
    for ids, labels in batches(3, seed=3):
        with mgpo:
            # ×300: ḡ from 0.02 to 300 over the layers, both sides of the cap at 1/ḡ = 10.
            (300 * model(input_ids=ids, labels=labels).loss).backward()
        for layer in layers:
            refs[layer.name].observe(layer.pair.A, layer.pair.B, layer.pair.A.grad, layer.pair.B.grad, layer.pair.scaling)
        ema = mgpo.grad_ema
        for layer in layers:
            assert ema[layer.name] == pytest.approx(refs[layer.name].gbar, rel=1e-5), layer.name
        opt.step()
        opt.zero_grad()
    gbars = [ref.gbar for ref in refs.values()]
    assert min(gbars) < 0.1 < max(gbars)
    for layer in layers:
        pair = layer.pair
        if layer.kind == "embedding":
            probe = torch.arange(pair.in_features)  # row i of the table, (W0 + s·B·A + ε)ᵀ
        else:
            probe = torch.eye(pair.in_features)
        with torch.no_grad():
            outside = layer.module(probe)
            with mgpo:
                inside = layer.module(probe)
        eps = refs[layer.name].epsilon(pair.A.detach(), pair.B.detach(), opt.state[pair.A]["exp_avg"],
                                       opt.state[pair.B]["exp_avg"], pair.scaling)
        rounding = 2 * torch.finfo(torch.float32).eps * outside.abs().max().item()
        torch.testing.assert_close((inside - outside).T.double(), eps, rtol=0,
                                   atol=2e-6 * eps.abs().max().item() + rounding, msg=layer.name)


class EmbedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(6, 5, kernel_size=3, stride=2, padding=1)

    def forward(self, ids):
        h = self.emb(ids)  # (N, H, W, 6)
        return self.conv(h.permute(0, 3, 1, 2))


def test_embedding_and_convolution_perturbations_match_the_formula():
    torch.manual_seed(0)
    model = peft.get_peft_model(EmbedConvNet(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv"]))
    emb_layer, conv_layer = find_lora_layers(model)
    assert (emb_layer.kind, conv_layer.kind) == ("embedding", "conv")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mgpo = MGPO(model, opt, rho=0.2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids = torch.randint(0, 11, (4, 5, 7), generator=gen)
        with mgpo:
            model(ids).square().mean().backward()
        opt.step()
        opt.zero_grad()
    refs = {}
    for layer in (emb_layer, conv_layer):
        ref = Reference(0.2, 0.9)
        ref.gbar = mgpo.grad_ema[layer.name]  # checked against a transcription above
        refs[layer.name] = ref.epsilon(layer.pair.A.detach().reshape(layer.pair.rank, -1),
                                       layer.pair.B.detach().reshape(-1, layer.pair.rank),
                                       opt.state[layer.pair.A]["exp_avg"].reshape(layer.pair.rank, -1),
                                       opt.state[layer.pair.B]["exp_avg"].reshape(-1, layer.pair.rank),
                                       layer.pair.scaling)
    # Embedding: row i of the table is looked up by id i; the table is (W0 + s·B·A + ε)ᵀ.
    table_ids = torch.arange(11)
    embedding = model.base_model.model.emb
    with torch.no_grad():
        outside = embedding(table_ids)
        with mgpo:
            inside = embedding(table_ids)
    eps = refs[emb_layer.name]
    torch.testing.assert_close((inside - outside).T.double(), eps, rtol=0, atol=2e-6 * eps.abs().max().item())
    # Convolution: ε is a (c_out, c_in·kh·kw) kernel applied with the layer's stride and padding.
    conv = model.base_model.model.conv
    h = torch.randn(2, 6, 5, 7, generator=gen)
    with torch.no_grad():
        outside = conv(h)
        with mgpo:
            inside = conv(h)
    eps = refs[conv_layer.name]
    expected = F.conv2d(h.double(), eps.reshape(5, 6, 3, 3), stride=2, padding=1)
    torch.testing.assert_close((inside - outside).double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_trains_a_tiny_peft_model(opt_name):
    model = tiny_bert()
    opt = OPTIMIZERS[opt_name](model)
    mgpo = MGPO(model, opt, rho=0.05, beta=0.9)
    losses = mgpo_steps(model, opt, mgpo, 40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (opt_name, losses)
    assert all(v is not None and v > 0 for v in mgpo.grad_ema.values())


def test_state_dict_round_trip():
    model = tiny_bert()
    opt = OPTIMIZERS["AdamW"](model)
    mgpo = MGPO(model, opt, rho=0.05, beta=0.9)
    mgpo_steps(model, opt, mgpo, 2)
    other = MGPO(model, opt, rho=0.5, beta=0.5)
    other.load_state_dict(mgpo.state_dict())
    assert other.grad_ema == mgpo.grad_ema and (other.rho, other.beta) == (0.05, 0.9)
    sd = mgpo.state_dict()
    sd["grad_ema"].pop(next(iter(sd["grad_ema"])))
    with pytest.raises(ValueError, match="layers do not match"):
        other.load_state_dict(sd)


# --------------------------------------------------------------------------- misuse
def test_bad_arguments_raise_value_error():
    model = tiny_bert()
    opt = OPTIMIZERS["AdamW"](model)
    for kwargs, match in (({"rho": -0.1}, "rho"), ({"rho": float("nan")}, "rho"), ({"beta": 1.0}, "beta"),
                          ({"beta": -0.1}, "beta"), ({"rho": True}, "rho")):
        with pytest.raises(ValueError, match=match):
            MGPO(model, opt, **kwargs)
    with pytest.raises(ValueError, match="optimizer"):
        MGPO(model, object())
    with pytest.raises(ValueError, match="model"):
        MGPO("model", opt)
    plain = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no LoRA layer"):
        MGPO(plain, torch.optim.AdamW(plain.parameters()))
    head_only = torch.optim.AdamW(model.base_model.model.classifier.parameters())
    with pytest.raises(ValueError, match="no LoRA layer"):
        MGPO(model, head_only)
    dora = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5)), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        MGPO(dora, torch.optim.AdamW([p for p in dora.parameters() if p.requires_grad]))


def test_an_optimizer_without_first_moments_is_reported():
    model = single_layer_model("own")
    opt = torch.optim.Adagrad([model.lora_A, model.lora_B], lr=0.1)
    mgpo = MGPO(model, opt)
    model(torch.randn(3, 7)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="first moment"):
        with mgpo:
            pass
    assert not mgpo._inside  # closed cleanly, no hook left


def test_step_inside_the_context_is_refused_and_nothing_leaks():
    model = tiny_bert()
    opt = OPTIMIZERS["AltLoRA"](model)
    mgpo = MGPO(model, opt, rho=0.05)
    mgpo_steps(model, opt, mgpo, 2)
    ids, labels = next(batches(1, seed=9))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    ema = mgpo.grad_ema
    with pytest.raises(RuntimeError, match="step"):
        with mgpo:
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
    assert mgpo.grad_ema == ema  # not updated from a step that changed the factors
    opt.zero_grad()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with pytest.raises(KeyError):
            with mgpo:
                raise KeyError("user code fails inside")
        assert torch.equal(model(input_ids=ids).logits, clean)  # hooks removed on the way out
        with mgpo:
            with pytest.raises(RuntimeError, match="entered twice"):
                with mgpo:
                    pass
