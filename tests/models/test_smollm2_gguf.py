"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the
same GGUF (gguf_file=), float32: logits, every layer, and 32 greedy tokens of chat replies."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.engine.reference import DenseGenerator
from rtpjax.env import default_model_path
from rtpjax.tokenizer import Tokenizer
from rtpjax.weights.checkpoint import open_checkpoint
from rtpjax.weights.loader import load_params
from tests.conftest import FIXTURES

PROMPTS = ["capital", "short", "long"]


@functools.cache
def loaded():
    path = default_model_path()
    ckpt = open_checkpoint(path)
    cfg = ModelConfig.from_hf(ckpt.hf_config, source=path)
    params = load_params(ckpt.source, cfg, jnp.float32)
    golden = dict(np.load(FIXTURES / "gguf" / "smollm2_golden.npz"))
    return cfg, params, golden, DenseGenerator(cfg, params)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_config_from_gguf():
    cfg, *_ = loaded()
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0


@pytest.mark.parametrize("name", PROMPTS)
def test_logits_and_greedy_chat_reply(name):
    _, _, g, gen = loaded()
    ids = [int(t) for t in g[f"{name}.prompt_ids"]]
    logits, _, _ = gen.prefill(ids, 128)
    assert rel_err(logits, g[f"{name}.logits_last4"][-1]) < 1e-4
    out = gen.generate(ids, 32)
    assert out == [int(t) for t in g[f"{name}.greedy_ids_ignore_eos"]]


def test_every_layer_hidden_state():
    cfg, _, g, gen = loaded()
    ids = [int(t) for t in g["capital.prompt_ids"]]
    _, _, hidden = gen.prefill(ids, 64, collect_hidden=True)
    ref = g["capital.hidden_states_last"]  # [31, D]: embeddings, layers 0..28 outputs, final norm
    last = len(ids) - 1
    for i in range(cfg.num_layers):
        assert rel_err(hidden[i][last], ref[i]) < 1e-4, f"layer {i}"


def test_chat_prompt_ids_match_transformers():
    g = loaded()[2]
    tok = Tokenizer.from_pretrained(default_model_path())
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    assert ids == [int(t) for t in g["capital.prompt_ids"]]
