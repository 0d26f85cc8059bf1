"""scripts/finetune.py end to end on a tiny model, in subprocesses: its outputs (PEFT adapters,
per-adapter losses, loss curve, dispatcher order), and SIGKILL mid-run + resume giving bitwise the
same final adapters and metrics as a run that was never interrupted."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rtpjax.finetune.peft import read_adapter

ROOT = pathlib.Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "finetune.py"

# Accumulation (micro < batch), dropout, packing, two optimizer families, DoRA, and a third task
# that waits for a slot: everything whose state a resume must restore. One [B, S] bucket. The
# first checkpoint (device step 2) finds `a` in the middle of an optimizer step (3 micro-batches
# a step) and `b` between two.
CONFIG = """
model: {model}
tokenizer: bytes
dtype: float32
datasets:
  rev: {{synthetic: {{task: reverse, train_examples: 40, eval_examples: 8}}}}
  up: {{synthetic: {{task: upper, train_examples: 40, eval_examples: 0, seed: 1}}}}
adapters:
  lora:
    kind: lora
    rank: 4
    alpha: 8
    dropout: 0.1
    target_modules: [q_proj, v_proj, down_proj]
    learning_rate: 1.0e-2
    schedule: {{name: cosine, warmup_steps: 2}}
  dora:
    kind: dora
    rank: 2
    alpha: 4
    target_modules: [k_proj, o_proj]
    learning_rate: 1.0e-2
    optimizer: {{name: sgd, momentum: 0.9}}
tasks:
  - {{name: a, adapter: lora, dataset: rev, batch_size: 6, micro_batch_size: 2, max_steps: 4,
      max_length: 32}}
  - {{name: b, adapter: dora, dataset: up, batch_size: 4, micro_batch_size: 2, max_steps: 3,
      max_length: 32, packing: true}}
  - {{name: c, adapter: lora, dataset: up, batch_size: 4, micro_batch_size: 2, max_steps: 3,
      max_length: 32}}
dispatcher: {{max_concurrent: 2}}
trainer: {{checkpoint_interval: 2, log_interval: 1, progress: false}}
"""


def _cmd(config: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(config), "--output-dir", str(out)]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def config(tmp_path_factory, fixtures_dir):
    d = tmp_path_factory.mktemp("cfg")
    p = d / "run.yaml"
    p.write_text(CONFIG.format(model=fixtures_dir / "models" / "llama_tied"))
    return p


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, config):
    out = tmp_path_factory.mktemp("full")
    r = subprocess.run(_cmd(config, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def _records(out: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_outputs(full_run, fixtures_dir):
    out, r = full_run
    recs = _records(out)
    train = [x for x in recs if "loss" in x]
    steps = {t: [x["step"] for x in train if x["task"] == t] for t in "abc"}
    assert steps == {"a": [1, 2, 3, 4], "b": [1, 2, 3], "c": [1, 2, 3]}
    # c waited for a slot: it started after b finished, while a kept going.
    first_c = min(x["device_step"] for x in train if x["task"] == "c")
    last_b = max(x["device_step"] for x in train if x["task"] == "b")
    last_a = max(x["device_step"] for x in train if x["task"] == "a")
    assert last_b < first_c < last_a
    # Per-adapter loss lines in the log; each adapter's own learning rate schedule.
    assert "a step 1/4 loss" in r.stderr and "c step 3/3 loss" in r.stderr
    assert next(x["lr"] for x in train if x["task"] == "a") == 0.0  # warmup from 0
    assert {x["lr"] for x in train if x["task"] == "b"} == {1e-2}
    evals = [x for x in recs if "exact_match" in x]
    assert [x["task"] for x in evals] == ["a"] and evals[0]["final"]
    assert (out / "loss.png").stat().st_size > 10_000
    from rtpjax.config import ModelConfig

    cfg = ModelConfig.from_hf(fixtures_dir / "models" / "llama_tied")
    for task, kind in (("a", False), ("b", True), ("c", False)):
        adapter = read_adapter(str(out / task / "final"), cfg)
        assert adapter.use_dora == kind
        assert any(np.abs(b).max() > 0 for layer in adapter.weights for _, b, _ in layer.values())
    summary = json.loads(r.stdout)
    assert set(summary["results"]) == {"a", "b", "c"}


def _wait_for_checkpoint(out: pathlib.Path, proc: subprocess.Popen, timeout: float = 300):
    ckpt = out / "checkpoints"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
            return
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_and_resume_is_bitwise_identical(full_run, config, tmp_path):
    full, _ = full_run
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(config, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_checkpoint(out, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "a" / "final").exists()  # killed mid-run
    r = subprocess.run(_cmd(config, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint" in r.stderr
    for task in "abc":
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (out / task / "final" / name).read_bytes() == (
                full / task / "final" / name
            ).read_bytes(), f"{task}/{name} differs"
    # Same losses, bit for bit, each step logged once.
    assert _records(out) == _records(full)

    # A changed config refuses to resume from these checkpoints.
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        config.read_text().replace(
            "learning_rate: 1.0e-2\n    schedule", "learning_rate: 2.0e-2\n    schedule"
        )
    )
    r = subprocess.run(_cmd(changed, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "written by a different config" in r.stderr
