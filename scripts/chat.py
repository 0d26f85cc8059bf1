"""Offline chat generation: `python scripts/chat.py [--model PATH] [--prompt TEXT ...]`.

With no arguments it answers a few questions with the embedded default model
(SmolLM2-135M-Instruct),
greedily, and prints each reply with its timing.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a GPU is.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded)")
    ap.add_argument("--prompt", action="append", help="a user message (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args(argv)

    from rtpjax import LLM, SamplingParams

    try:
        llm = LLM(args.model, max_model_len=args.max_model_len)
        params = SamplingParams(
            temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or DEFAULT_PROMPTS
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    wall = time.perf_counter() - t0
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        if o.error:
            print(f"\n> {p}\n[error] {o.error}")
            continue
        ttft = o.metrics.ttft or 0.0
        print(
            f"\n> {p}\n{c.text}\n[{len(c.token_ids)} tokens, {c.finish_reason}, "
            f"TTFT {ttft * 1e3:.0f} ms]"
        )
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    print(
        f"\n{len(prompts)} chats, {total} tokens in {wall:.2f} s "
        f"({llm.engine.runner.num_compiled_variants} compiled step variants)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
