"""Tables, JSON/CSV and the PNG of curves for a set of fine-tuning runs."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections import OrderedDict
from typing import Dict, List, Sequence

from .errors import CLIError
from .train import RunResult

__all__ = ["summarize", "format_table", "write_outputs", "plot_curves", "mean_std", "check_writable"]

SPLIT_NAMES = {"validation": "val. accuracy", "dev": "dev accuracy"}


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(results: Sequence[RunResult]) -> "OrderedDict[str, List[RunResult]]":
    groups: "OrderedDict[str, List[RunResult]]" = OrderedDict()
    for r in results:
        groups.setdefault(label_of(r), []).append(r)
    return groups


def label_of(r: RunResult) -> str:
    c = r.config
    label = f"{c.optimizer} lr={c.lr:g}"
    if c.optimizer in ("altlora", "altloraplus"):  # the schedule changes the result: always say which
        label += f" {c.schedule}/{c.order}"
    return label


def format_table(results: Sequence[RunResult], split: str = "validation") -> str:
    """Markdown table: one row per (optimizer, lr, schedule), mean ± std over seeds."""
    header = f"| optimizer | seeds | {SPLIT_NAMES.get(split, split)} | final train loss | s/step | optimizer state |"
    lines = [header, "|---|---|---|---|---|---|"]
    for label, runs in summarize(results).items():
        ok = [r for r in runs if r.diverged_at is None]
        diverged = [r for r in runs if r.diverged_at is not None]
        acc = mean_std([r.final_accuracy for r in ok]) if ok else "—"
        loss = mean_std([r.final_loss for r in ok]) if ok else "—"
        if diverged:
            acc += f" ({len(diverged)} diverged at step {', '.join(str(r.diverged_at) for r in diverged)})"
        sps = statistics.mean(r.seconds_per_step for r in runs)
        state = max(r.state_bytes for r in runs)
        lines.append(f"| {label} | {len(runs)} | {acc} | {loss} | {sps:.3f} | {state / 2**20:.2f} MiB |")
    return "\n".join(lines)


def check_writable(out_dir: str) -> None:
    """Create ``out_dir`` and prove a file can be written there, before any training."""
    probe = os.path.join(out_dir, ".altlora-write-check")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as err:
        raise CLIError(f"cannot write results to {out_dir}: {err.strerror or err}") from None


def _replace(path: str, write) -> None:
    """Write through a temporary file and rename it over ``path``: an interruption mid-write leaves
    the previous complete file, never a truncated one."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_outputs(results: Sequence[RunResult], out_dir: str, meta: Dict) -> Dict[str, str]:
    split = meta.get("evaluated_on", "validation")
    try:
        os.makedirs(out_dir, exist_ok=True)
        paths = {k: os.path.join(out_dir, f) for k, f in
                 (("json", "results.json"), ("csv", "results.csv"), ("table", "results.md"), ("png", "curves.png"))}

        def write_json(path):
            with open(path, "w") as fh:
                json.dump({"meta": meta, "runs": [r.to_dict() for r in results]}, fh, indent=1)

        def write_csv(path):
            with open(path, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["optimizer", "lr", "seed", "schedule", "order", "damping", "lr_schedule", "warmup_ratio",
                            "steps", "evaluated_on", "accuracy", "final_train_loss", "seconds_per_step", "state_bytes",
                            "diverged_at"])
                for r in results:
                    c = r.config
                    w.writerow([c.optimizer, c.lr, c.seed, c.schedule, c.order, "" if c.damping is None else c.damping,
                                c.lr_schedule, c.warmup_ratio, c.steps, c.eval_split,
                                "" if r.diverged_at else f"{r.final_accuracy:.4f}", f"{r.final_loss:.4f}",
                                f"{r.seconds_per_step:.4f}", r.state_bytes, r.diverged_at or ""])

        def write_table(path):
            with open(path, "w") as fh:
                fh.write(f"{meta.get('title', 'altlora finetune')}\n\n{format_table(results, split)}\n\n")
                fh.write("".join(f"- {k}: {v}\n" for k, v in meta.items() if k != "title"))

        _replace(paths["json"], write_json)
        _replace(paths["csv"], write_csv)
        _replace(paths["table"], write_table)
        _replace(paths["png"], lambda path: plot_curves(results, path, split, meta.get("majority_class")))
    except OSError as err:
        raise CLIError(f"cannot write results to {out_dir}: {err.strerror or err}") from None
    return paths


def _smooth(values: Sequence[float], weight: float = 0.9) -> List[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def _band(ax, x, series, label, smooth=False):
    """Mean over seeds as a line, mean ± std as a shaded band (no band for one seed)."""
    means = [statistics.mean(v) for v in series]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in series]
    if smooth:
        means, stds = _smooth(means), _smooth(stds)
    line, = ax.plot(x, means, label=label, marker=None if smooth else "o", markersize=3)
    if any(stds):
        ax.fill_between(x, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def plot_curves(results: Sequence[RunResult], path: str, split: str = "validation", majority=None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("matplotlib is not installed (needed for the PNG of curves): run ./setup.sh, or pip install matplotlib") from None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in summarize(results).items():
        seeds = len(runs)
        label = f"{label} ({seeds} seeds)" if seeds > 1 else label
        n = min(len(r.losses) for r in runs)
        if n:
            _band(ax_loss, range(1, n + 1), [[r.losses[i] for r in runs] for i in range(n)], label, smooth=True)
        steps = sorted({s for r in runs for s, _ in r.evals})
        acc = [[a for r in runs for s, a in r.evals if s == step] for step in steps]
        _band(ax_acc, steps, acc, label)
    if majority is not None:
        ax_acc.axhline(majority, color="gray", linestyle="--", linewidth=1, label=f"majority class ({majority:.3f})")
    name = SPLIT_NAMES.get(split, split)
    ax_loss.set(xlabel="step", ylabel="training loss (EMA 0.9; mean ± std over seeds)", title="Training loss")
    ax_acc.set(xlabel="step", ylabel=f"{name} (mean ± std over seeds)", title=name[0].upper() + name[1:])
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
