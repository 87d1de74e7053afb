"""The ``altlora`` command: ``altlora finetune`` and ``altlora experiment ablation``.

Errors a user can hit (a package missing, an unknown optimizer, a bad value) answer with one line
on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

__all__ = ["main"]

# The default protocol is the AltLoRA paper's (cosine lr, 3% linear warm-up, a full epoch), the one
# the default learning rates were chosen under on the dev split (experiments/README.md); with
# length-grouped batches one epoch is 338 steps of about 0.44 s on one core.
DEFAULT_EPOCHS = 1.0
DEFAULT_LR_SCHEDULE = "cosine"
DEFAULT_WARMUP_RATIO = 0.03
DEFAULT_BATCHING = "by-length"
# AltLoRA+ with `sequential` beat `alternate` on each of 3 dev seeds (0.807/0.809/0.805 vs
# 0.801/0.804/0.800, experiments/results/study/results.md); the library's own default stays the
# paper's `alternate` (see the README's quality section).
DEFAULT_SCHEDULE = "sequential"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def _lr_overrides(items: Optional[Sequence[str]]):
    from .finetune.errors import CLIError
    from .finetune.optimizers import OPTIMIZERS

    out = {}
    for item in items or ():
        for part in item.split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise CLIError(f"--lr expects NAME=VALUE (e.g. altlora=0.03), got {part!r}")
            if name not in OPTIMIZERS:
                raise CLIError(f"--lr: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
            try:
                out[name] = _positive_float(value)
            except argparse.ArgumentTypeError as err:
                raise CLIError(f"--lr {name}: {err}") from None
    return out


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    from .finetune.data import BATCHING
    from .finetune.lr_schedule import LR_SCHEDULES

    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None, help="training steps per run, instead of --epochs")
    length.add_argument("--epochs", type=_positive_float, default=None,
                        help=f"passes over the training split (may be fractional; default {DEFAULT_EPOCHS:g}: 338 steps)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=DEFAULT_LR_SCHEDULE,
                   help=f"learning-rate schedule, the same for every optimizer (default {DEFAULT_LR_SCHEDULE}, as in the AltLoRA paper)")
    p.add_argument("--warmup-ratio", type=_ratio, default=DEFAULT_WARMUP_RATIO,
                   help=f"fraction of the steps with a linear lr warm-up (default {DEFAULT_WARMUP_RATIO:g}, as in the paper)")
    p.add_argument("--eval-split", choices=("validation", "dev"), default="validation",
                   help="held-out split to evaluate on: 'dev' to choose settings, 'validation' to report them (default validation)")
    p.add_argument("--batching", choices=BATCHING, default=DEFAULT_BATCHING,
                   help="'by-length' groups snippets of similar length into each (random) batch: about half the padded "
                        f"tokens; 'random' pads each random batch to its longest row (default {DEFAULT_BATCHING})")
    p.add_argument("--damping", type=_positive_float, default=None, help="AltLoRA/AltLoRA+ damping λ (default: the optimizer's)")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=_positive_float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="training batch size (default 32)")
    p.add_argument("--max-length", type=_positive_int, default=64, help="tokens per snippet (default 64)")
    p.add_argument("--eval-every", type=_positive_int, default=50, help="steps between evaluations (default 50)")
    p.add_argument("--train-limit", type=_positive_int, default=None, help="use only the first N training snippets")
    p.add_argument("--val-limit", type=_positive_int, default=None, help="use only the first N snippets of the evaluated split")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: the idle cores when each run starts, i.e. CPUs minus the load "
                        "average, at least 1: on a busy machine more threads than idle cores make each step several "
                        "times slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .finetune.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS
    from .schedule import ORDERS, SCHEDULES

    parser = _Parser(prog="altlora", description="AltLoRA / AltLoRA+ for LoRA adapters: fine-tuning runs and experiments.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{finetune,experiment}")
    sub.required = True

    ft = sub.add_parser("finetune", help="fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes with several optimizers",
                        description="LoRA fine-tune of the packaged all-MiniLM-L6-v2 on Rotten Tomatoes sentiment, "
                                    "offline, one run per optimizer and seed, same data order for all. Writes a table, "
                                    "JSON/CSV and a PNG of the curves.")
    _add_common(ft)
    ft.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                    help=f"comma-separated, from: {', '.join(OPTIMIZERS)} (default {','.join(DEFAULT_OPTIMIZERS)})")
    ft.add_argument("--lr", action="append", metavar="NAME=VALUE",
                    help="learning rate of one optimizer, e.g. --lr altlora=0.05 (repeatable or comma-separated); "
                         "defaults: " + ", ".join(f"{k}={v.default_lr:g}" for k, v in OPTIMIZERS.items()))
    ft.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    ft.add_argument("--schedule", choices=SCHEDULES, default=DEFAULT_SCHEDULE,
                    help=f"AltLoRA/AltLoRA+ schedule (default {DEFAULT_SCHEDULE}: ahead of 'alternate' on all 3 dev seeds, "
                         "experiments/results/study/)")
    ft.add_argument("--order", choices=ORDERS, default="BA", help="AltLoRA/AltLoRA+ factor order (default BA)")
    ft.add_argument("--output", default="runs/finetune", help="directory for results (default runs/finetune)")

    ex = sub.add_parser("experiment", help="experiments from the paper on this task")
    exsub = ex.add_subparsers(dest="experiment", parser_class=_Parser, metavar="{ablation}")
    exsub.required = True
    ab = exsub.add_parser("ablation", help="Table 5: schedule × order for AltLoRA and AltLoRA+, mean ± std over seeds",
                          description="The AltLoRA paper's Table 5 on this task: update schedule and factor order for "
                                      "AltLoRA and AltLoRA+, several seeds.")
    _add_common(ab)
    ab.add_argument("--lr", action="append", metavar="NAME=VALUE", help="altlora / altloraplus learning rates")
    ab.add_argument("--variants", default="altlora,altloraplus",
                    help="comma-separated, from: altlora, altloraplus (default both)")
    ab.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    ab.add_argument("--output", default="runs/ablation", help="directory for results (default runs/ablation)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    from .finetune.errors import CLIError

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecation chatter

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .finetune import commands

        if args.command == "finetune":
            return commands.finetune(args, _lr_overrides(args.lr))
        return commands.ablation(args, _lr_overrides(args.lr))
    except CLIError as err:
        print(f"altlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"altlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
