"""The tensor-parallel serving step's communication, counted in the compiled HLO on simulated
devices: two all-reduces per layer (after o_proj and after down_proj) and a constant few for the
vocabulary-sharded embedding and logits. Attention needs none (shard_map over KV heads)."""

import collections
import dataclasses
import re

import jax.numpy as jnp
import pytest

from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.models.presets import preset, random_params
from rtpjax.sampling_params import SamplingParams
from rtpjax.sharding.mesh import make_mesh

COLLECTIVE = re.compile(
    r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def collectives(num_layers: int, tp: int) -> collections.Counter:
    base = dataclasses.replace(
        preset("tiny"), num_heads=8, num_kv_heads=8, head_dim=16, num_layers=num_layers
    )
    cfg = base.with_tensor_parallel(tp)
    mesh = make_mesh(tp)
    config = EngineConfig(
        max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32, page_size=8, num_pages=40
    )
    engine = LLMEngine(cfg, random_params(cfg, jnp.float32, mesh), None, mesh, config, num_pages=40)
    engine.add_request(
        "a", None, [5] * 10, SamplingParams(max_tokens=2, detokenize=False, temperature=0.0)
    )
    prepared = engine.runner.prepare(engine.scheduler.schedule())
    hlo = engine.runner.lower(prepared).compile().as_text()
    return collections.Counter(COLLECTIVE.findall(hlo))


@pytest.mark.parametrize("tp", [2, 8])
def test_two_all_reduces_per_layer(tp):
    three, four = collectives(3, tp), collectives(4, tp)
    assert four["all-reduce"] - three["all-reduce"] == 2  # per layer: o_proj and down_proj
    assert three["all-reduce"] - 2 * 3 <= 2  # embedding lookup (+ logits reduction)
    assert four["all-gather"] == three["all-gather"] <= 2  # logits / sampled ids only
    assert not (set(four) - {"all-reduce", "all-gather"})


def test_single_device_has_no_collectives():
    assert collectives(2, 1) == collections.Counter()
