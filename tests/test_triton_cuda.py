"""CUDA-only cases of the Triton kernels (they skip without a GPU): what the interpreter and the
ahead-of-time builds cannot show, in the cases the other CUDA tests do not reach.

* the phase update at padded rank 32 and in fp16 (test_triton_phase_update.py's CUDA cases run
  r ∈ {4, 8, 16, 64, 128} in fp32 and bf16), with and without a snapshot;
* the fused LoRA linear at ranks above 8 (16, 32, 64 and 100: every rank block, and a rank loop)
  in fp32, bf16 and fp16, with and without dropout (test_lora_linear.py's run r ≤ 8);
* the split reduction of low_rank_grad: deterministic, as many splits as split_count says;
* the first-use self-check passes on this device; a real CUDA-graph capture of a step raises;
  the chosen launch configurations fit this device's shared memory.

``bash bench/gpu_check.sh --quick`` runs these first (with the CUDA cases of the other files).
"""

import math

import pytest
import torch

import altlora

triton = pytest.importorskip("triton", reason="the triton backend needs the 'triton' package")

from altlora_kernels import triton_lora_linear, triton_phase_update  # noqa: E402
from altlora_kernels.lora_linear import dropout_keep_mask, lora_linear  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(autouse=True)
def _kernels_not_the_self_checks_fallback(monkeypatch):
    # A failed self-check would hand every phase to the torch backend: the comparisons below would
    # compare torch with itself. They test the kernels (test_cuda_self_check_passes tests the check).
    monkeypatch.setenv(triton_phase_update.SELF_CHECK_ENV, "0")


def _normalized_error(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all()
    return float((actual - expected).abs().max()) / (float(expected.abs().max()) or 1.0)


# ----------------------------------------------------------------------------- phase update
def _phase_run(backend, r, dtype, variant, schedule, switch_every, steps=4):
    gen = torch.Generator().manual_seed(r)
    pairs = []
    for i, (d, k) in enumerate(((257, 129), (130, 300))):
        A = torch.nn.Parameter((torch.randn(r, d, generator=gen) / math.sqrt(d)).cuda().to(dtype))
        B = torch.nn.Parameter((0.3 * torch.randn(k, r, generator=gen)).cuda().to(dtype))
        pairs.append(altlora.LoRAPair(A, B, 2.0 if i else 0.5, f"layer{i}"))
    lr = 1e-3 if variant == "AltLoRAPlus" else 1e-2
    opt = getattr(altlora, variant)(pairs, lr=lr, damping=1e-3, weight_decay=0.01, schedule=schedule,
                                    switch_every=switch_every, backend=backend, nonfinite="skip")
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in pairs:
            p.A.grad = (0.1 * torch.randn(p.A.shape, generator=g)).cuda().to(dtype)
            p.B.grad = (0.1 * torch.randn(p.B.shape, generator=g)).cuda().to(dtype)
        opt.step()
    return [t for p in pairs for t in [p.A, p.B] + [v for f in (p.A, p.B) for v in opt.state[f].values()
                                                       if isinstance(v, torch.Tensor)]]


PHASE_CASES = [(r, dtype) for r in (17, 32) for dtype in DTYPE_IDS]  # padded 32
PHASE_CASES += [(r, torch.float16) for r in (8, 64, 128)]  # fp16 at the other padded ranks


@pytest.mark.parametrize("variant,schedule,switch_every", [("AltLoRAPlus", "alternate", 2), ("AltLoRA", "sequential", 1)],
                         ids=["AltLoRAPlus-snapshot", "AltLoRA-sequential"])
@pytest.mark.parametrize("r,dtype", PHASE_CASES, ids=[f"r{r}-{DTYPE_IDS[d]}" for r, d in PHASE_CASES])
def test_cuda_phase_update_matches_torch_backend(r, dtype, variant, schedule, switch_every):
    got = _phase_run("triton", r, dtype, variant, schedule, switch_every)
    want = _phase_run("torch", r, dtype, variant, schedule, switch_every)
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        assert _normalized_error(a, b) <= tol, f"tensor {i}: {_normalized_error(a, b):.3g} > {tol}"


# ----------------------------------------------------------------------------- fused LoRA linear
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "dropout"])
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("r", [16, 32, 64, 100])
def test_cuda_fused_linear_matches_float64_above_rank_8(r, dtype, p):
    n, d, k = 333, 200, 136  # none a multiple of a tile
    gen = torch.Generator().manual_seed(r)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).cuda()

    x, w, b = rand(n, d), rand(k, d, scale=d**-0.5), rand(k)
    A, B, dy = rand(r, d, scale=d**-0.5), rand(k, r, scale=r**-0.5), rand(n, k)
    s, seed = 16.0 / r, 99
    keep = dropout_keep_mask(seed, (n, d), p, x.device) if p > 0 else None
    ref = [t.clone().requires_grad_(True) for t in (x, A, B)]
    dropped = ref[0] * keep / (1 - p) if keep is not None else ref[0]
    y_ref = ref[0] @ w.T + b + s * (dropped @ ref[1].T) @ ref[2].T
    y_ref.backward(dy)
    args = [t.to(dtype).requires_grad_(True) for t in (x, A, B)]
    y = lora_linear(args[0], w.to(dtype), b.to(dtype), args[1], args[2], s, dropout_p=p,
                    dropout_seed=seed if p > 0 else None, backend="triton")
    y.backward(dy.to(dtype))
    tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for name, got, want in (("y", y, y_ref), ("dx", args[0].grad, ref[0].grad), ("dA", args[1].grad, ref[1].grad),
                            ("dB", args[2].grad, ref[2].grad)):
        assert got.dtype == dtype
        assert _normalized_error(got, want) <= tol, f"{name}: {_normalized_error(got, want):.3g} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_split_reduction_is_deterministic(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(8192, 16, generator=gen).cuda().to(dtype)
    x = torch.randn(8192, 512, generator=gen).cuda().to(dtype)
    splits = []
    original = triton_lora_linear.split_count
    monkeypatch.setattr(triton_lora_linear, "split_count", lambda *a: splits.append(original(*a)) or splits[-1])
    first = triton_lora_linear.low_rank_grad(h, x, 0.5)
    second = triton_lora_linear.low_rank_grad(h, x, 0.5)
    assert splits and splits[0] > 1  # the case reduces over several splits
    assert torch.equal(first, second)
    assert _normalized_error(first, 0.5 * h.double().T @ x.double()) <= (2e-5 if dtype == torch.float32 else 2e-2)


# ----------------------------------------------------------------------------- device facts
def test_cuda_self_check_passes():
    device = torch.device("cuda", torch.cuda.current_device())
    for kind in (dict(), dict(rank=100, transposed=True, dtype=torch.bfloat16, snapshot=True, with_flag=True),
                 dict(rank=24, dtype=torch.float16, adaptive=False)):
        assert triton_phase_update.self_check(device, **kind) is None, kind


def test_cuda_graph_capture_of_a_step_raises():
    gen = torch.Generator().manual_seed(0)
    A = torch.nn.Parameter(torch.randn(8, 64, generator=gen).cuda())
    B = torch.nn.Parameter(torch.randn(48, 8, generator=gen).cuda())
    opt = altlora.AltLoRA([altlora.LoRAPair(A, B, 2.0)], lr=1e-2, backend="triton", nonfinite="skip")
    A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
    opt.step()  # outside capture: fine
    before = A.detach().clone(), B.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot run while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()
    assert torch.equal(A, before[0]) and torch.equal(B, before[1])


def test_cuda_launch_configs_fit_this_device():
    limit = triton_lora_linear.shared_memory_per_block(torch.cuda.current_device())
    for kernel in ("project", "matmul_plus_low_rank", "low_rank_grad"):
        for dtype in DTYPE_IDS:
            blocks, launch = triton_lora_linear.launch_config(kernel, dtype, shared_memory=limit)
            budget = next(c[2] for c in triton_lora_linear.launch_candidates(kernel, dtype) if (c[0], c[1]) == (blocks, launch))
            assert budget <= limit, f"{kernel} {dtype}: {budget} > {limit}"
