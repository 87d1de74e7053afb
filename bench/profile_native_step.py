"""Where the time of a native AltLoRA / AltLoRA+ step goes on the CPU, stage by stage.

For each case (the CPU cases of ``optimizer_step.py``: 64 × 384×384, mixed MiniLM shapes, Llama
proportions at hidden 1024; r = 8, fp32, ``schedule="alternate"``, ``nonfinite="skip"``) and each
phase (B steps and A steps alternate), one ``optimizer.step()`` through the step plan
(``python/altlora/step_plan.py``: every step after the first) is split into

* ``python``  everything the step does outside the plan's one native call (hyper-parameter checks,
  the schedule, the call itself; the median of step − plan over the steps); measured again alone,
  with a plan that does nothing, once with warm caches and once after a 16 MB pass in its place
  (rows ``python alone``: ``python_us`` warm, ``python_cold_us`` cold);
* ``plan``    the native call (``csrc/step_plan.cpp``), itself split by a second copy of the
  library built with ``-DALTLORA_PROFILE`` (``csrc/stage_clock.h``) into ``survey`` (every
  factor's storage and version, the gradients read and checked, the versions recorded),
  ``nonfinite`` (the read-only NaN/Inf check over every gradient), ``prepare`` (damped Cholesky,
  P, S, K), ``load`` / ``scaled_grad`` / ``carry`` / ``update`` (tile form: fp32 tiles, g̃ = S·∇X,
  K·M + (1−β1)·g̃, the new factor and every write-back), ``column_update`` (column form: the same
  four, fused per column), ``gram`` (Gram and cross-Gram partial sums) and ``finish`` (r×r
  bookkeeping). The clock measures thread-seconds; each stage is shown as its share of the
  production library's measured wall time of the call (the instrumented copy runs slower, shown
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
STAGES = ("survey", "nonfinite", "prepare", "load", "scaled_grad", "carry", "update", "column_update", "gram", "finish")
COLUMNS = ("case", "variant", "phase", "step_us", "python_us", "plan_us") + tuple(
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


class TimedPlan:
    """Stands in for one native step plan: times its step calls (and reads the stage clock)."""

    def __init__(self, plan, library: "TimedLibrary"):
        self.plan = plan
        self.library = library

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def step(self, *args, **kwargs):
        start = time.perf_counter()
        status = self.plan.step(*args, **kwargs)
        self.library.plan_s += time.perf_counter() - start
        for stage, seconds in self.library.module.stage_seconds().items():
            self.library.stages[stage] = self.library.stages.get(stage, 0.0) + seconds
        return status


class TimedLibrary:
    """Stands in for the loaded library: its step plans are timed (``TimedPlan``)."""

    def __init__(self, module):
        self.module = module
        self.plan_s = 0.0
        self.stages: Dict[str, float] = {}

    def __getattr__(self, name):
        return getattr(self.module, name)

    def StepPlan(self, *args, **kwargs):  # noqa: N802 - the extension's class name
        return TimedPlan(self.module.StepPlan(*args, **kwargs), self)

    def take(self):
        self.module.stage_seconds()  # drop what the general steps clocked
        out = (self.plan_s, self.stages)
        self.plan_s = 0.0
        self.stages = {}
        return out


def _optimizer(variant: str, shapes):
    return getattr(altlora, variant)(make_pairs(shapes, RANK, "cpu"), lr=1e-6, weight_decay=0.01, damping=1e-6,
                                     backend="native", nonfinite="skip")


def _run(module, shapes, variant: str, steps: int) -> Dict[str, Dict[str, List]]:
    """Per phase ("B", "A"): lists of step and plan seconds and stage thread-seconds."""
    timed = TimedLibrary(module)
    saved = native._LIBRARY.module
    native._LIBRARY.module = timed  # the step plan the optimizer builds comes from `timed`
    try:
        opt = _optimizer(variant, shapes)
        for _ in range(20):  # warm-up, state initialization, the plan
            opt.step()
        timed.take()
        out = {phase: {"step": [], "plan": [], "stages": []} for phase in ("B", "A")}
        for _ in range(2 * steps):
            phase = opt.active_factor
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            plan_s, stages = timed.take()
            if plan_s == 0.0:
                raise RuntimeError("a step did not go through the step plan; is ALTLORA_STEP_PLAN=0 set?")
            record = out[phase]
            record["step"].append(elapsed)
            record["plan"].append(plan_s)
            record["stages"].append(stages)
        return out
    finally:
        native._LIBRARY.module = saved


class NoOpPlan:
    """A step plan that does no work (``flush``: a 16 MB pass instead, so that the caches are as
    cold afterwards as after a real step)."""

    def __init__(self, buffer, seen):
        self.buffer = buffer
        self._seen = list(seen)
        self.found = torch.zeros(())

    def add_phase(self, **kwargs):
        pass

    def step(self, *args, **kwargs):
        if self.buffer is not None:
            self.buffer.add_(1.0)
        return 0  # STEPPED

    def seen(self):
        return self._seen

    def set_seen(self, seen):
        self._seen = list(seen)


class NoOpLibrary:
    """Stands in for the library with calls that do no work (``flush``: see ``NoOpPlan``)."""

    def __init__(self, module, flush: bool):
        self.module = module
        self.buffer = torch.zeros(4 << 20) if flush else None

    def __getattr__(self, name):
        return getattr(self.module, name)

    def StepPlan(self, tracked, identity, seen, *args, **kwargs):  # noqa: N802 - the extension's class name
        return NoOpPlan(self.buffer, seen)

    def flush(self):
        if self.buffer is not None:
            self.buffer.add_(1.0)


def python_side(module, shapes, variant: str, steps: int) -> Dict[str, float]:
    """Median µs of the step's Python side alone: the step plan does nothing (``warm``), or a
    16 MB pass whose own time is subtracted (``cold``)."""
    out = {}
    for label, flush in (("warm", False), ("cold", True)):
        stand_in = NoOpLibrary(module, flush)
        flush_s = 0.0
        if flush:
            times = []
            for _ in range(50):
                start = time.perf_counter()
                stand_in.flush()
                times.append(time.perf_counter() - start)
            flush_s = statistics.median(times)
        saved = native._LIBRARY.module
        try:
            opt = _optimizer(variant, shapes)
            opt.step()  # the first step is a general one (real work), and builds the plan
            native._LIBRARY.module = stand_in
            opt._plan = None  # rebuilt by the next (general) step from the stand-in
            times = []
            for i in range(20 + 2 * steps):
                start = time.perf_counter()
                opt.step()
                if i >= 20:
                    times.append(time.perf_counter() - start)
            if not isinstance(opt._plan.native._plan, NoOpPlan):
                raise RuntimeError("the optimizer did not step through the stand-in plan")
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
                record = plain[phase]
                step = statistics.median(record["step"])
                plan = statistics.median(record["plan"])
                python = statistics.median(s - p for s, p in zip(record["step"], record["plan"]))
                row = {"case": case, "variant": variant, "phase": phase, "step_us": step * 1e6,
                       "python_us": python * 1e6, "plan_us": plan * 1e6}
                totals = {s: sum(d.get(s, 0.0) for d in split[phase]["stages"]) for s in STAGES}
                clocked = sum(totals.values()) or 1.0
                for s in STAGES:
                    row[f"{s}_us"] = plan * totals[s] / clocked * 1e6
                row["instrumented/production"] = statistics.median(split[phase]["plan"]) / plan
                rows.append(row)
            side = python_side(production, shapes, variant, steps)
            rows.append({"case": case, "variant": variant, "phase": "python alone",
                         "python_us": side["warm"], "python_cold_us": side["cold"]})
    return rows


def markdown(rows: List[Dict], env: Dict[str, str], command: str) -> str:
    lines = [f"# {DESCRIPTION}", "", f"- command: `{command}`"] + [f"- {k}: {v}" for k, v in env.items()] + [
        "", "Median µs per step of each phase (alternate schedule: B and A steps alternate); the stages split the",
        "plan call's wall time by the profiling build's thread-seconds. See bench/profile_native_step.py.", "",
        "| " + " | ".join(PHASE_COLUMNS) + " |", "|" + "---|" * len(PHASE_COLUMNS)]
    for row in rows:
        if row["phase"] == "python alone":
            continue
        cells = [f"{row[c]:.0f}" if c.endswith("_us") else f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
                 for c in PHASE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The step's Python side alone, median µs: the plan's call replaced by one that does nothing",
              "(`warm`), or by a 16 MB pass whose own time is subtracted (`cold`: the caches as a real",
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
