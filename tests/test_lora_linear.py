"""The fused LoRA linear op (torch and Triton backends) and the LoRALinear module.

Every case is compared with a float64 transcription of the equations (forward, dx, dA, dB, with the
same dropout mask) on odd shapes. The Triton backend runs under TRITON_INTERPRET=1 on CPU (tiny
shapes) and natively on CUDA when present. A frozen factor must get no gradient *and no work*:
the backend primitives are recorded, and the B phase must not keep the input alive.
"""

import gc
import math
import os
import types
import weakref

import pytest
import torch

import altlora
import altlora_kernels.lora_linear as op_module
from altlora.lora_linear import LoRALinear
from altlora_kernels.lora_linear import (
    draw_dropout_seed,
    dropout_keep_mask,
    lora_linear,
    lora_linear_unavailable_reason,
    resolve_lora_linear_backend,
)

LEAD = (7, 3)  # N = 21 rows
D_IN, D_OUT = 19, 23
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Relative tolerances (of the largest reference entry) per dtype: fp32 rounding, bf16/fp16 outputs.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PHASES = {"AB": (True, True), "A": (True, False), "B": (False, True)}


@pytest.fixture(autouse=True)
def _interpret_triton_without_gpu(monkeypatch):
    # Without a GPU, Triton kernels run in its interpreter; set for these tests only (the kernels
    # are decorated per mode at launch, so this works after import).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _need_backend(backend, device):
    reason = lora_linear_unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(reason)


def _problem(r, dtype, device, bias=True, seed=0, lead=LEAD):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    return {
        "x": rand(*lead, D_IN),
        "weight": rand(D_OUT, D_IN, scale=D_IN**-0.5),
        "bias": rand(D_OUT) if bias else None,
        "A": rand(r, D_IN, scale=D_IN**-0.5),
        "B": rand(D_OUT, r, scale=r**-0.5),  # non-zero, so that dA is not trivially zero
        "dy": rand(*lead, D_OUT),
        "s": 16.0 / r,
    }


def _reference(prob, keep=None, p=0.0):
    """float64 forward and gradients (x, A, B) by autograd through the plain equations."""
    x, A, B = (prob[k].detach().double().clone().requires_grad_(True) for k in ("x", "A", "B"))
    dropped = x * keep.reshape(x.shape) / (1 - p) if keep is not None else x
    y = x @ prob["weight"].double().T + (prob["bias"].double() if prob["bias"] is not None else 0.0)
    y = y + prob["s"] * (dropped @ A.T) @ B.T
    y.backward(prob["dy"].double())
    return y.detach(), x.grad, A.grad, B.grad


def _assert_close(actual, expected, dtype, what):
    expected = expected.double()
    atol = TOL[dtype] * max(expected.abs().max().item(), 1.0)
    err = (actual.double().cpu() - expected.cpu()).abs()
    if err.max().item() > atol:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{what}: max error {err.max().item():.3g} > {atol:.3g} at {idx} "
                             f"(got {actual.flatten()[0].item():.6g}..., dtype {dtype})")


def _run(prob, dtype, backend, need_a, need_b, p=0.0, seed=None, need_x=True):
    x = prob["x"].to(dtype).requires_grad_(need_x)
    W = prob["weight"].to(dtype)
    b = prob["bias"].to(dtype) if prob["bias"] is not None else None
    A = prob["A"].to(dtype).requires_grad_(need_a)
    B = prob["B"].to(dtype).requires_grad_(need_b)
    y = lora_linear(x, W, b, A, B, prob["s"], dropout_p=p, dropout_seed=seed, backend=backend)
    y.backward(prob["dy"].to(dtype))
    return y, x, A, B


def _check_case(backend, device, dtype, r, bias, p, phase):
    _need_backend(backend, device)
    need_a, need_b = PHASES[phase]
    prob = _problem(r, dtype, device, bias=bias, seed=r)
    seed = 1234 if p > 0 else None
    keep = dropout_keep_mask(seed, (math.prod(LEAD), D_IN), p, device) if p > 0 else None
    y_ref, dx_ref, dA_ref, dB_ref = _reference(prob, keep, p)
    y, x, A, B = _run(prob, dtype, backend, need_a, need_b, p, seed)
    assert y.dtype == dtype and y.shape == (*LEAD, D_OUT)
    _assert_close(y.detach(), y_ref, dtype, "y")
    _assert_close(x.grad, dx_ref, dtype, "dx")
    if need_a:
        assert A.grad.dtype == dtype
        _assert_close(A.grad, dA_ref, dtype, "dA")
    else:
        assert A.grad is None
    if need_b:
        assert B.grad.dtype == dtype and B.grad.is_contiguous()
        _assert_close(B.grad, dB_ref, dtype, "dB")
    else:
        assert B.grad is None


# ---------------------------------------------------------------------------------------------
# Correctness against float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("phase", list(PHASES))
def test_torch_backend_matches_float64(device, dtype, r, bias, p, phase):
    _check_case("torch", device, dtype, r, bias, p, phase)


# The interpreter is slow: every (r, phase, dropout) in fp32, each dtype once, bias on and off.
TRITON_CASES = [(torch.float32, r, r != 3, p, phase) for r in (1, 3, 8) for p in (0.0, 0.1) for phase in PHASES]
TRITON_CASES += [(dtype, 8, True, 0.1, "AB") for dtype in (torch.bfloat16, torch.float16)]
TRITON_CASES += [(dtype, 3, False, 0.0, "AB") for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,r,bias,p,phase", TRITON_CASES, ids=lambda v: str(v))
def test_triton_backend_matches_float64(device, dtype, r, bias, p, phase):
    _check_case("triton", device, dtype, r, bias, p, phase)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rank_above_one_register_block(backend):
    # r = 70 > MAX_RANK_BLOCK: the kernels loop over (or spread) rank blocks; r not a power of two.
    _need_backend(backend, "cpu")
    prob = _problem(70, torch.float32, "cpu", seed=5, lead=(9,))
    y_ref, dx_ref, dA_ref, dB_ref = _reference(prob)
    y, x, A, B = _run(prob, torch.float32, backend, True, True)
    for got, ref, what in zip((y.detach(), x.grad, A.grad, B.grad), (y_ref, dx_ref, dA_ref, dB_ref), "y dx dA dB".split()):
        _assert_close(got, ref, torch.float32, what)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trainable_base_weight_and_bias_get_their_gradients(backend):
    _need_backend(backend, "cpu")
    prob = _problem(3, torch.float32, "cpu", seed=7)
    W = prob["weight"].float().requires_grad_(True)
    b = prob["bias"].float().requires_grad_(True)
    x = prob["x"].float()
    y = lora_linear(x, W, b, prob["A"].float(), prob["B"].float(), prob["s"], backend=backend)
    y.backward(prob["dy"].float())
    dy = prob["dy"].reshape(-1, D_OUT)
    _assert_close(W.grad, dy.T @ prob["x"].reshape(-1, D_IN), torch.float32, "dW")
    _assert_close(b.grad, dy.sum(0), torch.float32, "db")


def test_leading_dimensions_and_factor_dtype_cast():
    prob = _problem(3, torch.float32, "cpu", seed=3)
    W, A, B = prob["weight"].float(), prob["A"].float(), prob["B"].float()
    y1 = lora_linear(prob["x"][0, 0].float(), W, None, A, B, 2.0, backend="torch")  # a single vector
    assert y1.shape == (D_OUT,)
    x3 = prob["x"].float().reshape(7, 3, 1, D_IN)
    assert lora_linear(x3, W, None, A, B, 2.0, backend="torch").shape == (7, 3, 1, D_OUT)
    # fp32 factors on a bf16 input: computed in bf16, gradients land in the factors' own dtype.
    A32 = A.clone().requires_grad_(True)
    y = lora_linear(prob["x"].bfloat16(), W.bfloat16(), None, A32, B.bfloat16(), 2.0, backend="torch")
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and A32.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Dropout: reproducible mask, none at p = 0


def test_dropout_mask_is_reproducible_and_absent_at_p0(monkeypatch):
    prob = _problem(3, torch.float32, "cpu", seed=11)
    args = (prob["x"].float(), prob["weight"].float(), None, prob["A"].float(), prob["B"].float(), 2.0)
    y1 = lora_linear(*args, dropout_p=0.5, dropout_seed=99, backend="torch")
    y2 = lora_linear(*args, dropout_p=0.5, dropout_seed=99, backend="torch")
    y3 = lora_linear(*args, dropout_p=0.5, dropout_seed=100, backend="torch")
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # Without a seed one is drawn from torch's default generator: manual_seed reproduces it.
    torch.manual_seed(5)
    y4 = lora_linear(*args, dropout_p=0.5, backend="torch")
    torch.manual_seed(5)
    assert torch.equal(y4, lora_linear(*args, dropout_p=0.5, dropout_seed=draw_dropout_seed(), backend="torch"))
    keep = dropout_keep_mask(99, (21, D_IN), 0.5, "cpu")
    assert keep.dtype == torch.bool and 0.3 < keep.float().mean().item() < 0.7

    def no_mask(*a, **k):
        raise AssertionError("a dropout mask was generated at p = 0")

    monkeypatch.setattr(op_module, "dropout_keep_mask", no_mask)
    x = prob["x"].float().requires_grad_(True)
    A = prob["A"].float().requires_grad_(True)
    lora_linear(x, args[1], None, A, args[4], 2.0, dropout_p=0.0, backend="torch").sum().backward()


# ---------------------------------------------------------------------------------------------
# A frozen factor gets no gradient work; the B phase does not keep x


class _Recorder:
    """Wraps a backend's primitives and records (primitive, output shape) per call."""

    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def namespace(self):
        def wrap(name):
            def call(*args, **kwargs):
                out = getattr(self.ops, name)(*args, **kwargs)
                self.calls.append((name, tuple(out.shape)))
                return out
            return call
        return types.SimpleNamespace(**{n: wrap(n) for n in ("project", "matmul_plus_low_rank", "low_rank_grad")})


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("need_x", [True, False], ids=["x_grad", "x_frozen"])
def test_frozen_factor_gets_no_work(backend, need_x, monkeypatch):
    _need_backend(backend, "cpu")
    r, n = 3, math.prod(LEAD)
    real_ops = op_module._ops
    expected = {
        # backward calls per phase: g = dy·B (for dx or dA), dx, dA = gᵀ·x, dBᵀ = hᵀ·dy
        "AB": [("project", (n, r))] * 1 + ([("matmul_plus_low_rank", (n, D_IN))] if need_x else [])
        + [("low_rank_grad", (r, D_IN)), ("low_rank_grad", (r, D_OUT))],
        "A": [("project", (n, r))] + ([("matmul_plus_low_rank", (n, D_IN))] if need_x else [])
        + [("low_rank_grad", (r, D_IN))],
        "B": ([("project", (n, r)), ("matmul_plus_low_rank", (n, D_IN))] if need_x else [])
        + [("low_rank_grad", (r, D_OUT))],
    }
    for phase, (need_a, need_b) in PHASES.items():
        recorder = _Recorder(real_ops(backend))
        monkeypatch.setattr(op_module, "_ops", lambda name: recorder.namespace())
        prob = _problem(r, torch.float32, "cpu", seed=2)
        x = prob["x"].float().requires_grad_(need_x)
        A = prob["A"].float().requires_grad_(need_a)
        B = prob["B"].float().requires_grad_(need_b)
        y = lora_linear(x, prob["weight"].float(), None, A, B, prob["s"], backend=backend)
        forward_calls = list(recorder.calls)
        assert forward_calls == [("project", (n, r)), ("matmul_plus_low_rank", (n, D_OUT))]
        y.backward(prob["dy"].float())
        assert recorder.calls[2:] == expected[phase], phase
        assert (A.grad is None) != need_a and (B.grad is None) != need_b


def test_frozen_factor_gets_no_work_in_torch_ops():
    """Independent of the primitives: no aten op of the B-phase backward produces a (r, d) tensor (dA)
    and none of the A-phase backward a (k, r) or (r, k) one (dB)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and not func.is_view:  # views (transposes) do no work
                self.shapes.append(tuple(out.shape))
            return out

    r = 3
    for phase, (need_a, need_b) in PHASES.items():
        prob = _problem(r, torch.float32, "cpu", seed=4)
        x = prob["x"].float().requires_grad_(True)
        A = prob["A"].float().requires_grad_(need_a)
        B = prob["B"].float().requires_grad_(need_b)
        y = lora_linear(x, prob["weight"].float(), None, A, B, prob["s"], backend="torch")
        with Shapes() as mode:
            y.backward(prob["dy"].float())
        assert ((r, D_IN) in mode.shapes) == need_a, phase
        assert ((D_OUT, r) in mode.shapes or (r, D_OUT) in mode.shapes) == need_b, phase


def _saved_storages(fn):
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_b_phase_keeps_h_not_x(backend, p):
    _need_backend(backend, "cpu")
    r = 3
    prob = _problem(r, torch.float32, "cpu", seed=8)
    params = {k: prob[k].float() for k in ("weight", "A", "B")}
    x0 = prob["x"].float().requires_grad_(True)
    for phase, (need_a, need_b) in PHASES.items():
        A = params["A"].clone().requires_grad_(need_a)
        B = params["B"].clone().requires_grad_(need_b)
        x = x0 * 1.0  # a non-leaf activation (the product by a Python scalar saves nothing)
        x_storage = x.untyped_storage().data_ptr()
        x_ref = weakref.ref(x)
        y, saved = _saved_storages(lambda x=x: lora_linear(x, params["weight"], None, A, B, prob["s"], dropout_p=p,
                                                       dropout_seed=3, backend=backend))
        param_ptrs = {t.untyped_storage().data_ptr() for t in (params["weight"], A, B)}
        activations = [(ptr, nbytes) for ptr, nbytes in saved if ptr not in param_ptrs]
        del x
        gc.collect()
        if phase == "B":
            assert x_storage not in [ptr for ptr, _ in saved]
            assert x_ref() is None, "the B phase kept x alive"
            assert sum(nbytes for _, nbytes in activations) == math.prod(LEAD) * r * 4  # h only
        else:
            assert x_storage in [ptr for ptr, _ in saved]
            assert x_ref() is not None
        y.backward(prob["dy"].float())  # still differentiable for the factor being trained
        assert (B.grad is not None) == need_b and (A.grad is not None) == need_a


# ---------------------------------------------------------------------------------------------
# Backend selection and bad input


def test_backend_selection_and_errors():
    assert resolve_lora_linear_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_lora_linear_backend("torch", torch.device("cpu")) == "torch"
    prob = _problem(3, torch.float32, "cpu")
    x, W, A, B = (prob[k].float() for k in ("x", "weight", "A", "B"))
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, W, None, A, B, 1.0, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='torch'"):
        resolve_lora_linear_backend("triton", torch.device("meta"))
    with pytest.raises(ValueError, match="weight"):
        lora_linear(x, W.T, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, W, None, A, B.T, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, W, None, A[:, :-1], B, 1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, W, torch.zeros(D_OUT + 1), A, B, 1.0)
    with pytest.raises(ValueError, match="weight has dtype"):
        lora_linear(x, W.double(), None, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, None, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="x must be"):
        lora_linear(x.long(), W, None, A, B, 1.0)
    with pytest.raises(ValueError, match="features"):
        lora_linear(x[..., :-1], W, None, A, B, 1.0)


# ---------------------------------------------------------------------------------------------
# LoRALinear


def test_lora_linear_module_init_scaling_and_discovery():
    layer = LoRALinear(D_IN, D_OUT, r=4, alpha=8)
    assert layer.scaling == 2.0 and isinstance(layer.scaling, float)
    assert LoRALinear(D_IN, D_OUT, r=4, alpha=8, rslora=True).scaling == 4.0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (4, D_IN) and layer.lora_B.shape == (D_OUT, 4)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1.0 / math.sqrt(D_IN)  # kaiming_uniform(a=√5) on (r, in)
    assert 0 < layer.lora_A.abs().max() <= bound
    assert LoRALinear(D_IN, D_OUT, 2, 4, bias=False).bias is None
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), LoRALinear(D_OUT, 5, r=2, alpha=2))
    pairs = altlora.find_lora_pairs(model)
    assert [p.name for p in pairs] == ["0", "2"]
    assert pairs[0].A is layer.lora_A and pairs[0].B is layer.lora_B and pairs[0].scaling == 2.0
    for bad in ({"r": 0}, {"alpha": -1.0}, {"dropout": 1.0}, {"backend": "gpu"}):
        kwargs = {"in_features": D_IN, "out_features": D_OUT, "r": 2, "alpha": 4.0, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoRALinear(**kwargs)


def test_lora_linear_module_forward_merge_unmerge():
    torch.manual_seed(0)
    layer = LoRALinear(D_IN, D_OUT, r=3, alpha=6, dropout=0.1)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(*LEAD, D_IN)
    layer.eval()  # no dropout in eval mode: the plain equation
    ref = x @ layer.weight.T + layer.bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), ref)
    weight0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), ref)
    layer.train()
    assert not torch.allclose(layer(x), ref)  # dropout active while training
    # from_linear keeps the linear layer's weight and bias
    linear = torch.nn.Linear(D_IN, D_OUT)
    wrapped = LoRALinear.from_linear(linear, r=2, alpha=2)
    assert wrapped.weight is linear.weight and not linear.weight.requires_grad
    torch.testing.assert_close(wrapped(x), linear(x))


@pytest.mark.parametrize("freeze_inactive", [False, True])
def test_lora_linear_trains_with_altlora_like_the_plain_equations(freeze_inactive):
    """AltLoRA on LoRALinear gives the same parameters as AltLoRA on the unfused computation."""
    torch.manual_seed(0)
    layer = LoRALinear(D_IN, D_OUT, r=3, alpha=6)
    x = torch.randn(32, D_IN)
    target = torch.randn(32, D_OUT)
    A = torch.nn.Parameter(layer.lora_A.detach().clone())
    B = torch.nn.Parameter(layer.lora_B.detach().clone())
    W, b, s = layer.weight.detach(), layer.bias.detach(), layer.scaling
    opt_fused = altlora.AltLoRA(layer, lr=0.05, freeze_inactive=freeze_inactive)
    opt_plain = altlora.AltLoRA([altlora.LoRAPair(A, B, s)], lr=0.05, freeze_inactive=freeze_inactive)
    losses = []
    for _ in range(6):
        loss = ((layer(x) - target) ** 2).mean()
        opt_fused.zero_grad()
        loss.backward()
        opt_fused.step()
        losses.append(loss.item())
        plain = ((x @ W.T + b + s * (x @ A.T) @ B.T - target) ** 2).mean()
        opt_plain.zero_grad()
        plain.backward()
        opt_plain.step()
    torch.testing.assert_close(layer.lora_A.detach(), A.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.detach(), B.detach(), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]


def test_triton_split_reduction_of_factor_gradients():
    # On a GPU low_rank_grad splits N over programs and adds fp32 partials; force it here.
    _need_backend("triton", "cpu")
    from altlora_kernels import triton_lora_linear

    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(101, 5, generator=g), torch.randn(101, 19, generator=g)
    keep = torch.rand(101, 19, generator=g) > 0.3
    for splits in (1, 2, 4):
        got = triton_lora_linear.low_rank_grad(h, x, 0.5, keep, splits=splits)
        _assert_close(got, 0.5 * h.double().T @ (x.double() * keep), torch.float32, f"splits={splits}")


_COMPILE_CHECK = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from altlora_kernels import triton_lora_linear as T
from altlora_kernels.triton_runtime import interpreter_enabled
assert not interpreter_enabled()
KERNELS = {"project": T.PROJECT_KERNEL.get(), "matmul_plus_low_rank": T.MATMUL_PLUS_LOW_RANK_KERNEL.get(),
           "low_rank_grad": T.LOW_RANK_GRAD_KERNEL.get()}
for dtype, name, keep in [("bf16", torch.bfloat16, True), ("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)]:
    for kernel, fn in KERNELS.items():
        blocks, launch = T.launch_config(kernel, name)
        constexprs = {"HAS_KEEP": keep, "UPCAST": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                      "RANK_BLOCK": 16, **blocks}
        if kernel == "matmul_plus_low_rank":
            constexprs["HAS_BIAS"] = True
        sig = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                sig[arg] = "constexpr"
            elif arg == "keep_ptr":
                sig[arg] = "*u8"
            elif arg.endswith("_ptr"):
                sig[arg] = "*" + dtype
            else:
                sig[arg] = "fp32" if arg in ("scale", "scaling") else "i32"
        triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32), options=launch)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs the kernels for real")
def test_triton_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter accepts what a GPU compiler rejects (tl.dot dims < 16, ...): compile the launched
    configurations to sm_90 machine code ahead of time, in a process without TRITON_INTERPRET."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr):
        pytest.skip(f"Triton cannot compile ahead of time here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_backends_agree_on_strided_input_and_broadcast_gradient():
    # x is a transposed view (not contiguous), y.sum() sends back an expanded (stride-0) gradient.
    _need_backend("triton", "cpu")
    prob = _problem(3, torch.float32, "cpu", seed=9, lead=(5, 4))
    x = prob["x"].float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert not x.is_contiguous()
    results = []
    for backend in ("torch", "triton"):
        A = prob["A"].float().requires_grad_(True)
        B = prob["B"].float().requires_grad_(True)
        y = lora_linear(x, prob["weight"].float(), None, A, B, 2.0, dropout_p=0.2, dropout_seed=4, backend=backend)
        y.sum().backward()
        results.append((y.detach(), x.grad, A.grad, B.grad))
        x.grad = None
    for got, ref, what in zip(results[1], results[0], ("y", "dx", "dA", "dB")):
        _assert_close(got, ref, torch.float32, what)
