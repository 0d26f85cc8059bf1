"""Conversion round trips are bit-exact: HF → Orbax → HF, GGUF → HF, and every route loads the
same parameters; the tokenizer travels with the weights."""

from __future__ import annotations

import importlib.util
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.env import default_model_path
from rtpjax.tokenizer import Tokenizer
from rtpjax.weights.checkpoint import convert_checkpoint, load_model, open_checkpoint
from rtpjax.weights.fast_loader import load_params_fast
from rtpjax.weights.gguf_file import read_gguf
from rtpjax.weights.loader import load_params
from rtpjax.weights.orbax_io import OrbaxCheckpoint, write_tokenizer_files
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint, save_file
from tests.conftest import FIXTURES
from tests.weights.test_loading import assert_same_params

MODELS = FIXTURES / "models"
ROOT = FIXTURES.parents[1]


def tensors(path) -> dict[str, np.ndarray]:
    src = SafetensorsCheckpoint(path)
    return {n: np.array(src.tensor(n)) for n in src.tensor_names()}


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert a[n].tobytes() == b[n].tobytes(), n


@pytest.mark.parametrize("name", ["llama3_gqa4", "qwen2_bias", "llama_tied"])
def test_hf_orbax_hf_round_trip_is_bit_exact(tmp_path, name):
    orbax = convert_checkpoint(MODELS / name, tmp_path / "orbax", "orbax")
    back = convert_checkpoint(orbax, tmp_path / "hf", "hf", max_shard_bytes=100_000)
    assert_same_tensors(tensors(MODELS / name), tensors(back))
    with open(MODELS / name / "config.json") as f, open(tmp_path / "hf" / "config.json") as g:
        assert json.load(f) == json.load(g)
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    if name != "llama_tied":  # >100 kB: written in several shards with an index
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()


def test_mixed_dtypes_survive_the_round_trip(tmp_path):
    """bf16 weights with f32 norms: the tree is stored in f32 and each tensor's dtype restored."""
    src = tmp_path / "mixed"
    shutil.copytree(MODELS / "llama_mha8", src)
    t = tensors(src)
    t = {n: a if "norm" in n else a.astype(ml_dtypes.bfloat16) for n, a in t.items()}
    save_file(t, src / "model.safetensors")
    convert_checkpoint(src, tmp_path / "orbax", "orbax")
    assert OrbaxCheckpoint(tmp_path / "orbax").marker["dtype"] == "float32"
    convert_checkpoint(tmp_path / "orbax", tmp_path / "hf", "hf")
    assert_same_tensors(t, tensors(tmp_path / "hf"))


@pytest.mark.parametrize("name", ["llama_mixed", "qwen3_q8"])
def test_gguf_to_hf_equals_the_gguf_tensors(tmp_path, name):
    path = FIXTURES / "gguf" / f"{name}.gguf"
    out = convert_checkpoint(path, tmp_path / "hf", "hf")
    g = read_gguf(path)
    assert_same_tensors({n: g.tensor(n) for n in g.tensor_names()}, tensors(out))
    cfg = ModelConfig.from_hf(out)
    assert cfg == ModelConfig.from_hf(g.hf_config())
    # GGUF → load and GGUF → HF → load give the same parameters (fast and simple loaders).
    direct = load_params(g, cfg, jnp.float32)
    via_hf, _ = load_params_fast(SafetensorsCheckpoint(out), cfg, jnp.float32)
    assert_same_params(direct, via_hf)


def test_gguf_to_orbax_loads_the_same_parameters(tmp_path):
    path = FIXTURES / "gguf" / "qwen2_q8.gguf"
    out = convert_checkpoint(path, tmp_path / "orbax", "orbax")
    g = read_gguf(path)
    cfg = ModelConfig.from_hf(g.hf_config())
    ckpt = open_checkpoint(out)
    assert ckpt.kind == "orbax"
    from rtpjax.weights.orbax_io import load_orbax_params

    assert_same_params(
        load_params(g, cfg, jnp.bfloat16), load_orbax_params(ckpt.source, cfg, jnp.bfloat16)
    )


def test_gguf_tokenizer_is_carried(tmp_path):
    """SmolLM2's GGUF tokenizer written as tokenizer.json & co. encodes, decodes, renders chats
    and stops exactly as the GGUF's own."""
    gguf = default_model_path()
    write_tokenizer_files(gguf, tmp_path)
    a, b = Tokenizer.from_gguf_file(gguf), Tokenizer.from_dir(tmp_path)
    texts = ["Hello, world!", "  two  spaces\nand a newline", "<|im_start|>user\nhé 😀<|im_end|>"]
    for text in texts:
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert a.apply_chat_template(chat, add_generation_prompt=True) == b.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (a.bos_token_id, a.eos_token_ids, a.vocab_size) == (
        b.bos_token_id,
        b.eos_token_ids,
        b.vocab_size,
    )


def test_script_round_trip_and_errors(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src = MODELS / "mistral_swa"
    assert script.main([str(src), str(tmp_path / "o"), "--to", "orbax", "--quiet"]) == 0
    assert script.main([str(tmp_path / "o"), str(tmp_path / "h"), "--to", "hf"]) == 0
    out = capsys.readouterr()
    assert "wrote" in out.out and "B/s" in out.err  # progress bar with a byte rate
    assert_same_tensors(tensors(src), tensors(tmp_path / "h"))
    assert script.main([str(src), str(tmp_path / "o"), "--to", "orbax"]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert script.main([str(tmp_path / "o"), str(tmp_path / "o2"), "--to", "orbax"]) == 2
    assert "already an orbax checkpoint" in capsys.readouterr().err
    assert script.main([str(src), str(tmp_path / "b"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    got = tensors(tmp_path / "b")
    assert all(a.dtype == ml_dtypes.bfloat16 for a in got.values())


def test_sentencepiece_gguf_tokenizer_is_carried(tmp_path):
    path = FIXTURES / "tokenizer" / "tiny_spm.gguf"  # a SentencePiece vocabulary, no weights
    out = tmp_path / "tok"
    assert write_tokenizer_files(path, out) == [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ]
    a, b = Tokenizer.from_gguf_file(path), Tokenizer.from_dir(out)
    for text in ["Hello world", " leading space", "numbers 12345"]:
        assert a.encode(text) == b.encode(text)
    assert (a.bos_token_id, a.eos_token_ids, a.vocab_size) == (
        b.bos_token_id,
        b.eos_token_ids,
        b.vocab_size,
    )


def test_gguf_without_vocabulary_converts_weights_and_warns(tmp_path, caplog):
    out = convert_checkpoint(FIXTURES / "gguf" / "llama_mixed.gguf", tmp_path / "hf", "hf")
    assert "no tokenizer files written" in caplog.text and "merges is missing" in caplog.text
    lm = load_model(out, dtype="float32", tokenizer=FIXTURES / "tokenizer" / "smollm2")
    direct = load_model(
        FIXTURES / "gguf" / "llama_mixed.gguf",
        dtype="float32",
        tokenizer=FIXTURES / "tokenizer" / "smollm2",
    )
    assert_same_params(direct.params, lm.params)
