"""ModelConfig from HF config.json: both rope styles, and one clear error per unsupported input."""

import json

import pytest

from rtpjax.config import ModelConfig
from rtpjax.weights.checkpoint import load_model, open_checkpoint
from tests.conftest import FIXTURES

BASE = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_rope_parameters_v5_and_legacy_agree():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v5 = ModelConfig.from_hf({**BASE, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    legacy = ModelConfig.from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": scaling})
    old_key = ModelConfig.from_hf(
        {**BASE, "rope_theta": 5e5, "rope_scaling": {**scaling, "type": scaling["rope_type"]}}
    )
    assert v5 == legacy == old_key
    assert v5.rope_scaling.rope_type == "llama3" and v5.rope_theta == 5e5


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "model_type='gemma2'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads=4"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method='awq'"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "attention_factor": 2.0}},
            "attention_factor",
        ),
    ],
)
def test_unsupported_option_names_the_field(change, field):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf({**BASE, **change}, source="m/config.json")
    msg = str(e.value)
    assert field in msg and msg.startswith("m/config.json:") and "\n" not in msg


def test_missing_key_is_named():
    cfg = dict(BASE)
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match=r"missing required keys \['hidden_size'\]"):
        ModelConfig.from_hf(cfg)


def test_bad_files_give_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)  # a config but no weights


def test_round_trip_through_hf_config():
    cfg = ModelConfig.from_hf(FIXTURES / "models" / "qwen2_bias")
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
