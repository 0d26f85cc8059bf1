"""Adapters in PEFT's format, against goldens made by PEFT (scripts/goldens/make_peft_goldens.py).

- peft_*: adapters PEFT wrote with known random weights; our import + our model must give PEFT's
  logits (LoRA on every projection, DoRA on a model with q/k/v biases, rsLoRA).
- ours_*: adapters our export wrote; PEFT loaded them for the stored logits. Today's export must
  write exactly those tensors, and our model must give the same logits with them.
"""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.finetune.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PeftAdapter,
    export_adapter,
    place_adapter,
    read_adapter,
)
from rtpjax.layers.attention import DenseAttention, DenseMeta
from rtpjax.layers.lora import LoraLayout, MultiLora, SlotParams
from rtpjax.models import llama
from rtpjax.weights.loader import load_params
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint, SafetensorsFile

CASES = ["peft_lora", "peft_dora", "peft_rslora", "ours_lora", "ours_dora"]


def _script():
    path = os.path.join(
        os.path.dirname(__file__), "..", "..", "scripts", "goldens", "make_peft_goldens.py"
    )
    spec = importlib.util.spec_from_file_location("make_peft_goldens", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(fixtures_dir, name):
    d = fixtures_dir / "models" / name
    cfg = ModelConfig.from_hf(d)
    return cfg, load_params(SafetensorsCheckpoint(d), cfg, jnp.float32)


def adapter_logits(
    cfg, params, adapter: PeftAdapter | None, ids: np.ndarray, slot: int = 2
) -> np.ndarray:
    """Our model's logits with `adapter` in `slot` of a 3-slot bank (other slots hold noise, to
    show that rows never read another slot), through llama.forward's own adapter hook."""
    T = len(ids)
    adapters = None
    if adapter is not None:
        layout = LoraLayout(
            num_slots=3,
            rank=adapter.rank + 2,
            targets=adapter.targets,
            num_layers=cfg.num_layers,
            dora=adapter.use_dora,
        )
        rng = np.random.default_rng(0)
        bank = [
            {
                t: w.replace(
                    a=jnp.asarray(rng.standard_normal(w.a.shape), jnp.float32),
                    b=jnp.asarray(rng.standard_normal(w.b.shape), jnp.float32),
                )
                for t, w in layer.items()
            }
            for layer in layout.zeros(cfg)
        ]
        bank = place_adapter(bank, slot, adapter, layout)
        scale = np.full(3, 5.0, np.float32)
        scale[slot] = adapter.scale
        rank = np.full(3, layout.rank, np.int32)
        rank[slot] = adapter.rank
        slots = SlotParams(
            scale=jnp.asarray(scale),
            rank=jnp.asarray(rank),
            dora=jnp.full((3,), float(adapter.use_dora)),
        )
        adapters = MultiLora(layout, bank, slots, jnp.full((T,), slot, jnp.int32), impl="xla")
    K, H = cfg.num_kv_heads, cfg.head_dim
    caches = [(jnp.zeros((T, K, H)), jnp.zeros((T, K, H))) for _ in range(cfg.num_layers)]
    from rtpjax.layers.attention import DenseCache

    caches = [DenseCache(*c) for c in caches]
    pos = jnp.arange(T, dtype=jnp.int32)
    attn = DenseAttention(scale=H**-0.5, sliding_window=cfg.sliding_window)
    x, _, _ = llama.forward(
        params, cfg, jnp.asarray(ids), pos, caches, DenseMeta(pos, pos[0]), attn, adapters=adapters
    )
    return np.asarray(llama.logits(params, x))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_peft(fixtures_dir, case):
    d = fixtures_dir / "peft" / case
    golden = np.load(d / "golden.npz")
    model = json.loads((d / "golden.json").read_text())["model"]
    cfg, params = _model(fixtures_dir, model)
    ids = golden["input_ids"]
    base = adapter_logits(cfg, params, None, ids)
    np.testing.assert_allclose(base, golden["base_logits"], atol=1e-4, rtol=0)
    adapter = read_adapter(str(d), cfg)
    got = adapter_logits(cfg, params, adapter, ids)
    # The adapter moves logits by several units; our result must sit on PEFT's, not the base's.
    assert np.abs(golden["logits"] - golden["base_logits"]).max() > 1.0
    np.testing.assert_allclose(got, golden["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["ours_lora", "ours_dora"])
def test_export_writes_the_golden_files(fixtures_dir, tmp_path, case):
    mod = _script()
    _cfg, a, bank, slot = mod.ours_bank(case)
    export_adapter(str(tmp_path), bank, slot, a, base_model=mod.OURS_CASES[case][0])
    want = fixtures_dir / "peft" / case
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == json.loads(
        (want / CONFIG_FILE).read_text()
    )
    got_f, want_f = SafetensorsFile(tmp_path / WEIGHTS_FILE), SafetensorsFile(want / WEIGHTS_FILE)
    assert sorted(got_f.entries) == sorted(want_f.entries)
    for name in want_f.entries:
        np.testing.assert_array_equal(got_f.tensor(name), want_f.tensor(name))
    # Only the adapter's own rank is written, although the bank's rank is larger.
    a_name = next(n for n in want_f.entries if n.endswith("lora_A.weight"))
    assert want_f.tensor(a_name).shape[0] == a.rank < bank[0][a.target_modules[0]].a.shape[2]


def test_roundtrip_export_import(fixtures_dir, tmp_path):
    mod = _script()
    cfg, a, bank, slot = mod.ours_bank("ours_dora")
    export_adapter(str(tmp_path), bank, slot, a)
    back = read_adapter(str(tmp_path), cfg)
    assert (back.rank, back.alpha, back.use_dora, back.targets) == (
        a.rank,
        a.alpha,
        True,
        tuple(t for t in mod.OURS_CASES["ours_dora"][5]),
    )
    for i, layer in enumerate(back.weights):
        for t, (A, B, m) in layer.items():
            w = bank[i][t]
            np.testing.assert_array_equal(A, np.asarray(w.a[slot, :, : a.rank]))
            np.testing.assert_array_equal(B, np.asarray(w.b[slot, : a.rank]))
            np.testing.assert_array_equal(m, np.asarray(w.m[slot]))


def test_import_errors(fixtures_dir, tmp_path):
    cfg, _ = _model(fixtures_dir, "llama_tied")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        read_adapter(str(tmp_path), cfg)
    src = fixtures_dir / "peft" / "peft_lora"
    (tmp_path / WEIGHTS_FILE).write_bytes((src / WEIGHTS_FILE).read_bytes())
    c = json.loads((src / CONFIG_FILE).read_text())
    c["fan_in_fan_out"] = True
    (tmp_path / CONFIG_FILE).write_text(json.dumps(c))
    with pytest.raises(ValueError, match="fan_in_fan_out=True is not supported"):
        read_adapter(str(tmp_path), cfg)
    # The right files on the wrong model: shapes are checked.
    qcfg, _ = _model(fixtures_dir, "qwen2_bias")
    with pytest.raises(ValueError, match="has shape"):
        read_adapter(str(src), qcfg)
