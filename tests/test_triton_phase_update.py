"""The triton backend: larger ranks, launches, work tables and the factor kernel, in Triton's CPU
interpreter, and against the float64 oracle on CUDA when present.

The oracle matrix and the edge cases every backend shares run in test_oracle.py (the ``backend``
fixture of conftest.py includes triton in the interpreter). CPU tests here set
``TRITON_INTERPRET=1`` for themselves only (a fixture), so the rest of the suite still sees the
interpreter off. Shapes are tiny and odd: the interpreter runs every program in Python.
"""

import inspect
import shutil
import sys

import pytest
import torch

import altlora
import altlora_kernels.triton_phase_tables as tables
from problems import CASES, SMALL_LAYERS, Problem, compare_with_oracle, make, params_and_state, run_against_oracle

triton = pytest.importorskip("triton", reason="the triton backend needs the 'triton' package")

from altlora_kernels import FactorGroup, PhaseHyperParams, damped_cholesky  # noqa: E402
from altlora_kernels import triton_cholesky, triton_phase_update  # noqa: E402
from altlora_kernels.triton_phase_tables import NUM_FIELDS, Field  # noqa: E402
from altlora_kernels.triton_runtime import LazyKernel  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

STEPS = 30
RANK_LAYERS = [(8, 13, 17, 16.0), (16, 21, 19, 8.0), (33, 37, 41, 40.0)]  # padded to 16, 16, 64


@pytest.fixture(autouse=True)
def _kernels_not_the_self_checks_fallback(monkeypatch):
    # On a GPU a failed first-use self-check would hand every phase to the torch backend, and the
    # comparisons below would compare torch with itself: they test the kernels, with the check off
    # (its own tests switch it back on).
    monkeypatch.setenv(triton_phase_update.SELF_CHECK_ENV, "0")


# ----------------------------------------------------------------------------- availability
def test_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_phase_update.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "CUDA" in reason
    assert triton_phase_update.unavailable_reason(None) is not None
    pair = Problem(SMALL_LAYERS).pairs()
    with pytest.raises(RuntimeError, match="backend='torch'"):
        altlora.AltLoRA(pair, lr=0.1, backend="triton")


def test_available_on_cpu_with_interpreter(interpreter):
    assert triton_phase_update.unavailable_reason(torch.device("cpu")) is None


# ----------------------------------------------------------------------------- larger ranks against the oracle
@pytest.mark.parametrize("variant,order,layers", [
    ("AltLoRA", "AB", [(8, 13, 17, 16.0), (16, 21, 19, 8.0)]),  # both padded to 16: one bucket
    ("AltLoRAPlus", "BA", [(33, 37, 41, 40.0)]),  # padded to 64
])
def test_larger_ranks_match_float64_oracle(interpreter, variant, order, layers):
    run_against_oracle(variant, "alternate", order, 1, steps=STEPS, layers=layers, backend="triton")


# ----------------------------------------------------------------------------- launches
def _count_launches(monkeypatch):
    counts = []
    for lazy in LazyKernel.instances:
        kernel = lazy.get()
        original = kernel.run

        def run(*args, _original=original, **kwargs):
            counts.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return counts


def _launches_per_step(monkeypatch, layers, schedule):
    prob = Problem(layers, seed=0)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05, damping=1e-3, schedule=schedule, backend="triton")
    counts = _count_launches(monkeypatch)
    per_step = []
    for t in range(2):
        prob.set_grads(t, pairs)
        before = len(counts)
        opt.step()
        per_step.append(len(counts) - before)
    return per_step


@pytest.mark.parametrize("schedule", ["alternate", "sequential"])
def test_launches_per_step_do_not_depend_on_the_layer_count(interpreter, monkeypatch, schedule):
    phases = 1 if schedule == "alternate" else 2
    few = _launches_per_step(monkeypatch, [(1, 3, 5, 2.0)] * 2, schedule)
    # 40 layers of 40 different shapes (two param-shape groups each): still one bucket per phase.
    many = _launches_per_step(monkeypatch, [(1 + i % 2, 3 + i, 5 + i % 3, 2.0) for i in range(40)], schedule)
    assert few == many == [3 * phases, 3 * phases]


def test_identical_runs_give_identical_bits(interpreter):
    results = []
    for _ in range(2):
        tables.clear_cache()
        _, pairs, opt, _ = run_against_oracle("AltLoRAPlus", "sequential", "BA", 1, steps=3, layers=SMALL_LAYERS, backend="triton")
        results.append(params_and_state(pairs, opt))
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ----------------------------------------------------------------------------- work table
@pytest.mark.parametrize("columns_per_rank", [1, 4])
def test_several_chunks_and_tiles_per_layer(interpreter, monkeypatch, columns_per_rank):
    # Chunks of one 32-column tile or of two: a layer spans several chunks (whose Gram partials
    # the reduce kernel sums) and a chunk several tiles (summed in the update kernel).
    monkeypatch.setattr(tables, "MIN_CHUNK_COLUMNS_PER_RANK", columns_per_rank)
    assert tables.tile_shape(16) == (32, 32 if columns_per_rank == 1 else 64)
    run_against_oracle("AltLoRAPlus", "alternate", "AB", 3, steps=5, layers=[(3, 71, 45, 6.0), (5, 97, 33, 10.0)], backend="triton")


def test_pointers_from_memory_reach_separate_and_strided_tensors(interpreter):
    # Every factor is reached through an int64 data_ptr() read from the work table (the Triton
    # docs call pointer-from-memory unsupported in the interpreter; it works, and this keeps it
    # tested), including a factor that is a strided view into a larger buffer.
    prob = Problem(SMALL_LAYERS, seed=7)
    results = {}
    for backend in ("torch", "triton"):
        pairs = prob.pairs()
        big = torch.zeros(5, 12)
        big[:, :3] = pairs[0].B.detach()
        pairs[0] = altlora.LoRAPair(torch.nn.Parameter(pairs[0].A.detach().clone()), torch.nn.Parameter(big[:, :3]), pairs[0].scaling, "strided")
        assert pairs[0].B.stride() == (12, 1)
        opt = altlora.AltLoRA(pairs, lr=0.05, damping=1e-3, schedule="sequential", backend=backend)
        for t in range(3):
            prob.set_grads(t, pairs)
            opt.step()
        results[backend] = params_and_state(pairs, opt)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tables_are_rebuilt_only_when_storage_changes(interpreter):
    prob = Problem(SMALL_LAYERS, seed=3)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05, damping=1e-3, backend="triton")
    for t in range(4):
        prob.set_grads(t, pairs)  # fresh gradient tensors every step, as zero_grad(set_to_none=True)
        opt.step()
    assert len(tables._CACHE) == 2  # one table per phase (A, B), reused
    with torch.no_grad():
        pairs[0].B.data = pairs[0].B.detach().clone()  # new storage, same values
    prob.set_grads(4, pairs)
    opt.step()  # a B phase: its table points at the new storage
    assert len(tables._CACHE) == 3
    assert float(opt.state[pairs[0].A]["step"]) == 2 and float(opt.state[pairs[0].B]["step"]) == 3


# ----------------------------------------------------------------------------- bounded table cache
def _run_with_storage_moves(monkeypatch, steps=6, move=True):
    """AltLoRA+ (sequential: an A and a B phase per step) where every factor gets new storage before
    each step, as FSDP2's gathers or ``p.data = ...`` give; returns the final values and state, the
    number of table builds and the cache's (entries, bytes) after each step."""
    builds = []
    original = tables._build

    def counted(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tables, "_build", counted)
    tables.clear_cache()
    prob = Problem(SMALL_LAYERS, seed=5)
    pairs = prob.pairs()
    opt = altlora.AltLoRAPlus(pairs, lr=0.05, damping=1e-3, schedule="sequential", backend="triton")
    sizes = []
    for t in range(steps):
        if move:
            with torch.no_grad():
                for p in pairs:
                    p.A.data, p.B.data = p.A.detach().clone(), p.B.detach().clone()
        prob.set_grads(t, pairs)
        opt.step()
        sizes.append((len(tables._CACHE), tables.cache_bytes()))
    return params_and_state(pairs, opt), len(builds), sizes


def test_table_cache_is_bounded_and_an_evicted_entry_is_rebuilt_alike(interpreter, monkeypatch):
    """Storage that moves every step would add cache entries forever; the cache keeps at most
    CACHE_SIZE entries and CACHE_MAX_BYTES, and a phase whose table was evicted rebuilds it from
    the same tensors: the same bits as a run that never evicted."""
    unbounded, builds, sizes = _run_with_storage_moves(monkeypatch)
    assert builds == 12 and [n for n, _ in sizes] == [2, 4, 6, 8, 10, 12]  # one new entry per phase
    entry_bytes = sizes[0][1] // 2

    monkeypatch.setattr(tables, "CACHE_SIZE", 3)
    bounded, builds, sizes = _run_with_storage_moves(monkeypatch)
    assert builds == 12 and max(n for n, _ in sizes) == 3

    monkeypatch.setattr(tables, "CACHE_SIZE", 16)
    monkeypatch.setattr(tables, "CACHE_MAX_BYTES", entry_bytes)  # room for one entry's tables
    by_bytes, builds, sizes = _run_with_storage_moves(monkeypatch)
    assert builds == 12 and all(n == 1 and size <= entry_bytes for n, size in sizes)
    for got in (bounded, by_bytes):
        assert all(torch.equal(a, b) for a, b in zip(got, unbounded))

    # Fixed storage, a cache of one entry: the A and B phases evict each other's tables, so every
    # phase rebuilds, with the same results as the run that keeps both.
    monkeypatch.setattr(tables, "CACHE_MAX_BYTES", 16 * 2**20)
    kept, builds, _ = _run_with_storage_moves(monkeypatch, move=False)
    assert builds == 2
    monkeypatch.setattr(tables, "CACHE_SIZE", 1)
    evicting, builds, _ = _run_with_storage_moves(monkeypatch, move=False)
    assert builds == 12
    assert all(torch.equal(a, b) for a, b in zip(evicting, kept))


def test_workspaces_are_not_cached():
    # The R×R float32 workspaces (tens of MB at r = 128 over many layers) belong to one phase: the
    # cached buckets hold only the int64 tables.
    assert not {"precond", "carry", "partials"} & set(tables.Bucket.__dataclass_fields__)


# ----------------------------------------------------------------------------- CUDA graphs
@pytest.fixture
def capturing(monkeypatch):
    """Pretend a CUDA graph is being captured on the current stream (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_step_under_cuda_graph_capture_raises_before_changing_anything(capturing):
    prob = Problem(SMALL_LAYERS, seed=2)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05, damping=1e-3, backend="torch")
    prob.set_grads(0, pairs)
    before = [p.detach().clone() for pair in pairs for p in (pair.A, pair.B)]
    with pytest.raises(RuntimeError, match=r"AltLoRA\.step\(\) cannot run while a CUDA graph is being captured: "
                                           r"it reads the non-finite flag on the host.*call step\(\) outside the graph"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, (p for pair in pairs for p in (pair.A, pair.B))))
    assert opt.active_factor == "B" and not opt.state[pairs[0].B]


def test_triton_phase_update_under_capture_raises(capturing):
    group = _tiny_group()
    with pytest.raises(RuntimeError, match="backend='triton'.*CUDA graph is being captured.*work tables"):
        triton_phase_update.phase_update([group], PhaseHyperParams(lr=0.1, beta1=0.9, weight_decay=0.0, damping=1e-3))


def test_no_capture_no_error(monkeypatch):
    # Off capture the check is silent, also where CUDA is initialized.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    prob = Problem(SMALL_LAYERS, seed=2)
    pairs = prob.pairs()
    opt = altlora.AltLoRA(pairs, lr=0.05, damping=1e-3, backend="torch")
    prob.set_grads(0, pairs)
    opt.step()
    assert opt.active_factor == "A"


# ----------------------------------------------------------------------------- first-use self-check
def _tiny_group(seed=0):
    g = torch.Generator().manual_seed(seed)
    r, d = 3, 11
    eye = torch.eye(r).expand(1, r, r).clone()
    return FactorGroup(params=[torch.randn(r, d, generator=g)], grads=[torch.randn(r, d, generator=g)], transposed=False,
                       momentum=torch.zeros(1, r, d), variance=None, step=torch.zeros(1), gram=eye.clone(),
                       cross=eye.clone(), other_gram=eye.clone(), other_cross=eye.clone(), inv_scale_sq=torch.ones(1))


@pytest.fixture
def self_check_on_cpu(interpreter, monkeypatch):
    """The first-use self-check, which guards CUDA devices, switched on for the CPU interpreter."""
    monkeypatch.setattr(triton_phase_update, "SELF_CHECK_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(triton_phase_update, "_VERDICTS", {})
    monkeypatch.delenv(triton_phase_update.SELF_CHECK_ENV, raising=False)


@pytest.mark.parametrize("kind", [
    dict(),
    dict(rank=3, transposed=True, dtype=torch.bfloat16, grad_dtype=torch.float32, snapshot=True, with_flag=True),
    dict(rank=20, dtype=torch.float16, adaptive=False),  # padded to 32
], ids=["fp32-A-AltLoRA+", "bf16-B-snapshot-flag", "fp16-r20-AltLoRA"])
def test_self_check_passes_where_the_kernels_are_right(self_check_on_cpu, kind):
    assert triton_phase_update.self_check(torch.device("cpu"), **kind) is None


def _steps_counting_launches(monkeypatch, backend, steps=4):
    prob = Problem(SMALL_LAYERS, seed=4)
    pairs = prob.pairs()
    opt = altlora.AltLoRAPlus(pairs, lr=0.05, damping=1e-3, schedule="sequential", backend=backend, nonfinite="skip")
    counts = _count_launches(monkeypatch)
    for t in range(steps):
        prob.set_grads(t, pairs)
        opt.step()
    return params_and_state(pairs, opt), len(counts)


@pytest.mark.parametrize("failure", ["mismatch", "launch error"])
def test_self_check_failure_warns_once_and_runs_torch_from_then_on(self_check_on_cpu, monkeypatch, failure):
    if failure == "mismatch":
        def reference(groups, hp, found_inf):  # a reference that disagrees: as if the kernels were wrong
            triton_phase_update.phase_update_torch(groups, hp, found_inf)
            groups[0].momentum.mul_(1.01)

        monkeypatch.setattr(triton_phase_update, "_reference_phase", reference)
    else:
        def refuse(*args, **kwargs):
            raise RuntimeError("PTX .version 9.9 does not support .target sm_200")

        monkeypatch.setattr(triton_phase_update, "phase_launches", refuse)
    want, _ = _steps_counting_launches(monkeypatch, "torch")
    with pytest.warns(RuntimeWarning) as caught:
        got, launches = _steps_counting_launches(monkeypatch, "triton")
    messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(messages) == 1, messages  # once, not per phase
    assert "torch backend runs every phase on this device" in messages[0]
    assert ("momentum" in messages[0]) if failure == "mismatch" else ("sm_200" in messages[0])
    # The check's own phase launched (3 kernels) or raised; no phase of the run used the kernels,
    # and the run is the torch backend's, bit for bit.
    assert launches == (3 if failure == "mismatch" else 0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    (verdict,) = triton_phase_update.self_check_results().values()
    assert verdict is not None


def test_self_check_runs_once_per_device_and_can_be_turned_off(self_check_on_cpu, monkeypatch):
    calls = []
    original = triton_phase_update.self_check

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_phase_update, "self_check", recorded)
    _, launches = _steps_counting_launches(monkeypatch, "triton")
    # Once, shaped like the first group of the first phase (B of rank 3: transposed; AltLoRA+, flag).
    assert len(calls) == 1 and calls[0]["transposed"] and calls[0]["adaptive"] and calls[0]["with_flag"]
    assert launches == 3 + 4 * 2 * 3  # the check's phase, then 4 steps × 2 phases × 3 launches
    assert list(triton_phase_update.self_check_results().values()) == [None]

    monkeypatch.setattr(triton_phase_update, "_VERDICTS", {})
    monkeypatch.setenv(triton_phase_update.SELF_CHECK_ENV, "0")
    calls.clear()
    _, launches = _steps_counting_launches(monkeypatch, "triton")
    assert calls == [] and launches == 4 * 2 * 3 and triton_phase_update.self_check_results() == {}


def test_ranks_above_the_kernels_go_to_the_torch_backend(interpreter):
    layers = [(3, 7, 5, 6.0), (130, 131, 133, 16.0)]
    runs = {}
    for backend in ("torch", "triton"):
        _, pairs, opt, _ = run_against_oracle("AltLoRA", "alternate", "BA", 1, steps=2, layers=layers, backend=backend)
        runs[backend] = params_and_state(pairs, opt)
    for got, want in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- damped Cholesky
def _factor_table(grams: torch.Tensor, crosses: torch.Tensor) -> torch.Tensor:
    table = torch.zeros(grams.shape[0], NUM_FIELDS, dtype=torch.int64)
    r = grams.shape[-1]
    step = r * r * 4
    table[:, Field.RANK] = r
    table[:, Field.OTHER_GRAM] = grams.data_ptr() + step * torch.arange(grams.shape[0])
    table[:, Field.OTHER_CROSS] = crosses.data_ptr() + step * torch.arange(grams.shape[0])
    return table


def test_factor_kernel_escalates_damping_like_cholesky_py(interpreter):
    good = torch.diag(torch.tensor([2.0, 1.0, 3.0]))
    zero = torch.zeros(3, 3)
    nearly_singular = torch.diag(torch.tensor([1.0, 1.0, 1e-9]))
    u = torch.tensor([[1.0], [2.0], [-1.0]])
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    grams = torch.stack([good, zero, nearly_singular, u @ u.T, x @ x.T]).contiguous()
    crosses = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(1))
    for damping in (0.0, 1e-3):
        precond = torch.empty(5, 16, 16)
        carry = torch.empty(5, 16, 16)
        triton_cholesky.factor_launch(_factor_table(grams, crosses), 16, damping, precond, carry)()
        chol = damped_cholesky(grams.double(), damping)
        want = torch.cholesky_inverse(chol)
        got = precond[:, :3, :3].double()
        for i in range(5):
            # fp32 rounding of G is amplified by the condition number of the shifted Gram; another
            # rung would change P by orders of magnitude.
            rtol = max(2e-5, 1e-6 * float(torch.linalg.cond(chol[i] @ chol[i].mT)))
            torch.testing.assert_close(got[i], want[i], rtol=rtol, atol=0, msg=lambda m: f"matrix {i}, damping {damping}: {m}")
            torch.testing.assert_close(carry[i, :3, :3].double(), want[i] @ crosses[i].double(), rtol=rtol,
                                       atol=rtol * float(want[i].abs().max()))
        assert torch.isfinite(precond).all() and torch.isfinite(carry).all()


# ----------------------------------------------------------------------------- CUDA
def _cuda_pairs(prob):
    return [altlora.LoRAPair(torch.nn.Parameter(p.A.detach().cuda()), torch.nn.Parameter(p.B.detach().cuda()), p.scaling, p.name)
            for p in prob.pairs()]


def _set_cuda_grads(prob, t, pairs):
    for i, p in enumerate(pairs):
        gA, gB = prob.grads(t, i, p.A.detach().cpu(), p.B.detach().cpu(), p.scaling)
        p.A.grad, p.B.grad = gA.to(p.A.dtype).cuda(), gB.to(p.B.dtype).cuda()


@needs_cuda
@pytest.mark.parametrize("variant,schedule,order,switch_every", CASES)
def test_cuda_matches_float64_oracle(variant, schedule, order, switch_every):
    prob = Problem(SMALL_LAYERS + RANK_LAYERS, seed=0)
    pairs = _cuda_pairs(prob)
    opt, orc = make(variant, pairs, prob, schedule=schedule, order=order, switch_every=switch_every, backend="triton")
    for t in range(STEPS):
        _set_cuda_grads(prob, t, pairs)
        grads = prob.oracle_grads(t, orc)
        opt.step()
        orc.step(grads)
        compare_with_oracle(opt, pairs, orc, 1e-4, where=f"step {t}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [4, 8, 16, 64, 128])
def test_cuda_every_kernel_compiles_and_matches_torch(r, dtype):
    # The interpreter accepts tl.dot shapes a GPU compiler rejects: build and run every kernel here.
    layers = [(r, 257, 129, 2.0 * r), (r, 257, 129, float(r))]
    prob = Problem(layers, seed=r, dtype=dtype)
    runs = {}
    for backend in ("torch", "triton"):
        pairs = _cuda_pairs(prob)
        opt = altlora.AltLoRAPlus(pairs, lr=1e-2, damping=1e-3, weight_decay=0.01, schedule="sequential", backend=backend,
                                  nonfinite="skip")
        for t in range(3):
            _set_cuda_grads(prob, t, pairs)
            opt.step()
        runs[backend] = params_and_state(pairs, opt)
    tol = dict(rtol=1e-3, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for got, want in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(got.float(), want.float(), **tol)


# ----------------------------------------------------------------------------- GPU builds without a GPU
# Shared memory per block (opt-in maximum) of the targets: A100, A6000, H100/H200.
TARGETS = {"sm_80": (80, 166912), "sm_86": (86, 101376), "sm_90": (90, 232448)}
_PTR_TYPES = {torch.float32: "*fp32", torch.int64: "*i64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _signature(launch):
    names = list(inspect.signature(launch.kernel.fn).parameters)
    sig = {}
    for name, arg in zip(names, launch.args):
        sig[name] = _PTR_TYPES[arg.dtype] if isinstance(arg, torch.Tensor) else "fp32"
    sig.update({name: "constexpr" for name in launch.constexprs})
    return sig


def _ptxas_available():
    from pathlib import Path

    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    return nvidia.is_dir() and (any((nvidia / "bin").glob("ptxas*")) or shutil.which("ptxas"))


def _phase_build_configs(full):
    """(r, param dtype, AltLoRA+, factor) of the phases whose launches are built ahead of time.

    CI: every padded rank (16, 32, 64, 128) with every constexpr switch on (bf16 B phase of
    AltLoRA+ with a snapshot and the non-finite flag), and the plain fp32 A phase once.
    ALTLORA_FULL_COMPILE_MATRIX=1: every padded rank × parameter dtype × variant × factor."""
    if full:
        return [(r, dtype, adaptive, factor) for r in (8, 32, 64, 128)
                for dtype in (torch.float32, torch.bfloat16, torch.float16)
                for adaptive in (False, True) for factor in ("A", "B")]
    return [(r, torch.bfloat16, True, "B") for r in (4, 8, 16, 32, 64, 128)] + [(4, torch.float32, False, "A")]


@pytest.mark.skipif(CUDA, reason="on a GPU test_cuda_every_kernel_compiles_and_matches_torch builds them for real")
@pytest.mark.skipif(not _ptxas_available(), reason="this Triton has no NVIDIA backend/ptxas to build for a GPU target")
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_kernel_builds_for(target, monkeypatch):
    """The interpreter accepts tl.dot shapes that a GPU compiler rejects: build the kernels of the
    launches a phase makes, at every padded rank, down to a cubin for ``target``, within its shared
    memory per block and within the register-spill bounds of triton_aot.SPILL_BOUNDS; the shared
    memory, registers and spills of every build are printed (``pytest -s``)."""
    import os

    from triton_aot import compile_with_report, print_report, spill_bound

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tables.clear_cache()
    full = os.environ.get("ALTLORA_FULL_COMPILE_MATRIX", "0") == "1"
    arch, limit = TARGETS[target]
    seen, report, failures = set(), [], []
    for r, dtype, adaptive, factor in _phase_build_configs(full):
        L, d, k = 2, 37, 29
        shape = (k, r) if factor == "B" else (r, d)
        params = [torch.zeros(shape, dtype=dtype) for _ in range(L)]
        eye = torch.eye(r).expand(L, r, r).contiguous()
        group = FactorGroup(params=params, grads=[torch.zeros_like(p) for p in params], transposed=factor == "B",
                            momentum=torch.zeros(L, *shape), variance=torch.zeros(L, *shape) if adaptive else None,
                            step=torch.zeros(L), gram=eye.clone(), cross=eye.clone(), other_gram=eye.clone(),
                            other_cross=eye.clone(), inv_scale_sq=torch.ones(L),
                            snapshot=torch.zeros(L, *shape, dtype=dtype) if adaptive else None)
        hp = PhaseHyperParams(lr=0.1, beta1=0.9, weight_decay=0.0, damping=1e-3, adaptive=adaptive)
        for launch in triton_phase_update.phase_launches([group], hp, torch.zeros(()) if adaptive else None):
            key = (launch.kernel.__name__, tuple(sorted((n, str(v)) for n, v in launch.constexprs.items())), launch.num_warps)
            if key in seen:
                continue
            seen.add(key)
            compiled, built = compile_with_report(launch.kernel.get(), _signature(launch), dict(launch.constexprs), arch,
                                                  {"num_warps": launch.num_warps})
            assert compiled.asm["cubin"], key
            name, padded = launch.kernel.__name__, launch.constexprs["R"]
            what = f"{name} R={padded} {dict(launch.constexprs)} on {target}"
            if built["shared"] > limit:
                failures.append(f"{what}: {built['shared']} bytes of shared memory > {limit}")
            if built["spills"] > spill_bound(name, padded):
                failures.append(f"{what}: {built['spills']} bytes of register spills > {spill_bound(name, padded)}")
            report.append(dict(kernel=name, R=padded, BLOCK_N=launch.constexprs.get("BLOCK_N", ""),
                               warps=launch.num_warps, dtype=str(launch.constexprs.get("PARAM_DTYPE", "")),
                               variant="+".join(n.lower() for n in ("TRANSPOSED", "ADAPTIVE", "HAS_SNAPSHOT", "HAS_FOUND_INF")
                                                if launch.constexprs.get(n)),
                               **built))
    tables.clear_cache()
    print_report(f"phase-update builds for {target}", report, list(report[0]))
    assert {row["kernel"] for row in report} == {"_factor_kernel", "_update_kernel", "_reduce_kernel"}
    assert {row["R"] for row in report} == {16, 32, 64, 128}
    assert not failures, "\n".join(failures)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
