"""What a GPU would show and the interpreter does not: launches on the tensors' device, temporaries
kept alive for the kernels that read them through a table, int64 addressing, NaN-preserving bf16
write-back, launch configurations that fit each GPU's shared memory.

Everything here runs on the CPU (structurally, in Triton's interpreter, or as ahead-of-time builds
for sm_80/sm_86/sm_90); nothing replaces running the kernels on a real device.
"""

import contextlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs the 'triton' package")

from altlora_kernels import triton_lora_linear, triton_runtime  # noqa: E402
from altlora_kernels.triton_runtime import LazyKernel, device_guard  # noqa: E402


# ----------------------------------------------------------------------------- hazard 1: device guard
class _RecordedDevice:
    """Stands in for torch.cuda.device: records the device it is asked for and when it is current."""

    current = []
    asked = []

    def __init__(self, device):
        self.device = torch.device(device)
        _RecordedDevice.asked.append(self.device)

    def __enter__(self):
        _RecordedDevice.current.append(self.device)

    def __exit__(self, *exc):
        _RecordedDevice.current.pop()


@pytest.fixture
def recorded_cuda_device(monkeypatch):
    _RecordedDevice.current, _RecordedDevice.asked = [], []
    monkeypatch.setattr(torch.cuda, "device", _RecordedDevice)
    return _RecordedDevice


def test_device_guard_makes_the_tensors_cuda_device_current(recorded_cuda_device):
    with device_guard(torch.device("cuda", 1)):
        assert recorded_cuda_device.current == [torch.device("cuda", 1)]
    assert recorded_cuda_device.current == []
    for off_cuda in (torch.device("cpu"), None):
        with device_guard(off_cuda):
            pass
    assert recorded_cuda_device.asked == [torch.device("cuda", 1)]


def test_launch_runs_its_kernel_under_the_guard_of_its_device(recorded_cuda_device):
    seen = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(list(recorded_cuda_device.current))

    triton_runtime.Launch(FakeKernel(), (1,), (), {}, device=torch.device("cuda", 3))()
    triton_runtime.Launch(FakeKernel(), (1,), (), {})()
    assert seen == [[torch.device("cuda", 3)], []]


def test_every_fused_linear_launch_is_guarded_on_its_tensors_device(monkeypatch):
    """Each launcher of triton_lora_linear launches inside device_guard(x.device) (CPU here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    active, launched = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    original = LazyKernel.__getitem__

    def recording_getitem(self, grid):
        launched.append((self.__name__, list(active)))
        return original(self, grid)

    monkeypatch.setattr(triton_runtime, "device_guard", recording_guard)
    monkeypatch.setattr(LazyKernel, "__getitem__", recording_getitem)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 7, generator=g), torch.randn(7, 5, generator=g)
    h, l = torch.randn(9, 3, generator=g), torch.randn(3, 5, generator=g)
    triton_lora_linear.project(x, l.T.contiguous(), 1.0)
    triton_lora_linear.matmul_plus_low_rank(x, w, h, l, 0.5)
    triton_lora_linear.low_rank_grad(h, x, 1.0, splits=2)
    names = [name for name, _ in launched]
    assert names == ["_project_kernel", "_matmul_plus_low_rank_kernel", "_low_rank_grad_kernel"]
    for name, guards in launched:
        assert guards == [x.device], f"{name} launched outside device_guard({x.device}): {guards}"


# ----------------------------------------------------------------------------- hazard 3: bf16 write-back of NaN/Inf
def _one_layer_group(param, grad):
    from altlora_kernels import FactorGroup

    r, d = param.shape
    eye = torch.eye(r).expand(1, r, r).clone()
    return FactorGroup(params=[param], grads=[grad], transposed=False, momentum=torch.zeros(1, r, d),
                       variance=torch.zeros(1, r, d), step=torch.zeros(1), gram=eye.clone(), cross=eye.clone(),
                       other_gram=eye.clone(), other_cross=eye.clone(), inv_scale_sq=torch.ones(1))


@pytest.mark.parametrize("nan_bits", [0x7FFFFFFF, -1, 0x7FC00000], ids=["0x7FFFFFFF", "0xFFFFFFFF", "0x7FC00000"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["AltLoRA", "AltLoRAPlus"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["wd0", "wd"])
def test_bf16_write_back_keeps_nan_and_inf(interpreter, nan_bits, adaptive, weight_decay):
    """A NaN reaching the bf16 write-back stays NaN (the rounding carry once made 0x7FFFFFFF −0.0), ±Inf
    stays ±Inf, as torch's backend writes them. The NaN comes from an fp32 gradient column holding
    ``nan_bits`` (its payload survives the arithmetic, as on a GPU, whose own NaN is 0x7FFFFFFF);
    the backends are called directly, below the optimizer's non-finite policy."""
    from altlora_kernels import PhaseHyperParams, torch_phase_update, triton_phase_update

    g = torch.Generator().manual_seed(0)
    param = torch.randn(5, 11, generator=g).to(torch.bfloat16)
    param[1, 6], param[3, 0] = float("inf"), float("-inf")
    grad = torch.randn(5, 11, generator=g)
    grad.view(torch.int32)[:, 2] = nan_bits
    hp = PhaseHyperParams(lr=0.1, beta1=0.9, weight_decay=weight_decay, damping=1e-3, adaptive=adaptive)
    got = _one_layer_group(param.clone(), grad.clone())
    want = _one_layer_group(param.clone(), grad.clone())
    triton_phase_update.phase_update([got], hp)
    torch_phase_update.phase_update_torch([want], hp)
    got_p, want_p = got.params[0].float(), want.params[0].float()
    assert want_p[:, 2].isnan().all()  # the oracle's view of the NaN column
    assert torch.equal(got_p.isnan(), want_p.isnan()), f"NaN at {got_p.isnan().nonzero().tolist()}, " \
        f"want {want_p.isnan().nonzero().tolist()}; column 2 written as {got_p[:, 2].tolist()}"
    assert torch.equal(got_p.isposinf(), want_p.isposinf()) and torch.equal(got_p.isneginf(), want_p.isneginf())
    finite = want_p.isfinite()
    torch.testing.assert_close(got_p[finite], want_p[finite], rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- hazard 4: temporaries in the work table
def test_update_launch_keeps_the_gradients_its_table_points_at():
    """Cast or contiguous gradients are temporaries whose addresses go into the gradient table: the
    update launch must hold them (else they are freed, and their memory reusable, before it runs)."""
    from altlora_kernels import PhaseHyperParams, triton_phase_update

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 9, generator=g) for _ in range(3)]
    grads = [torch.randn(4, 9, generator=g).to(torch.bfloat16),  # the group's gradient dtype
             torch.randn(4, 9, generator=g),  # cast to bf16: a temporary
             torch.randn(9, 4, generator=g).to(torch.bfloat16).T]  # strided: a contiguous temporary
    group = _one_layer_group(params[0], grads[0])
    group.params, group.grads = params, grads
    for name in ("momentum", "variance"):
        setattr(group, name, torch.zeros(3, 4, 9))
    for name in ("gram", "cross", "other_gram", "other_cross"):
        setattr(group, name, torch.eye(4).expand(3, 4, 4).clone())
    group.step, group.inv_scale_sq = torch.zeros(3), torch.ones(3)
    hp = PhaseHyperParams(lr=0.1, beta1=0.9, weight_decay=0.0, damping=1e-3)
    launches = triton_phase_update.phase_launches([group], hp, None)
    updates = [launch for launch in launches if launch.kernel is triton_phase_update.update_kernel]
    assert len(updates) == 1
    (update,) = updates
    table_ptrs = update.args[1][:, 0].tolist()  # the gradient table: (data_ptr, lead) per layer
    held = {t.data_ptr(): t for t in update.keep_alive}
    assert table_ptrs[0] == grads[0].data_ptr()
    assert table_ptrs[1] != grads[1].data_ptr() and table_ptrs[2] != grads[2].data_ptr()  # temporaries
    for i, ptr in enumerate(table_ptrs):
        assert ptr in held, f"layer {i}: the table points at a gradient no launch holds"
        assert held[ptr].dtype == torch.bfloat16 and held[ptr].stride(1) == 1


# ----------------------------------------------------------------------------- ahead-of-time builds
_AOT_SCRIPT = __file__.rsplit("/", 1)[0] + "/triton_aot.py"


@pytest.fixture(scope="module")
def aot_cache(tmp_path_factory):
    """One Triton cache for this module's builds (the same build in two tests compiles once)."""
    return tmp_path_factory.mktemp("triton-cache")


def _aot_builds(specs, cache_dir):
    """Build ``specs`` (see triton_aot.py) for their GPU targets in a process without TRITON_INTERPRET."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, _AOT_SCRIPT], input=json.dumps(specs), env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0 and ("ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr):
        pytest.skip(f"Triton cannot compile ahead of time here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(specs)
    return results


# ----------------------------------------------------------------------------- hazard 2: int64 addressing
def test_fused_linear_address_arithmetic_is_int64(aot_cache):
    """No index × stride product of the fused linear is computed in int32 (a column-major x or W0ᵀ has
    column stride N or K, so ``cols * stride`` passes 2³¹ for tensors of more than 2³¹ elements):
    read from the compiled Triton IR (sm_90), where every pointer offset must be int64."""
    specs = []
    for kernel in ("project", "matmul_plus_low_rank", "low_rank_grad"):
        blocks, launch = triton_lora_linear.launch_config(kernel, torch.float32)
        specs.append(dict(kernel=kernel, dtype="fp32", rank_block=triton_lora_linear.MAX_RANK_BLOCK_FP32, has_keep=True,
                          has_bias=True, blocks=blocks, launch=launch, arch=90))
    for result in _aot_builds(specs, aot_cache):
        assert result["i32_tensor_muls"] == [], f"{result['kernel']}: int32 index products {result['i32_tensor_muls']}"
        assert result["narrow_addptr_offsets"] == [], f"{result['kernel']}: {result['narrow_addptr_offsets']}"


# ----------------------------------------------------------------------------- launch configurations per GPU
# Shared memory per block (the opt-in maximum a kernel may use) of each target the tests build for.
TARGETS = {"sm_80": (80, 166912), "sm_86": (86, 101376), "sm_90": (90, 232448)}  # A100, A6000, H100/H200
KERNELS = ("project", "matmul_plus_low_rank", "low_rank_grad")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def test_launch_config_fits_the_device_shared_memory():
    T = triton_lora_linear
    for kernel in KERNELS:
        for dtype in DTYPE_NAMES:
            candidates = T.launch_candidates(kernel, dtype)
            budgets = [budget for _, _, budget in candidates]
            assert budgets == sorted(budgets, reverse=True), f"{kernel}: candidates are not preferred-first"
            assert T.launch_config(kernel, dtype) == (candidates[0][0], candidates[0][1])
            assert T.launch_config(kernel, dtype, shared_memory=1024) == (candidates[-1][0], candidates[-1][1])
            for target, (_, limit) in TARGETS.items():
                blocks, launch = T.launch_config(kernel, dtype, shared_memory=limit)
                chosen = next(c for c in candidates if (c[0], c[1]) == (blocks, launch))
                assert chosen[2] <= limit, f"{kernel} {dtype} on {target}: needs {chosen[2]} > {limit}"
    # Every target (the A6000's 99 KB included) fits the preferred configuration of every kernel:
    # no target runs a smaller pipeline (the old fp32 tiles needed up to 128 KB).
    for kernel in KERNELS:
        for dtype in DTYPE_NAMES:
            first = T.launch_candidates(kernel, dtype)[0]
            for target, (_, limit) in TARGETS.items():
                assert first[2] <= limit, f"{kernel} {dtype}: {first[2]} bytes do not fit {target}"


def test_launchers_ask_the_tensors_device_for_its_shared_memory(monkeypatch):
    T = triton_lora_linear
    asked = []

    chosen = []

    def fake_shared_memory(index):
        asked.append(index)
        return TARGETS["sm_86"][1]

    def recorded_config(kernel, dtype, gpu=True, shared_memory=None):
        chosen.append(shared_memory)
        return launch_config(kernel, dtype, gpu, shared_memory)

    launch_config = T.launch_config
    monkeypatch.setattr(T, "_gpu", lambda device: True)
    monkeypatch.setattr(T, "shared_memory_per_block", fake_shared_memory)
    monkeypatch.setattr(T, "launch_config", recorded_config)
    assert T._device_launch_config("low_rank_grad", torch.float32, torch.device("cuda", 1)) == \
        launch_config("low_rank_grad", torch.float32, shared_memory=TARGETS["sm_86"][1])
    assert asked == [1] and chosen == [TARGETS["sm_86"][1]]


def _config_specs(arch, limit, full):
    """The builds of the launch configurations chosen for a device with ``limit`` bytes per block:
    the largest rank block of each dtype with and without dropout (CI), or every rank block, dtype
    and candidate (``full``)."""
    specs = []
    dtypes = list(DTYPE_NAMES) if full else [torch.float32, torch.bfloat16]
    for kernel in KERNELS:
        for dtype in dtypes:
            configs = triton_lora_linear.launch_candidates(kernel, dtype) if full else []
            blocks, launch = triton_lora_linear.launch_config(kernel, dtype, shared_memory=limit)
            chosen = [c for c in triton_lora_linear.launch_candidates(kernel, dtype) if (c[0], c[1]) == (blocks, launch)]
            largest = triton_lora_linear._rank_block(1 << 20, dtype)
            for block_cfg, launch_cfg, budget in configs or chosen:
                for rank_block in ([b for b in (16, 32, 64) if b <= largest] if full else (largest,)):
                    for has_keep in (True, False):
                        for has_bias in ((True, False) if full and kernel == "matmul_plus_low_rank" else (True,)):
                            specs.append(dict(kernel=kernel, dtype=DTYPE_NAMES[dtype], rank_block=rank_block,
                                              has_keep=has_keep, has_bias=has_bias, blocks=block_cfg,
                                              launch=launch_cfg, arch=arch, budget=budget,
                                              chosen=(block_cfg, launch_cfg) == (blocks, launch)))
    return specs


@pytest.mark.parametrize("target", list(TARGETS))
def test_fused_linear_builds_fit_shared_memory(target, aot_cache):
    """Each configuration the launch code chooses for ``target`` builds for it, fits its shared
    memory per block, needs no more than the budget its choice was made by, and spills no more
    registers than triton_aot.SPILL_BOUNDS allows (none); the spill and register counts of every
    build are printed per target. CI builds the largest rank block (the most shared memory in every
    measured case); ALTLORA_FULL_COMPILE_MATRIX=1 builds every rank block, dtype, dropout/bias
    variant and candidate (minutes)."""
    import os

    from triton_aot import print_report, spill_bound

    arch, limit = TARGETS[target]
    full = os.environ.get("ALTLORA_FULL_COMPILE_MATRIX", "0") == "1"
    failures, report = [], []
    for r in _aot_builds(_config_specs(arch, limit, full), aot_cache):
        what = (f"{r['kernel']} {r['dtype']} rank_block={r['rank_block']} keep={r['has_keep']} "
                f"{r['blocks']} {r['launch']} on {target}")
        if r["shared"] > r["budget"]:
            failures.append(f"{what}: {r['shared']} bytes of shared memory > its budget {r['budget']}")
        if r["chosen"] and r["shared"] > limit:
            failures.append(f"{what}: {r['shared']} bytes of shared memory > the limit {limit}")
        bound = spill_bound(f"_{r['kernel']}_kernel", r["rank_block"])
        if r["chosen"] and r["spills"] > bound:
            failures.append(f"{what}: {r['spills']} bytes of register spills > {bound}")
        report.append(dict(kernel=r["kernel"], dtype=r["dtype"], rank_block=r["rank_block"], keep=r["has_keep"],
                           stages=r["launch"].get("num_stages"), chosen=r["chosen"], shared=r["shared"],
                           registers=r["registers"], spills=r["spills"]))
    print_report(f"fused LoRA linear builds for {target}", report, list(report[0]))
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- hazard 7: split count vs SM count
def test_split_count_is_a_function_of_the_shapes_not_the_device(monkeypatch):
    """The split count of low_rank_grad decides the summation order of dA/dB: it must not follow
    the device's SM count (other bits on every GPU model). On a faked GPU that would answer any
    property query with an error, the launcher takes split_count's answer, reading no property."""
    T = triton_lora_linear

    def no_properties(*args, **kwargs):
        raise AssertionError("the split count asked the device for its properties")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_properties)
    assert T.split_count(8192, 4096, 16, 64, 128, 16) == 16  # 32 column programs: 512 / 32
    assert T.split_count(8192, 14336, 64, 64, 128, 64) == 5  # 112 column programs
    assert T.split_count(200, 64, 8, 64, 128, 16) == 1  # too few rows to split
    assert T.split_count(10**6, 32, 8, 64, 128, 16) == T.TARGET_PROGRAMS

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(T, "_gpu", lambda device: True)  # choose as on a GPU, run in the interpreter
    monkeypatch.setattr(T, "_device_launch_config", lambda kernel, dtype, device: T.launch_config(kernel, dtype, gpu=False))
    asked = []
    original = T.split_count
    monkeypatch.setattr(T, "split_count", lambda *args: asked.append(args) or original(*args))
    g = torch.Generator().manual_seed(3)
    h, x = torch.randn(300, 5, generator=g), torch.randn(300, 7, generator=g)
    got = T.low_rank_grad(h, x, 0.5)
    assert asked == [(300, 7, 5, 32, 32, 16)]
    torch.testing.assert_close(got.double(), 0.5 * h.double().T @ x.double(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- hazard 7: a strided bias
def test_fused_linear_reads_a_strided_bias(monkeypatch):
    """The kernel reads the bias with unit stride; a strided one (a column of a matrix, every other
    element) must be read as its values, not as its storage neighbours."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 7, generator=g), torch.randn(7, 5, generator=g)
    h, l = torch.randn(9, 3, generator=g), torch.randn(3, 5, generator=g)
    for bias in (torch.randn(10, generator=g)[::2], torch.randn(5, 4, generator=g)[:, 1]):
        assert bias.stride(0) != 1
        got = triton_lora_linear.matmul_plus_low_rank(x, w, h, l, 0.5, bias=bias)
        want = x.double() @ w.double() + bias.double() + 0.5 * (h.double() @ l.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_a_launch_refused_for_shared_memory_is_retried_with_fewer_stages(monkeypatch):
    """Budgets were measured with one Triton version; if a device still refuses a build for shared
    memory (checked when it loads, before it runs), the launcher retries with one stage fewer."""
    from triton.runtime.errors import OutOfResources

    T = triton_lora_linear
    tried = []

    class RefusingKernel:
        def __getitem__(self, grid):
            def run(*args, num_stages, **kwargs):
                tried.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(131072, 101376, "shared memory")
            return run

    T._run(triton_runtime.Launch(RefusingKernel(), (1,), (), {}, 4, {"num_stages": 3}))
    assert tried == [3, 2]

    class NoThreads(RefusingKernel):  # other refusals are not retried
        def __getitem__(self, grid):
            def run(*args, num_stages, **kwargs):
                tried.append(num_stages)
                raise OutOfResources(2048, 1024, "threads")
            return run

    tried.clear()
    with pytest.raises(OutOfResources):
        T._run(triton_runtime.Launch(NoThreads(), (1,), (), {}, 4, {"num_stages": 3}))
    assert tried == [3]
