"""Scheduler: continuous batching with a token budget, chunked prefill, prefix caching and
preemption by recompute, built for asynchronous stepping.

The engine launches step N, calls schedule() for step N+1 before step N's sampled tokens are known,
then calls update() with step N's results. So a decoding sequence whose last token is still on the
device is scheduled again with that token as its input (`from_device`): the runner takes its id from
the device. A sequence is never given a second unknown token as input: it waits for update().

One schedule():
1. Running sequences, in order (admission order; priority order under "priority"), each get
   min(tokens left to compute, budget left) tokens. When pages run out, the last running sequence
   (the last admitted; the lowest priority) is preempted: its pages are freed, its KV is recomputed
   later from prompt + outputs, and it goes to the front of the waiting queue. If it is the sequence
   being scheduled, scheduling of running sequences stops.
2. If nothing was preempted, waiting sequences in FCFS (or priority) order are admitted while the
   budget, max_num_seqs and the pages allow; each looks up the prefix cache first.
3. Every scheduled chunk advances num_computed_tokens; newly full pages whose tokens are all known
   are registered in the prefix cache (pages completed by a device-side token wait for update()).

Multi-step decode (schedule(num_steps=K), vLLM's num_scheduler_steps): when every running sequence
is decoding (one token left to compute) and no waiting sequence could be admitted (none waits, or
max_num_seqs run), each chunk gets `num_steps` = min(K, outputs it may still produce): the device
computes its input token, samples, feeds the sample back as the next input, K times in one launch.
Pages are allocated for all K positions up front. take_tokens() and accept() (or accept_all())
then take up to K tokens per sequence; the ones after a stop are dropped (their KV was written
into pages the sequence frees).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from typing import NamedTuple

from rtpjax.engine.block_manager import BlockManager
from rtpjax.engine.sequence import FinishReason, Sequence, SequenceStatus

POLICIES = ("fcfs", "priority")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget
    max_model_len: int = 2048
    page_size: int = 16
    long_prefill_token_threshold: int = 0  # > 0 caps one sequence's chunk per step; 0 is off
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"SchedulerConfig.{name}={value!r} must be an int >= 1")
        thr = self.long_prefill_token_threshold
        if not (isinstance(thr, int) and not isinstance(thr, bool) and thr >= 0):
            raise ValueError(
                f"SchedulerConfig.long_prefill_token_threshold={thr!r} must be an int >= 0 "
                "(0 = off)"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"SchedulerConfig.policy={self.policy!r} must be one of {POLICIES}")
        if not self.enable_chunked_prefill:
            if self.max_num_batched_tokens < self.max_model_len:
                raise ValueError(
                    f"SchedulerConfig.max_num_batched_tokens={self.max_num_batched_tokens} must be "
                    f">= max_model_len={self.max_model_len} when enable_chunked_prefill is False"
                )
            if thr:
                raise ValueError(
                    f"SchedulerConfig.long_prefill_token_threshold={thr} needs "
                    "enable_chunked_prefill=True; set it to 0"
                )


class ScheduledChunk(NamedTuple):
    seq: Sequence
    start: int  # first position computed this step (num_computed_tokens before this step)
    num_tokens: int  # tokens computed this step: positions start .. start+num_tokens-1
    samples: bool  # this chunk's last position produces a sampled token
    from_device: bool  # the chunk's single token is the pending token still on the device
    num_steps: int = 1  # multi-step decode: tokens this chunk samples, each the next one's input


# ScheduledChunk(...) runs the Python __new__ NamedTuple generates; building the tuple directly
# costs half as much, and schedule() builds one chunk per running sequence per step.
_new_chunk = functools.partial(tuple.__new__, ScheduledChunk)


class SchedulerOutput(NamedTuple):
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    num_batched_tokens: int
    num_prompt_tokens: int  # of num_batched_tokens, those at prompt positions (the rest decode)
    num_host_chunks: int  # chunks whose input tokens are known on the host (not from_device)
    # Scheduled sequences whose page_ids changed in this schedule() (pages added, or admitted):
    # every other scheduled sequence holds the pages it held when last scheduled.
    paged: list[Sequence]
    num_steps: int = 1  # multi-step decode: K iterations in this launch (1: an ordinary step)
    num_step_tokens: int = 0  # multi-step decode: tokens all chunks sample together


class UpdateOutput(NamedTuple):
    updated: list[Sequence]  # sequences that got new tokens
    finished: list[Sequence]  # sequences this update finished (EOS / stop id / max_tokens)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Decides each step's chunks; owns the waiting and running queues (see module docstring)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if block_manager.page_size != config.page_size:
            raise ValueError(
                f"SchedulerConfig.page_size={config.page_size} must equal the block manager's "
                f"page_size={block_manager.page_size}"
            )
        max_pages = _cdiv(config.max_model_len, config.page_size)
        if max_pages > block_manager.num_pages - 1:
            raise ValueError(
                f"num_pages={block_manager.num_pages} is too small: one sequence of max_model_len="
                f"{config.max_model_len} needs {max_pages} pages plus the null page"
            )
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        # Live sequences, plus finished ones whose sampled tokens are still on the device.
        self._seqs: dict[int, Sequence] = {}
        # Counted by the running schedule() over its chunks that are not from_device (the few in
        # a decode step): prompt positions scheduled, and such chunks.
        self._prompt_tokens = 0
        self._host_chunks = 0

    # -- queues -----------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    @staticmethod
    def _priority_key(seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival_time, seq.seq_id)

    def _enqueue(self, queue: list[Sequence], seq: Sequence, front: bool = False) -> None:
        if self.config.policy == "priority":
            bisect.insort(queue, seq, key=self._priority_key)
        elif front:
            queue.insert(0, seq)
        else:
            queue.append(seq)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (status WAITING, no pages)."""
        cfg = self.config
        if seq.seq_id in self._seqs:
            raise ValueError(f"add: seq_id={seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.page_ids or seq.num_computed_tokens:
            raise ValueError(f"add: {seq!r} must be a fresh WAITING sequence with no pages")
        if not 1 <= seq.num_tokens <= cfg.max_model_len:
            raise ValueError(
                f"add: seq_id={seq.seq_id} has {seq.num_tokens} tokens: allowed is 1 to "
                f"max_model_len={cfg.max_model_len}"
            )
        if not (isinstance(seq.max_tokens, int) and seq.max_tokens >= 1):
            raise ValueError(f"add: seq_id={seq.seq_id} max_tokens={seq.max_tokens!r} must be >= 1")
        if seq.num_tokens + seq.max_tokens > cfg.max_model_len:
            raise ValueError(
                f"add: seq_id={seq.seq_id} has {seq.num_tokens} tokens + max_tokens="
                f"{seq.max_tokens} > max_model_len={cfg.max_model_len}; clamp max_tokens first"
            )
        self._seqs[seq.seq_id] = seq
        self._enqueue(self.waiting, seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence now (any state) and free its pages; a no-op if already finished."""
        if seq.is_finished:
            return
        if self._seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"finish: seq_id={seq.seq_id} is not in this scheduler")
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self._release_pages(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.num_pending == 0:
            del self._seqs[seq.seq_id]

    def abort(self, key: int | str) -> list[Sequence]:
        """Abort a sequence (int seq_id) or every sequence of a request (str request_id).

        Returns the sequences aborted; unknown or already finished ones are ignored.
        """
        if isinstance(key, str):
            seqs = [s for s in self._seqs.values() if s.request_id == key and not s.is_finished]
        else:
            seq = self._seqs.get(key)
            seqs = [seq] if seq is not None and not seq.is_finished else []
        for seq in seqs:
            self.finish(seq, FinishReason.ABORT)
        return seqs

    # -- scheduling -------------------------------------------------------------------------------

    def schedule(self, num_steps: int = 1) -> SchedulerOutput:
        """The next step's chunks. num_steps > 1 asks for a multi-step decode step, granted when
        every running sequence is decoding and nothing could be admitted (module docstring)."""
        cfg, bm = self.config, self.block_manager
        page_size = cfg.page_size
        budget = cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        paged: list[Sequence] = []
        self._prompt_tokens = self._host_chunks = 0
        multi = num_steps > 1 and self._can_multi_step()
        max_steps = step_tokens = 0

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            plan = self._next_chunk(seq, budget)
            if plan is None:
                i += 1
                continue
            n, from_device = plan
            steps = 1
            if multi:  # n == 1; it may still produce max_tokens - (outputs + pending) tokens
                steps = min(num_steps, seq.max_tokens - seq.num_output_tokens - seq.num_pending)
            # Most decode steps stay inside the last page: the allocator is asked only when the
            # chunk reaches past the pages the sequence holds.
            if seq.num_computed_tokens + steps * n > len(seq.page_ids) * page_size:
                need = _cdiv(seq.num_computed_tokens + steps * n, page_size) - len(seq.page_ids)
                # Victims come from the tail, which this loop has not reached: no chunk is undone.
                while not bm.can_allocate(need):
                    victim = self.running.pop()
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    break
                seq.page_ids += bm.allocate(need)
                paged.append(seq)
            chunks.append(self._advance(seq, n, from_device, steps))
            max_steps = max(max_steps, steps)
            step_tokens += steps
            budget -= n
            i += 1

        # Admitting after a preemption would only take back the pages just freed.
        while not multi and not preempted and self.waiting and budget > 0:
            if len(self.running) >= cfg.max_num_seqs:
                break
            seq = self.waiting[0]
            if seq.num_pending:  # a preempted sequence waits for its in-flight token
                break
            cached = self._match_prefix(seq)
            start = len(cached) * cfg.page_size
            remaining = seq.num_tokens - start
            n = self._cap(remaining, budget)
            if n < remaining and not cfg.enable_chunked_prefill:
                break
            need = _cdiv(start + n, cfg.page_size) - len(cached)
            if not bm.can_allocate(need + bm.num_evictable_among(cached)):
                break
            self.waiting.pop(0)
            bm.acquire(cached)
            seq.page_ids = cached + bm.allocate(need)
            paged.append(seq)
            seq.num_computed_tokens = start
            seq.num_registered_pages = len(cached)
            if seq.num_admissions == 0:
                seq.num_cached_tokens = start
                bm.record_prefix_lookup(seq.num_tokens, start)
            seq.num_admissions += 1
            seq.status = SequenceStatus.RUNNING
            self._enqueue(self.running, seq)
            chunks.append(self._advance(seq, n, from_device=False))
            budget -= n

        return SchedulerOutput(
            chunks,
            preempted,
            cfg.max_num_batched_tokens - budget,
            self._prompt_tokens,
            self._host_chunks,
            paged,
            # Always K when any chunk takes more than one step: one compiled variant per bucket
            # (rows with fewer steps write their extra iterations into the null page).
            num_steps if max_steps > 1 else 1,
            step_tokens,
        )

    def _can_multi_step(self) -> bool:
        """Every running sequence has at most one token left to compute (its input: known, or the
        newest pending one), and no waiting sequence could be admitted now."""
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return False
        for seq in self.running:
            if seq.num_tokens + seq.num_pending - seq.num_computed_tokens > 1:
                return False
        return bool(self.running)

    def _cap(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        thr = self.config.long_prefill_token_threshold
        return min(n, thr) if thr else n

    def _next_chunk(self, seq: Sequence, budget: int) -> tuple[int, bool] | None:
        """(tokens, from_device) for a running sequence this step, or None to skip it."""
        if seq.num_pending == 0:
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = self._cap(remaining, budget)
            if remaining <= 0 or (n < remaining and not self.config.enable_chunked_prefill):
                return None
            return n, False
        # Its newest unknown token is the next input, unless that token is surely its last output.
        # The device holds only the tokens of the sequence's last chunk: all pending ones must be
        # from it (one, or a multi-step chunk's), and none of their KV computed yet but the input's.
        pending = seq.num_pending
        if (
            pending == seq.last_chunk_samples
            and seq.num_computed_tokens == seq.num_tokens + pending - 1
            and seq.num_output_tokens + pending < seq.max_tokens
        ):
            return 1, True
        return None

    def _advance(self, seq: Sequence, n: int, from_device: bool, steps: int = 1) -> ScheduledChunk:
        start = seq.num_computed_tokens
        samples = from_device or start + n == seq.num_tokens
        # A multi-step chunk computes its input and then steps - 1 tokens it samples itself.
        seq.num_computed_tokens += n + steps - 1
        if samples:
            seq.num_pending += steps
            seq.last_chunk_samples = steps
        # A from_device chunk computes only the unknown token, which fills no page of known tokens
        # and lies past the prompt.
        if not from_device:
            self._host_chunks += 1
            prompt = seq.num_prompt_tokens
            if start < prompt:
                self._prompt_tokens += min(start + n, prompt) - start
            self._cache_full_pages(seq)
        return _new_chunk((seq, start, n, samples, from_device, steps))

    def _match_prefix(self, seq: Sequence) -> list[int]:
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return []
        num_full = seq.num_tokens // self.config.page_size
        bm.extend_hashes(seq.page_hashes, seq.all_token_ids, seq.extra_hash_keys, num_full)
        return bm.match_hashes(seq.page_hashes, seq.num_tokens)

    def _cache_full_pages(self, seq: Sequence) -> None:
        """Register the pages that are full, computed and hold only known tokens."""
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.config.page_size
        if num_full <= seq.num_registered_pages:
            return
        bm.extend_hashes(seq.page_hashes, seq.all_token_ids, seq.extra_hash_keys, num_full)
        for i in range(seq.num_registered_pages, num_full):
            bm.register(seq.page_ids[i], seq.page_hashes[i])
        seq.num_registered_pages = num_full

    def _release_pages(self, seq: Sequence) -> None:
        self.block_manager.free(seq.page_ids)
        seq.page_ids = []
        seq.num_registered_pages = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release_pages(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._enqueue(self.waiting, seq, front=True)

    # -- results ----------------------------------------------------------------------------------

    def update(self, sampled: Mapping[int, Seq[int]]) -> UpdateOutput:
        """Apply one step's sampled tokens: {seq_id: [token, ...]} for each chunk that sampled.

        Tokens of a sequence finished or aborted meanwhile are dropped. A list with several tokens
        (speculative decoding) is appended in order up to the first stop.
        """
        updated: list[Sequence] = []
        finished: list[Sequence] = []
        for seq_id, tokens in sampled.items():
            if len(tokens) == 0:
                raise ValueError(f"update: seq_id={seq_id} got no tokens; at least one is due")
            seq = self._take_pending(seq_id)
            if seq is None:
                continue
            for token in tokens:
                token = int(token)
                seq.append_token(token)
                reason = seq.stop_reason_for(token)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
            updated.append(seq)
            self._cache_new_pages(seq)
        return UpdateOutput(updated, finished)

    def update_sampled(self, seq_ids: Seq[int], token_ids: Seq[int]) -> UpdateOutput:
        """update() for one sampled token per sequence (`token_ids[i]` for `seq_ids[i]`, Python
        ints): every step without speculative decoding. The same rules, without the mapping and
        with the per-token work inline (it runs for every running sequence every step)."""
        caching = self.block_manager.enable_prefix_caching
        page_size = self.config.page_size
        running = SequenceStatus.RUNNING
        seqs = self._seqs
        updated: list[Sequence] = []
        finished: list[Sequence] = []
        for seq_id, token in zip(seq_ids, token_ids, strict=True):
            seq = seqs.get(seq_id)
            if seq is None or seq.num_pending <= 0 or seq.status is not running:
                seq = self._take_pending(seq_id)
                if seq is None:
                    continue
            else:
                seq.num_pending -= 1
            seq.output_token_ids.append(token)
            ids = seq.all_token_ids  # (the live list: append_token without the call)
            ids.append(token)
            updated.append(seq)
            # Most tokens neither can end the sequence nor fill a page: two cheap tests first.
            if token in seq.ending_ids or len(seq.output_token_ids) >= seq.max_tokens:
                reason = seq.stop_reason_for(token)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    continue
            if (
                caching
                and len(ids) >= (seq.num_registered_pages + 1) * page_size
                and seq.status is running
            ):
                self._cache_full_pages(seq)
        return UpdateOutput(updated, finished)

    def take_tokens(self, seq_id: int, count: int) -> Sequence | None:
        """Count `count` in-flight tokens of seq_id as returned (a multi-step chunk's, oldest
        first): the sequence, to give them to with accept() in order, or None when it finished
        meanwhile (they are dropped; it is forgotten once nothing of it is in flight)."""
        seq = self._seqs.get(seq_id)
        if seq is None or not 1 <= count <= seq.num_pending:
            raise ValueError(
                f"take_tokens: seq_id={seq_id} has {0 if seq is None else seq.num_pending} "
                f"sampled tokens in flight, not {count}"
            )
        seq.num_pending -= count
        if seq.is_finished:
            if seq.num_pending == 0:
                del self._seqs[seq_id]
            return None
        return seq

    def accept(self, seq: Sequence, token: int) -> FinishReason | None:
        """Append one returned token (after take_tokens) and apply the stop rules: the reason it
        ended the sequence, or None. Once it ended, the rest of its taken tokens are dropped."""
        seq.output_token_ids.append(token)
        seq.all_token_ids.append(token)
        if token in seq.ending_ids or len(seq.output_token_ids) >= seq.max_tokens:
            reason = seq.stop_reason_for(token)
            if reason is not None:
                self.finish(seq, reason)
                return reason
        return None

    def accept_all(self, seq: Sequence, tokens: list[int]) -> bool:
        """Append all of `tokens` (after take_tokens) when none of them can end the sequence (no
        ending id, max_tokens not reached) and return True; else append nothing and return False
        (give them one by one with accept())."""
        if len(seq.output_token_ids) + len(tokens) >= seq.max_tokens or not (
            seq.ending_ids.isdisjoint(tokens)
        ):
            return False
        seq.output_token_ids += tokens
        seq.all_token_ids.extend(tokens)
        return True

    def cache_new_pages(self, seq: Sequence) -> None:
        """After accept(): register the pages the new tokens filled in the prefix cache."""
        self._cache_new_pages(seq)

    def _take_pending(self, seq_id: int) -> Sequence | None:
        """Count one in-flight token of seq_id as returned; the sequence, or None when it finished
        meanwhile (its token is dropped; it is forgotten once nothing of it is in flight)."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.num_pending <= 0:
            raise ValueError(f"update: seq_id={seq_id} has no sampled token in flight")
        seq.num_pending -= 1
        if seq.is_finished:
            if seq.num_pending == 0:
                del self._seqs[seq_id]
            return None
        return seq

    def _cache_new_pages(self, seq: Sequence) -> None:
        """After tokens were appended: register the pages they filled, if any."""
        # Most tokens fill no page: test that cheaply before the full check.
        if (
            self.block_manager.enable_prefix_caching
            and seq.status is SequenceStatus.RUNNING
            and seq.num_tokens >= (seq.num_registered_pages + 1) * self.config.page_size
        ):
            self._cache_full_pages(seq)
