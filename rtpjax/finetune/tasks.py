"""Synthetic tasks generated offline and deterministically, for tests and demos.

Every task reads the same kind of input, a few lowercase letters separated by spaces ("k q m b x"),
and answers with its own function of them, so an adapter can only succeed on its own task:
reverse ("x b m q k"), upper ("K Q M B X"), shift (next letter, "l r n c y"), sort
("b k m q x"), rotate (first letter to the end, "q m b x k"). Short sequences (about 26 tokens
with SmolLM2's chat template) make them learnable in a few dozen steps.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable

import numpy as np

LETTERS = string.ascii_lowercase


def _shift(c: str) -> str:
    return LETTERS[(LETTERS.index(c) + 1) % 26]


TASKS: dict[str, Callable[[list[str]], list[str]]] = {
    "reverse": lambda xs: xs[::-1],
    "upper": lambda xs: [c.upper() for c in xs],
    "shift": lambda xs: [_shift(c) for c in xs],
    "sort": sorted,
    "rotate": lambda xs: xs[1:] + xs[:1],
}


def make_examples(
    task: str, n: int, seed: int, *, min_letters: int = 4, max_letters: int = 6
) -> list[dict]:
    """`n` chat records {"messages": [user, assistant]} of `task`, a pure function of the seed."""
    if task not in TASKS:
        raise ValueError(f"synthetic task {task!r} is unknown; known: {', '.join(TASKS)}")
    fn = TASKS[task]
    # Inputs depend on the seed only, not on the task: every task sees the same kinds of inputs.
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(min_letters, max_letters + 1))
        xs = [LETTERS[i] for i in rng.integers(0, 26, k)]
        out.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(xs)},
                    {"role": "assistant", "content": " ".join(fn(xs))},
                ]
            }
        )
    return out


def make_split(task: str, train: int, eval_: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples; held-out inputs never occur in the training set."""
    records = make_examples(task, train + 4 * eval_ + 16, seed)
    train_set = records[:train]
    seen = {r["messages"][0]["content"] for r in train_set}
    held = [r for r in records[train:] if r["messages"][0]["content"] not in seen][:eval_]
    if len(held) < eval_:
        raise ValueError(f"synthetic task {task!r}: could not draw {eval_} unseen eval examples")
    return train_set, held


def write_jsonl(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
