"""What every Triton module of this package shares: the optional import, the interpreter, lazy kernels, launches.

* Triton is optional: without it this module still imports (``triton`` and ``tl`` are None) and
  :func:`triton_missing_reason` says what to install. Kernel modules take ``triton``/``tl`` from
  here and use ``from __future__ import annotations``, so they import without Triton too.
* :func:`interpreter_enabled`: whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).
* :class:`LazyKernel`: ``triton.jit`` decides at decoration time whether it builds a compiled
  or an interpreted kernel, and a process may switch ``TRITON_INTERPRET`` after importing this
  package (the tests do), so a kernel body is decorated on first launch, once per mode. For the
  same reason kernels call only builtins of ``triton.language`` (``tl.full``, ``tl.reduce``), not
  the jit helpers of ``triton.language.standard`` (``tl.zeros``, ``tl.sum``, ``tl.cdiv``), which
  were decorated for the mode of the moment Triton was imported.
* :class:`Launch`: one launch described before it runs (tests compile these for a GPU target); it
  runs under :func:`device_guard` of its tensors' device.
* :data:`MIN_DOT_EXTENT` and :func:`dot_extent`: the one hardware fact about ``tl.dot`` shapes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

try:  # Triton is optional: the package must import without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    triton = None
    tl = None

__all__ = [
    "triton",
    "tl",
    "MIN_DOT_EXTENT",
    "dot_extent",
    "interpreter_enabled",
    "triton_missing_reason",
    "device_reason",
    "LazyKernel",
    "Launch",
    "device_guard",
]

# Every dimension of a tl.dot must be at least 16 for a GPU compiler (NVIDIA's MMA tiles); the
# interpreter accepts smaller ones, so nothing but this constant keeps the kernels compilable.
# Ranks are padded up to it and K loops step by it.
MIN_DOT_EXTENT = 16


def dot_extent(n: int, cap: Optional[int] = None) -> int:
    """The power of two ≥ ``n`` and ≥ :data:`MIN_DOT_EXTENT` (at most ``cap``, when given) a tl.dot dimension gets."""
    extent = max(MIN_DOT_EXTENT, 1 << (int(n) - 1).bit_length())
    return extent if cap is None else min(cap, extent)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to interpret kernels on the CPU."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_missing_reason() -> Optional[str]:
    """None when Triton is installed, else a one-line reason that says what to install."""
    if triton is None:
        return "backend='triton' needs the 'triton' package, which is not installed (pip install triton)"
    return None


def device_reason(device: Optional[torch.device], *, cuda_in_interpreter: bool = True) -> Optional[str]:
    """Why Triton kernels cannot run on ``device`` now (None: they can): CUDA, or the CPU in the interpreter.

    ``cuda_in_interpreter=False`` for kernels that must not run on CUDA tensors in the
    interpreter (it runs on the host, and would dereference device pointers read from a table).
    """
    missing = triton_missing_reason()
    if missing is not None:
        return missing
    if device is None:
        return "backend='triton' needs all its tensors on one device"
    device = torch.device(device)
    if device.type == "cuda":
        if interpreter_enabled() and not cuda_in_interpreter:
            return "backend='triton' cannot run on CUDA tensors while TRITON_INTERPRET=1 is set (unset it)"
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return ("backend='triton' needs a CUDA GPU (the tensors are on the CPU); set TRITON_INTERPRET=1 "
                "to run its kernels on the CPU in Triton's (slow) interpreter")
    return f"backend='triton' runs on CUDA devices (or the CPU with TRITON_INTERPRET=1), not on {device.type}"


def device_guard(device: Optional[torch.device]):
    """Make ``device`` current while a launch runs (a no-op context off CUDA).

    Triton launches on the *current* CUDA device and its current stream, not on the device of the
    tensors it is given: a layer on cuda:1 launched while cuda:0 is current (``device_map="auto"``,
    DDP without ``torch.cuda.set_device``) would read cuda:1 pointers from a cuda:0 kernel.
    """
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class LazyKernel:
    """A kernel body decorated with ``triton.jit`` on first use, once per mode (compiled / interpreted)."""

    instances: List["LazyKernel"] = []

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self._built: Dict[bool, object] = {}
        LazyKernel.instances.append(self)

    def get(self):
        """The ``triton.jit`` object for the current mode (what ``kernel[grid](...)`` launches)."""
        mode = interpreter_enabled()
        kernel = self._built.get(mode)
        if kernel is None:
            kernel = self._built[mode] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid):
        return self.get()[grid]


@dataclass
class Launch:
    """One kernel launch, described before it runs (tests compile these for a GPU target)."""

    kernel: LazyKernel
    grid: Tuple[int, ...]
    args: tuple  # positional runtime arguments, in the kernel's order
    constexprs: Dict[str, object]
    num_warps: Optional[int] = None  # None: Triton's default
    options: Dict[str, object] = field(default_factory=dict)  # other launch options (num_stages)
    device: Optional[torch.device] = None  # made current for the launch (see device_guard); None: as is
    # Tensors whose addresses the kernel reads from a table (not through ``args``): held here so
    # that temporaries (cast or contiguous gradients) outlive the launch that reads them.
    keep_alive: tuple = ()

    def __call__(self) -> None:
        options = dict(self.options)
        if self.num_warps is not None:
            options["num_warps"] = self.num_warps
        with device_guard(self.device):
            self.kernel[self.grid](*self.args, **self.constexprs, **options)
