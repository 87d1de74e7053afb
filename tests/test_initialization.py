"""init_lora: shapes, ranks and distributions of each method, the model function left unchanged,
randomized SVD, and the spectral initialization's claim on matrix factorization."""

import math
import warnings

import pytest
import torch
from torch import nn

from altlora.initialization import init_lora, top_singular
from altlora.layers import find_lora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

R = 4
VOCAB, SEQ = 40, 8


@pytest.fixture
def one_thread():
    """Hundreds of tiny matmuls: one thread is faster, and immune to a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class OwnLoRALinear(nn.Module):
    """A module that owns its factors, like altlora's LoRALinear: weight, bias, lora_A, lora_B, scaling."""

    def __init__(self, d, k, r, alpha=8.0, seed=0, with_weight=True):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        if with_weight:
            self.weight = nn.Parameter(torch.randn(k, d, generator=gen) / math.sqrt(d), requires_grad=False)
            self.bias = nn.Parameter(torch.randn(k, generator=gen), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d, generator=gen) / math.sqrt(d))
        self.lora_B = nn.Parameter(torch.zeros(k, r))
        self.scaling = alpha / r

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


def tiny_bert(seed=0):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["query", "value", "dense", "word_embeddings"]))


def tiny_gpt2(seed=0):
    """GPT-2's Conv1D stores W transposed: PEFT sets fan_in_fan_out=True."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                   peft.LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                                                   target_modules=["c_attn", "c_fc"]))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def tiny_conv(seed=0):
    torch.manual_seed(seed)
    return peft.get_peft_model(ConvNet(), peft.LoraConfig(r=R, lora_alpha=8, target_modules=["conv", "head"]))


def own_model(seed=0):
    return nn.Sequential(OwnLoRALinear(9, 7, 3, seed=seed), nn.Tanh(), OwnLoRALinear(7, 5, 2, seed=seed + 1))


MODELS = {
    "bert": (tiny_bert, lambda: {"input_ids": torch.randint(1, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))}),
    "gpt2-fan_in_fan_out": (tiny_gpt2, lambda: {"input_ids": torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))}),
    "conv": (tiny_conv, lambda: {"x": torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))}),
    "own-module": (own_model, lambda: {"input": torch.randn(6, 9, generator=torch.Generator().manual_seed(1))}),
}

CASES = [("kaiming", "B"), ("kaiming", "A"), ("gaussian", "B"), ("gaussian", "A"),
         ("spectral", None), ("spectral", "B"), ("spectral", "A"), ("pissa", None)]


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        if "input" in inputs:
            out = model(inputs["input"])
        elif "x" in inputs:
            out = model(inputs["x"])
        else:
            out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def effective_matrices(model):
    """{name: W0 + s·B·A in float64, (k, d)} for every LoRA layer."""
    return {layer.name: layer.base_matrix().double() + layer.pair.scaling * layer.pair.matrices()[1].double()
            @ layer.pair.matrices()[0].double() for layer in find_lora_layers(model)}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method,zero", CASES)
def test_model_function_unchanged(model_name, method, zero):
    build, make_inputs = MODELS[model_name]
    model = build()
    inputs = make_inputs()
    for layer in find_lora_layers(model):  # a trained adapter: init_lora starts it afresh from W0
        with torch.no_grad():
            layer.pair.B.normal_()
    base_before = {layer.name: layer.base_matrix().double().clone() for layer in find_lora_layers(model)}
    for layer in find_lora_layers(model):
        with torch.no_grad():
            layer.pair.B.zero_()
    before = outputs(model, inputs)
    pairs = init_lora(model, method, zero=zero, generator=torch.Generator().manual_seed(0))
    assert len(pairs) == len(find_lora_layers(model)) > 0
    after = outputs(model, inputs)
    if method in ("kaiming", "gaussian") or zero is not None:
        assert torch.equal(before, after)  # a zero factor: exactly the base model
    else:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for name, W in effective_matrices(model).items():
        torch.testing.assert_close(W, base_before[name], rtol=0, atol=1e-5 * base_before[name].abs().max().item())


def _layers(model):
    return [(layer, *layer.pair.matrices()) for layer in find_lora_layers(model)]


@pytest.mark.parametrize("zero", ["B", "A"])
def test_kaiming_and_gaussian_distributions(zero):
    model = nn.Sequential(OwnLoRALinear(601, 599, 8), OwnLoRALinear(599, 601, 8, seed=1))  # ≈ 4,800 entries a factor
    bert = tiny_bert()
    for m in (model, bert):
        init_lora(m, "kaiming", zero=zero, generator=torch.Generator().manual_seed(0))
        for layer, A, B in _layers(m):
            r, d = layer.pair.rank, layer.pair.in_features
            random, zeroed, fan_in = (A, B, d) if zero == "B" else (B, A, r)
            assert not zeroed.any()
            assert torch.linalg.matrix_rank(random.double()) == r
            bound = 1 / math.sqrt(fan_in)  # PEFT's kaiming_uniform_(a=√5)
            assert random.abs().max() <= bound and random.abs().max() > 0.5 * bound
    for layer, A, B in _layers(model):  # U(−b, b): std b/√3
        random = A if zero == "B" else B
        fan_in = layer.pair.in_features if zero == "B" else layer.pair.rank
        assert random.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    init_lora(model, "gaussian", zero=zero, scale=2.0, generator=torch.Generator().manual_seed(0))
    for layer, A, B in _layers(model):
        random, zeroed = (A, B) if zero == "B" else (B, A)
        assert not zeroed.any()
        assert random.std().item() == pytest.approx(2.0 / 8, rel=0.05)  # std = scale / r
        assert abs(random.mean().item()) < 0.05 * 2.0 / 8


def test_generator_makes_it_reproducible():
    a, b = tiny_bert(), tiny_bert()
    init_lora(a, "kaiming", generator=torch.Generator().manual_seed(7))
    init_lora(b, "kaiming", generator=torch.Generator().manual_seed(7))
    for (_, A1, _), (_, A2, _) in zip(_layers(a), _layers(b)):
        assert torch.equal(A1, A2)


def test_spectral_factors_are_scaled_top_singular_vectors():
    model = tiny_gpt2()
    original = {layer.name: layer.base_matrix().double().clone() for layer in find_lora_layers(model)}
    scale = 0.05
    init_lora(model, "spectral", scale=scale, svd="full")
    for layer, A, B in _layers(model):
        s, r = layer.pair.scaling, layer.pair.rank
        U, S, Vh = torch.linalg.svd(original[layer.name])
        a2 = scale**2 * S[0].item() / s
        eye = torch.eye(r, dtype=torch.float64)
        torch.testing.assert_close(A.double() @ A.double().T, a2 * eye, rtol=1e-4, atol=1e-6 * a2)
        torch.testing.assert_close(B.double().T @ B.double(), a2 * eye, rtol=1e-4, atol=1e-6 * a2)
        product = s * B.double() @ A.double()
        expected = scale**2 * S[0] * U[:, :r] @ Vh[:r]  # s·B·A = c²·σ₁·U_r V_rᵀ
        torch.testing.assert_close(product, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
        assert torch.linalg.matrix_rank(product) == r


@pytest.mark.parametrize("zero", ["B", "A"])
def test_spectral_with_a_zero_factor(zero):
    model = own_model()
    original = {layer.name: layer.base_matrix().detach().clone() for layer in find_lora_layers(model)}
    init_lora(model, "spectral", zero=zero, scale=0.5)
    for layer, A, B in _layers(model):
        U, S, Vh = torch.linalg.svd(original[layer.name].double())
        r = layer.pair.rank
        assert torch.equal(layer.base_matrix(), original[layer.name])  # W0 untouched
        if zero == "B":
            assert not B.any()
            torch.testing.assert_close((A.double().T @ A.double()), 0.25 * Vh[:r].T @ Vh[:r], rtol=0, atol=1e-6)
        else:
            assert not A.any()
            torch.testing.assert_close((B.double() @ B.double().T), 0.25 * U[:, :r] @ U[:, :r].T, rtol=0, atol=1e-6)


def test_pissa_moves_the_principal_part_into_the_adapter():
    model = tiny_bert()
    original = {layer.name: layer.base_matrix().double().clone() for layer in find_lora_layers(model)}
    init_lora(model, "pissa", svd="full")
    for layer, A, B in _layers(model):
        r, s = layer.pair.rank, layer.pair.scaling
        U, S, Vh = torch.linalg.svd(original[layer.name])
        principal = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        scale = S[0].item()
        torch.testing.assert_close(s * B.double() @ A.double(), principal, rtol=0, atol=2e-6 * scale)
        residual_sv = torch.linalg.svdvals(layer.base_matrix().double())
        torch.testing.assert_close(residual_sv[: len(S) - r], S[r:], rtol=0, atol=2e-6 * scale)
        # Balanced factors: A Aᵀ = BᵀB = Σ_r / s.
        torch.testing.assert_close(A.double() @ A.double().T, torch.diag(S[:r]) / s, rtol=0, atol=2e-6 * scale)
        torch.testing.assert_close(B.double().T @ B.double(), torch.diag(S[:r]) / s, rtol=0, atol=2e-6 * scale)


def test_randomized_svd_matches_full_on_a_gapped_matrix(one_thread):
    gen = torch.Generator().manual_seed(0)
    k, d, r = 300, 260, 6
    U = torch.linalg.qr(torch.randn(k, r, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(d, r, generator=gen))[0]
    M = U @ torch.diag(torch.linspace(10, 5, r)) @ V.T + 0.01 * torch.randn(k, d, generator=gen) / math.sqrt(d)
    Uf, Sf, Vf = top_singular(M, r, svd="full")
    Ul, Sl, Vl = top_singular(M, r, svd="lowrank")
    torch.testing.assert_close(Sl, Sf, rtol=1e-4, atol=0)
    torch.testing.assert_close(Ul @ Ul.T, Uf @ Uf.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(Vl @ Vl.T, Vf @ Vf.T, rtol=0, atol=1e-4)


def test_pissa_with_randomized_svd_keeps_the_model():
    model = tiny_bert()
    inputs = MODELS["bert"][1]()
    before = outputs(model, inputs)
    init_lora(model, "pissa", svd="lowrank", niter=2)
    torch.testing.assert_close(outputs(model, inputs), before, rtol=1e-5, atol=1e-5)


def test_only_the_named_adapter():
    model = tiny_bert()
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["key"]))
    second = [layer for layer in find_lora_layers(model) if layer.adapter == "second"]
    default_before = [p.detach().clone() for layer in find_lora_layers(model) if layer.adapter == "default"
                      for p in (layer.pair.A, layer.pair.B)]
    pairs = init_lora(model, "kaiming", zero="A", adapter="second")
    assert {id(p.A) for p in pairs} == {id(layer.pair.A) for layer in second}
    assert all(not layer.pair.A.any() and layer.pair.B.any() for layer in second)
    default_after = [p for layer in find_lora_layers(model) if layer.adapter == "default" for p in (layer.pair.A, layer.pair.B)]
    assert all(torch.equal(a, b) for a, b in zip(default_before, default_after))


def matrix_factorization_error(method, seed, steps=200, lr=0.05, k=40, d=30, r=4):
    """LoRA on ½‖W0 + s·B·A − Y‖² (Y − W0 rank r, misaligned with W0), plain gradient descent.

    Returns ‖W0 + s·B·A − Y‖_F / ‖Y − W0‖_F after ``steps``.
    """
    gen = torch.Generator().manual_seed(seed)
    layer = OwnLoRALinear(d, k, r, alpha=2 * r, seed=seed)
    U = torch.linalg.qr(torch.randn(k, r, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(d, r, generator=gen))[0]
    delta = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5])) @ V.T
    target = layer.weight.detach() + delta
    if method == "spectral":
        # The paper's source: the fine-tuning residual Y − W0 (= −∇W of the loss at the start).
        init_lora(layer, "spectral", sources={"": target - layer.weight})
    else:
        init_lora(layer, method, generator=torch.Generator().manual_seed(seed + 100))
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=lr)
    for _ in range(steps):
        loss = 0.5 * ((layer.weight + layer.scaling * layer.lora_B @ layer.lora_A - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((layer.weight + layer.scaling * layer.lora_B @ layer.lora_A - target).norm() / delta.norm()).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_init_beats_random_init_on_matrix_factorization(seed, one_thread):
    """The gradient-flow paper's claim: started on the target's singular vectors, GD does not
    spend an alignment phase, and reaches a far lower error in the same number of steps."""
    spectral = matrix_factorization_error("spectral", seed)
    kaiming = matrix_factorization_error("kaiming", seed)
    gaussian = matrix_factorization_error("gaussian", seed)
    assert spectral < 1e-5
    assert spectral < 1e-2 * min(kaiming, gaussian), (spectral, kaiming, gaussian)


# --------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_value_error():
    model = tiny_bert()
    with pytest.raises(ValueError, match="method"):
        init_lora(model, "orthogonal")
    with pytest.raises(ValueError, match="zero"):
        init_lora(model, "kaiming", zero=None)
    with pytest.raises(ValueError, match="zero"):
        init_lora(model, "pissa", zero="B")
    with pytest.raises(ValueError, match="scale"):
        init_lora(model, "pissa", scale=0.1)
    with pytest.raises(ValueError, match="scale"):
        init_lora(model, "gaussian", scale=-1.0)
    with pytest.raises(ValueError, match="svd"):
        init_lora(model, "pissa", svd="qr")
    with pytest.raises(ValueError, match="sources"):
        init_lora(model, "kaiming", sources={})
    with pytest.raises(ValueError, match="sources"):
        init_lora(model, "spectral", sources={"no such layer": torch.zeros(2, 2)})
    name = find_lora_layers(model)[1].name
    with pytest.raises(ValueError, match=r"sources\["):
        init_lora(model, "spectral", sources={name: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="adapter"):
        init_lora(model, "kaiming", adapter="missing")
    with pytest.raises(ValueError, match="no LoRA layers"):
        init_lora(nn.Linear(3, 3), "kaiming")


def test_layers_that_cannot_be_initialized_leave_the_model_untouched():
    wide = nn.Sequential(OwnLoRALinear(9, 7, 3), OwnLoRALinear(5, 4, 6))  # second: r = 6 > min(k, d) = 4
    before = [p.detach().clone() for p in wide.parameters()]
    with pytest.raises(ValueError, match="rank 6 exceeds"):
        init_lora(wide, "pissa")
    assert all(torch.equal(a, b) for a, b in zip(before, wide.parameters()))

    no_weight = OwnLoRALinear(6, 5, 2, with_weight=False)
    with pytest.raises(ValueError, match="no base weight"):
        init_lora(no_weight, "spectral")
    init_lora(no_weight, "kaiming")  # random methods do not need W0

    dora = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5)),
                               peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        init_lora(dora, "kaiming")
