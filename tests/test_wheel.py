"""Packaging: a wheel built from this checkout carries the native sources, and runs a native step once installed.

Offline and without reinstalling torch: the wheel is built with the test environment's
setuptools (no build isolation, no index), installed without dependencies into a fresh venv,
and that venv sees the test environment's packages (torch, ninja) through a ``.pth`` line, so
only altlora itself comes from the wheel. The step runs from a folder outside the checkout, so
nothing can be imported from the source tree by accident.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from altlora_kernels import native_phase_update as native

ROOT = Path(__file__).resolve().parent.parent
# What setup.py and MANIFEST.in read; copied so that building writes nothing into the checkout.
BUILD_INPUTS = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "requirements.txt", "python",
                "altlora_kernels", "csrc", "docs")
NATIVE_FILES = tuple(f"altlora_kernels/csrc/{name}" for name in native.SOURCES + native.HEADERS)

STEP = textwrap.dedent("""
    import json, sys, torch, altlora, altlora_kernels
    from altlora_kernels import native_phase_update as native
    pairs = [altlora.LoRAPair(torch.nn.Parameter(torch.randn(3, 7)), torch.nn.Parameter(torch.randn(5, 3)), 2.0)]
    opt = altlora.AltLoRA(pairs, lr=0.1, backend="native")
    before = pairs[0].B.detach().clone()
    pairs[0].A.grad, pairs[0].B.grad = torch.randn(3, 7), torch.randn(5, 3)
    opt.step()
    print(json.dumps({"altlora": altlora.__file__, "kernels": altlora_kernels.__file__,
                      "sources": str(native.SOURCE_DIR), "backends": sorted(set(opt.backends.values())),
                      "moved": bool((pairs[0].B != before).any())}))
""")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_carries_csrc_and_runs_a_native_step_in_a_fresh_venv(tmp_path):
    problem = native._toolchain_problem()
    if problem is not None:
        pytest.skip(f"the native backend cannot be built here: {problem}")
    source = tmp_path / "src"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, source / name)

    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("altlora-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert set(NATIVE_FILES) <= names, f"the wheel lacks {set(NATIVE_FILES) - names}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The test environment's packages (torch, ninja, setuptools), after the venv's own.
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    # ninja beside the test environment's python, should the library need compiling.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    out = _run([str(python), "-c", STEP], cwd=work, env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("altlora", "kernels", "sources"):
        assert Path(report[key]).resolve().is_relative_to(site.resolve()), f"{key} not from the wheel: {report[key]}"
    assert report["backends"] == ["native"] and report["moved"]
