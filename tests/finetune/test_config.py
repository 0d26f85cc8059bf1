"""The fine-tuning YAML: the example configs load, and every wrong key or value is one ValueError
line naming the file and the YAML path."""

import pathlib

import pytest

from rtpjax.finetune.config import FinetuneConfig

CONFIGS = pathlib.Path(__file__).parents[2] / "configs" / "finetune"

GOOD = """
model: null
datasets:
  d: {synthetic: {task: reverse, train_examples: 10, eval_examples: 2}}
  j: {path: data.jsonl, format: alpaca, eval_fraction: 0.1}
adapters:
  a:
    kind: lora_plus
    rank: 4
    alpha: 8
    target_modules: [q_proj, down_proj]
    learning_rate: 1e-3
    optimizer: {name: adamw, betas: [0.9, 0.95], weight_decay: 0.01}
    schedule: {name: linear, warmup_steps: 3}
tasks:
  - {name: t1, adapter: a, dataset: d, batch_size: 8, micro_batch_size: 2}
  - {name: t2, adapter: a, dataset: j}
dispatcher: {max_concurrent: 2, memory_budget: 1.5GiB}
"""


def load(text: str, tmp_path) -> FinetuneConfig:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return FinetuneConfig.from_yaml(p)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = FinetuneConfig.from_yaml(path)
    assert cfg.tasks and cfg.adapters and cfg.datasets


def test_values_and_conversions(tmp_path):
    cfg = load(GOOD, tmp_path)
    a = cfg.adapters["a"]
    assert a.learning_rate == 1e-3  # YAML 1.1 reads `1e-3` as a string; the schema converts
    assert a.optimizer.betas == (0.9, 0.95) and a.schedule.name == "linear"
    assert a.scale == 2.0 and a.b_lr_ratio == 16.0
    assert cfg.dispatcher.memory_budget == int(1.5 * 2**30)
    assert cfg.tasks[0].accumulation == 4 and cfg.tasks[1].micro == 8
    assert cfg.resolve("data.jsonl") == str(tmp_path / "data.jsonl")


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("    rank: 4", "    rnak: 4", r"adapters\.a\.rnak: unknown key; allowed: kind, rank"),
        ("    rank: 4", "    rank: -4", r"adapters\.a\.rank: -4 must be a positive integer"),
        ("    rank: 4", "    rank: four", r"adapters\.a\.rank: expected an integer, got 'four'"),
        (
            "q_proj, down_proj",
            "q_proj, mlp",
            r"adapters\.a\.target_modules\[1\]: 'mlp' is not allowed; allowed: q_proj",
        ),
        ("kind: lora_plus", "kind: qlora", r"adapters\.a\.kind: 'qlora' is not allowed"),
        ("name: adamw", "name: adafactor", r"adapters\.a\.optimizer\.name: 'adafactor'"),
        (
            "betas: [0.9, 0.95]",
            "betas: [0.9]",
            r"adapters\.a\.optimizer\.betas: expected a list of 2",
        ),
        (
            "micro_batch_size: 2",
            "micro_batch_size: 3",
            r"tasks\[0\]\.micro_batch_size: 3 must divide batch_size=8",
        ),
        (
            "{name: t2, adapter: a,",
            "{name: t2, adapter: b,",
            r"tasks\[1\]\.adapter: 'b' is not defined; defined: a",
        ),
        ("{name: t2,", "{name: t1,", r"tasks\[1\]\.name: 't1' is used twice"),
        ("task: reverse", "task: translate", r"datasets\.d\.synthetic\.task: 'translate'"),
        ("{path: data.jsonl, ", "{", r"datasets\.j\.path: give exactly one of"),
        (
            "memory_budget: 1.5GiB",
            "memory_budget: lots",
            r"dispatcher\.memory_budget: 'lots' is not a size",
        ),
        (
            "model: null",
            "model: null\ntrainer: {remat: yes please}",
            r"trainer\.remat: expected true or false",
        ),
        ("model: null", "modle: null", r"modle: unknown key"),
    ],
)
def test_errors_name_the_yaml_path(tmp_path, old, new, message):
    assert old in GOOD
    with pytest.raises(ValueError, match=message) as e:
        load(GOOD.replace(old, new, 1), tmp_path)
    text = str(e.value)
    assert text.startswith(str(tmp_path / "run.yaml") + ": ") and "\n" not in text


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        FinetuneConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load("tasks: [", tmp_path)
    with pytest.raises(ValueError, match="tasks: required key missing"):
        load("datasets: {}\nadapters: {}\n", tmp_path)
