"""The offline API, in the shape vLLM users know:

from rtpjax import LLM, SamplingParams
llm = LLM()                                   # the embedded default model
outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
outs = llm.chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence as Seq
from typing import Any

from rtpjax import env
from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.engine.model_runner import ModelRunner
from rtpjax.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from rtpjax.sampling_params import SamplingParams
from rtpjax.weights.checkpoint import LoadedModel, load_model

logger = logging.getLogger("rtpjax")

PromptType = str | Seq[int] | dict


class LLM:
    def __init__(
        self,
        model: str | os.PathLike | LoadedModel | None = None,
        *,
        tokenizer: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        page_size: int = 16,
        kv_cache_memory_fraction: float = 0.9,
        num_pages: int | None = None,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        dtype: Any = "auto",
        seed: int = 0,
        long_prefill_token_threshold: int = 0,
        scheduling_policy: str = "fcfs",
        async_scheduling: bool = True,
        attention_impl: str = "auto",
        cudnn_prefill: bool = False,
        num_scheduler_steps: int = 1,
        progress: bool = True,
    ):
        if not env.jax_started():
            env.configure_xla()  # opt-in stable CUDA graphs (RTPJAX_STABLE_GRAPHS): rtpjax/env.py
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            loaded = load_model(
                model,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                tokenizer=tokenizer,
                progress=progress,
            )
        self.model = loaded
        cfg = loaded.config
        if max_model_len is None:
            max_model_len = min(cfg.max_position_embeddings, 8192)
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(2048, min(8192, max_num_seqs))
        config = EngineConfig(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            page_size=page_size,
            num_pages=num_pages,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            enable_prefix_caching=enable_prefix_caching,
            long_prefill_token_threshold=long_prefill_token_threshold,
            policy=scheduling_policy,
            async_scheduling=async_scheduling,
            attention_impl=attention_impl,
            cudnn_prefill=cudnn_prefill,
            num_scheduler_steps=num_scheduler_steps,
            seed=seed,
        )
        pages = plan_num_pages(loaded, config)
        self.engine = LLMEngine(
            cfg, loaded.params, loaded.tokenizer, loaded.mesh, config, num_pages=pages
        )
        self.tokenizer = loaded.tokenizer
        self._ids = itertools.count()

    # -- public API -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or {"prompt_token_ids": [...]})."""
        prompts = _as_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        outputs: dict[str, RequestOutput] = {}
        order = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = str(next(self._ids))
            order.append(rid)
            try:
                text, ids = self._tokenize(prompt)
                self.engine.add_request(
                    rid,
                    text,
                    ids,
                    p,
                    priority=0 if priority is None else priority[i],
                    output_kind="final",
                )
            except ValueError as e:
                outputs[rid] = _failed(rid, prompt, p, str(e))
        outputs.update(self._run(use_tqdm))
        return [outputs[r] for r in order]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        use_tqdm: bool = False,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt_token_ids": self.tokenizer.apply_chat_template(
                    c,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=True,
                    chat_template=chat_template,
                    **template_kwargs,
                )
            }
            for c in convs
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def get_tokenizer(self):
        return self.tokenizer

    # -- internals --------------------------------------------------------------------------------

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(
                f"prompt dict needs 'prompt' or 'prompt_token_ids', got {list(prompt)}"
            )
        ids = list(prompt)
        if not all(isinstance(t, int) for t in ids):
            raise ValueError("prompt must be a string, a list of token ids, or a dict")
        return None, ids

    def _run(self, use_tqdm: bool) -> dict[str, RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.engine.num_unfinished_requests, desc="generating", unit="req")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return done


def _as_list(prompts) -> list:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]
    return prompts


def _per_prompt(sp, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n:
        raise ValueError(f"got {len(sp)} sampling_params for {n} prompts")
    return sp


def _failed(rid: str, prompt, params: SamplingParams, message: str) -> RequestOutput:
    import time

    n = getattr(params, "n", 1)
    outs = [CompletionOutput(i, "", [], None, None, "error") for i in range(n)]
    ids = list(prompt) if isinstance(prompt, list | tuple) else []
    return RequestOutput(
        rid,
        prompt if isinstance(prompt, str) else None,
        ids,
        None,
        outs,
        True,
        RequestMetrics(arrival_time=time.monotonic()),
        error=message,
    )


def plan_num_pages(model: LoadedModel, config: EngineConfig) -> int:
    """KV pages: explicit, or the given fraction of the device memory left after the weights."""
    per_page = ModelRunner.page_bytes(model.config, config.page_size, model.dtype)
    tp = model.mesh.shape.get("tensor", 1)
    per_seq = -(-config.max_model_len // config.page_size)
    if config.num_pages is not None:
        pages = config.num_pages
    else:
        memory = env.device_memory(model.mesh.devices.flat[0])
        if memory is None:
            # CPU: no memory statistics; enough for every sequence at full length, capped at 4 GiB.
            budget = min(4 * 2**30, per_page * per_seq * config.max_num_seqs // tp + per_page)
        else:
            limit, used = memory
            budget = int(config.kv_cache_memory_fraction * limit - used)
        pages = int(budget * tp // per_page)
    if pages < per_seq + 1:
        need = (per_seq + 1) * per_page / tp / 2**30
        raise ValueError(
            f"the KV cache holds {pages} pages of {config.page_size} tokens, fewer than one "
            f"sequence of max_model_len={config.max_model_len} needs ({per_seq + 1} pages, "
            f"{need:.2f} GiB per device); lower max_model_len, raise kv_cache_memory_fraction, "
            "or use more devices"
        )
    logger.info(
        "KV cache: %d pages x %d tokens (%.2f GiB per device)",
        pages,
        config.page_size,
        pages * per_page / tp / 2**30,
    )
    return pages
