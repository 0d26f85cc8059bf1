"""The offline engine's outputs for the serving tests, computed in a child process.

    python tests/serving/offline_expected.py < spec.json > outputs.json

spec: {"settings": {LLM keyword arguments}, "requests": [{"prompt": str} or {"messages": [...]},
each with "params": {SamplingParams fields}]}. All requests go through one `LLM.generate` call
(chats as their chat-template token ids, exactly what `LLM.chat` sends). Output: {"outputs": one
{"text", "finish_reason"} per request, "prompt_ids": each request's prompt token ids}.

A child process keeps the test process free of a second model and of jax's global settings (it
shares the server's persistent compilation cache through JAX_COMPILATION_CACHE_DIR).
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rtpjax import LLM, SamplingParams


def main() -> int:
    spec = json.load(sys.stdin)
    llm = LLM(**spec["settings"], progress=False)
    tok = llm.get_tokenizer()
    prompts = [
        {"prompt_token_ids": tok.apply_chat_template(r["messages"], add_generation_prompt=True)}
        if "messages" in r
        else r["prompt"]
        for r in spec["requests"]
    ]
    params = [SamplingParams(**r["params"]) for r in spec["requests"]]
    outs = llm.generate(prompts, params)
    result = {
        "outputs": [
            {"text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason} for o in outs
        ],
        "prompt_ids": [o.prompt_token_ids for o in outs],
    }
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
