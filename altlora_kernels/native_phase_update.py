"""The ``native`` backend: the phase update in C++ (``csrc/phase_update.cpp``), compiled on demand.

Same semantics as the torch backend (``torch_phase_update.py``; the math: ``docs/math.md``): one
call runs a phase for every layer of every group, with ``at::parallel_for`` over layers and
column chunks, element-wise work in fp32 and the r×r damped Cholesky in double. CPU only.

**Building.** ``torch.utils.cpp_extension.load`` compiles ``csrc/`` with the C++ compiler
(``$CXX``, default ``c++``) and ninja into ``<root>/altlora_native_<key>``, where ``<root>`` is
``$TORCH_EXTENSIONS_DIR`` or torch's default cache (``~/.cache/torch_extensions``) and ``<key>``
hashes the sources, the flags, the torch and Python versions, the machine and the CPU capability:
a changed input gets a new folder, so a cached library is never stale.

**What "built" means, and who compiles.** Built = the library is loaded in this process or
present in the cache for the current key. :func:`unavailable_reason` answers "can it run now",
so it is None only when built, and never compiles; :func:`prepare` builds.

* ``backend="auto"`` on CPU takes native only when it is built: constructing an optimizer or
  running its first step never stalls on a compiler.
* ``backend="native"`` builds on first request: ``backends.resolve_backend`` calls
  :func:`prepare` for an explicitly named backend (tens of seconds, once per machine and source
  version, announced on stderr), and :func:`phase_update` builds if called before that.
* Fill the cache ahead with ``python -m altlora_kernels.native_phase_update``.
* Without a compiler, ninja or the sources, everything imports and trains with the torch backend;
  ``backend="native"`` raises a ``RuntimeError`` that says what is missing. A build that failed
  is not retried in the same process: its error becomes the reason.

The damping-escalation constants come from ``cholesky.py`` at every call (one source of truth).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cholesky import ABSOLUTE_FLOOR, ESCALATION, PIVOT_FLOOR
from .phase_types import FactorGroup, PhaseHyperParams

__all__ = [
    "SUPPORTED_DTYPES",
    "NativeUnavailable",
    "unavailable_reason",
    "prepare",
    "phase_update",
    "nonfinite_flag",
    "damped_cholesky",
    "load_extension",
    "build_directory",
]

SOURCES = ("phase_update.cpp", "step_plan.cpp")
HEADERS = ("damped_cholesky.h", "nonfinite.h", "phase_update.h", "stage_clock.h", "step_plan.h")


def _source_dir() -> Path:
    """Where the C++ sources are: inside the package (an installed wheel), else ``csrc/`` beside it (a checkout)."""
    here = Path(__file__).resolve().parent
    candidates = (here / "csrc", here.parent / "csrc")
    return next((c for c in candidates if (c / SOURCES[0]).is_file()), candidates[0])


SOURCE_DIR = _source_dir()
MODULE_PREFIX = "altlora_native"

# Parameter dtypes the C++ code takes (fp32 math and state).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Lines of compiler output kept in the reason of a failed build.
_ERROR_LINES = 25


class NativeUnavailable(RuntimeError):
    """The native extension cannot be built or loaded here; the message says why."""


def _compile_flags():
    """(cflags, ldflags) for g++/clang on Linux and macOS."""
    # torch adds no optimization flag of its own; -ffp-contract=fast lets the column loops use FMA
    # and -fno-math-errno lets sqrt vectorize (no errno to set: inputs are never negative).
    cflags = ["-O3", "-ffp-contract=fast", "-fno-math-errno"]
    ldflags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP code in the headers: without -fopenmp it runs serially.
        # The library then needs libgomp.so.1, which resolves to the copy torch has already loaded.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        # What torch itself dispatches to on this CPU; part of the cache key, never -march=native.
        cflags += ["-mavx2", "-mfma", "-mf16c"]
        if capability == "AVX512":
            # The extensions torch requires before it dispatches to AVX-512 (so the CPU has
            # them). GCC would otherwise keep to 256-bit vectors; the tile form's loops run 16
            # columns at a time (kLanes), one 512-bit vector.
            cflags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    return cflags, ldflags


def _build_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    cflags, ldflags = _compile_flags()
    for item in (cflags, ldflags, torch.__version__, sys.version, platform.machine(),
                 torch.backends.cpu.get_cpu_capability(), os.environ.get("CXX", "c++")):
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def _module_name() -> str:
    return f"{MODULE_PREFIX}_{_build_key()}"


def build_directory() -> Path:
    """The cache folder of the library for the current sources, flags and versions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / _module_name()


def _import_library(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toolchain_problem() -> Optional[str]:
    """Why the extension cannot be compiled here (cheap checks), or None."""
    if sys.platform == "win32":
        return "building it on Windows is not supported (the compiler flags are for GCC/Clang)"
    missing = [name for name in SOURCES + HEADERS if not (SOURCE_DIR / name).is_file()]
    if missing:
        return (f"the C++ sources are not installed ({', '.join(missing)} missing under {SOURCE_DIR}); "
                f"reinstall altlora from a wheel or a checkout that has csrc/")
    compiler = os.environ.get("CXX", "c++")
    if not compiler.split() or shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; set $CXX or install g++/clang++)"
    try:
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError as err:  # e.g. setuptools missing
        return f"torch.utils.cpp_extension cannot be imported ({err}); install setuptools"
    if _ninja_directory() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def _ninja_directory() -> Optional[str]:
    """The folder of the ninja executable: on PATH, or beside this Python (a venv not activated)."""
    found = shutil.which("ninja")
    if found is None:
        found = shutil.which("ninja", path=os.path.dirname(sys.executable))
    return None if found is None else os.path.dirname(found)


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs `ninja` from PATH; add the venv's bin folder for the build if that is where it is."""
    directory = _ninja_directory()
    path = os.environ.get("PATH", "")
    if directory is None or directory in path.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = directory + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build():
    """Compile the extension into the cache and import it; raises NativeUnavailable."""
    problem = _toolchain_problem()
    if problem is not None:
        raise NativeUnavailable(problem)
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = _compile_flags()
    print(f"altlora: compiling the native backend (once per machine and version: tens of seconds) into {directory}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with _ninja_on_path():
            module = cpp_extension.load(
                name=_module_name(),
                sources=[str(SOURCE_DIR / name) for name in SOURCES],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                build_directory=str(directory),
                verbose=False,
            )
    except Exception as err:  # compiler errors arrive as RuntimeError with the compiler's output
        tail = "\n".join(str(err).strip().splitlines()[-_ERROR_LINES:])
        raise NativeUnavailable(f"building the native backend in {directory} failed:\n{tail}") from err
    print(f"altlora: native backend built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


class _Library:
    """The loaded extension of this process, or why it could not be had."""

    def __init__(self):
        self.module = None
        self.failure: Optional[str] = None
        self.lock = threading.Lock()

    def cached(self):
        """The module if loaded or loadable from the cache without compiling, else None."""
        with self.lock:
            if self.module is None:
                path = build_directory() / f"{_module_name()}.so"
                if path.is_file():
                    try:
                        self.module = _import_library(path)
                    except ImportError:
                        return None  # e.g. a library another process is still writing
            return self.module

    def get(self):
        """The module, compiling it if needed; raises NativeUnavailable."""
        if self.cached() is not None:
            return self.module
        with self.lock:
            if self.module is None:
                if self.failure is not None:
                    raise NativeUnavailable(self.failure)
                try:
                    self.module = _build()
                except NativeUnavailable as err:
                    self.failure = str(err)
                    raise
            return self.module


_LIBRARY = _Library()


NOT_BUILT = "it is not built yet (build it once with `python -m altlora_kernels.native_phase_update`: tens of seconds)"


def load_extension(build: bool = True):
    """The compiled extension module (compiled first when ``build``); raises :class:`NativeUnavailable`."""
    if build:
        return _LIBRARY.get()
    module = _LIBRARY.cached()
    if module is None:
        raise NativeUnavailable(NOT_BUILT)
    return module


def _device_problem(device: Optional[torch.device]) -> Optional[str]:
    if device is not None and torch.device(device).type != "cpu":
        return f"it runs on the CPU only and the LoRA factors are on {device} (there is no GPU code in csrc/)"
    return None


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why native cannot run on ``device`` now, or None (only when built); never compiles."""
    problem = _device_problem(device)
    if problem is None and _LIBRARY.cached() is None:
        problem = _LIBRARY.failure or _toolchain_problem() or NOT_BUILT
    return None if problem is None else f"backend='native' is unavailable: {problem}"


def prepare(device: Optional[torch.device] = None) -> None:
    """Build the library if it is not built (for an explicit ``backend="native"``); never raises.

    A failure is remembered and becomes :func:`unavailable_reason`; on another device there is
    nothing to prepare.
    """
    if _device_problem(device) is None:
        try:
            load_extension(build=True)
        except NativeUnavailable:
            pass


def phase_update(groups: Sequence[FactorGroup], hp: PhaseHyperParams, found_inf: Optional[torch.Tensor] = None) -> None:
    """One phase for every group: the semantics of ``torch_phase_update.phase_update_torch``."""
    if not groups:
        return
    try:
        extension = load_extension(build=True)
    except NativeUnavailable as err:
        raise RuntimeError(f"backend='native' is unavailable: {err}") from None
    extension.phase_update(
        params=[list(g.params) for g in groups],
        grads=[list(g.grads) for g in groups],
        transposed=[bool(g.transposed) for g in groups],
        momentum=[g.momentum for g in groups],
        variance=[g.variance for g in groups],
        step=[g.step for g in groups],
        gram=[g.gram for g in groups],
        cross=[g.cross for g in groups],
        other_gram=[g.other_gram for g in groups],
        other_cross=[g.other_cross for g in groups],
        inv_scale_sq=[g.inv_scale_sq for g in groups],
        snapshot=[g.snapshot for g in groups],
        lr=float(hp.lr),
        beta1=float(hp.beta1),
        weight_decay=float(hp.weight_decay),
        damping=float(hp.damping),
        adaptive=bool(hp.adaptive),
        beta2=float(hp.beta2),
        eps=float(hp.eps),
        found_inf=found_inf,
        pivot_floor=PIVOT_FLOOR,
        escalation=list(ESCALATION),
        absolute_floor=ABSOLUTE_FLOOR,
    )


def nonfinite_flag(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The semantics of ``nonfinite.nonfinite_flag`` in one read-only parallel pass, or None when
    it does not apply: the library is not built (this never builds), or a tensor is not a
    contiguous CPU tensor of a float dtype (``csrc/nonfinite.h`` decides, at no cost here).

    torch's multi-tensor check (``_amp_foreach_non_finite_check_and_unscale_``) also writes every
    gradient back (times a scale of 1); this one only reads (``bench/profile_native_step.py``
    times it within a step).
    """
    module = _LIBRARY.cached()
    if module is None:
        return None
    found = torch.zeros((), dtype=torch.float32)
    return found if module.nonfinite_flag(list(tensors), found) else None


def damped_cholesky(gram: torch.Tensor, damping: float):
    """``(factor, rung)``: the native ladder (``csrc/damped_cholesky.h``) on a float32 ``(L, r, r)`` batch.

    The counterpart of ``cholesky.damped_cholesky``, for tests: ``rung[l]`` is the ladder rung
    taken by matrix ``l`` (0 = the requested damping).
    """
    return load_extension(build=True).damped_cholesky(
        gram=gram, damping=float(damping), pivot_floor=PIVOT_FLOOR, escalation=list(ESCALATION),
        absolute_floor=ABSOLUTE_FLOOR,
    )


def _main() -> int:
    """``python -m altlora_kernels.native_phase_update``: build (if needed) into the cache and report."""
    start = time.perf_counter()
    try:
        module = load_extension(build=True)
    except NativeUnavailable as err:
        print(f"native backend unavailable: {err}", file=sys.stderr)
        return 1
    print(f"native backend ready ({time.perf_counter() - start:.1f} s): {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
