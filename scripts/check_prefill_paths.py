"""Compare the engine's prefill attention paths on one device (tokens and prompt logprobs).

    python scripts/check_prefill_paths.py --model llama3-1b --compare triton,default

Builds the engine twice on the same random weights of the preset with two of the attention
paths: "triton" (the Triton-lowered paged kernel for every step), "default" (on Hopper the
Mosaic GPU kernel for prefill steps, the Triton kernel for decode steps), "xla" (XLA's
attention for every step: the reference for the decode kernel too), "cudnn"
(`cudnn_prefill=True`: fresh prefill steps through cuDNN's flash attention, chunks over cached
prefixes through kernels/prefix_prefill.py), and runs
the same long prompts chunked by `--max-num-batched-tokens`, so every chunk after the first
attends to cached pages at offsets that are not page-aligned. Greedy decoding of `--max-tokens`
tokens with the logprob of every prompt token. Prints how many generated tokens agree and the
largest / mean / p99 difference of the prompt logprobs; both paths compute in bf16 on a GPU, so
the logprobs differ by bf16 rounding and a greedy token may flip at a near-tie. Exits 1 if fewer
than `--min-equal` of the tokens agree. On CPU (no cuDNN, no GPU kernels) both runs take the XLA
path: a smoke test of the plumbing.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rtpjax import env

env.configure_xla()

import jax  # noqa: E402

from rtpjax import SamplingParams  # noqa: E402
from rtpjax.models.presets import preset  # noqa: E402
from scripts import bench_offline as bo  # noqa: E402

# A path: the engine's attention settings (attention_impl, cudnn_prefill).
PATHS = {
    "default": ("auto", False),  # on Hopper: Mosaic GPU kernel for prefill, Triton for decode
    "triton": ("triton", False),  # the Triton kernel for every step
    "xla": ("xla", False),  # XLA's attention for every step, decode included
    "cudnn": ("auto", True),  # cuDNN for fresh prefill and chunks over cached prefixes
}


def run(args, path: str, prompts: list[dict]) -> tuple[list, dict]:
    impl, cudnn = PATHS[path]
    if jax.default_backend() != "gpu":
        impl = "auto"
    ns = argparse.Namespace(
        model="random:" + args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=8,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype="auto",
        tensor_parallel_size=1,
        kv_cache_memory_fraction=0.3,
        num_scheduler_steps=1,
        cudnn_prefill=cudnn,
        attention_impl=impl,
    )
    llm = bo.build(ns)
    sp = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, prompt_logprobs=1, detokenize=False
    )
    outs = llm.generate(prompts, sp)
    info = {
        "path": path,
        "cudnn_prefill": llm.engine.runner.cudnn_prefill,
        "variants": llm.engine.runner.num_compiled_variants,
    }
    res = [(list(o.outputs[0].token_ids), list(o.prompt_logprobs or [])) for o in outs]
    del llm
    jax.clear_caches()
    return res, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-1b", help="preset with random weights")
    ap.add_argument("--prompt-lens", default="1500,900,2000")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--min-equal", type=float, default=0.9, help="fraction of tokens that agree")
    ap.add_argument("--compare", default="triton,cudnn", help=f"two of {sorted(PATHS)}")
    args = ap.parse_args(argv)
    lens = [int(v) for v in args.prompt_lens.split(",") if v]
    vocab = preset(args.model).vocab_size
    prompts = [p for i, n in enumerate(lens) for p in bo.random_prompts(1, n, vocab, i + 1)]
    pair = args.compare.split(",")
    if len(pair) != 2 or not set(pair) <= set(PATHS):
        ap.error(f"--compare={args.compare!r} must be two of {sorted(PATHS)}, comma-separated")
    (paged, info_p), (cudnn, info_c) = run(args, pair[0], prompts), run(args, pair[1], prompts)
    print(f"A: {info_p}; B: {info_c}")
    diffs, same, total = [], 0, 0
    for (tok_a, lp_a), (tok_b, lp_b) in zip(paged, cudnn):
        same += sum(a == b for a, b in zip(tok_a, tok_b))
        total += max(len(tok_a), len(tok_b))
        for da, db in zip(lp_a, lp_b):
            if da is None or db is None:
                continue
            for t in da.keys() & db.keys():
                va, vb = (getattr(d[t], "logprob", d[t]) for d in (da, db))
                diffs.append(abs(va - vb))
    d = np.asarray(diffs) if diffs else np.zeros(1)
    print(
        f"prompt logprobs compared: {len(diffs)}, max |diff| {d.max():.4f}, mean {d.mean():.5f}, "
        f"p99 {np.quantile(d, 0.99):.4f}"
    )
    print(f"greedy tokens equal: {same} of {total}")
    return 0 if same >= args.min_equal * total else 1


if __name__ == "__main__":
    sys.exit(main())
