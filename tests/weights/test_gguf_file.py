"""GGUF → HF tensors and config, against transformers' goldens.

The goldens come from scripts/goldens/make_gguf_goldens.py (oracle venv); this file needs no torch.
"""

from __future__ import annotations

import json
import os
import pathlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from rtpjax.env import default_model_path
from rtpjax.weights.gguf_file import (
    SUPPORTED_TYPES,
    fit_llama3_rope_scaling,
    llama3_rope_freq_factors,
    read_gguf,
    unpermute_llama_rows,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
TINY = ["llama_mixed", "qwen2_q8", "qwen3_q8"]


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def transformers_state(name: str) -> dict[str, np.ndarray]:
    arrays = load_npz(FIXTURES / f"{name}.npz")
    return {k.removeprefix("state."): v for k, v in arrays.items() if k.startswith("state.")}


def write_gguf(path: pathlib.Path, arch: str = "llama", tensors: dict | None = None, **kv) -> str:
    """A minimal GGUF with llama-style metadata; `tensors` maps GGUF names to (array, raw type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(32)])
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    tensors = (
        tensors
        if tensors is not None
        else {"token_embd.weight": (np.ones((32, 64), np.float32), None)}
    )
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# ---- tensors: bitwise equal to transformers' state dict ------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tensors_equal_transformers_state_dict(name: str) -> None:
    # Bitwise: transformers' GGUF path dequantises with the same gguf.quants code, then un-permutes
    # llama q/k; any difference in names, layout, permutation or dequantisation shows here.
    ckpt = read_gguf(FIXTURES / f"{name}.gguf")
    golden = transformers_state(name)
    ours = dict(ckpt.tensors())
    expected_names = set(golden)
    if ckpt.hf_config()["tie_word_embeddings"]:  # transformers lists the tied head as well
        np.testing.assert_array_equal(golden["lm_head.weight"], golden["model.embed_tokens.weight"])
        expected_names.discard("lm_head.weight")
    assert set(ours) == expected_names
    assert list(ours) == ckpt.tensor_names()
    for hf_name, array in ours.items():
        assert array.dtype == np.float32, hf_name
        assert array.shape == golden[hf_name].shape == ckpt.tensor_shape(hf_name), hf_name
        assert array.tobytes() == golden[hf_name].tobytes(), f"{name}: {hf_name} differs"


def test_every_quant_type_is_exercised() -> None:
    ckpt = read_gguf(FIXTURES / "llama_mixed.gguf")
    types = {ckpt.tensor_type(n) for n in ckpt.tensor_names() if len(ckpt.tensor_shape(n)) == 2}
    assert types == {q.name for q in SUPPORTED_TYPES}
    # q/k of a llama are stored permuted, so un-permuting is not a no-op on these fixtures.
    raw = {t.name: t for t in gguf.GGUFReader(FIXTURES / "llama_mixed.gguf").tensors}
    stored = raw["blk.1.attn_q.weight"]
    as_stored = gguf.quants.dequantize(stored.data, stored.tensor_type)
    golden = transformers_state("llama_mixed")["model.layers.1.self_attn.q_proj.weight"]
    assert not np.array_equal(as_stored, golden)
    np.testing.assert_array_equal(unpermute_llama_rows(as_stored, 4), golden)


def test_tensor_returns_owned_writable_arrays() -> None:
    ckpt = read_gguf(FIXTURES / "qwen3_q8.gguf")
    norm = ckpt.tensor("model.norm.weight")  # F32 in the file: must not be a read-only memmap view
    norm[0] = 123.0
    assert ckpt.tensor("model.norm.weight")[0] != 123.0


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rng = np.random.default_rng(0)
    for n_head, head_dim, extra in [(4, 8, (16,)), (2, 6, ()), (3, 64, (5,))]:
        w = rng.standard_normal((n_head * head_dim, *extra)).astype(np.float32)
        # llama.cpp's convert_hf_to_gguf: rows of each head, halves → interleaved pairs.
        permuted = w.reshape(n_head, 2, head_dim // 2, *extra).swapaxes(1, 2).reshape(w.shape)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_llama_rows(permuted, n_head), w)
    with pytest.raises(ValueError, match="un-permute"):
        unpermute_llama_rows(np.zeros((6, 2), np.float32), 2)


# ---- config: what transformers builds from the same file ----------------------------------------


def check_config_against_transformers(ours: dict, oracle: dict) -> None:
    theirs = oracle["config"]
    assert ours["architectures"] == [oracle["model_class"]]
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == theirs[key], key
    # Qwen2Config has no head_dim field: its attention uses hidden_size // num_attention_heads.
    their_head_dim = (
        theirs.get("head_dim") or theirs["hidden_size"] // theirs["num_attention_heads"]
    )
    assert ours["head_dim"] == their_head_dim
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    assert theirs["rope_parameters"]["rope_type"] == "default" and ours["rope_scaling"] is None
    if ours["model_type"] == "qwen2":
        assert ours["attention_bias"] is True  # Qwen2 has q/k/v biases unconditionally
    else:
        assert ours["attention_bias"] == theirs["attention_bias"]
    assert ours["torch_dtype"] == "float32"


@pytest.mark.parametrize("name", TINY)
def test_hf_config_matches_transformers(name: str) -> None:
    oracle = json.loads((FIXTURES / f"{name}.config.json").read_text())
    check_config_against_transformers(read_gguf(FIXTURES / f"{name}.gguf").hf_config(), oracle)


def test_head_dim_from_key_length_and_vocab_from_tokens() -> None:
    # qwen3_q8 has H=128 ≠ D/N=32, told only by attention.key_length; llama_mixed has no
    # llama.vocab_size key, so the vocabulary is the token list's length.
    qwen3 = read_gguf(FIXTURES / "qwen3_q8.gguf")
    assert qwen3.hf_config()["head_dim"] == 128 != 64 // 2
    llama = read_gguf(FIXTURES / "llama_mixed.gguf")
    assert "llama.vocab_size" not in llama.metadata
    assert llama.hf_config()["vocab_size"] == len(llama.metadata["tokenizer.ggml.tokens"]) == 512


def test_metadata_is_plain_python(tmp_path: pathlib.Path) -> None:
    ckpt = read_gguf(FIXTURES / "qwen2_q8.gguf")
    assert ckpt.metadata["general.architecture"] == "qwen2"
    assert ckpt.metadata["qwen2.embedding_length"] == 64
    assert ckpt.metadata["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]

    def plain(value) -> bool:
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (str, int, float, bool)

    assert all(plain(v) for v in ckpt.metadata.values())
    assert not any(k.startswith("GGUF.") for k in ckpt.metadata)


# ---- rope scaling --------------------------------------------------------------------------------


def test_llama3_rope_freqs_map_to_transformers_parameters(tmp_path: pathlib.Path) -> None:
    golden = load_npz(FIXTURES / "llama3_rope_freqs.npz")
    expected = {
        k.removeprefix("scaling."): v.item() for k, v in golden.items() if k.startswith("scaling.")
    }
    for case in ("h64", "h128"):
        freqs = golden[f"{case}.rope_freqs"]  # f32[H/2]: transformers' default / llama3 inv_freq
        head_dim, theta = int(golden[f"{case}.head_dim"]), float(golden[f"{case}.rope_theta"])
        fitted = fit_llama3_rope_scaling(freqs, head_dim, theta)
        assert fitted == {"rope_type": "llama3", **expected}
        np.testing.assert_allclose(
            llama3_rope_freq_factors(fitted, head_dim, theta), freqs, rtol=1e-6
        )
    # Through a file (H=64 told by key_length): the tensor is consumed, it is not an HF tensor.
    head_dim = 64
    freqs = llama3_rope_freq_factors(
        {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        head_dim,
        500000.0,
    ).astype(np.float32)
    path = write_gguf(
        tmp_path / "l3.gguf",
        tensors={
            "token_embd.weight": (np.ones((32, 64), np.float32), None),
            "rope_freqs.weight": (freqs, None),
        },
        **{"llama.rope.freq_base": 500000.0, "llama.attention.key_length": head_dim},
    )
    ckpt = read_gguf(path)
    assert ckpt.hf_config()["rope_scaling"] == {"rope_type": "llama3", **expected}
    assert ckpt.tensor_names() == ["model.embed_tokens.weight"]


def test_rope_freqs_that_are_not_llama3_raise(tmp_path: pathlib.Path) -> None:
    freqs = np.random.default_rng(0).uniform(1.0, 3.0, 16).astype(np.float32)
    path = write_gguf(
        tmp_path / "odd_rope.gguf",
        tensors={
            "token_embd.weight": (np.ones((32, 64), np.float32), None),
            "rope_freqs.weight": (freqs, None),
        },
    )
    ckpt = read_gguf(path)
    with pytest.raises(ValueError, match=r"odd_rope\.gguf.*rope_freqs\.weight"):
        ckpt.hf_config()


def test_rope_scaling_metadata(tmp_path: pathlib.Path) -> None:
    linear = write_gguf(
        tmp_path / "lin.gguf",
        **{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    )
    assert read_gguf(linear).hf_config()["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn = write_gguf(
        tmp_path / "yarn.gguf",
        **{
            "llama.rope.scaling.type": "yarn",
            "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 32768,
        },
    )
    assert read_gguf(yarn).hf_config()["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    longrope = write_gguf(
        tmp_path / "longrope.gguf",
        **{"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0},
    )
    with pytest.raises(ValueError, match=r"longrope\.gguf.*rope\.scaling\.type='longrope'"):
        read_gguf(longrope).hf_config()


# ---- the real SmolLM2-135M-Instruct Q4_1 ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    info = json.loads((FIXTURES / "smollm2_golden.json").read_text())
    path = default_model_path()
    assert os.path.getsize(path) == info["gguf_size"], (
        "the installed SmolLM2 GGUF is not the golden's"
    )
    return read_gguf(path), load_npz(FIXTURES / "smollm2_golden.npz"), info


def test_smollm2_tensors_equal_transformers(smollm2) -> None:
    ckpt, golden, _ = smollm2
    slices = {
        "w.model.embed_tokens.weight.rows_0_4": ckpt.tensor("model.embed_tokens.weight")[0:4],
        "w.model.layers.0.self_attn.q_proj.weight": ckpt.tensor(
            "model.layers.0.self_attn.q_proj.weight"
        ),
        "w.model.layers.0.self_attn.k_proj.weight": ckpt.tensor(
            "model.layers.0.self_attn.k_proj.weight"
        ),
        "w.model.layers.29.mlp.down_proj.weight.rows_0_8": ckpt.tensor(
            "model.layers.29.mlp.down_proj.weight"
        )[0:8],
        "w.model.norm.weight": ckpt.tensor("model.norm.weight"),
    }
    for key, ours in slices.items():
        assert ours.shape == golden[key].shape, key
        assert ours.tobytes() == golden[key].tobytes(), key
    assert len(ckpt.tensor_names()) == 2 + 30 * 9  # embed, final norm, 9 per layer; lm_head tied


def test_smollm2_hf_config_matches_transformers(smollm2) -> None:
    ckpt, _, info = smollm2
    config = ckpt.hf_config()
    check_config_against_transformers(config, info)
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    assert ckpt.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")


# ---- errors: one line, naming the file -----------------------------------------------------------


def assert_one_line_naming(excinfo: pytest.ExceptionInfo, path: str) -> None:
    message = str(excinfo.value)
    assert path in message and "\n" not in message, message


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError) as excinfo:
        read_gguf(path)
    assert_one_line_naming(excinfo, path)


@pytest.mark.parametrize("content", [b"", b"GG", os.urandom(4096), b"PK\x03\x04" + bytes(100)])
def test_not_a_gguf(tmp_path: pathlib.Path, content: bytes) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a GGUF") as excinfo:
        read_gguf(path)
    assert_one_line_naming(excinfo, str(path))


def test_truncated_files(tmp_path: pathlib.Path) -> None:
    whole = (FIXTURES / "qwen2_q8.gguf").read_bytes()
    data_start = gguf.GGUFReader(FIXTURES / "qwen2_q8.gguf").data_offset
    cuts = sorted(
        {
            6,
            16,
            24,
            40,
            100,
            1000,
            3000,
            data_start - 1,
            data_start,
            data_start + 1,
            len(whole) // 2,
            len(whole) - 1000,
            len(whole) - 1,
        }
    )
    for cut in cuts:
        path = tmp_path / f"cut_{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError) as excinfo:
            read_gguf(path)
        assert_one_line_naming(excinfo, str(path))


def test_unsupported_quant_type(tmp_path: pathlib.Path) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q5_K]
    blocks = np.zeros((32, 256 // block_size * type_size), np.uint8)
    path = write_gguf(tmp_path / "q5k.gguf", tensors={"token_embd.weight": (blocks, Q.Q5_K)})
    with pytest.raises(ValueError, match=r"q5k\.gguf.*'token_embd\.weight'.*Q5_K") as excinfo:
        read_gguf(path)
    assert_one_line_naming(excinfo, path)


def test_unsupported_architecture(tmp_path: pathlib.Path) -> None:
    path = write_gguf(tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(
        ValueError, match=r"general\.architecture='gemma'.*llama, qwen2, qwen3"
    ) as excinfo:
        read_gguf(path)
    assert_one_line_naming(excinfo, path)


def test_unknown_tensor_name(tmp_path: pathlib.Path) -> None:
    path = write_gguf(
        tmp_path / "fused.gguf",
        tensors={"blk.0.attn_qkv.weight": (np.zeros((128, 64), np.float32), None)},
    )
    with pytest.raises(ValueError, match=r"fused\.gguf.*'blk\.0\.attn_qkv\.weight'"):
        read_gguf(path)


def test_unknown_tensor_lookup() -> None:
    ckpt = read_gguf(FIXTURES / "qwen2_q8.gguf")
    with pytest.raises(KeyError, match=r"lm_head\.weight"):
        ckpt.tensor("lm_head.weight")  # tied: not in the file
