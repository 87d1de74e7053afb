"""The learning-rate sweep behind ``altlora finetune``'s default learning rates.

One seed (0), the default settings of ``altlora finetune`` (MiniLM, LoRA r 8 / α 16 on
query/key/value/dense, batch 32, 64 tokens, the default number of steps), a grid of learning rates
per optimizer, and for AltLoRA also the damping λ (both matter here: see experiments/results/lr_sweep.md). Writes
``experiments/results/lr_sweep.json`` and ``lr_sweep.md``; the best validation accuracy per
optimizer is the default in ``python/altlora/finetune/optimizers.py``.

The full grid was run at 200 steps. ``altlora finetune`` then moved to 100 steps by default (200
took about 15 minutes for the four optimizers on 2 cores, over the 10-minute budget), and the
sweep was repeated at 100 steps on ``NEAR_BEST``: each optimizer's best lr at 200 steps and its
neighbours on the grid (``--grid near-best``). Both sets of runs are kept in the results.

Run: ``.venv/bin/python experiments/lr_sweep.py [--steps N] [--grid full|near-best] [--only NAME,...]``
(about an hour on 2 CPU cores for the full grid at 200 steps). Finished runs are kept, so an
interrupted sweep resumes.
"""

import argparse
import json
import os
import sys
import time
import warnings

import torch

DEFAULT_STEPS = 100  # the length the old defaults were swept at

from altlora.finetune.data import TokenizedSet, load_snippets, split_by_movie
from altlora.finetune.model import load_tokenizer
from altlora.finetune.train import RunConfig, train_run

GRID = {
    "adamw": [dict(lr=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3)],
    "loraplus": [dict(lr=lr) for lr in (3e-5, 1e-4, 3e-4, 1e-3)],
    "altloraplus": [dict(lr=lr) for lr in (3e-4, 1e-3, 3e-3)],
    # The first 3×3 grid had its best accuracy at its largest lr for damping ≥ 1e-4, so it was
    # extended to larger lrs there.
    "altlora": [dict(lr=lr, damping=d) for d in (1e-6, 1e-4, 1e-2) for lr in (1e-2, 3e-2, 1e-1)]
    + [dict(lr=lr, damping=d) for d in (1e-4, 1e-2) for lr in (3e-1, 1.0)],
    "sgd": [dict(lr=lr) for lr in (0.1, 0.3, 1.0, 3.0)],
}
# The best of each optimizer at 200 steps and its neighbours; shorter runs tend to favour larger lrs.
NEAR_BEST = {
    "adamw": [dict(lr=lr) for lr in (3e-4, 1e-3, 3e-3)],
    "loraplus": [dict(lr=lr) for lr in (3e-5, 1e-4, 3e-4)],
    "altloraplus": [dict(lr=lr) for lr in (3e-4, 1e-3, 3e-3)],
    "altlora": [dict(lr=lr, damping=1e-6) for lr in (3e-2, 1e-1)] + [dict(lr=0.3, damping=1e-2)],
    "sgd": [dict(lr=lr) for lr in (0.3, 1.0)],
}
GRIDS = {"full": GRID, "near-best": NEAR_BEST}
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "lr_sweep.json")


def key(name, setting):
    return name + "".join(f" {k}={v:g}" for k, v in sorted(setting.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--grid", choices=list(GRIDS), default="full")
    parser.add_argument("--only", default=",".join(GRID))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    grid = GRIDS[args.grid]
    done = {}  # (key, steps) -> run, for every step count swept so far
    if os.path.exists(OUT):
        with open(OUT) as fh:
            done = {(r["key"], r["steps"]): r for r in json.load(fh)["runs"]}
    tokenizer = load_tokenizer()
    train, val = split_by_movie(load_snippets())
    train, val = TokenizedSet(train, tokenizer, 64), TokenizedSet(val, tokenizer, 64)
    for name in args.only.split(","):
        for setting in grid.get(name, []):
            k = key(name, setting)
            if (k, args.steps) in done:
                continue
            start = time.time()
            r = train_run(RunConfig(optimizer=name, seed=0, steps=args.steps, **setting), train, val)
            done[k, args.steps] = run = {"key": k, "optimizer": name, **setting, "steps": args.steps,
                       "val_accuracy": None if r.diverged_at else r.final_accuracy,
                       "final_loss": r.final_loss, "diverged_at": r.diverged_at, "evals": r.evals,
                       "seconds": round(time.time() - start, 1)}
            print(f"{k} ({args.steps} steps): acc {run['val_accuracy']}, loss {r.final_loss:.4f}, "
                  f"diverged {r.diverged_at}, {run['seconds']} s", flush=True)
            write(done)


def write(done):
    runs = sorted(done.values(), key=lambda r: (-r["steps"], r["optimizer"], r.get("damping") or 0, r["lr"]))
    with open(OUT, "w") as fh:
        json.dump({"seed": 0, "torch": torch.__version__, "runs": runs}, fh, indent=1)
    lines = ["# Learning-rate sweep (seed 0, validation accuracy)", ""]
    for steps in sorted({r["steps"] for r in runs}, reverse=True):
        lines += [f"## {steps} steps", "", "| optimizer | lr | damping | val. accuracy | final train loss |",
                  "|---|---|---|---|---|"]
        best = {}
        for r in (r for r in runs if r["steps"] == steps):
            acc = "diverged" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
            lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r.get('damping', '')} | {acc} | {r['final_loss']:.4f} |")
            if r["val_accuracy"] is not None and r["val_accuracy"] > best.get(r["optimizer"], (-1,))[0]:
                best[r["optimizer"]] = (r["val_accuracy"], r["key"])
        lines += ["", "Best per optimizer: " + "; ".join(f"{v[1]} ({v[0]:.4f})" for v in best.values()), ""]
    with open(OUT.replace(".json", ".md"), "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
