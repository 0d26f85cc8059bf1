"""Sequence: the host state of one generated completion (a request with n > 1 makes n of them).

Token accounting under asynchronous scheduling (see scheduler.py):
- `num_tokens` counts known tokens (prompt + outputs returned by the device).
- `num_pending` counts sampled tokens that are scheduled but not yet returned. Right after the
  scheduler gives a decoding sequence its pending token as input (`from_device`), a second sampled
  token is in flight, so `num_pending` is 0, 1 or 2; but at most one *unknown* token is ever an
  input: `num_computed_tokens <= num_tokens + 1`.
- Multi-step decode (`num_scheduler_steps` > 1): one chunk computes its input token and then
  `num_steps - 1` tokens it sampled itself on the device, so it leaves `num_steps` tokens pending;
  `last_chunk_samples` counts them. The next chunk may take the newest of them as its input only
  when every pending token came from that one chunk (the device holds no older ones).
- `num_computed_tokens` counts positions whose KV is written or being written by a launched step;
  for a running sequence `num_computed_tokens <= num_tokens + num_pending - 1` (the newest token's
  KV is never computed: computing it is what samples the next one).
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Iterable
from typing import Any

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class Sequence:
    """One completion's tokens, status, page table and cache bookkeeping.

    Stop rules the scheduler applies on the host (text stops are the caller's): an id in
    `stop_token_ids` (the EOS ids the caller gives) ends the sequence unless `ignore_eos`; an id in
    `user_stop_token_ids` (the request's own stop ids, vLLM's `stop_token_ids`) ends it even under
    `ignore_eos`. Either only counts at an output index >= `min_tokens` (vLLM masks stop ids while
    fewer than min_tokens outputs exist). `max_tokens` outputs end it with LENGTH. `min_tokens`,
    `ignore_eos` and `user_stop_token_ids` default to the same-named fields of `params` when it has
    them.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        *,
        max_tokens: int,
        params: Any = None,
        seq_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        extra_hash_keys: tuple = (),
        stop_token_ids: Iterable[int] = (),
        user_stop_token_ids: Iterable[int] | None = None,
        min_tokens: int | None = None,
        ignore_eos: bool | None = None,
    ) -> None:
        self.seq_id: int = next(_seq_ids) if seq_id is None else seq_id
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # prompt + outputs, kept in step with output_token_ids: slicing a chunk copies no more.
        self._token_ids: list[int] = list(self.prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.arrival_time: float = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.extra_hash_keys: tuple = tuple(extra_hash_keys)
        self.stop_token_ids: frozenset[int] = frozenset(stop_token_ids)
        if user_stop_token_ids is None:
            user_stop_token_ids = getattr(params, "stop_token_ids", None) or ()
        self.user_stop_token_ids: frozenset[int] = frozenset(user_stop_token_ids)
        if min_tokens is None:
            min_tokens = getattr(params, "min_tokens", 0)
        self.min_tokens: int = min_tokens
        self.ignore_eos: bool = (
            getattr(params, "ignore_eos", False) if ignore_eos is None else ignore_eos
        )
        # The ids that can end it (past min_tokens): one set for the per-token test.
        self.ending_ids: frozenset[int] = self.user_stop_token_ids | (
            frozenset() if self.ignore_eos else self.stop_token_ids
        )

        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        self.num_pending = 0
        self.last_chunk_samples = 0  # tokens the last scheduled chunk samples (1, or its steps)
        self.page_ids: list[int] = []
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.num_admissions = 0
        # Prefix-cache bookkeeping owned by the scheduler: hash of each full page of known tokens
        # (valid across preemption: tokens never change), and how many leading pages of page_ids are
        # already offered to the cache since the last admission.
        self.page_hashes: list[bytes] = []
        self.num_registered_pages = 0

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """prompt + outputs. The live list, not a copy: read it, never mutate it."""
        return self._token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    def stop_reason_for(self, token_id: int) -> FinishReason | None:
        """The finish reason once `token_id` has been appended as the newest output, or None."""
        num_outputs = len(self.output_token_ids)
        if token_id in self.ending_ids and num_outputs > self.min_tokens:
            return FinishReason.STOP
        if num_outputs >= self.max_tokens:
            return FinishReason.LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, "
            f"status={self.status.name}, tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, pending={self.num_pending}, "
            f"pages={len(self.page_ids)})"
        )
