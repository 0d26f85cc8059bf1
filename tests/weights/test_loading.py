"""The fast loader: bit-identical to the simple loader on every fixture and mesh, reads in file
order into a bounded ring, reads only the rows a process's devices hold, and fails cleanly."""

from __future__ import annotations

import itertools
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.models import llama
from rtpjax.models.params import info_leaves, is_info
from rtpjax.sharding import rules
from rtpjax.sharding.mesh import make_mesh
from rtpjax.weights.checkpoint import load_model, open_checkpoint
from rtpjax.weights.fast_loader import (
    DevicePlacer,
    LoadOptions,
    load_params_fast,
    make_plan,
    read_local_shards,
    run_plan,
)
from rtpjax.weights.gguf_file import read_gguf
from rtpjax.weights.loader import load_params, recipes
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint, drop_from_page_cache, save_file
from tests.conftest import FIXTURES

MODELS = FIXTURES / "models"
TOKENIZER = FIXTURES / "tokenizer" / "smollm2"
# Small blocks and a two-slot ring: tensors split over several reads, slots reused many times.
TIGHT = LoadOptions(readers=3, block_bytes=4096, ring_slots=2)


def assert_same_params(a: llama.Params, b: llama.Params) -> None:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb, strict=True):
        where = jax.tree_util.keystr(path)
        assert x.shape == y.shape and x.dtype == y.dtype, where
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim), where
        hx, hy = np.asarray(x), np.asarray(y)
        assert hx.tobytes() == hy.tobytes(), f"{where} differs"


def load_both(source, cfg, dtype, mesh, options=TIGHT):
    ref = load_params(source, cfg, dtype, mesh)
    fast, stats = load_params_fast(source, cfg, dtype, mesh, options=options)
    return ref, fast, stats


@pytest.mark.parametrize("name", sorted(os.listdir(MODELS)))
def test_fast_equals_simple_every_fixture(name):
    src = SafetensorsCheckpoint(MODELS / name)
    cfg = ModelConfig.from_hf(MODELS / name)
    ref, fast, stats = load_both(src, cfg, jnp.float32, make_mesh(1, 1))
    assert_same_params(ref, fast)
    assert stats.blocks > len(src.files)  # really cut into many reads
    assert stats.bytes_needed == sum(e.nbytes for e in map(src.entry, src.tensor_names()))


@pytest.mark.parametrize(
    ("name", "tp", "dtype"),
    [
        ("llama3_gqa4", 2, jnp.float32),  # K=2 split over 2
        ("llama3_gqa4", 8, jnp.float32),  # K=2 replicated 4x (one KV head per device)
        ("llama_mha8", 4, jnp.bfloat16),  # f32 → bf16 on the devices
        ("qwen2_bias", 4, jnp.float32),  # q/k/v biases fused too
        ("qwen3_qknorm", 2, jnp.bfloat16),
    ],
)
def test_fast_equals_simple_tensor_parallel(name, tp, dtype):
    cfg = ModelConfig.from_hf(MODELS / name).with_tensor_parallel(tp)
    mesh = make_mesh(tensor_parallel_size=tp)
    ref, fast, stats = load_both(SafetensorsCheckpoint(MODELS / name), cfg, dtype, mesh)
    assert_same_params(ref, fast)
    w = fast.layers[0].w_qkv  # each device holds 1/tp of the fused projection
    assert {s.data.shape[0] for s in w.addressable_shards} == {cfg.num_kv_heads // tp}
    assert stats.bytes_transferred >= stats.bytes_needed


@pytest.mark.parametrize("name", ["llama_mixed", "qwen2_q8"])
def test_fast_equals_simple_gguf(name):
    g = read_gguf(FIXTURES / "gguf" / f"{name}.gguf")
    cfg = ModelConfig.from_hf(g.hf_config())
    ref, fast, _ = load_both(
        g, cfg.with_tensor_parallel(2), jnp.float32, make_mesh(tensor_parallel_size=2)
    )
    assert_same_params(ref, fast)


def test_plan_reads_in_file_order_in_bounded_blocks():
    src = SafetensorsCheckpoint(MODELS / "llama3_gqa4")  # 9 files, tensors spread over them
    cfg = ModelConfig.from_hf(MODELS / "llama3_gqa4")
    spec = llama.spec(cfg, jnp.float32)
    mesh = make_mesh(1, 1)
    plan = make_plan(
        src,
        recipes(cfg, spec, rules.shardings(spec, mesh)),
        list(mesh.devices.flat),
        block_bytes=8192,
    )
    rank = {f.path: i for i, f in enumerate(src.files)}
    keys = [(rank[b.file], b.start) for b in plan.blocks]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(b.end - b.start <= 8192 for b in plan.blocks)
    # Every byte of every tensor is read exactly once.
    covered: dict[str, list[tuple[int, int]]] = {}
    for b in plan.blocks:
        for seg in b.segments:
            covered.setdefault(b.file, []).append((seg.start, seg.end))
    for f in src.files:
        spans = sorted(covered[f.path])
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        entries = sorted(f.entries.values(), key=lambda e: e.offset)
        assert spans[0][0] == entries[0].offset
        assert spans[-1][1] == entries[-1].offset + entries[-1].nbytes


def test_weights_waiting_for_their_programs_complete_at_the_end():
    """A fusion or concatenation whose program is still compiling waits without stalling reads;
    with programs never ready until the end, every weight is built in the final flush."""

    class Slow(DevicePlacer):
        def ready(self, kind, arrays, arg):
            return False

    d = MODELS / "llama3_gqa4"
    src = SafetensorsCheckpoint(d)
    cfg = ModelConfig.from_hf(d).with_tensor_parallel(2)
    mesh = make_mesh(tensor_parallel_size=2)
    plan_recipes = recipes(
        cfg, llama.spec(cfg, jnp.bfloat16), rules.shardings(llama.spec(cfg, jnp.bfloat16), mesh)
    )
    plan = make_plan(src, plan_recipes, list(mesh.devices.flat), block_bytes=4096)
    weights, _ = run_plan(src, plan, Slow(), TIGHT)
    _, treedef = jax.tree.flatten(llama.spec(cfg, jnp.bfloat16), is_leaf=is_info)
    assert_same_params(load_params(src, cfg, jnp.bfloat16, mesh), treedef.unflatten(weights))


def test_host_memory_is_a_bounded_ring():
    src = SafetensorsCheckpoint(MODELS / "llama_mha8")
    cfg = ModelConfig.from_hf(MODELS / "llama_mha8")
    _, stats = load_params_fast(src, cfg, jnp.float32, options=TIGHT)
    model_bytes = os.path.getsize(MODELS / "llama_mha8" / "model.safetensors")
    assert stats.host_buffer_bytes <= TIGHT.slots * (TIGHT.block_bytes + 2 * 4096)
    assert stats.host_buffer_bytes < model_bytes / 10
    assert not stats.pinned  # CPU: nothing to register for DMA


def test_simulated_multihost_process_reads_only_its_rows():
    """tp=8 over 8 devices split between two 'hosts' of 4: each reads about half of the
    row-sharded tensors and all of the column-sharded ones, and gets exactly its shards."""
    d = MODELS / "llama_mha8"
    src = SafetensorsCheckpoint(d)
    cfg = ModelConfig.from_hf(d).with_tensor_parallel(8)
    mesh = make_mesh(tensor_parallel_size=8)
    ref = load_params(src, cfg, jnp.float32, mesh)
    paths = [p for p, _ in info_leaves(llama.spec(cfg))]
    ref_shards = {
        path: {s.device: np.asarray(s.data) for s in leaf.addressable_shards}
        for path, leaf in zip(paths, jax.tree.leaves(ref), strict=True)
    }
    total = sum(e.nbytes for e in map(src.entry, src.tensor_names()))
    devices = list(mesh.devices.flat)
    read = 0
    for host in (devices[:4], devices[4:]):
        shards, stats = read_local_shards(src, cfg, jnp.float32, mesh, host, TIGHT)
        assert set(shards) == set(ref_shards)
        for path, by_device in shards.items():
            assert set(by_device) == set(host), path
            for dev, x in by_device.items():
                np.testing.assert_array_equal(x, ref_shards[path][dev], err_msg=path)
        assert stats.bytes_needed < 0.8 * total
        read += stats.bytes_needed
    assert read > total  # column-sharded w_o and w_down are read by both hosts


def test_progress_bar_shows_bytes_and_rate(capsys):
    cfg = ModelConfig.from_hf(MODELS / "llama_tied")
    load_params_fast(SafetensorsCheckpoint(MODELS / "llama_tied"), cfg, jnp.float32, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"loading llama_tied: 100%.* 247kB/247kB \[.*, [\d.]+[kMG]?B/s\]", err), err


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_io_modes_and_cold_cache_give_the_same_weights(tmp_path, io):
    d = tmp_path / "m"
    shutil.copytree(MODELS / "llama3_gqa4", d)
    src = SafetensorsCheckpoint(d)
    drop_from_page_cache(src.file_paths)
    cfg = ModelConfig.from_hf(d)
    ref, fast, _ = load_both(
        src, cfg, jnp.float32, make_mesh(1, 1), LoadOptions(readers=2, block_bytes=8192, io=io)
    )
    assert_same_params(ref, fast)


def test_load_model_fast_and_simple_agree():
    fast = load_model(MODELS / "qwen2_bias", dtype="float32", tokenizer=TOKENIZER)
    simple = load_model(
        MODELS / "qwen2_bias", dtype="float32", tokenizer=TOKENIZER, loader="simple"
    )
    assert_same_params(simple.params, fast.params)
    assert fast.load_stats is not None and fast.load_stats.bytes_needed > 0
    assert simple.load_stats is None
    with pytest.raises(ValueError, match=r"loader='slow' is not supported; allowed: fast, simple"):
        load_model(MODELS / "qwen2_bias", loader="slow")


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"block_bytes=1000 must be a positive multiple of 4096"):
        LoadOptions(block_bytes=1000)
    with pytest.raises(ValueError, match=r"io='mmap' is not supported; allowed: auto, buffered"):
        LoadOptions(io="mmap")
    with pytest.raises(ValueError, match=r"readers=0 must be >= 1"):
        LoadOptions(readers=0)


# --- broken files: one clear line, before any weight exists ---------------------------------------


@pytest.fixture
def model_copy(tmp_path):
    d = tmp_path / "llama_mha8"
    shutil.copytree(MODELS / "llama_mha8", d)
    return d


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_truncated_file(model_copy):
    f = model_copy / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    with pytest.raises(
        ValueError, match=r"model.safetensors: truncated: tensor .* ends at byte"
    ) as e:
        load_model(model_copy, tokenizer=TOKENIZER)
    one_line(e)


def test_file_truncated_while_loading(model_copy):
    """Opened (and validated) first, cut short before the read: the reader notices, no params."""
    src = SafetensorsCheckpoint(model_copy)
    cfg = ModelConfig.from_hf(model_copy)
    f = model_copy / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: truncated: reading bytes up to \d+, "
        r"the file ended at \d+",
    ) as e:
        load_params_fast(src, cfg, jnp.float32, options=TIGHT)
    one_line(e)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (
            lambda b: b"\xff" * 8 + b[8:],
            r"corrupt safetensors header \(length \d+, file \d+ bytes\)",
        ),
        (lambda b: b[:8] + b"{not json" + b[17:], r"corrupt safetensors header \("),
        (lambda b: b[:4], r"not a safetensors file \(only 4 bytes\)"),
    ],
)
def test_corrupt_header(model_copy, damage, pattern):
    f = model_copy / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=pattern) as e:
        open_checkpoint(model_copy)
    one_line(e)


def test_wrong_shape_and_missing_tensor(model_copy):
    src = SafetensorsCheckpoint(model_copy)
    tensors = {n: np.array(src.tensor(n)) for n in src.tensor_names()}
    del src
    q = "model.layers.0.self_attn.q_proj.weight"
    tensors[q] = tensors[q][:-8]
    save_file(tensors, model_copy / "model.safetensors")
    cfg = ModelConfig.from_hf(model_copy)
    with pytest.raises(
        ValueError,
        match=rf"tensor '{q}' has shape \(56, 64\), the config implies "
        r"\(64, 64\)",
    ):
        load_params_fast(SafetensorsCheckpoint(model_copy), cfg, jnp.float32)
    del tensors[q]
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(ValueError, match=rf"missing tensor '{q}'"):
        load_params_fast(SafetensorsCheckpoint(model_copy), cfg, jnp.float32)


def test_missing_shard(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODELS / "llama3_gqa4", d)
    os.remove(d / "model-00004-of-00009.safetensors")
    with pytest.raises(
        FileNotFoundError,
        match=r"model-00004-of-00009.safetensors: listed in .*"
        r"index.json but missing",
    ):
        open_checkpoint(d)
