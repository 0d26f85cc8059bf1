"""Training data with grain: JSONL → chat messages → chat-template tokens with a loss mask → rows.

A record is alpaca `{"instruction", "input"?, "output", "system"?}` or chat `{"messages": [{"role",
"content"}, …]}`. Rendering goes through the tokenizer's chat template: the loss covers every
assistant message's tokens up to and including the end-of-turn token, never the prompt (the mask is
found by rendering the conversation prefix by prefix, so any template works).

Per task, a grain pipeline: source → deterministic shuffle (reshuffled each epoch) → repeat(epochs)
→ render → either one example per row, or first-fit packing into rows of max_length with segment
ids and per-segment positions. The iterator's state (a small dict) goes into checkpoints. Rows
are later padded into a step's [B, S] bucket by trainer's batch builder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import grain.experimental as grain_exp
import numpy as np

from rtpjax.finetune.config import DatasetConfig, TaskConfig


class ChatTokenizer(Protocol):
    eos_token_ids: frozenset[int]

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tokenize: bool = True
    ) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256) with a minimal chat format, for tiny test models:
    each turn is "<role initial>:<content>\\x03", the generation prompt "a:", end of turn 3."""

    EOT = 3
    eos_token_ids = frozenset({EOT})
    vocab_size = 256

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **_: Any,
    ) -> list[int] | str:
        text = "".join(f"{m['role'][0]}:{m['content']}\x03" for m in messages)
        if add_generation_prompt:
            text += "a:"
        return list(text.encode("utf-8")) if tokenize else text

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if not (skip_special_tokens and i == self.EOT)).decode(
            "utf-8", errors="replace"
        )


# ----------------------------------------------------------------------------------- records


def _record_messages(rec: Any, fmt: str, where: str, system: str | None) -> list[dict]:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = "chat" if "messages" in rec else "alpaca"
    if fmt == "chat":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list (chat format)")
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: messages[{i}] must be {{role: system|user|assistant, "
                    f"content: string}}, got {m!r}"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message to train on")
        out = [dict(role=m["role"], content=m["content"]) for m in msgs]
    else:
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{where}: alpaca record needs a string {key!r}")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"{where}: alpaca 'input' must be a string")
        prompt = rec["instruction"] + (f"\n\n{extra}" if extra else "")
        out = [dict(role="user", content=prompt), dict(role="assistant", content=rec["output"])]
        if isinstance(rec.get("system"), str):
            out.insert(0, dict(role="system", content=rec["system"]))
    if system is not None and out[0]["role"] != "system":
        out.insert(0, dict(role="system", content=system))
    return out


def read_jsonl(path: str, fmt: str = "auto", system: str | None = None) -> list[list[dict]]:
    """Conversations (lists of messages) from a JSONL file; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: dataset file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(_record_messages(rec, fmt, f"{path}:{n}", system))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


Conversations = list[list[dict]]


def load_dataset(ds: DatasetConfig, resolve, seed: int) -> tuple[Conversations, Conversations]:
    """(train, eval) conversations of a dataset config; `resolve` maps YAML paths to files."""
    if ds.synthetic is not None:
        from rtpjax.finetune.tasks import make_split

        s = ds.synthetic
        train, held = make_split(s.task, s.train_examples, s.eval_examples, s.seed)
        conv = lambda rs: [_record_messages(r, "chat", "synthetic", ds.system_prompt) for r in rs]
        return conv(train), conv(held)
    records = read_jsonl(resolve(ds.path), ds.format, ds.system_prompt)
    if ds.eval_path is not None:
        return records, read_jsonl(resolve(ds.eval_path), ds.format, ds.system_prompt)
    n_eval = round(len(records) * ds.eval_fraction)
    if n_eval == 0:
        return records, []
    order = np.random.default_rng(seed).permutation(len(records))
    held = set(order[:n_eval].tolist())
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


# --------------------------------------------------------------------------------- rendering


def render(
    messages: list[dict], tokenizer: ChatTokenizer, max_length: int
) -> dict[str, np.ndarray]:
    """Chat-template tokens and the loss mask, shifted for next-token prediction and cut to
    max_length: {"inputs": i32[n], "targets": i32[n], "mask": f32[n]}, n <= max_length."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; "
                "cannot find the assistant tokens to train on"
            )
        answer = full[len(prompt) :]
        # Train up to the end-of-turn token; what the template writes after it (a newline) is
        # the next turn's prefix.
        cut = next(
            (j + 1 for j, t in enumerate(answer) if t in tokenizer.eos_token_ids), len(answer)
        )
        mask += [False] * (len(prompt) - len(ids)) + [True] * cut
        ids = prompt + answer[:cut]
    ids, mask = ids[: max_length + 1], mask[: max_length + 1]
    return {
        "inputs": np.asarray(ids[:-1], np.int32),
        "targets": np.asarray(ids[1:], np.int32),
        "mask": np.asarray(mask[1:], np.float32),
    }


def _row(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(x["inputs"])
    return {**x, "segments": np.ones(n, np.int32), "positions": np.arange(n, dtype=np.int32)}


def _unpack(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": x["inputs"],
        "targets": x["targets"],
        "mask": x["mask"],
        "segments": x["inputs_segment_ids"].astype(np.int32),
        "positions": x["inputs_positions"].astype(np.int32),
    }


class _Render(grain.transforms.Map):
    def __init__(self, tokenizer: ChatTokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def map(self, messages):
        return render(messages, self.tokenizer, self.max_length)


class TaskStream:
    """The training rows of one task, in a deterministic order, with a resumable position.

    Rows: {"inputs", "targets", "mask", "segments", "positions"}, each [n] with n <= max_length
    (packed rows are exactly max_length)."""

    def __init__(
        self, conversations: list[list[dict]], tokenizer: ChatTokenizer, task: TaskConfig, seed: int
    ):
        self.task = task
        ds = grain.MapDataset.source(conversations).shuffle(seed=seed + task.shuffle_seed)
        ds = ds.repeat(task.epochs).map(_Render(tokenizer, task.max_length))
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if task.packing:
            L = task.max_length
            it_ds = grain_exp.FirstFitPackIterDataset(
                it_ds,
                length_struct={"inputs": L, "targets": L, "mask": L},
                num_packing_bins=max(4, task.micro),
                shuffle_bins=False,
            )
            self._post = _unpack
        else:
            self._post = _row
        self._dataset = it_ds
        self._it = iter(it_ds)
        self.exhausted = False

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """Up to n rows; fewer (and `exhausted` set) at the end of the last epoch."""
        rows = []
        while len(rows) < n and not self.exhausted:
            try:
                rows.append(self._post(next(self._it)))
            except StopIteration:
                self.exhausted = True
        return rows

    def get_state(self) -> dict:
        return {"iterator": self._it.get_state(), "exhausted": self.exhausted}

    def set_state(self, state: dict) -> None:
        self._it = iter(self._dataset)
        self._it.set_state(state["iterator"])
        self.exhausted = bool(state["exhausted"])

    def count_rows(self) -> int:
        """Rows in the whole stream (walks a fresh iterator; host work only)."""
        return sum(1 for _ in iter(self._dataset))


def eval_rows(
    conversations: list[list[dict]],
    tokenizer: ChatTokenizer,
    max_length: int,
    limit: int | None = None,
) -> list[dict[str, np.ndarray]]:
    convs = conversations if limit is None else conversations[:limit]
    return [_row(render(c, tokenizer, max_length)) for c in convs]
