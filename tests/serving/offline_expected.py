"""The offline engine's outputs for the serving tests, computed in a child process.

    python tests/serving/offline_expected.py < spec.json > outputs.json

spec: {"settings": {LLM keyword arguments}, "jobs": [{"prompts": [...]} or {"messages": [...]},
with "params": {SamplingParams fields}]}. Output: one {"texts": [...], "finish_reasons": [...]} per
job. A child process keeps the test process free of a second model and of jax's global settings
(it shares the server's persistent compilation cache through JAX_COMPILATION_CACHE_DIR).
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
    results = []
    for job in spec["jobs"]:
        params = SamplingParams(**job["params"])
        if "messages" in job:
            outs = llm.chat(job["messages"], params)
        else:
            outs = llm.generate(job["prompts"], params)
        results.append(
            {
                "texts": [o.outputs[0].text for o in outs],
                "finish_reasons": [o.outputs[0].finish_reason for o in outs],
            }
        )
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
