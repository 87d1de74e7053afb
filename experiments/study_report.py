"""Tables and plots of ``study.py``'s runs (called by ``study.py report``)."""

import os
import statistics

from altlora.finetune.report import mean_std, plot_curves

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "study")


def _setting_label(s):
    d = "" if s.get("damping") is None else f", λ {s['damping']:g}"
    b = "" if s.get("beta2") is None else f", β2 {s['beta2']:g}"
    return f"lr {s['lr']:g}{d}{b}"


def sweep_table(store, arms, key):
    lines = ["| arm | setting | dev accuracy (end of epoch) | best dev accuracy during the epoch | final train loss |",
             "|---|---|---|---|---|"]
    for arm, grid in arms.items():
        for s in grid:
            d = store["runs"].get(key(s, "dev", 0))
            if d is None:
                continue
            if d["diverged_at"]:
                lines.append(f"| {arm} | {_setting_label(s)} | diverged at step {d['diverged_at']} | | |")
                continue
            best = max(a for _, a in d["evals"])
            lines.append(f"| {arm} | {_setting_label(s)} | {d['final_accuracy']:.4f} | {best:.4f} | {d['final_loss']:.4f} |")
    return "\n".join(lines)


def final_table(store, arms, best_setting, key, seeds):
    lines = ["| arm | chosen on dev | validation accuracy, mean ± std | per seed | final train loss |", "|---|---|---|---|---|"]
    per_arm = {}
    for arm in arms:
        s = best_setting(store, arm)
        if s is None:
            continue
        runs = [store["runs"].get(key(s, "validation", seed)) for seed in seeds]
        if not all(runs):
            continue
        accs = [r["final_accuracy"] if not r["diverged_at"] else float("nan") for r in runs]
        per_arm[arm] = (s, runs, accs)
        lines.append(f"| {arm} | {_setting_label(s)} | {mean_std(accs)} | {', '.join(f'{a:.4f}' for a in accs)} | "
                     f"{mean_std([r['final_loss'] for r in runs])} |")
    return "\n".join(lines), per_arm


def dev_seeds_table(store, arms, best_setting, key, seeds):
    """The chosen settings over all seeds on dev: the evidence a default change needs."""
    lines = ["| arm | setting | dev accuracy, mean ± std | per seed |", "|---|---|---|---|"]
    for arm in arms:
        s = best_setting(store, arm)
        runs = [store["runs"].get(key(s, "dev", seed)) for seed in seeds] if s else []
        if runs and all(runs):
            accs = [r["final_accuracy"] if not r["diverged_at"] else float("nan") for r in runs]
            lines.append(f"| {arm} | {_setting_label(s)} | {mean_std(accs)} | {', '.join(f'{a:.4f}' for a in accs)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def extra_table(store):
    lines = ["| run | dev accuracy | final train loss |", "|---|---|---|"]
    for k, d in store["runs"].items():
        if "epochs=" in k:
            acc = f"diverged at {d['diverged_at']}" if d["diverged_at"] else f"{d['final_accuracy']:.4f}"
            lines.append(f"| {k} | {acc} | {d['final_loss']:.4f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def paired_table(per_arm, seeds, baseline="adamw"):
    if baseline not in per_arm:
        return ""
    base = per_arm[baseline][2]
    lines = [f"| arm − {baseline} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean difference | wins |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for arm, (_, _, accs) in per_arm.items():
        if arm == baseline:
            continue
        diffs = [a - b for a, b in zip(accs, base)]
        wins = sum(d > 0 for d in diffs)
        lines.append(f"| {arm} | " + " | ".join(f"{d:+.4f}" for d in diffs) +
                     f" | {statistics.mean(diffs):+.4f} | {wins} of {len(diffs)} |")
    return "\n".join(lines)


def write(store, arms, best_setting, key, result_from, seeds=(0, 1, 2)):
    os.makedirs(OUT, exist_ok=True)
    meta = store.get("meta", {})
    sweep = sweep_table(store, arms, key)
    final, per_arm = final_table(store, arms, best_setting, key, seeds)
    paired = paired_table(per_arm, seeds)
    with open(os.path.join(OUT, "results.md"), "w") as fh:
        fh.write("# Quality study: one epoch, cosine lr with 3% warm-up, settings chosen on dev\n\n")
        fh.write("".join(f"- {k}: {v}\n" for k, v in meta.items()))
        fh.write("\n## Dev sweep (seed 0; used to choose)\n\n"
                 "Command: `.venv/bin/python experiments/study.py sweep --only ARMS`\n\n" + sweep + "\n")
        fh.write("\n## Validation, 3 seeds at each arm's best dev setting (reported once)\n\n"
                 "Command: `.venv/bin/python experiments/study.py final --only ARMS`\n\n" + final + "\n")
        if paired:
            fh.write("\n## Paired per seed against AdamW (same seed: same model init, head and batches)\n\n" + paired + "\n")
        dev3 = dev_seeds_table(store, arms, best_setting, key, seeds)
        if dev3:
            fh.write("\n## Dev, 3 seeds at the chosen settings (what a change of default rests on)\n\n"
                     "Command: `.venv/bin/python experiments/study.py dev-seeds --only ARMS`\n\n" + dev3 + "\n")
        extra = extra_table(store)
        if extra:
            fh.write("\n## Equal work: `alternate` for two epochs (dev, seed 0)\n\n"
                     "Command: `.venv/bin/python experiments/study.py equal-work --only ARMS`\n\n" + extra + "\n")
    results = [result_from(r) for _, runs, _ in per_arm.values() for r in runs]
    if results:
        plot_curves(results, os.path.join(OUT, "curves-validation.png"), "validation")
    dev = [result_from(store["runs"][key(best_setting(store, a) or {}, "dev", 0)]) for a in arms
           if best_setting(store, a) is not None]
    if dev:
        plot_curves(dev, os.path.join(OUT, "curves-dev-best.png"), "dev")
    print(open(os.path.join(OUT, "results.md")).read())
