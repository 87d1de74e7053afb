"""The CPU benchmark and profile scripts run (tiny sizes) and report what they claim to."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from altlora_kernels import native_phase_update as native

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)])}

needs_native = pytest.mark.skipif(native._toolchain_problem() is not None, reason="no C++ toolchain for the native backend")


@needs_native
def test_profile_script_splits_a_step_into_stages_that_add_up(tmp_path):
    out = tmp_path / "profile.md"
    result = subprocess.run([sys.executable, "bench/profile_native_step.py", "--quick", "--steps", "10", "--threads", "1",
                             "--output", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    tables, current = [], []
    for line in out.read_text().splitlines() + [""]:
        if line.startswith("| ") and "---" not in line:
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif not line.strip() and current:
            tables.append(current)
            current = []
    (header, *cells), (side_header, *side_cells) = tables
    rows = [dict(zip(header, line)) for line in cells]
    # The Python side alone, warm and cold, per case and variant.
    assert side_header == ["case", "variant", "warm", "cold"] and len(side_cells) == 4
    assert all(float(warm) > 0 and float(cold) > 0 for *_, warm, cold in side_cells)
    assert {(r["variant"], r["phase"]) for r in rows} == {(v, p) for v in ("AltLoRA", "AltLoRAPlus") for p in ("A", "B")}
    stages = ("survey", "nonfinite", "prepare", "load", "scaled_grad", "carry", "update", "column_update", "gram",
              "finish")
    for row in rows:
        split = sum(float(row[f"{s}_us"]) for s in stages)
        # Each cell is rounded to whole µs: the sum of the rounded stages and the rounded total may
        # differ by up to 0.5 per stage plus 0.5.
        assert abs(split - float(row["plan_us"])) <= 0.5 * len(stages) + 0.5 + 0.01 * float(row["plan_us"]), row
        # B (stored (k, r), r = 8) takes the column form, A the tile form: the other form's stages
        # are never clocked, so they are exactly zero.
        if row["phase"] == "B":
            assert all(float(row[f"{s}_us"]) == 0 for s in ("load", "scaled_grad", "carry", "update")), row
        else:
            assert float(row["column_update_us"]) == 0, row
    # The plan's own stages are clocked (a tiny case may round one cell to 0 µs, not all of them).
    assert any(float(row["survey_us"]) > 0 for row in rows) and any(float(row["nonfinite_us"]) > 0 for row in rows)


def test_native_step_byte_floor_counts_what_each_step_moves():
    sys.path.insert(0, str(ROOT))
    from bench.native_step import floor_bytes

    shapes = [(10, 6), (4, 4)]  # (d, k): A is 8×d, B is k×8
    a, b = 8 * 14, 8 * 10
    assert floor_bytes("AdamW(foreach) step", shapes) == 7 * 4 * (a + b)
    assert floor_bytes("B phase only (native)", shapes) == 5 * 4 * b
    assert floor_bytes("AltLoRA alternate step (native)", shapes) == 5 * 4 * (a + b) / 2
    assert floor_bytes("AltLoRAPlus sequential step (torch)", shapes) == 7 * 4 * (a + b)
