"""``python -m bench``: run the benchmarks, print their tables, save JSON/CSV/Markdown.

    python -m bench                      # every benchmark, on CUDA if present else CPU
    python -m bench --quick              # small sizes (CPU smoke)
    python -m bench --only optimizer_step,end_to_end --device cpu

Results go to ``bench/results/<device>-<date>.{json,csv,md}`` and ``bench/results/latest-<device>.md``
with the device, versions, date and the exact command.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
import time
import traceback

import torch

from .common import environment, print_table

# In the order they run; a module that is missing in this build is skipped with a note.
BENCHMARKS = ("optimizer_step", "native_step", "lora_linear", "end_to_end", "freeze_inactive", "mgpo_cost")
HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="altlora benchmarks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [b for b in (args.only.split(",") if args.only else BENCHMARKS) if b]
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    env = environment(args.device)
    env["command"] = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    sections, all_rows, notes = [], [], []
    for name in chosen:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"bench.{name}":
                notes.append(f"{name}: not in this build")
                continue
            raise
        print(f"\n== {name} ==", flush=True)
        start = time.time()
        try:
            rows = module.run(args.device, args.quick)
        except Exception as err:  # one broken benchmark must not lose the others' numbers
            traceback.print_exc()
            notes.append(f"{name}: failed ({type(err).__name__}: {err})")
            continue
        for row in rows:
            row.setdefault("benchmark", name)
        table = print_table(rows)
        sections.append((name, getattr(module, "DESCRIPTION", (module.__doc__ or "").strip().splitlines()[0]), table))
        notes.append(f"{name}: {len(rows)} rows in {time.time() - start:.0f} s")
        all_rows += rows
    _save(args, env, sections, all_rows, notes)
    return 0


def _save(args, env, sections, rows, notes) -> None:
    os.makedirs(args.output, exist_ok=True)
    tag = "cuda-" + env["device"].replace(" ", "_") if args.device.startswith("cuda") else "cpu"
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    base = os.path.join(args.output, f"{tag}-{stamp}{'-quick' if args.quick else ''}")
    with open(base + ".json", "w") as fh:
        json.dump({"environment": env, "notes": notes, "rows": rows}, fh, indent=1, default=str)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(base + ".csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    md = [f"# altlora benchmarks — {env['device']}", ""]
    md += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in env.items()]
    md += [""] + [f"- {n}" for n in notes] + [""]
    for name, description, table in sections:
        md += [f"## {name}", "", description, "", "```", table, "```", ""]
    text = "\n".join(md)
    with open(base + ".md", "w") as fh:
        fh.write(text)
    if not args.quick:
        with open(os.path.join(args.output, f"latest-{'cuda' if args.device.startswith('cuda') else 'cpu'}.md"), "w") as fh:
            fh.write(text)
    print(f"\nwrote {base}.json, .csv and .md", flush=True)


if __name__ == "__main__":
    sys.exit(main())
