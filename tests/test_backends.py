"""The backend registry (altlora_kernels/backends.py): names, capability checks, "auto", module layout."""

import importlib
import pkgutil
import types

import pytest
import torch

import altlora_kernels
from altlora_kernels import backends

CPU = torch.device("cpu")
OP_FUNCTIONS = {
    backends.PHASE_UPDATE: ("phase_update",),
    backends.LORA_LINEAR: ("project", "matmul_plus_low_rank", "low_rank_grad"),
}


@pytest.mark.parametrize("op", backends.OPS)
def test_every_backend_module_has_the_interface(op):
    names = backends.backend_names(op)
    assert names[:2] == ("auto", "torch")
    for name in names[1:]:
        module = backends.backend_module(name, op)
        assert module is not None, name
        assert callable(module.unavailable_reason), name
        dtypes = module.SUPPORTED_DTYPES
        assert dtypes is None or all(isinstance(d, torch.dtype) for d in dtypes), name
        for function in OP_FUNCTIONS[op]:
            assert callable(getattr(module, function)), f"{name}.{function}"
    assert backends.unsupported_reason("torch", torch.float64, CPU, op=op) is None


def test_float64_goes_to_torch_under_auto_on_every_device_type():
    for device in (CPU, torch.device("cuda", 0), torch.device("meta"), None):
        assert backends.resolve_auto(torch.float64, device) == "torch"
    for name in ("native", "triton"):
        reason = backends.unsupported_reason(name, torch.float64, CPU)
        assert reason is not None and "float64" in reason and name in reason
    assert backends.unsupported_reason("torch", torch.float64, CPU) is None


def test_auto_for_float32_takes_native_on_cpu_exactly_when_it_can_run():
    native_ok = backends.unsupported_reason("native", torch.float32, CPU) is None
    assert backends.resolve_auto(torch.float32, CPU) == ("native" if native_ok else "torch")
    assert backends.resolve_auto(torch.bfloat16, CPU) == backends.resolve_auto(torch.float32, CPU)
    assert backends.resolve_backend("auto", CPU, torch.float64) == "torch"
    assert backends.resolve_backend("auto", CPU) == backends.resolve_auto(None, CPU)
    assert backends.resolve_auto(torch.float32, None) == "torch"  # tensors on several devices


def test_a_named_backend_that_cannot_take_the_dtype_raises_and_builds_nothing(monkeypatch):
    native = backends.backend_module("native")
    monkeypatch.setattr(native, "prepare", lambda device=None: pytest.fail("prepare was called"))
    with pytest.raises(RuntimeError, match="float64.*backend='torch'"):
        backends.resolve_backend("native", CPU, torch.float64)


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.unavailable_reason("triton", CPU, op=backends.LORA_LINEAR) is None  # it could run ...
    assert backends.resolve_auto(torch.float32, CPU, op=backends.LORA_LINEAR) == "torch"  # ... but is not chosen
    assert backends.resolve_backend("triton", CPU, op=backends.LORA_LINEAR) == "triton"


def test_bad_names_raise_value_error_with_the_choices():
    with pytest.raises(ValueError, match="expected one of auto, torch, triton, native"):
        backends.resolve_backend("cuda", CPU)
    with pytest.raises(ValueError, match=r"expected one of auto, torch, triton\)$"):
        backends.resolve_backend("native", CPU, op=backends.LORA_LINEAR)
    with pytest.raises(ValueError, match="Invalid backend: 'auto'"):
        backends.unsupported_reason("auto", torch.float32, CPU)
    with pytest.raises(ValueError, match="Invalid op"):
        backends.backend_names("matmul")


def test_no_package_export_shadows_a_submodule():
    # `import altlora_kernels.X` must give the module X, whatever the package re-exports.
    for info in pkgutil.iter_modules(altlora_kernels.__path__):
        module = importlib.import_module(f"altlora_kernels.{info.name}")
        assert isinstance(module, types.ModuleType)
        assert getattr(altlora_kernels, info.name, module) is module, info.name
        assert info.name not in altlora_kernels.__all__, info.name
