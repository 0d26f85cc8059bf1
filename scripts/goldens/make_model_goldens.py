"""Write tiny random-weight HF models of each supported family and transformers' outputs for them.

Run with a Python that has torch + transformers (never needed by rtpjax or its tests):
    /path/to/oracle/python scripts/goldens/make_model_goldens.py
Writes tests/fixtures/models/<name>/{config.json, *.safetensors, golden.npz, golden.json}.

Random tiny models have nearly tied logits, which would make greedy comparisons flaky: weights
are drawn wider than HF's default init, norms and biases are randomised (HF starts them at 1 and
0, which would hide a bias or norm bug), and the script checks that every greedy step's
top-1/top-2 margin is comfortably above float32 noise, re-seeding if not.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "models")
PROMPT_LEN = 11
NEW_TOKENS = 32
MIN_MARGIN = 2e-3

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

MODELS = {
    # Llama 3.x with 'llama3' rope scaling (original 64 positions so all three bands are exercised)
    # and GQA ratio 4; saved sharded to test model.safetensors.index.json.
    "llama3_gqa4": (
        LlamaConfig,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        True,
    ),
    # Llama 2 style: MHA, default rope, attention_bias (bias on q/k/v/o); config.json rewritten in
    # the legacy key style (rope_theta / rope_scaling) to test that path too.
    "llama2_bias": (
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True),
        False,
    ),
    # Mistral with a sliding window shorter than the prompt.
    "mistral_swa": (
        MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8, head_dim=16),
        False,
    ),
    "qwen2_bias": (
        Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0),
        False,
    ),
    # Qwen3: q/k RMSNorm, explicit head_dim different from hidden/heads.
    "qwen3_qknorm": (
        Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0),
        False,
    ),
    # SmolLM2-like: tied embeddings, GQA ratio 3.
    "llama_tied": (
        LlamaConfig,
        dict(
            num_attention_heads=6,
            num_key_value_heads=2,
            hidden_size=48,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        ),
        False,
    ),
    # Tensor-parallel test models: 8 query / 8 KV heads (the 8 query / 2 KV one is llama3_gqa4).
    "llama_mha8": (LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=8), False),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def greedy_margins(model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    out = model.generate(
        ids,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    margins = []
    for s in out.scores:  # processed scores per step [1, V]
        top2 = torch.topk(s[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return out.sequences[0, ids.shape[1] :], min(margins)


def make(name: str, cls, kwargs: dict, sharded: bool) -> None:
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg_kwargs = {**COMMON, **kwargs}
    config = cls(**cfg_kwargs)
    config._attn_implementation = "eager"
    for attempt in range(20):
        seed = 1000 * attempt + sum(map(ord, name))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        randomize(model, seed)
        rng = np.random.default_rng(seed)
        ids = torch.tensor(rng.integers(3, config.vocab_size, (1, PROMPT_LEN)), dtype=torch.long)
        with torch.no_grad():
            fwd = model(ids, output_hidden_states=True)
            greedy, margin = greedy_margins(model, ids)
            # The prompt's own logits must not be near-tied either (first greedy token).
        if margin >= MIN_MARGIN:
            break
    else:
        sys.exit(f"{name}: could not find weights with greedy margin >= {MIN_MARGIN}")
    model.save_pretrained(out_dir, max_shard_size="60KB" if sharded else "1GB")
    if name == "llama2_bias":
        legacy_config(os.path.join(out_dir, "config.json"))
    hidden = torch.stack([h[0] for h in fwd.hidden_states]).numpy().astype(np.float32)
    np.savez_compressed(
        os.path.join(out_dir, "golden.npz"),
        input_ids=ids[0].numpy().astype(np.int32),
        hidden_states=hidden,  # [L+1, T, D]: embeddings, each layer; the last is after final norm
        logits=fwd.logits[0].numpy().astype(np.float32),  # [T, V]
        greedy=greedy.numpy().astype(np.int32),  # [NEW_TOKENS]
    )
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(
            {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "seed": seed,
                "min_greedy_margin": margin,
                "sharded": sharded,
            },
            f,
            indent=1,
        )
    files = sorted(os.listdir(out_dir))
    print(f"{name}: seed {seed}, min greedy margin {margin:.4f}, files {files}")


def legacy_config(path: str) -> None:
    """Rewrite transformers v5's `rope_parameters` into the v4 keys (rope_theta, rope_scaling)."""
    with open(path) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.get("rope_theta", 10000.0)
    c["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    with open(path, "w") as f:
        json.dump(c, f, indent=2)


if __name__ == "__main__":
    os.makedirs(ROOT, exist_ok=True)
    torch.set_num_threads(2)
    for name, (cls, kwargs, sharded) in MODELS.items():
        make(name, cls, kwargs, sharded)
