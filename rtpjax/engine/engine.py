"""LLMEngine: requests in, RequestOutputs out; owns the scheduler, the block manager and the runner.

A request with n > 1 becomes n sequences. `step()` runs the pipeline

    schedule N+1 → prepare → launch N+1 (async)  ‖  fetch N → update → detokenize → stop strings

so the host works on one step while the device runs the previous one (the "overlap"). A step whose
sampling needs the previous tokens on the host (penalties) is synchronised instead.

Bad input never reaches the scheduler: add_request validates and raises ValueError naming the field;
a failure of one request never touches the others.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Sequence as Seq

from rtpjax.config import ModelConfig
from rtpjax.engine.block_manager import BlockManager
from rtpjax.engine.model_runner import InflightStep, ModelRunner, StepResult
from rtpjax.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from rtpjax.engine.scheduler import Scheduler, SchedulerConfig
from rtpjax.engine.sequence import FinishReason, Sequence
from rtpjax.engine.stats import EngineStats, StepTiming
from rtpjax.sampling_params import SamplingParams
from rtpjax.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("rtpjax.engine")

OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    num_pages: int | None = None  # explicit KV pool size (else from memory)
    kv_cache_memory_fraction: float = 0.9
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0
    policy: str = "fcfs"
    async_scheduling: bool = True
    attention_impl: str = "auto"
    cudnn_prefill: bool = False  # fresh-prefill steps through cuDNN (GPU; slow to compile)
    # Multi-step decode (vLLM's num_scheduler_steps): up to this many decode iterations per launch
    # when every running sequence decodes and none waits (scheduler.py); 1 is off.
    num_scheduler_steps: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in (
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "page_size",
            "num_scheduler_steps",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.num_scheduler_steps > 64:
            raise ValueError(f"num_scheduler_steps={self.num_scheduler_steps} must be <= 64")
        if self.page_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"page_size={self.page_size} must be one of 8, 16, 32, 64, 128")
        if self.num_pages is not None and (
            not isinstance(self.num_pages, int) or self.num_pages < 2
        ):
            raise ValueError(f"num_pages={self.num_pages!r} must be an integer >= 2 or None")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must be in (0, 1]"
            )


@dataclasses.dataclass
class _SeqState:
    seq: Sequence
    index: int
    detok: IncrementalDetokenizer | None  # None when the request asked detokenize=False
    text_len: int | None = None  # where a stop string cut the text (None: the detokenizer's all)
    stop_window: str = ""  # the text's last (longest stop string - 1) characters
    sent_tokens: int = 0  # "delta" outputs: tokens / characters / logprobs already returned
    sent_chars: int = 0
    sent_deltas: int = 0  # ... and the detokenizer's deltas they hold
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        """The output text: what the detokenizer returned (it joins its deltas when read), minus
        any stop string cut and, unless asked for, the text of a stop token (never added)."""
        if self.detok is None:
            return ""
        text = self.detok.text
        return text if self.text_len is None else text[: self.text_len]


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None
    output_kind: str = "cumulative"

    @property
    def finished(self) -> bool:
        if len(self.seqs) == 1:
            return self.seqs[0].seq.is_finished
        return all(s.seq.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(
        self,
        cfg: ModelConfig,
        params,
        tokenizer: Tokenizer | None,
        mesh,
        config: EngineConfig,
        *,
        num_pages: int,
    ):
        self.model_config = cfg
        self.tokenizer = tokenizer  # None: only detokenize=False requests (benchmarks)
        self.config = config
        tok_eos = tokenizer.eos_token_ids if tokenizer is not None else frozenset()
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | tok_eos
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=config.max_model_len,
                page_size=config.page_size,
                long_prefill_token_threshold=config.long_prefill_token_threshold,
                policy=config.policy,
            ),
            self.block_manager,
        )
        self.runner = ModelRunner(
            cfg,
            params,
            mesh,
            num_pages=num_pages,
            page_size=config.page_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            attention_impl=config.attention_impl,
            cudnn_prefill=config.cudnn_prefill,
            eos_token_ids=self.eos_token_ids,
        )
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, _SeqState]] = {}
        self._inflight: InflightStep | None = None
        self._rng = random.Random(config.seed)
        self.stats = EngineStats()

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request for this model; queue nothing."""
        if not isinstance(params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(params).__name__}"
            )
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        limit = self.config.max_model_len
        if n >= limit:
            raise ValueError(
                f"prompt has {n} tokens; max_model_len={limit} allows at most "
                f"{limit - 1} prompt tokens (one output token must fit)"
            )
        V = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < V]
        if bad:
            raise ValueError(f"prompt_token_ids contains {bad[0]}, outside the vocabulary [0, {V})")
        for t in params.stop_token_ids:
            if not 0 <= t < V:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary [0, {V})")
        for t in params.logit_bias or {}:
            if not 0 <= t < V:
                raise ValueError(f"logit_bias key {t} is outside the vocabulary [0, {V})")
        if params.detokenize and self.tokenizer is None:
            raise ValueError("detokenize=True needs a tokenizer; this engine has none")
        if params.stop and not params.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        output_kind: str = "cumulative",
    ) -> None:
        """Queue a request. output_kind (as vLLM v1): "cumulative" — every step returns the text and
        tokens so far; "delta" — only what is new since the last output; "final" — one output when
        the request finishes."""
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind={output_kind!r} must be one of {OUTPUT_KINDS}")
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        now = time.monotonic() if arrival_time is None else arrival_time
        ids = [int(t) for t in prompt_token_ids]
        max_tokens = self.config.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        extra = ("salt", cache_salt) if cache_salt else ()
        req = _Request(
            request_id,
            prompt,
            ids,
            params,
            [],
            RequestMetrics(arrival_time=now),
            output_kind=output_kind,
        )
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first prompt token has no logprob (as vLLM)
        for i in range(params.n):
            seq = Sequence(
                request_id,
                ids,
                max_tokens=max_tokens,
                params=params,
                arrival_time=now,
                priority=priority,
                extra_hash_keys=extra,
                stop_token_ids=self.eos_token_ids,
                min_tokens=min(params.min_tokens, max_tokens),
            )
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(32)
            self.runner.register(seq.seq_id, params, seed)
            detok = (
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                if params.detokenize
                else None
            )
            state = _SeqState(seq, i, detok, logprobs=[] if params.logprobs is not None else None)
            req.seqs.append(state)
            self._by_seq[seq.seq_id] = (req, state)
            self.scheduler.add(seq)
        self._requests[request_id] = req
        self.stats.requests_added += 1

    def abort_request(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None:
            return False
        for s in req.seqs:
            if not s.seq.is_finished:
                self.scheduler.finish(s.seq, FinishReason.ABORT)
        self._retire(req)
        self.stats.requests_aborted += 1
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the requests that progressed (cumulative outputs)."""
        changed: dict[str, _Request] = {}
        timing = StepTiming()
        prev = self._inflight
        self._inflight = None
        if prev is not None and (prev.prepared.needs_sync or not self.config.async_scheduling):
            self._process(prev, changed, timing)
            prev = None
        t0 = time.perf_counter()
        k = self.config.num_scheduler_steps
        if k > 1 and not self.runner.batch.multi_step_ok():
            k = 1
        sched = self.scheduler.schedule(k)
        t1 = time.perf_counter()
        timing.schedule_s = t1 - t0
        if sched.chunks:
            prepared = self.runner.prepare(sched)
            t2 = time.perf_counter()
            self._inflight = self.runner.execute(prepared)
            timing.prepare_s = t2 - t1
            timing.launch_s = time.perf_counter() - t2
        if prev is not None:
            self._process(prev, changed, timing)
        elif not sched.chunks and self._inflight is None and self.scheduler.has_work():
            raise RuntimeError("scheduler made no progress with work pending (engine bug)")
        self.stats.record_step(sched, timing)
        return [self._output(r) for r in changed.values() if r.output_kind != "final" or r.finished]

    def _process(
        self, inflight: InflightStep, changed: dict[str, _Request], timing: StepTiming
    ) -> None:
        t0 = time.perf_counter()
        result: StepResult = self.runner.fetch(inflight)
        t1 = time.perf_counter()
        timing.wait_s += t1 - t0
        self._process_result(result, changed)
        timing.post_s += time.perf_counter() - t1

    def _process_result(self, result: StepResult, changed: dict[str, _Request]) -> None:
        if result.num_tokens is not None:
            self._process_multi(result, changed)
            return
        now = time.monotonic()
        for seq_id, (start, lp, top_i, top_lp) in result.prompt_logprobs.items():
            self._add_prompt_logprobs(seq_id, start, lp, top_i, top_lp)
        upd = self.scheduler.update_sampled(result.seq_ids, result.token_ids.tolist())
        rows: dict[int, int] | None = None  # seq_id → result row, built once logprobs need it
        by_seq = self._by_seq
        ended: dict[str, _Request] = {}
        # Once per running sequence per step: the common case (a token of whole characters, no
        # stop string in it, no logprobs) stays inline; the rest goes to helpers.
        for seq in upd.updated:
            entry = by_seq.get(seq.seq_id)
            if entry is None:
                continue
            req, state = entry
            token = seq.output_token_ids[-1]
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.num_cached_tokens = max(m.num_cached_tokens, seq.num_cached_tokens)
            m.token_times.append(now)
            if state.logprobs is not None:
                if rows is None:
                    rows = {sid: i for i, sid in enumerate(result.seq_ids)}
                self._append_logprobs(req, state, result, rows[seq.seq_id], token)
            if state.detok is not None:
                if seq.finish_reason is FinishReason.STOP:  # by a stop id, in update()
                    self._add_stop_token(req.params, state, token)
                elif (delta := state.detok.add(token)) and req.params.stop:
                    self._find_stop_string(req.params, state, delta)
            changed[req.request_id] = req
            # Ended by a stop id or max_tokens (update) or a stop string (above).
            if seq.finish_reason is not None:
                ended[req.request_id] = req
        for req in ended.values():
            if req.finished:
                self._retire(req)

    def _process_multi(self, result: StepResult, changed: dict[str, _Request]) -> None:
        """A multi-step decode step's results: up to K tokens per sequence, given to the scheduler
        one at a time so that a stop (id, max_tokens or stop string) drops the rest."""
        now = time.monotonic()
        sched = self.scheduler
        by_seq = self._by_seq
        ended: dict[str, _Request] = {}
        ids = result.token_ids.tolist()  # [R][K]
        counts = result.num_tokens.tolist()
        for r, seq_id in enumerate(result.seq_ids):
            seq = sched.take_tokens(seq_id, counts[r])
            if seq is None:
                continue
            req, state = by_seq[seq_id]
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.num_cached_tokens = max(m.num_cached_tokens, seq.num_cached_tokens)
            detok, stop = state.detok, req.params.stop
            toks = ids[r][: counts[r]]
            # No token needs text or logprobs, and none can end it: append them at once.
            if detok is None and state.logprobs is None and sched.accept_all(seq, toks):
                m.token_times.extend([now] * len(toks))
                sched.cache_new_pages(seq)
                changed[req.request_id] = req
                continue
            for j in range(counts[r]):
                token = ids[r][j]
                reason = sched.accept(seq, token)
                m.token_times.append(now)
                if state.logprobs is not None:
                    self._add_logprobs(
                        req.params.logprobs,
                        state,
                        token,
                        result.logprob[r, j],
                        result.top_ids[r, j],
                        result.top_logprobs[r, j],
                    )
                if detok is not None:
                    if reason is FinishReason.STOP:
                        self._add_stop_token(req.params, state, token)
                    elif (delta := detok.add(token)) and stop:
                        self._find_stop_string(req.params, state, delta)
                if seq.finish_reason is not None:
                    ended[req.request_id] = req
                    break
            sched.cache_new_pages(seq)
            changed[req.request_id] = req
        for req in ended.values():
            if req.finished:
                self._retire(req)

    @staticmethod
    def _append_logprobs(
        req: _Request, state: _SeqState, result: StepResult, i: int, token: int
    ) -> None:
        LLMEngine._add_logprobs(
            req.params.logprobs,
            state,
            token,
            result.logprob[i],
            result.top_ids[i],
            result.top_logprobs[i],
        )

    @staticmethod
    def _add_logprobs(k: int, state: _SeqState, token: int, lp, top_ids, top_lps) -> None:
        """Record one sampled token's logprob and the k most likely (id, logprob) beside it."""
        d = {int(t): float(v) for t, v in zip(top_ids[:k], top_lps[:k])}
        d[token] = float(lp)
        state.logprobs.append(d)
        state.cumulative_logprob += float(lp)

    @staticmethod
    def _add_stop_token(p: SamplingParams, state: _SeqState, token: int) -> None:
        """A stop id (or EOS) ended the sequence: its text is not part of the output (as vLLM;
        EOS decodes to "" anyway) unless include_stop_str_in_output asks for a stop id's."""
        state.stop_reason = token if token in p.stop_token_ids else None
        if p.include_stop_str_in_output and token in p.stop_token_ids:
            state.detok.add(token)

    def _find_stop_string(self, p: SamplingParams, state: _SeqState, delta: str) -> None:
        """End the sequence at the earliest stop string that `delta`, just added, completes.

        Only the new text can complete a stop string, so the search covers the last
        (longest - 1) characters before delta plus delta, never the whole text.
        """
        window = state.stop_window + delta
        hit = None
        for s in p.stop:
            j = window.find(s)
            if j >= 0 and (hit is None or j < hit[0]):
                hit = (j, s)
        if hit is None:
            keep = max(map(len, p.stop)) - 1
            state.stop_window = window[max(0, len(window) - keep) :]
            return
        j, s = hit
        at = len(state.text) - len(window) + j  # the stop string's index in the whole text
        state.text_len = at + len(s) if p.include_stop_str_in_output else at
        state.stop_reason = s
        if state.seq.finish_reason is FinishReason.LENGTH:
            # update() ended it on this same token, the last max_tokens allows: the stop string
            # is the reason (as vLLM reports).
            state.seq.finish_reason = FinishReason.STOP
        else:
            self.scheduler.finish(state.seq, FinishReason.STOP)

    def _add_prompt_logprobs(self, seq_id, start, lp, top_i, top_lp) -> None:
        entry = self._by_seq.get(seq_id)
        if entry is None:
            return
        req, state = entry
        if state.index != 0 or req.prompt_logprobs is None:
            return
        k = req.params.prompt_logprobs
        n = len(req.prompt_token_ids)
        for j in range(len(lp)):
            pos = start + j + 1  # logits at position p predict token p+1
            if pos >= n or pos != len(req.prompt_logprobs):
                continue
            d = {int(t): float(v) for t, v in zip(top_i[j][:k], top_lp[j][:k])}
            d[req.prompt_token_ids[pos]] = float(lp[j])
            req.prompt_logprobs.append(d)

    def _retire(self, req: _Request) -> None:
        self._requests.pop(req.request_id, None)
        req.metrics.finished_time = time.monotonic()
        for s in req.seqs:
            self._by_seq.pop(s.seq.seq_id, None)
            self.runner.release(s.seq.seq_id)
            req.metrics.num_preemptions += s.seq.num_preemptions
        if req.finished and req.error is None:
            self.stats.requests_finished += 1

    def _output(self, req: _Request) -> RequestOutput:
        delta = req.output_kind == "delta"
        outs = []
        for s in req.seqs:
            reason = s.seq.finish_reason
            ids, lps = s.seq.output_token_ids, s.logprobs
            if delta:
                ids = ids[s.sent_tokens :]
                lps = None if lps is None else lps[s.sent_tokens :]
                s.sent_tokens = len(s.seq.output_token_ids)
                if s.detok is not None and s.text_len is None:
                    text = s.detok.text_since(s.sent_deltas)  # only the new text is joined
                    s.sent_deltas = s.detok.num_deltas
                else:
                    text = s.text[s.sent_chars :]
                s.sent_chars += len(text)
            else:
                text = s.text
                # Copies: the engine keeps appending to its own lists after this output is handed
                # to another thread.
                ids = ids.copy()
                lps = None if lps is None else lps.copy()
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=ids,
                    cumulative_logprob=s.cumulative_logprob if lps is not None else None,
                    logprobs=lps,
                    finish_reason=None if reason is None else reason.value,
                    stop_reason=s.stop_reason,
                )
            )
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            None if req.prompt_logprobs is None else list(req.prompt_logprobs),
            outs,
            req.finished,
            req.metrics,
            req.error,
        )

    # -- introspection ----------------------------------------------------------------------------

    def kv_usage(self) -> float:
        return self.block_manager.usage()

    def prefix_cache_hit_rate(self) -> float:
        return self.block_manager.prefix_hit_rate
