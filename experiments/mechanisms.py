"""Measurements of *why* AltLoRA / AltLoRA+ train as they do on the fine-tuning task.

Each subcommand trains the real model (MiniLM + LoRA r 8 on Rotten Tomatoes, the study's protocol:
cosine lr with 3% warm-up over one epoch, length-grouped batches, seed 0) for a few dozen steps,
records the LoRA factors after every step, and writes a small table to
``experiments/results/mechanisms/<name>.md`` with the command, date and versions.

* ``movement`` — (a) equal work and (c) the first phases while B ≈ 0: per step, the mean ‖A‖, ‖B‖
  over layers and how far W = W0 + s·B·A moved (Σ over layers of ‖ΔW‖_F), for AltLoRA and AltLoRA+
  with the ``alternate`` and ``sequential`` schedules and for AdamW.
* ``invariance`` — (b) damping: AltLoRA started from (c·A, B/c) instead of (A, B) should give the
  same W at every step (Theorem 4) when λ = 0; an absolute λ breaks that by an amount that depends
  on c. Reports ‖W_c − W_1‖ / ‖W_1 − W0‖ after the run for several c and λ.
* ``normalization`` — (d, scale) AltLoRA+'s A phase divides by BᵀB, which grows from ≈ 0 over
  training, so the scaled gradient shrinks while V (β2 0.999: a memory of ~1000 updates) still holds
  the early, large values: the per-element step |M̂|/√V̂ of each factor over the epoch, against AdamW's.
* ``subspace`` — (d) AltLoRA+'s second moment V is not carried into the new subspace while the first
  moment is: at every B phase, the largest principal angle between row(A) now and at the previous
  B phase (and the mirror for A phases) says how far the subspace V was accumulated in has turned.

Run: ``.venv/bin/python experiments/mechanisms.py movement|invariance|subspace [--steps N]``
"""

import argparse
import datetime
import math
import os
import platform
import sys
import warnings

import torch

import altlora
from altlora.finetune import lr_schedule
from altlora.finetune.data import TokenizedSet, batches, load_snippets, steps_per_epoch, three_way_split
from altlora.finetune.model import build_lora_model, load_tokenizer
from altlora.finetune.optimizers import build_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "mechanisms")


def training_data():
    tokenizer = load_tokenizer()
    train, _, _ = three_way_split(load_snippets())
    return TokenizedSet(train, tokenizer, 64)


def trace(train, name, lr, steps, schedule="alternate", damping=None, seed=0, rescale=None, on_step=None, beta2=None):
    """Train ``steps`` steps of the one-epoch cosine protocol; call ``on_step(step, pairs, opt)``
    after each. ``rescale=c`` starts from (c·A, B/c) (B is zero at init, so only A changes)."""
    model = build_lora_model(8, 16.0, seed)
    model.train()
    pairs = altlora.find_lora_pairs(model)
    if rescale is not None:
        with torch.no_grad():
            for p in pairs:
                p.A.mul_(rescale)
                p.B.div_(rescale)
    opt = build_optimizer(name, model, lr, schedule, "BA", damping, beta2=beta2)
    epoch = steps_per_epoch(train, 32)
    schedulers = lr_schedule.attach(opt, epoch, 0.03, "cosine")
    for step, (ids, mask, labels) in enumerate(batches(train, 32, steps, seed, "by-length"), start=1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for s in schedulers:
            s.step()
        if on_step is not None:
            on_step(step, pairs, opt)
    return model, pairs


def delta_w(pairs):
    return [(p.scaling * p.B.detach().double() @ p.A.detach().double()) for p in pairs]


def movement(train, steps):
    arms = [("altlora", 0.1, "alternate"), ("altlora", 0.1, "sequential"), ("altloraplus", 1e-3, "alternate"),
            ("altloraplus", 1e-3, "sequential"), ("adamw", 1e-3, "alternate")]
    report = {}
    for name, lr, schedule in arms:
        rows, last = [], [None]

        def on_step(step, pairs, opt):
            dw = delta_w(pairs)
            moved = sum(float((w - w0).norm()) for w, w0 in zip(dw, last[0])) if last[0] is not None else sum(float(w.norm()) for w in dw)
            last[0] = dw
            rows.append((step, sum(float(p.A.norm()) for p in pairs) / len(pairs), sum(float(p.B.norm()) for p in pairs) / len(pairs),
                         moved, sum(float(w.norm()) for w in dw)))

        trace(train, name, lr, steps, schedule, on_step=on_step)
        report[f"{name} {schedule} lr {lr:g}"] = rows
        print(f"{name} {schedule}: ‖W−W0‖ after {steps} steps {rows[-1][4]:.3f}", flush=True)
    shown = [1, 2, 3, 4, 5, 6, 10, 20, 30, 40, 60, 80, steps]
    shown = sorted({s for s in shown if s <= steps})
    lines = ["Per step: mean ‖A‖_F and ‖B‖_F over the 36 LoRA layers; Σ‖ΔW‖_F this step; Σ‖W − W0‖_F so far.", ""]
    for label, rows in report.items():
        lines += [f"**{label}**", "", "| step | mean ‖A‖ | mean ‖B‖ | Σ‖ΔW‖ this step | Σ‖W − W0‖ |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {a:.3f} | {b:.4f} | {m:.4f} | {t:.4f} |" for s, a, b, m, t in rows if s in shown]
        lines.append("")
    totals = ["| optimizer / schedule | Σ‖W − W0‖ at step 10 | at step 25 | at step " + str(steps) + " | Σ over steps of Σ‖ΔW‖ |",
              "|---|---|---|---|---|"]
    for label, rows in report.items():
        at = {s: t for s, _, _, _, t in rows}
        totals.append(f"| {label} | {at.get(10, float('nan')):.4f} | {at.get(25, float('nan')):.4f} | {at[steps]:.4f} | "
                      f"{sum(m for _, _, _, m, _ in rows):.4f} |")
    return "\n".join(totals + [""] + lines)


def invariance(train, steps):
    lines = ["| λ | c | ‖W_c − W_1‖ / ‖W_1 − W0‖ after %d steps |" % steps, "|---|---|---|"]
    for damping in (1e-6, 1e-3, 1e-2):
        _, ref = trace(train, "altlora", 0.1, steps, damping=damping)
        w1 = delta_w(ref)
        scale = math.sqrt(sum(float(w.square().sum()) for w in w1))
        for c in (0.1, 10.0):
            _, pairs = trace(train, "altlora", 0.1, steps, damping=damping, rescale=c)
            wc = delta_w(pairs)
            diff = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(wc, w1)))
            lines.append(f"| {damping:g} | {c:g} | {diff / scale:.2e} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def _max_angle_sin(prev, now):
    """sin of the largest principal angle between the row spaces of two r×n matrices."""
    q1, _ = torch.linalg.qr(prev.double().T)
    q2, _ = torch.linalg.qr(now.double().T)
    s = torch.linalg.svdvals(q1.T @ q2)
    return float(torch.sqrt(torch.clamp(1 - s.min() ** 2, min=0.0)))


def subspace(train, steps):
    rows = []
    held_a, held_b = {}, {}  # A at the previous B phase, B at the previous A phase, per layer

    def on_step(step, pairs, opt):
        factor = "B" if step % 2 == 1 else "A"  # alternate, B first: B phases on odd steps
        held, current = (held_a, lambda p: p.A.detach()) if factor == "B" else (held_b, lambda p: p.B.detach().T)
        # a B phase works in row(A), an A phase in col(B) = row(Bᵀ); the factor it works in did not
        # change during the phase itself, only during the other factor's phases in between
        angles = [_max_angle_sin(held[i], current(p)) for i, p in enumerate(pairs) if i in held and held[i].abs().sum() > 0]
        if angles:
            rows.append((step, factor, sum(angles) / len(angles), max(angles)))
        for i, p in enumerate(pairs):
            held[i] = current(p).clone()

    trace(train, "altloraplus", 1e-3, steps, on_step=on_step)
    lines = ["sin of the largest principal angle between the factor's subspace at this phase and at the previous phase "
             "of the same factor (mean and max over the 36 layers); 0 = V's subspace unchanged, 1 = orthogonal.", "",
             "| step | phase | subspace the phase works in | mean sin θ_max | max sin θ_max |", "|---|---|---|---|---|"]
    for step, factor, mean, mx in rows:
        if step <= 12 or step % 20 in (0, 1):
            lines.append(f"| {step} | {factor} | {'row(A)' if factor == 'B' else 'col(B)'} | {mean:.2e} | {mx:.2e} |")
    return "\n".join(lines)


def _normalized_step(m, v, n, beta1, beta2, eps):
    """Mean over elements of |M̂| / (√V̂ + ε): how large Adam's per-element step is, in units of lr.
    Near 1 while gradients keep their sign and scale; it shrinks when V remembers larger gradients
    than the ones now arriving (or when M averages out)."""
    m_hat = m / (1 - beta1 ** n)
    v_hat = v / (1 - beta2 ** n)
    return float((m_hat.abs() / (v_hat.sqrt() + eps)).mean())


def normalization(train, steps, beta2=None):
    """Per factor, over the epoch: the normalized step of AltLoRA+ (alternate) and of AdamW."""
    series = {}

    def record(label, pairs, opt, keys, betas, eps):
        for factor in ("A", "B"):
            values = []
            for p in pairs:
                st = opt.state.get(getattr(p, factor), {})
                if keys[0] in st and float(st[keys[2]]) > 0:
                    values.append(_normalized_step(st[keys[0]].double(), st[keys[1]].double(), float(st[keys[2]]),
                                                   betas[0], betas[1], eps))
            if values:
                series.setdefault((label, factor), []).append(sum(values) / len(values))

    b2 = beta2 or 0.999
    every = 10

    def alt(step, pairs, opt):
        if step % every == 0:  # an A phase has just run; B's state is from the step before
            record("altloraplus", pairs, opt, ("momentum", "variance", "step"), (0.9, b2), 1e-8)

    def adamw(step, pairs, opt):
        if step % every == 0:
            record("adamw", pairs, opt, ("exp_avg", "exp_avg_sq", "step"), (0.9, 0.999), 1e-8)

    trace(train, "altloraplus", 1e-3, steps, on_step=alt, beta2=beta2)
    trace(train, "adamw", 1e-3, steps, on_step=adamw)
    count = min(len(v) for v in series.values())
    marks = sorted({i for i in (0, 1, 2, 4, 8, 16, count - 1) if 0 <= i < count})
    lines = [f"Mean over elements and the 36 layers of |M̂| / (√V̂ + ε) (bias-corrected): the per-element step in "
             f"units of lr. AltLoRA+ alternate (β2 {b2:g}) and AdamW, lr 1e-3, read every {every} steps.", "",
             "| step | AltLoRA+ A | AltLoRA+ B | AdamW A | AdamW B |", "|---|---|---|---|---|"]
    for i in marks:
        vals = [series[(lab, f)][i] for lab in ("altloraplus", "adamw") for f in ("A", "B")]
        lines.append(f"| {(i + 1) * every} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("movement", "invariance", "subspace", "normalization"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    steps = args.steps or {"movement": 50, "invariance": 30, "subspace": 120, "normalization": 338}[args.what]
    train = training_data()
    body = {"movement": movement, "invariance": invariance, "subspace": subspace,
            "normalization": normalization}[args.what](train, steps)
    os.makedirs(OUT, exist_ok=True)
    header = (f"# {args.what}\n\n- command: `.venv/bin/python experiments/mechanisms.py {' '.join(sys.argv[1:])}`\n"
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n- torch {torch.__version__}, "
              f"{platform.machine()}, {args.threads} thread(s)\n- protocol: MiniLM + LoRA r 8 / α 16, seed 0, batch 32, "
              f"length-grouped batches, cosine lr over one epoch with 3% warm-up; the first {steps} steps\n\n")
    with open(os.path.join(OUT, f"{args.what}.md"), "w") as fh:
        fh.write(header + body + "\n")
    print(header + body)


if __name__ == "__main__":
    main()
