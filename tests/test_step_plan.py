"""The step plan (python/altlora/step_plan.py, csrc/step_plan.cpp): the fast path of the native step.

Every test runs the same training twice, with plans on and off (``ALTLORA_STEP_PLAN``), and
compares parameters and the whole optimizer state bit for bit after every step: the plan must give
exactly what the general step gives (which test_oracle.py checks against float64 math), and hand
every unusual step to it. The statuses the plan returned show which path each step took, so a
plan that quietly never runs fails here too.
"""

import gc
import weakref

import pytest
import torch

import altlora
from altlora_kernels import native_phase_update as native
from altlora_kernels import native_step_plan as NSP

CPU = torch.device("cpu")

# (d_in, d_out, r, scaling): odd shapes, two layers of one shape (a group of two), ranks 3 and 8
# (r = 8 takes the column form for B), a layer wider than one column chunk.
LAYERS = [(37, 21, 3, 2.0), (37, 21, 3, 4.0), (50, 37, 8, 1.5), (21, 2101, 8, 0.5), (13, 7, 1, 3.0)]
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def extension():
    problem = native._toolchain_problem()
    if problem is not None:
        pytest.skip(f"backend='native' cannot be built here: {problem}")
    return native.load_extension(build=True)


@pytest.fixture
def statuses(monkeypatch):
    """The status of every plan step during the test."""
    seen = []
    original = NSP.NativeStepPlan.step

    def recorded(self, *args, **kwargs):
        status = original(self, *args, **kwargs)
        seen.append(status)
        return status

    monkeypatch.setattr(NSP.NativeStepPlan, "step", recorded)
    return seen


class Run:
    """One training run: LoRA pairs, a head stepped by AdamW, fresh gradients every step."""

    def __init__(self, variant="AltLoRA", dtype=torch.float32, head=True, **options):
        gen = torch.Generator().manual_seed(0)
        self.pairs = []
        for i, (d, k, r, s) in enumerate(LAYERS):
            A = torch.nn.Parameter((torch.randn(r, d, generator=gen) / d**0.5).to(dtype))
            B = torch.nn.Parameter((torch.randn(k, r, generator=gen) * 0.1).to(dtype))
            self.pairs.append(altlora.LoRAPair(A, B, s, f"layer{i}"))
        self.head = torch.nn.Parameter(torch.randn(5, 3, generator=gen)) if head else None
        groups = [{"pairs": self.pairs}] + ([{"params": [self.head]}] if head else [])
        options = {"lr": 0.05, "weight_decay": 0.01, "damping": 1e-4, "backend": "native", **options}
        self.opt = getattr(altlora, variant)(groups, **options)
        self.gen = torch.Generator().manual_seed(1)

    def params(self):
        return [t for p in self.pairs for t in (p.A, p.B)] + ([self.head] if self.head is not None else [])

    def grads(self):
        for t in self.params():
            t.grad = (torch.randn(t.shape, generator=self.gen) * 0.05).to(t.dtype)

    def step(self):
        self.grads()
        self.opt.step()


def _same_state(a, b):
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        assert sa["state"][key].keys() == sb["state"][key].keys()
        for name, value in sa["state"][key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][key][name])), (key, name)
    assert a.opt.skipped_steps == b.opt.skipped_steps
    assert a.opt.active_factor == b.opt.active_factor


def _same(a, b):
    for x, y in zip(a.params(), b.params()):
        assert x.dtype == y.dtype and torch.equal(x, y)
    _same_state(a, b)


def twin_runs(monkeypatch, events=None, steps=STEPS, **kwargs):
    """The same run with plans off, then on, an event applied to both before some steps; compared
    after every step. Returns the run with plans (its steps' statuses are in the fixture)."""
    events = events or {}
    general, planned = Run(**kwargs), Run(**kwargs)
    for i in range(steps):
        for run, switch in ((general, "0"), (planned, "1")):
            monkeypatch.setenv("ALTLORA_STEP_PLAN", switch)  # read whenever a plan would be built
            run.grads()
            if i in events:
                events[i](run)
            run.opt.step()
        _same(general, planned)
    assert general.opt._plan is None
    return planned


@pytest.mark.parametrize("variant", ["AltLoRA", "AltLoRAPlus"])
@pytest.mark.parametrize("schedule", ["alternate", "sequential"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_gives_the_bits_of_the_general_step(monkeypatch, statuses, variant, schedule, dtype):
    twin_runs(monkeypatch, variant=variant, schedule=schedule, dtype=dtype)
    # The first step is a general one (it builds the plan); the plan ran every other.
    assert statuses == [NSP.STEPPED] * (STEPS - 1)


def test_param_groups_with_their_own_hyper_parameters(monkeypatch, statuses):
    runs = []
    for _ in range(2):
        run = Run(head=False)
        # A second LoRA param group, and a learning-rate change as a scheduler makes it.
        gen = torch.Generator().manual_seed(5)
        A = torch.nn.Parameter(torch.randn(4, 9, generator=gen) * 0.3)
        B = torch.nn.Parameter(torch.randn(11, 4, generator=gen) * 0.1)
        extra = altlora.LoRAPair(A, B, 2.0, "extra")
        run.opt.add_param_group({"pairs": [extra], "lr": 0.01, "damping": 1e-3})
        run.pairs.append(extra)
        runs.append(run)
    for i in range(STEPS):
        for run, switch in zip(runs, ("0", "1")):
            monkeypatch.setenv("ALTLORA_STEP_PLAN", switch)
            run.grads()
            if i == 5:
                run.opt.param_groups[0]["lr"] = 0.02
            run.opt.step()
        _same(*runs)
    assert statuses == [NSP.STEPPED] * (STEPS - 1)
    assert len(runs[1].opt._plan.units) == 2


def _write_outside(run):
    with torch.no_grad():
        run.pairs[1].A.mul_(1.25)  # bumps the version: the Grams must be refreshed


def _write_same_values(run):
    with torch.no_grad():
        run.pairs[2].B.copy_(run.pairs[2].B.clone())  # a reload of the same weights


def _no_grad_for_one_layer(run):
    run.pairs[3].A.grad = None
    run.pairs[3].B.grad = None


def _strided_grad(run):
    g = run.pairs[2].B.grad
    run.pairs[2].B.grad = g.t().contiguous().t()  # same values, not contiguous


def _nan_in_head(run):
    run.head.grad[0, 0] = float("nan")


def _cast_to_bf16(run):
    for t in run.params()[:-1]:
        t.data = t.data.to(torch.bfloat16)
        t.grad = t.grad.to(torch.bfloat16)


def _reload(run):
    run.opt.load_state_dict(run.opt.state_dict())


@pytest.mark.parametrize("event,expected,options", [
    (_write_outside, NSP.CHANGED, {}),
    (_write_same_values, NSP.CHANGED, {}),
    (_no_grad_for_one_layer, NSP.IRREGULAR, {}),
    (_strided_grad, NSP.IRREGULAR, {}),
    (_nan_in_head, NSP.SKIPPED, {"nonfinite": "skip"}),
    (_cast_to_bf16, NSP.CHANGED, {}),
])
def test_unusual_steps_go_to_the_general_step(monkeypatch, statuses, event, expected, options):
    at = 5
    twin_runs(monkeypatch, events={at: event}, **options)
    # Step `at` is the plan's step number at - 1 (step 0 built it): it saw the event.
    assert statuses[at - 1] == expected
    if expected == NSP.SKIPPED:
        assert statuses.count(NSP.SKIPPED) == 1 and statuses.count(NSP.STEPPED) == STEPS - 2
    else:
        # The general step ran that step (and rebuilt or kept the plan); the plan ran all others.
        assert statuses.count(NSP.STEPPED) == STEPS - 2 and len(statuses) == STEPS - 1


def test_load_state_dict_drops_the_plan_and_the_next_general_step_builds_one(monkeypatch, statuses):
    planned = twin_runs(monkeypatch, events={6: _reload})
    # Step 6 follows a reload: a general step, no plan status for it.
    assert statuses == [NSP.STEPPED] * (STEPS - 2)
    assert planned.opt._plan is not None


def test_nonfinite_raise_changes_nothing_and_the_plan_goes_on(monkeypatch, statuses):
    run = Run()
    for _ in range(3):
        run.step()
    before = [t.detach().clone() for t in run.params()]
    state = run.opt.state_dict()
    run.grads()
    run.pairs[0].B.grad[1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="layer0.lora_B"):
        run.opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, run.params()))
    after = run.opt.state_dict()
    for key in state["state"]:
        for name, value in state["state"][key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][key][name]))
    run.step()  # a general step (the failed one dropped the plan), which builds a new plan
    run.step()
    assert statuses == [NSP.STEPPED, NSP.STEPPED, NSP.NONFINITE, NSP.STEPPED]


def test_sparse_gradient_is_refused_as_without_a_plan(monkeypatch, statuses):
    run = Run()
    for _ in range(2):
        run.step()
    run.grads()
    run.head.grad = run.head.grad.to_sparse()
    with pytest.raises(ValueError, match="sparse gradient"):
        run.opt.step()
    assert statuses[-1] == NSP.IRREGULAR


def test_add_param_group_mid_run_is_stepped(monkeypatch, statuses):
    run = Run(head=False)
    for _ in range(3):
        run.step()
    bias = torch.nn.Parameter(torch.zeros(6))
    run.opt.add_param_group({"params": [bias]})
    assert run.opt._plan is None
    for _ in range(3):
        for t in run.params():
            t.grad = torch.ones_like(t) * 0.01
        bias.grad = torch.ones(6)
        run.opt.step()
    assert bool((bias != 0).all())  # AdamW stepped the new group every step
    assert statuses[-2:] == [NSP.STEPPED, NSP.STEPPED]


def test_the_plan_keeps_no_gradient_alive(monkeypatch, statuses):
    run = Run()
    for _ in range(3):
        run.step()
    assert statuses == [NSP.STEPPED] * 2
    refs = [weakref.ref(t.grad) for t in run.params()]
    run.opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_freeze_inactive(monkeypatch, statuses):
    def frozen_grads(run):
        for t in run.params()[:-1]:
            if not t.requires_grad:
                t.grad = None

    planned = twin_runs(monkeypatch, events={i: frozen_grads for i in range(STEPS)}, freeze_inactive=True)
    assert statuses == [NSP.STEPPED] * (STEPS - 1)
    assert planned.pairs[0].A.requires_grad != planned.pairs[0].B.requires_grad


@pytest.mark.parametrize("options", [
    {"schedule": "joint"},
    {"schedule": "alternate", "switch_every": 3},
    {"backend": "torch"},
], ids=["joint", "switch_every", "torch-backend"])
def test_no_plan_where_it_does_not_apply(monkeypatch, statuses, options):
    run = Run(**options)
    for _ in range(4):
        run.step()
    assert run.opt._plan is None and statuses == []


def test_switched_off_by_the_environment(monkeypatch, statuses):
    monkeypatch.setenv("ALTLORA_STEP_PLAN", "0")
    run = Run()
    for _ in range(4):
        run.step()
    assert run.opt._plan is None and statuses == []


def test_native_plan_checks_its_inputs(extension):
    A = torch.zeros(3, 5)
    B = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="one entry per factor"):
        extension.StepPlan([A, B], [A.data_ptr()], [0, 0], False, 1e-6, [1.0], 1e-8)
    plan = extension.StepPlan([A, B], [A.data_ptr(), B.data_ptr()], [0, 0], False, 1e-6, [1.0], 1e-8)
    square = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="out of range"):
        plan.add_phase(unit=0, factor=0, tracked_index=[[2]], params=[[A]], transposed=[False],
                       momentum=[torch.zeros(1, 3, 5)], variance=[None], step=[torch.zeros(1)], gram=[square],
                       cross=[square], other_gram=[square], other_cross=[square], inv_scale_sq=[torch.ones(1)])
    with pytest.raises(ValueError, match="differ in shape or dtype"):
        plan.add_phase(unit=0, factor=0, tracked_index=[[1]], params=[[A]], transposed=[False],
                       momentum=[torch.zeros(1, 3, 5)], variance=[None], step=[torch.zeros(1)], gram=[square],
                       cross=[square], other_gram=[square], other_cross=[square], inv_scale_sq=[torch.ones(1)])
    with pytest.raises(ValueError, match="momentum"):
        plan.add_phase(unit=0, factor=0, tracked_index=[[0]], params=[[A]], transposed=[False],
                       momentum=[torch.zeros(1, 3, 4)], variance=[None], step=[torch.zeros(1)], gram=[square],
                       cross=[square], other_gram=[square], other_cross=[square], inv_scale_sq=[torch.ones(1)])
