"""Where the time of a native AltLoRA / AltLoRA+ step goes on the CPU, stage by stage.

For each case (the CPU cases of ``optimizer_step.py``: 64 × 384×384, mixed MiniLM shapes, Llama
proportions at hidden 1024; r = 8, fp32, ``schedule="alternate"``, ``nonfinite="skip"``) and each
phase (B steps and A steps alternate), one ``optimizer.step()`` is split into

* ``python``     everything the step does outside the two native calls (bookkeeping, dispatch;
  the median of step − extension − nonfinite over the steps); measured again alone, with both
  calls doing nothing, once with warm caches and once after a 16 MB pass in place of the phase
  (rows ``python alone``: ``python_us`` warm, ``python_cold_us`` cold);
* ``nonfinite``  the read-only NaN/Inf check over every gradient (``csrc/nonfinite.h``);
* ``extension``  the phase update call, itself split by a second copy of the library built with
  ``-DALTLORA_PROFILE`` (``csrc/stage_clock.h``) into ``prepare`` (damped Cholesky, P, S, K),
  ``load`` / ``scaled_grad`` / ``carry`` / ``update`` (tile form: fp32 tiles, g̃ = S·∇X,
  K·M + (1−β1)·g̃, the new factor and every write-back), ``column_update`` (column form: the same
  four, fused per column), ``gram`` (Gram and cross-Gram partial sums) and ``finish`` (r×r
  bookkeeping). The clock measures thread-seconds; each stage is shown as its share of the
  production library's measured wall time (the instrumented copy runs a few percent slower, shown
  as ``instrumented/production``).

Medians over ``--steps`` steps of each phase. Run on a quiet machine:
``python bench/profile_native_step.py [--threads 2] [--steps 400] [--output FILE.md]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import altlora  # noqa: E402
from altlora_kernels import native_phase_update as native  # noqa: E402
from bench.common import environment, print_table  # noqa: E402
from bench.optimizer_step import LLAMA_LIKE_1024_BLOCK, MINILM_BLOCK, make_pairs  # noqa: E402

DESCRIPTION = __doc__.strip().splitlines()[0]
CASES = {
    "64 × 384×384": [(384, 384)] * 64,
    "mixed MiniLM 6 blocks": MINILM_BLOCK * 6,
    "Llama-like h1024 16×qkvo": LLAMA_LIKE_1024_BLOCK * 16,
}
QUICK_CASES = {"16 × 96×96": [(96, 96)] * 16, "mixed 2 blocks/4": [(96, 96)] * 4 + [(96, 384), (384, 96)]}
RANK = 8
STAGES = ("prepare", "load", "scaled_grad", "carry", "update", "column_update", "gram", "finish")
COLUMNS = ("case", "variant", "phase", "step_us", "python_us", "nonfinite_us", "extension_us") + tuple(
    f"{s}_us" for s in STAGES) + ("instrumented/production", "python_cold_us")
PHASE_COLUMNS = COLUMNS[:-1]  # the markdown's per-phase table; "python alone" rows get their own


def profiling_library():
    """A copy of the native library built with -DALTLORA_PROFILE (its own cache folder)."""
    from torch.utils import cpp_extension

    cflags, ldflags = native._compile_flags()
    name = native._module_name().replace(native.MODULE_PREFIX, native.MODULE_PREFIX + "_profile")
    directory = native.build_directory().parent / name
    directory.mkdir(parents=True, exist_ok=True)
    print(f"building the profiling copy of the native library into {directory} (once)", file=sys.stderr, flush=True)
    with native._ninja_on_path():
        return cpp_extension.load(name=name, sources=[str(native.SOURCE_DIR / s) for s in native.SOURCES],
                                  extra_cflags=cflags + ["-DALTLORA_PROFILE"], extra_ldflags=ldflags,
                                  build_directory=str(directory), verbose=False)


class TimedLibrary:
    """Stands in for the loaded library: times its two calls (and reads the stage clock)."""

    def __init__(self, module):
        self.module = module
        self.phase_s = self.check_s = 0.0
        self.stages: Dict[str, float] = {}

    def __getattr__(self, name):
        return getattr(self.module, name)

    def phase_update(self, **kw):
        start = time.perf_counter()
        self.module.phase_update(**kw)
        self.phase_s += time.perf_counter() - start
        for stage, seconds in self.module.stage_seconds().items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def nonfinite_flag(self, tensors, found):
        start = time.perf_counter()
        applied = self.module.nonfinite_flag(tensors, found)
        self.check_s += time.perf_counter() - start
        return applied

    def take(self):
        out = (self.phase_s, self.check_s, self.stages)
        self.phase_s = self.check_s = 0.0
        self.stages = {}
        return out


def _run(module, shapes, variant: str, steps: int) -> Dict[str, Dict[str, List]]:
    """Per phase ("B", "A"): lists of step, extension and check seconds and stage thread-seconds."""
    timed = TimedLibrary(module)
    saved = native._LIBRARY.module
    native._LIBRARY.module = timed  # both native calls of the step now go through `timed`
    try:
        opt = getattr(altlora, variant)(make_pairs(shapes, RANK, "cpu"), lr=1e-6, weight_decay=0.01, damping=1e-6,
                                        backend="native", nonfinite="skip")
        for _ in range(20):  # warm-up, state initialization
            opt.step()
        timed.take()
        out = {phase: {"step": [], "extension": [], "check": [], "stages": []} for phase in ("B", "A")}
        for _ in range(2 * steps):
            phase = opt.active_factor
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            phase_s, check_s, stages = timed.take()
            record = out[phase]
            record["step"].append(elapsed)
            record["extension"].append(phase_s)
            record["check"].append(check_s)
            record["stages"].append(stages)
        return out
    finally:
        native._LIBRARY.module = saved


class NoOpLibrary:
    """Stands in for the library with calls that do no work (``flush``: a 16 MB pass instead of
    the phase, so that the caches are as cold afterwards as after a real phase)."""

    def __init__(self, module, flush: bool):
        self.module = module
        self.buffer = torch.zeros(4 << 20) if flush else None

    def __getattr__(self, name):
        return getattr(self.module, name)

    def phase_update(self, **kw):
        if self.buffer is not None:
            self.buffer.add_(1.0)

    def nonfinite_flag(self, tensors, found):
        found.zero_()
        return True


def python_side(module, shapes, variant: str, steps: int) -> Dict[str, float]:
    """Median µs of the step's Python side alone: both native calls do nothing (``warm``), or
    the phase is a 16 MB pass whose own time is subtracted (``cold``)."""
    out = {}
    for label, flush in (("warm", False), ("cold", True)):
        stand_in = NoOpLibrary(module, flush)
        flush_s = 0.0
        if flush:
            times = []
            for _ in range(50):
                start = time.perf_counter()
                stand_in.phase_update()
                times.append(time.perf_counter() - start)
            flush_s = statistics.median(times)
        saved = native._LIBRARY.module
        native._LIBRARY.module = stand_in
        try:
            opt = getattr(altlora, variant)(make_pairs(shapes, RANK, "cpu"), lr=1e-6, weight_decay=0.01, damping=1e-6,
                                            backend="native", nonfinite="skip")
            times = []
            for i in range(20 + 2 * steps):
                start = time.perf_counter()
                opt.step()
                if i >= 20:
                    times.append(time.perf_counter() - start)
        finally:
            native._LIBRARY.module = saved
        out[label] = (statistics.median(times) - flush_s) * 1e6
    return out


def run(steps: int, quick: bool = False) -> List[Dict]:
    production = native.load_extension(build=True)
    instrumented = profiling_library()
    rows = []
    for case, shapes in (QUICK_CASES if quick else CASES).items():
        for variant in ("AltLoRA", "AltLoRAPlus"):
            plain = _run(production, shapes, variant, steps)
            split = _run(instrumented, shapes, variant, steps)
            for phase in ("B", "A"):
                step = statistics.median(plain[phase]["step"])
                extension = statistics.median(plain[phase]["extension"])
                check = statistics.median(plain[phase]["check"])
                record = plain[phase]
                python = statistics.median(s - e - c for s, e, c in zip(record["step"], record["extension"], record["check"]))
                row = {"case": case, "variant": variant, "phase": phase, "step_us": step * 1e6,
                       "python_us": python * 1e6, "nonfinite_us": check * 1e6, "extension_us": extension * 1e6}
                totals = {s: sum(d.get(s, 0.0) for d in split[phase]["stages"]) for s in STAGES}
                clocked = sum(totals.values()) or 1.0
                for s in STAGES:
                    row[f"{s}_us"] = extension * totals[s] / clocked * 1e6
                row["instrumented/production"] = statistics.median(split[phase]["extension"]) / extension
                rows.append(row)
            side = python_side(production, shapes, variant, steps)
            rows.append({"case": case, "variant": variant, "phase": "python alone",
                         "python_us": side["warm"], "python_cold_us": side["cold"]})
    return rows


def markdown(rows: List[Dict], env: Dict[str, str], command: str) -> str:
    lines = [f"# {DESCRIPTION}", "", f"- command: `{command}`"] + [f"- {k}: {v}" for k, v in env.items()] + [
        "", "Median µs per step of each phase (alternate schedule: B and A steps alternate); the stages split the",
        "extension's wall time by the profiling build's thread-seconds. See bench/profile_native_step.py.", "",
        "| " + " | ".join(PHASE_COLUMNS) + " |", "|" + "---|" * len(PHASE_COLUMNS)]
    for row in rows:
        if row["phase"] == "python alone":
            continue
        cells = [f"{row[c]:.0f}" if c.endswith("_us") else f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
                 for c in PHASE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The step's Python side alone, median µs: both native calls replaced by calls that do nothing",
              "(`warm`), or the phase by a 16 MB pass whose own time is subtracted (`cold`: the caches as a real",
              "phase, or a forward and backward, leave them).", "",
              "| case | variant | warm | cold |", "|---|---|---|---|"]
    for row in rows:
        if row["phase"] == "python alone":
            lines.append(f"| {row['case']} | {row['variant']} | {row['python_us']:.0f} | {row['python_cold_us']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="steps of each phase timed per case and variant")
    parser.add_argument("--output", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--quick", action="store_true", help="tiny cases (a check that the script runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    env["threads"] = str(args.threads)
    env["load_avg"] = f"{os.getloadavg()[0]:.2f}"
    rows = run(args.steps, args.quick)
    print_table(rows, COLUMNS, title=DESCRIPTION)
    if args.output:
        command = "python bench/profile_native_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.output, "w") as fh:
            fh.write(markdown(rows, env, command.strip()))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
