"""``bash bench/gpu_check.sh --quick`` before a GPU is lent: its CPU dry run passes, every part runs,
and its correctness sweep reaches every launch configuration the code can choose.

The dry run (``--quick --dry-run``) runs each part on the CPU with tiny shapes, the Triton kernels in
Triton's interpreter and the GPU launch-configuration choice faked (about 30 s on 2 cores): the
script, its time boxes, its summary and each part's code path, not the GPU's numbers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the quick check's Triton parts need the 'triton' package")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PARTS = ["env", "tests", "sweep", "memcheck", "optimizer", "linear", "e2e", "e2e-hf"]

needs_shell = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                 reason="the check is a bash script that uses coreutils' timeout")


def _script_env():
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    return env


@needs_shell
def test_quick_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--quick", "--dry-run", str(tmp_path)], cwd="/", env=_script_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [line.split("\t") for line in (tmp_path / "quick-parts.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == PARTS
    status = {name: int(rc) for name, rc, *_ in rows}
    # Every part ran to completion; memcheck is "skipped" (no compute-sanitizer in a dry run) with
    # its step run without it.
    assert status == {**{p: 0 for p in PARTS}, "memcheck": 3}, status
    summary = (tmp_path / "summary.md").read_text()
    for part in PARTS:
        assert f"| {part} |" in summary
    assert "memcheck skipped: dry run" in summary

    env = json.loads((tmp_path / "env.json").read_text())
    assert env["failed"] == 0 and len(env["environment"]["self_check"]) == 3
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["failed"] == 0 and {r["case"].split()[0] for r in sweep["rows"]} == {"phase", "linear"}
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == sweep["cases"]
    assert json.loads((tmp_path / "memcheck-step.json").read_text())["finite"]
    for part in ("optimizer", "linear", "e2e"):
        rows = json.loads((tmp_path / f"{part}.json").read_text())["rows"]
        assert rows and all(r["median_ms"] > 0 for r in rows), part
    impls = {r["impl"] for r in json.loads((tmp_path / "optimizer.json").read_text())["rows"]}
    assert impls == {"AltLoRA[triton]", "AltLoRA[torch]", "AltLoRAPlus[triton]", "AltLoRAPlus[torch]", "AdamW(fused)"}


@needs_shell
def test_a_part_that_hangs_is_cut_at_its_time_box_and_the_rest_runs(tmp_path):
    """A hung part (here: the linear benchmark's interpreter sleeps) is killed at its time box,
    reported as timed out, and the check goes on to the next part and the summary."""
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/bash\n[ "$3" = linear ] && exec sleep 300\nexec "{sys.executable}" "$@"\n')
    fake_python.chmod(0o755)
    out = tmp_path / "out"
    env = {**_script_env(), "PYTHON": str(fake_python), "GPU_CHECK_PARTS": "linear,e2e", "GPU_CHECK_BOX_linear": "2"}
    proc = subprocess.run(["bash", str(SCRIPT), "--quick", "--dry-run", str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]  # a timed-out part fails the check
    rows = [line.split("\t") for line in (out / "quick-parts.tsv").read_text().splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("linear", "124"), ("e2e", "0")]
    assert int(rows[0][2]) < 15
    assert "| linear | TIMED OUT after 2 s |" in (out / "summary.md").read_text()


@needs_shell
def test_dry_run_needs_quick_and_unknown_options_are_refused(tmp_path):
    for args in (["--dry-run"], ["--quick", "--fast"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args, str(tmp_path)], env=_script_env(), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "gpu_check.sh:" in proc.stderr, args


def test_the_sweep_reaches_every_launch_configuration(tmp_path):
    """The GPU sweep (not the dry run's subset) runs each phase-update configuration (one per padded
    rank) and, for the fused linear, makes the launchers choose every candidate configuration of
    every kernel, at every rank block, in every dtype."""
    sys.path.insert(0, str(ROOT))
    from altlora_kernels import triton_lora_linear as T
    from altlora_kernels import triton_phase_tables as tables
    from bench import gpu_quick

    ctx = gpu_quick.Context(str(tmp_path), dry_run=False)
    ctx.device = torch.device("cpu")  # enumerate as on a GPU whose shared memory fits every candidate
    cases = gpu_quick.sweep_cases(ctx)
    phase = [c for c in cases if c["kind"] == "phase"]
    linear = [c for c in cases if c["kind"] == "linear"]
    assert {tables.padded_rank(c["rank"]) for c in phase} == set(tables.BLOCK_N_BY_PADDED_RANK)
    assert {(tables.padded_rank(c["rank"]), c["dtype"]) for c in phase} == \
        {(r, d) for r in tables.BLOCK_N_BY_PADDED_RANK for d in gpu_quick.DTYPES.values()}
    for dtype in gpu_quick.DTYPES.values():
        mine = [c for c in linear if c["dtype"] == dtype]
        for kernel in gpu_quick.KERNELS:
            chosen = {repr(T.launch_config(kernel, dtype, shared_memory=c["limit"])) for c in mine}
            every = {repr((c[0], c[1])) for c in T.launch_candidates(kernel, dtype)}
            assert chosen == every, (kernel, dtype)
        blocks = {T._rank_block(c["rank"], dtype) for c in mine}
        assert blocks == {b for b in (16, 32, 64) if b <= T._rank_block(1 << 20, dtype)}
        assert any(c["rank"] > T._rank_block(c["rank"], dtype) for c in mine)  # a rank loop
        assert {c["p"] for c in mine} == {0.0, 0.1}
    # Configurations first: every phase configuration and every linear configuration set are tried
    # before any case that only adds a dtype, so a time-out keeps the coverage.
    firsts = {}
    for i, c in enumerate(cases):
        key = (c["kind"], tables.padded_rank(c["rank"]) if c["kind"] == "phase" else c["limit"])
        firsts.setdefault(key, i)
    later_fp32 = [i for i, c in enumerate(cases) if c["dtype"] != torch.float32]
    assert max(firsts.values()) < min(later_fp32)
