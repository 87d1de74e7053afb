"""Fixtures shared by the test modules.

``backend``: every concrete phase-update backend of ``altlora_kernels.backends`` that can run on
this machine's CPU, so that a test written once runs for each of them:

* ``torch`` always;
* ``native``, built first if needed (tens of seconds, once per machine and source version;
  ``./setup.sh`` builds it ahead); skipped, with the reason, where it cannot be built;
* ``triton`` when the package is installed, in Triton's CPU interpreter (``TRITON_INTERPRET=1`` is
  set for that test only, so the rest of the suite sees the interpreter off).

``interpreter``: ``TRITON_INTERPRET=1`` for one test, with the Triton work tables cleared around it.

``phase_calls``: the calls that reached the chosen backend's ``phase_update`` during the test (for
native also the phases its step plan ran), to show that the backend really ran and nothing fell
back quietly.

Shared problems, the oracle runs and the oracle matrix are in ``problems.py`` and ``oracle.py``.
"""

import pytest
import torch

from altlora_kernels import backends

CPU = torch.device("cpu")
CONCRETE_BACKENDS = backends.backend_names(backends.PHASE_UPDATE)[1:]


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton", reason="the triton backend needs the 'triton' package")
    from altlora_kernels import triton_phase_tables

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_phase_tables.clear_cache()
    yield
    triton_phase_tables.clear_cache()


@pytest.fixture(params=CONCRETE_BACKENDS)
def backend(request):
    name = request.param
    if name == "triton":
        request.getfixturevalue("interpreter")
    module = backends.backend_module(name)
    if hasattr(module, "prepare"):
        module.prepare(CPU)  # builds the native library once; a failure becomes the skip reason
    reason = backends.unavailable_reason(name, CPU)
    if reason is not None:
        pytest.skip(reason)
    return name


@pytest.fixture
def phase_calls(backend, monkeypatch):
    module = backends.backend_module(backend)
    original = module.phase_update
    calls = []

    def counted(*args, **kwargs):
        calls.append(backend)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "phase_update", counted)
    if backend == "native":
        # After the first step the native phases usually run through the optimizer's step plan
        # (python/altlora/step_plan.py), which calls the library without this module's function.
        from altlora_kernels import native_step_plan

        planned = native_step_plan.NativeStepPlan.step

        def counted_plan(self, phases, *args, **kwargs):
            status = planned(self, phases, *args, **kwargs)
            if status == native_step_plan.STEPPED:
                calls.extend([backend] * len(phases))
            return status

        monkeypatch.setattr(native_step_plan.NativeStepPlan, "step", counted_plan)
    return calls
