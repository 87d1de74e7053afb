"""Every backend against the float64 oracle: parameters and all state, after every step.

Written once, run for each backend the ``backend`` fixture (conftest.py) finds here: torch,
native when built, triton in the interpreter. What only one backend has (the native build, the
Triton work tables and launches) is tested in that backend's own module.
"""

import pytest
import torch

from problems import (
    CASES,
    STEPS,
    Problem,
    compare_with_oracle,
    layers_for,
    make,
    params_and_state,
    rank_one_B_problem,
    run_against_oracle,
)


def _total_loss(prob, pairs):
    return sum(prob.loss(i, p.A, p.B, p.scaling) for i, p in enumerate(pairs))


@pytest.mark.parametrize("variant,schedule,order,switch_every", CASES)
def test_matches_float64_oracle(backend, phase_calls, variant, schedule, order, switch_every):
    prob, pairs, _, _ = run_against_oracle(variant, schedule, order, switch_every, layers=layers_for(backend),
                                           backend=backend)
    assert len(phase_calls) >= STEPS  # the backend itself ran every phase
    before = sum(prob.loss(i, A, B, s) for i, (A, B, s) in enumerate(prob.init))
    assert _total_loss(prob, pairs) < 0.6 * before  # and it optimizes


# Several pair groups of one rank (different shapes): the torch backend batches their r×r work
# (the damped Cholesky, P and P·C_Y) across the groups of a phase and splits it back.
MIXED_SHAPES_ONE_RANK = [(3, 7, 5, 6.0), (3, 9, 11, 2.0), (3, 7, 13, 4.0), (2, 5, 6, 3.0), (3, 9, 11, 8.0)]


@pytest.mark.parametrize("variant,schedule", [("AltLoRA", "alternate"), ("AltLoRAPlus", "sequential")])
def test_groups_of_one_rank_match_oracle(backend, phase_calls, variant, schedule):
    run_against_oracle(variant, schedule, "BA", 1, steps=12, layers=MIXED_SHAPES_ONE_RANK, backend=backend)
    assert len(phase_calls) >= 12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant,schedule", [("AltLoRA", "alternate"), ("AltLoRAPlus", "alternate"),
                                              ("AltLoRA", "sequential")])
def test_half_precision_parameters_match_rounded_oracle(backend, variant, schedule, dtype):
    # Written back in the parameters' dtype from fp32 math and fp32 state; the oracle rounds every
    # written factor the same way. fp32 vs float64 arithmetic can round a value to the neighbouring
    # bf16/fp16 number, hence the tolerance; a truncating cast instead of round-to-nearest (what
    # Triton's interpreter does by default for bf16) exceeds it.
    tol = 1e-2 if dtype == torch.bfloat16 else 5e-3
    _, pairs, opt, _ = run_against_oracle(variant, schedule, "BA", 1, steps=10, tol=tol,
                                          layers=layers_for(backend, with_rank_8=True),
                                          dtype=dtype, param_dtype=dtype, backend=backend)
    assert all(p.A.dtype == dtype and p.B.dtype == dtype for p in pairs)
    assert all(opt.state[p.A]["momentum"].dtype == torch.float32 for p in pairs)


def test_rank_deficient_factor_with_zero_damping_escalates_like_the_oracle(backend):
    # B has rank 1 < r: BᵀB is singular, so with λ = 0 the first A phase must escalate the
    # damping; the result is finite and equals the oracle, which escalates the same way.
    prob = rank_one_B_problem()
    pairs = prob.pairs()
    opt, orc = make("AltLoRA", pairs, prob, schedule="alternate", order="AB", damping=0.0, weight_decay=0.0,
                    backend=backend)
    prob.set_grads(0, pairs)
    grads = prob.oracle_grads(0, orc)
    opt.step()
    orc.step(grads)
    # In the directions where BᵀB is singular the exact ∇A is zero and fp32 leaves rounding
    # (~1e-7·r relative) that the escalated damping (1e-4·μ) amplifies to ~1e-2 of M_A; the
    # parameters move by η·M and stay within 1e-4.
    compare_with_oracle(opt, pairs, orc, 1e-4, where="A phase with rank-1 B", moment_tol=2e-2)


@pytest.mark.parametrize("order", ["BA", "AB"])
def test_zero_B_with_zero_damping_stays_finite_and_matches_oracle(backend, order):
    # B = 0 and λ = 0: with order AB the first phase is an A phase with BᵀB = 0, which takes the
    # ladder's last rung (and ∇A = 0); with BA the first B phases start from B = 0.
    prob = Problem(layers_for(backend, with_rank_8=True), seed=5, zero_B=True)
    pairs = prob.pairs()
    opt, orc = make("AltLoRA", pairs, prob, schedule="alternate", order=order, damping=0.0, weight_decay=0.0,
                    backend=backend)
    for t in range(8):
        prob.set_grads(t, pairs)
        grads = prob.oracle_grads(t, orc)
        opt.step()
        orc.step(grads)
        assert all(bool(torch.isfinite(x).all()) for x in params_and_state(pairs, opt))
        # As in the rank-deficient test: escalated damping amplifies fp32 rounding in the null
        # space of a singular Gram, so the moments get a looser bound than the parameters.
        compare_with_oracle(opt, pairs, orc, 1e-4, where=f"step {t}", moment_tol=2e-2)


def test_nonfinite_raise_changes_nothing(backend):
    prob = Problem(layers_for(backend), seed=1)
    pairs = prob.pairs()
    opt, _ = make("AltLoRAPlus", pairs, prob, schedule="sequential", order="BA", backend=backend)
    prob.set_grads(0, pairs)
    opt.step()
    before = params_and_state(pairs, opt)
    prob.set_grads(1, pairs)
    pairs[1].B.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="layer1.lora_B"):
        opt.step()
    after = params_and_state(pairs, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused step changed something"


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter computes with the NaN, then drops it
@pytest.mark.parametrize("schedule", ["alternate", "sequential"])
@pytest.mark.parametrize("variant", ["AltLoRA", "AltLoRAPlus"])
def test_nonfinite_skip_is_a_no_op_and_the_run_goes_on_like_torch(backend, variant, schedule):
    # A skipped step leaves everything as it was, bit for bit, on the device; the run after it
    # equals the torch backend's run with the same skipped step.
    prob = Problem(layers_for(backend), seed=2)
    runs = {}
    for name in dict.fromkeys((backend, "torch")):
        pairs = prob.pairs()
        opt, _ = make(variant, pairs, prob, schedule=schedule, order="BA", backend=name, nonfinite="skip")
        for t in range(6):
            prob.set_grads(t, pairs)
            if t == 3:
                before = params_and_state(pairs, opt)
                pairs[0].A.grad[0, 1] = float("nan")  # whichever phase step 3 runs, it sees a NaN
                pairs[0].B.grad[1, 0] = float("inf")
            opt.step()
            if t == 3:
                after = params_and_state(pairs, opt)
                assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step changed something"
        assert opt.skipped_steps == 1
        runs[name] = params_and_state(pairs, opt)
    # fp32 sums in another order: momentum entries near zero differ by a few 1e-6.
    for got, want in zip(runs[backend], runs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
