"""The native (C++) backend: wide layers, its damping ladder, the kernel call, and its absence.

The oracle matrix and the edge cases every backend shares run in test_oracle.py (the ``backend``
fixture of conftest.py includes native). The extension is compiled once per machine and source
version (tens of seconds the first time, then loaded from the cache); every test here that needs
it shares the module-scoped ``extension`` fixture. Without a C++ compiler those tests skip, and the fallback tests still run: they
simulate a missing compiler (or a failing build) on any machine.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import altlora
import altlora_kernels as K
from altlora_kernels import native_phase_update as native
from altlora_kernels.cholesky import ABSOLUTE_FLOOR, ESCALATION, damping_ladder
from altlora_kernels.torch_phase_update import phase_update_torch
from problems import Problem, run_against_oracle

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def extension():
    problem = native._toolchain_problem()
    if problem is not None:
        pytest.skip(f"backend='native' cannot be built here: {problem}")
    start = time.perf_counter()
    module = native.load_extension(build=True)  # with a toolchain, a failed build is an error, not a skip
    print(f"native extension ready in {time.perf_counter() - start:.1f} s: {module.__file__}")
    return module


# ------------------------------------------------------------------ wide layers against the float64 oracle


# Wider than one column chunk (r=8: 2048 columns, r=3: 5376) and not a multiple of a tile, so
# that the partial Gram sums of several chunks per layer are exercised; r = 1 beside them. With
# 1 thread the kernel takes whole layers as work items, with 4 threads and 4 layers it splits
# them into (layer, chunk) items over three passes: both schedules are checked.
WIDE_LAYERS = [(8, 2101, 37, 16.0), (3, 5400, 9, 6.0), (1, 13, 1031, 2.0), (8, 2101, 37, 8.0)]


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 4], indirect=True)
@pytest.mark.parametrize("variant,schedule", [("AltLoRA", "sequential"), ("AltLoRAPlus", "alternate")])
def test_wide_layers_split_over_chunks_match_oracle(extension, threads, variant, schedule):
    run_against_oracle(variant, schedule, "BA", 1, steps=8, layers=WIDE_LAYERS, backend="native")


# ------------------------------------------------------------------ the damping ladder


def _ladder_cases():
    good = torch.diag(torch.tensor([2.0, 1.0, 3.0]))
    zero = torch.zeros(3, 3)
    nearly_singular = torch.diag(torch.tensor([1.0, 1.0, 1e-9]))
    u = torch.tensor([[1.0], [2.0], [-1.0]])
    return torch.stack([good, zero, nearly_singular, u @ u.T])


def _reconstruct(L):
    return L @ L.mT


def test_ladder_takes_the_same_rungs_as_damped_cholesky(extension):
    G = _ladder_cases()
    factor, rung = native.damped_cholesky(G, 0.0)
    assert rung.tolist() == [0, len(ESCALATION), 1, 1]  # untouched, last rung (floor), first rung twice
    # LLᵀ = G + λI with the same λ; the factors themselves differ by fp32 (LAPACK) vs double
    # rounding where the shifted Gram is ill-conditioned.
    torch.testing.assert_close(_reconstruct(factor), _reconstruct(K.damped_cholesky(G, 0.0)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_reconstruct(factor[1]), ABSOLUTE_FLOOR * torch.eye(3), rtol=1e-4, atol=0)


@pytest.mark.parametrize("damping", [0.0, 1e-6, 1e-3])
def test_ladder_agrees_with_damped_cholesky_on_random_grams(extension, damping):
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for r, n in ((1, 4), (3, 2), (5, 9), (8, 3), (8, 20)):  # full rank and rank-deficient (n < r)
        X = torch.randn(6, r, n, generator=gen)
        blocks.append(X @ X.mT)
    rungs = []
    for G in blocks + [torch.zeros(2, 4, 4)]:
        factor, rung = native.damped_cholesky(G, damping)
        rungs += rung.tolist()
        assert torch.isfinite(factor).all()
        want = K.damped_cholesky(G, damping)
        # The rung torch took: the ladder value nearest to the shift its factor reconstructs.
        shift = (_reconstruct(want) - G).diagonal(dim1=-2, dim2=-1).mean(-1)
        torch_rung = (damping_ladder(G, damping) - shift).abs().argmin(0)
        assert rung.tolist() == torch_rung.tolist()
        scale = max(float(G.diagonal(dim1=-2, dim2=-1).amax()), damping, ABSOLUTE_FLOOR)
        torch.testing.assert_close(_reconstruct(factor), _reconstruct(want), rtol=1e-5, atol=1e-6 * scale)
    if damping == 0.0:
        assert 0 in rungs and 1 in rungs and len(ESCALATION) in rungs  # requested, escalated, floor


# ------------------------------------------------------------------ the kernel call itself


def _factor_group(L=3, r=3, n=29, transposed=True, dtype=torch.float32, adaptive=False, snapshot=False, seed=0,
                  strided=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, r) if transposed else (r, n)

    def param_like():
        t = torch.randn(shape[0], 2 * shape[1], generator=gen).to(dtype)
        return t[:, ::2] if strided else t[:, : shape[1]].contiguous()

    Y = torch.randn(L, r, r + 4, generator=gen)
    other_gram = Y @ Y.mT
    return K.FactorGroup(
        params=[param_like() for _ in range(L)],
        grads=[param_like() for _ in range(L)],
        transposed=transposed,
        momentum=torch.randn(L, *shape, generator=gen),
        variance=torch.rand(L, *shape, generator=gen) if adaptive else None,
        step=torch.full((L,), 2.0),
        gram=torch.randn(L, r, r, generator=gen),
        cross=torch.randn(L, r, r, generator=gen),
        other_gram=other_gram,
        other_cross=other_gram + 0.1 * torch.randn(L, r, r, generator=gen),
        inv_scale_sq=torch.rand(L, generator=gen) + 0.5,
        snapshot=torch.randn(L, *shape, generator=gen).to(dtype) if snapshot else None,
    )


def _outputs(g):
    outs = {"params": torch.stack([p.float() for p in g.params])}
    for key in ("momentum", "variance", "step", "gram", "cross", "other_cross"):
        if getattr(g, key) is not None:
            outs[key] = getattr(g, key).clone()
    return outs


def _clone(g):
    copy = lambda t: None if t is None else t.clone()  # noqa: E731
    return K.FactorGroup(
        params=[p.clone() for p in g.params],
        grads=list(g.grads), transposed=g.transposed, momentum=copy(g.momentum), variance=copy(g.variance),
        step=copy(g.step), gram=copy(g.gram), cross=copy(g.cross), other_gram=copy(g.other_gram),
        other_cross=copy(g.other_cross), inv_scale_sq=g.inv_scale_sq, snapshot=copy(g.snapshot))


HP = K.PhaseHyperParams(lr=0.02, beta1=0.9, weight_decay=0.1, damping=1e-3, beta2=0.99, eps=1e-8)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("snapshot", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_several_groups_in_one_call_equal_the_torch_backend(extension, adaptive, snapshot, strided):
    # Both factors' layouts, mixed dtypes and ranks in one call; with `strided` the parameters and
    # gradients are non-contiguous views (column stride 2).
    specs = [dict(transposed=True, r=3, n=29), dict(transposed=False, r=8, n=301, L=2),
             dict(transposed=True, r=1, n=17, dtype=torch.bfloat16), dict(transposed=False, r=5, n=40, dtype=torch.float16)]
    groups = [_factor_group(adaptive=adaptive, snapshot=snapshot, strided=strided, seed=i, **s) for i, s in enumerate(specs)]
    reference = [_clone(g) for g in groups]
    hp = K.PhaseHyperParams(**{**HP.__dict__, "adaptive": adaptive})
    native.phase_update(groups, hp)
    phase_update_torch(reference, hp)
    for i, (got, want) in enumerate(zip(groups, reference)):
        low_precision = got.params[0].dtype != torch.float32
        for key, value in _outputs(want).items():
            tol = dict(rtol=1e-2, atol=1e-2) if low_precision and key in ("params", "gram", "cross") else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(_outputs(got)[key], value, **tol, msg=lambda m: f"group {i} {key}: {m}")


# The column form (csrc/phase_update.cpp, update_columns) takes contiguous B layouts of rank 8, 16,
# 32 and 64; every other layout goes through the tile form. n = 2101 > one chunk (2048 columns at
# r = 8) and not a multiple of the 128-column flush or the 16-column block.
def _as_float64(g):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return K.FactorGroup(
        params=[p.double() for p in g.params], grads=[d.double() for d in g.grads], transposed=g.transposed,
        momentum=f64(g.momentum), variance=f64(g.variance), step=f64(g.step), gram=f64(g.gram), cross=f64(g.cross),
        other_gram=f64(g.other_gram), other_cross=f64(g.other_cross), inv_scale_sq=f64(g.inv_scale_sq),
        snapshot=f64(g.snapshot))


@pytest.mark.parametrize("r", [8, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("adaptive,snapshot", [(False, False), (True, True)])
def test_column_form_is_as_accurate_as_the_torch_backend(extension, r, dtype, adaptive, snapshot):
    # Against float64 math on the same inputs: the column form's fp32 error must be of the size
    # of the torch backend's (both sum r-term products in fp32, in different orders). Values the
    # parameter dtype rounds (bf16/fp16 factors, and Grams of them) are compared with the torch
    # backend's at that dtype's precision instead (a rounding flip moves one element by an ulp).
    n = 2101 if r == 8 else 61
    group = _factor_group(L=2, r=r, n=n, transposed=True, dtype=dtype, adaptive=adaptive, snapshot=snapshot, seed=r)
    torch_fp32, exact = _clone(group), _as_float64(group)
    hp = K.PhaseHyperParams(**{**HP.__dict__, "adaptive": adaptive})
    native.phase_update([group], hp)
    phase_update_torch([torch_fp32], hp)
    phase_update_torch([exact], hp)
    got, theirs, want = _outputs(group), _outputs(torch_fp32), _outputs(exact)
    for key in want:
        if dtype != torch.float32 and key in ("params", "gram", "cross"):
            # Rounded to bf16/fp16 by both fp32 backends, not by the float64 math: compare the two.
            scale = theirs[key].abs().max().item()
            torch.testing.assert_close(got[key], theirs[key], rtol=1e-2, atol=1e-2 * scale, msg=lambda m: f"{key}: {m}")
            continue
        error = (got[key].double() - want[key]).abs().max().item()
        torch_error = (theirs[key].double() - want[key]).abs().max().item()
        scale = want[key].abs().max().item()
        assert error <= 4 * torch_error + 1e-6 * scale, f"{key}: native error {error:.3g}, torch fp32 error {torch_error:.3g}"


@pytest.mark.parametrize("r", [8, 32])
def test_column_form_and_tile_form_agree(extension, r):
    # The same B values, once contiguous (column form) and once as a strided view (tile form).
    contiguous = _factor_group(L=3, r=r, n=300, transposed=True, adaptive=True, seed=5)
    strided = _clone(contiguous)
    strided = K.FactorGroup(**{**strided.__dict__,
                               "params": [torch.empty(p.shape[0], 2 * r)[:, ::2].copy_(p) for p in strided.params],
                               "grads": [torch.empty(g.shape[0], 2 * r)[:, ::2].copy_(g) for g in strided.grads]})
    assert strided.params[0].stride() == (2 * r, 2)
    hp = K.PhaseHyperParams(**{**HP.__dict__, "adaptive": True})
    native.phase_update([contiguous], hp)
    native.phase_update([strided], hp)
    for key, value in _outputs(strided).items():
        # Equal up to fp32 summation order (sums of r or n terms, relative to the largest entry).
        atol = 1e-6 * value.abs().max().item()
        torch.testing.assert_close(_outputs(contiguous)[key], value, rtol=1e-5, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("r,n", [(8, 300), (3, 700)])
def test_tile_form_reads_fp32_rows_in_place_with_the_same_bits(extension, r, n):
    # A stored (r, n) in fp32: full tiles read ∇X and M in place, the tail tile through copies; a
    # strided view of the same values takes copies everywhere. Same arithmetic, so the same bits.
    direct = _factor_group(L=3, r=r, n=n, transposed=False, adaptive=True, seed=7)
    copied = _clone(direct)
    copied = K.FactorGroup(**{**copied.__dict__,
                              "params": [torch.empty(r, 2 * n)[:, ::2].copy_(p) for p in copied.params],
                              "grads": [torch.empty(r, 2 * n)[:, ::2].copy_(g) for g in copied.grads]})
    assert direct.params[0].is_contiguous() and copied.grads[0].stride() == (2 * n, 2)
    hp = K.PhaseHyperParams(**{**HP.__dict__, "adaptive": True})
    native.phase_update([direct], hp)
    native.phase_update([copied], hp)
    for key, value in _outputs(copied).items():
        assert torch.equal(_outputs(direct)[key], value), key


# Ranks the column form is built for, against the float64 oracle over many steps: B is (k, r).
COLUMN_FORM_LAYERS = [(16, 23, 40, 8.0), (32, 37, 70, 4.0), (64, 70, 90, 2.0), (8, 11, 2101, 16.0)]


# Relative tolerance per variant: fp32 at r = 64 on this problem; the torch backend needs the same
# (measured: both pass at 2e-5 and 2e-4, both fail at 1e-5 and 1e-4).
@pytest.mark.parametrize("variant,schedule,tol", [("AltLoRA", "alternate", 2e-5), ("AltLoRAPlus", "sequential", 2e-4)])
def test_column_form_ranks_match_oracle(extension, variant, schedule, tol):
    run_against_oracle(variant, schedule, "BA", 1, steps=12, layers=COLUMN_FORM_LAYERS, backend="native", tol=tol)


def test_found_inf_leaves_every_output_bitwise_unchanged(extension):
    groups = [_factor_group(adaptive=True, snapshot=True), _factor_group(transposed=False, dtype=torch.bfloat16,
                                                                      adaptive=True, seed=1)]
    before = [_outputs(g) for g in groups]
    native.phase_update(groups, K.PhaseHyperParams(**{**HP.__dict__, "adaptive": True}), torch.tensor(1.0))
    for g, old in zip(groups, before):
        for key, value in _outputs(g).items():
            assert torch.equal(value, old[key]), key
    native.phase_update(groups, K.PhaseHyperParams(**{**HP.__dict__, "adaptive": True}), torch.tensor(0.0))
    assert not torch.equal(_outputs(groups[0])["params"], before[0]["params"])


def test_writes_bump_version_counters(extension):
    # Like torch's in-place ops, so autograd notices a parameter changed under a saved graph.
    g = _factor_group()
    versions = [p._version for p in g.params] + [g.momentum._version, g.gram._version]
    native.phase_update([g], HP)
    after = [p._version for p in g.params] + [g.momentum._version, g.gram._version]
    assert all(b > a for a, b in zip(versions, after))


def test_bad_input_raises_value_error_naming_it(extension):
    g = _factor_group()
    g.momentum = g.momentum.double()
    with pytest.raises(ValueError, match=r"groups\[0\]\.momentum must be Float"):
        native.phase_update([g], HP)
    g = _factor_group()
    g.params = [p.to(torch.float64) for p in g.params]
    with pytest.raises(ValueError, match=r"groups\[0\]\.params have dtype Double"):
        native.phase_update([g], HP)
    with pytest.raises(ValueError, match="variance is required"):
        native.phase_update([_factor_group()], K.PhaseHyperParams(**{**HP.__dict__, "adaptive": True}))


# ------------------------------------------------------------------ built or not: auto, explicit, no compiler


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache without the library and a process that has not loaded it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_LIBRARY", native._Library())
    return tmp_path


def _train_a_few_steps(backend):
    prob = Problem()
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05, damping=1e-3, backend=backend)
    before = sum(prob.loss(i, p.A, p.B, p.scaling) for i, p in enumerate(pairs))
    for t in range(6):
        prob.set_grads(t, pairs)
        opt.step()
    after = sum(prob.loss(i, p.A, p.B, p.scaling) for i, p in enumerate(pairs))
    return opt, before, after


def test_without_a_compiler_auto_trains_with_torch_and_native_says_why(empty_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = K.unavailable_reason("native", CPU)
    assert reason is not None and "no C++ compiler" in reason
    assert K.resolve_backend("auto", CPU) == "torch"
    opt, before, after = _train_a_few_steps("auto")
    assert opt._backend == "torch" and after < before
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        altlora.AltLoRA(Problem().pairs(), lr=0.05, backend="native")
    assert not any(empty_cache.iterdir())  # nothing was attempted


def test_a_failing_build_is_reported_once_and_changes_nothing(empty_cache, monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise native.NativeUnavailable("simulated: the C++ compiler crashed")

    monkeypatch.setattr(native, "_toolchain_problem", lambda: None)  # a compiler "is there"
    monkeypatch.setattr(native, "_build", failing_build)
    group = _factor_group()
    before = _outputs(group)
    with pytest.raises(RuntimeError, match="simulated: the C\\+\\+ compiler crashed"):
        native.phase_update([group], HP)  # first use builds, and the build fails
    assert all(torch.equal(value, before[key]) for key, value in _outputs(group).items())
    assert "compiler crashed" in K.unavailable_reason("native", CPU)  # remembered, not retried
    with pytest.raises(RuntimeError, match="compiler crashed"):
        altlora.AltLoRA(Problem().pairs(), lr=0.05, backend="native")
    assert K.resolve_backend("auto", CPU) == "torch"
    _, before_loss, after_loss = _train_a_few_steps("auto")
    assert after_loss < before_loss
    assert len(calls) == 1


def test_auto_never_builds_and_explicit_native_builds_on_first_request(extension, empty_cache, monkeypatch):
    calls = []

    def fake_build():  # stands for a compile: returns the library the fixture built
        calls.append(1)
        return extension

    monkeypatch.setattr(native, "_toolchain_problem", lambda: None)
    monkeypatch.setattr(native, "_build", fake_build)
    assert "not built yet" in native.unavailable_reason(CPU)
    assert K.resolve_backend("auto", CPU) == "torch"  # not built: auto takes torch, and builds nothing
    opt, before, after = _train_a_few_steps("auto")
    assert opt._backend == "torch" and after < before and not calls
    chosen = K.resolve_backend("native", CPU)
    assert chosen == "native" and len(calls) == 1
    assert native.unavailable_reason(CPU) is None and K.resolve_backend("auto", CPU) == "native"
    assert len(calls) == 1


def test_native_refuses_other_devices():
    reason = native.unavailable_reason(torch.device("cuda", 0))
    assert "CPU only" in reason and "cuda:0" in reason


def test_package_imports_and_trains_without_a_compiler(tmp_path):
    # A fresh interpreter, no compiler, an empty cache: import, auto → torch, training works.
    script = textwrap.dedent("""
        import torch, altlora, altlora_kernels as K
        pairs = [altlora.LoRAPair(torch.nn.Parameter(torch.randn(2, 5)), torch.nn.Parameter(torch.zeros(3, 2)), 1.0)]
        opt = altlora.AltLoRA(pairs, lr=0.1)
        for _ in range(2):
            pairs[0].A.grad, pairs[0].B.grad = torch.randn(2, 5), torch.randn(3, 2)
            opt.step()
        assert torch.isfinite(pairs[0].B).all() and pairs[0].B.abs().sum() > 0
        try:
            K.resolve_backend("native", torch.device("cpu"))
        except RuntimeError as err:
            print("native:", err)
        print("backend:", opt._backend)
    """)
    env = dict(os.environ, CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backend: torch" in out.stdout
    assert "native: backend='native' is unavailable: no C++ compiler found" in out.stdout


# ------------------------------------------------------------------ the read-only non-finite check


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_flag_finds_one_bad_element_anywhere(extension, dtype, bad):
    # Sizes around the SIMD width and the 32768-element piece the work is split into.
    tensors = [torch.randn(n, dtype=torch.float64).to(dtype) for n in (1, 7, 64, 32767, 32768, 70001)]
    assert native.nonfinite_flag(tensors).item() == 0.0
    for i, t in enumerate(tensors):
        for position in sorted({0, t.numel() // 2, t.numel() - 1}):
            t[position] = bad
            flag = native.nonfinite_flag(tensors)
            assert flag.dtype == torch.float32 and flag.dim() == 0 and flag.item() == 1.0, (i, position)
            t[position] = 0.5


def test_nonfinite_flag_reads_only_and_declines_what_it_cannot_read(extension):
    grads = [torch.randn(8, 33), torch.randn(40, 8)]
    versions = [g._version for g in grads]
    before = [g.clone() for g in grads]
    native.nonfinite_flag(grads)
    assert [g._version for g in grads] == versions and all(torch.equal(a, b) for a, b in zip(grads, before))
    assert native.nonfinite_flag([torch.randn(8, 10)[:, ::2]]) is None  # not contiguous
    assert native.nonfinite_flag([torch.ones(3, dtype=torch.int64)]) is None
    # K.nonfinite_flag falls back to torch's check for those, with the same answer.
    strided = torch.randn(8, 10)[:, ::2]
    strided[0, 0] = float("inf")
    assert K.nonfinite_flag([grads[0], strided]).item() == 1.0


def test_nonfinite_flag_is_the_one_the_optimizer_uses_on_cpu(extension, monkeypatch):
    calls = []
    real = native.nonfinite_flag
    monkeypatch.setattr(native, "nonfinite_flag", lambda ts: calls.append(len(ts)) or real(ts))
    A = torch.nn.Parameter(torch.randn(4, 9))
    B = torch.nn.Parameter(torch.randn(7, 4))
    opt = altlora.AltLoRA([altlora.LoRAPair(A, B, 2.0)], lr=0.1, nonfinite="skip")
    A.grad, B.grad = torch.randn(4, 9), torch.randn(7, 4)
    B.grad[1, 1] = float("nan")
    before = (A.detach().clone(), B.detach().clone())
    opt.step()
    assert calls == [2] and opt.skipped_steps == 1
    assert torch.equal(A, before[0]) and torch.equal(B, before[1])
