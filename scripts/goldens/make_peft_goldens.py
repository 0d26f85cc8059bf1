"""PEFT goldens for rtpjax's adapter import and export, on the tiny fixture models.

Two directions, two stages (each Python has what its stage needs):

1. Our export (rtpjax's Python; writes adapters that PEFT must load):
       /path/to/rtpjax/python scripts/goldens/make_peft_goldens.py --stage ours
   writes tests/fixtures/peft/ours_*/{adapter_config.json, adapter_model.safetensors} with
   rtpjax.finetune.peft.export_adapter, from deterministic random weights (`ours_bank`).
2. PEFT (a Python with torch + transformers + peft; never needed by rtpjax or its tests):
       /path/to/oracle/python scripts/goldens/make_peft_goldens.py
   writes tests/fixtures/peft/peft_*/ adapters made by PEFT itself with known random weights,
   and for every case (peft_* and ours_*) golden.npz: PEFT's logits for a fixed input, with and
   without the adapter, and golden.json with the versions.

tests/finetune/test_peft.py checks that our import of peft_* reproduces PEFT's logits, that our
export today writes exactly the ours_* tensors, and that those give PEFT's logits in our model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "peft")
INPUT_LEN = 12

# name → (fixture model, PEFT LoraConfig arguments)
PEFT_CASES = {
    "peft_lora": (
        "llama_tied",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
    ),
    # q/k/v biases: DoRA must rescale the projection without its bias, as PEFT does.
    "peft_dora": (
        "qwen2_bias",
        dict(
            r=4,
            lora_alpha=6,
            use_dora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        ),
    ),
    "peft_rslora": (
        "llama3_gqa4",
        dict(r=6, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj"]),
    ),
}

# name → (fixture model, kind, rank, alpha, bank rank R (>= rank: export must cut), targets)
OURS_CASES = {
    "ours_lora": (
        "llama_tied",
        "lora",
        3,
        6.0,
        5,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    "ours_dora": ("qwen2_bias", "dora", 2, 5.0, 4, ("q_proj", "v_proj", "o_proj", "up_proj")),
}


def input_ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(7).integers(3, vocab, INPUT_LEN).astype(np.int32)


def ours_bank(name: str):
    """(model config, adapter config, bank, slot) our export writes for an ours_* case: slot 1
    of a 3-slot bank, random A, B (and magnitudes near the base row norms for DoRA), with junk
    in the columns past the rank so a wrong cut shows."""
    import jax.numpy as jnp

    from rtpjax.config import ModelConfig
    from rtpjax.finetune.config import AdapterConfig
    from rtpjax.layers.lora import LoraLayout, LoraWeights

    model, kind, rank, alpha, R, targets = OURS_CASES[name]
    cfg = ModelConfig.from_hf(os.path.join(MODELS, model))
    a = AdapterConfig(kind=kind, rank=rank, alpha=alpha, target_modules=targets)
    layout = LoraLayout(
        num_slots=3, rank=R, targets=targets, num_layers=cfg.num_layers, dora=kind == "dora"
    )
    rng = np.random.default_rng(sum(map(ord, name)))
    bank = []
    for layer in layout.template(cfg):
        row = {}
        for t, w in layer.items():
            m = None
            if w.m is not None:
                m = jnp.asarray(rng.uniform(0.5, 1.5, w.m.shape), jnp.float32)
            row[t] = LoraWeights(
                a=jnp.asarray(0.3 * rng.standard_normal(w.a.shape), jnp.float32),
                b=jnp.asarray(0.3 * rng.standard_normal(w.b.shape), jnp.float32),
                m=m,
            )
        bank.append(row)
    return cfg, a, bank, 1


def stage_ours() -> None:
    sys.path.insert(0, ROOT)
    from rtpjax.finetune.peft import export_adapter

    for name in OURS_CASES:
        _cfg, a, bank, slot = ours_bank(name)
        path = os.path.join(OUT, name)
        export_adapter(path, bank, slot, a, base_model=OURS_CASES[name][0])
        print(f"{name}: exported to {path}")


def stage_peft() -> None:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)

    os.chdir(ROOT)  # adapter_config.json then names the base by its path in the repository

    def load(model: str):
        return AutoModelForCausalLM.from_pretrained(
            f"tests/fixtures/models/{model}", dtype=torch.float32, attn_implementation="eager"
        ).eval()

    def logits(m, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return m(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()

    def write(name: str, model: str, ids, base_logits, adapter_logits) -> None:
        path = os.path.join(OUT, name)
        np.savez_compressed(
            os.path.join(path, "golden.npz"),
            input_ids=ids,
            base_logits=base_logits.astype(np.float32),
            logits=adapter_logits.astype(np.float32),
        )
        with open(os.path.join(path, "golden.json"), "w") as f:
            json.dump(
                {
                    "model": model,
                    "peft": peft.__version__,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                f,
                indent=1,
            )
        delta = float(np.abs(adapter_logits - base_logits).max())
        print(f"{name}: {model}, max |adapter - base| logits {delta:.3f}")

    for name, (model, kwargs) in PEFT_CASES.items():
        base = load(model)
        ids = input_ids(base.config.vocab_size)
        base_logits = logits(base, ids)
        pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **kwargs))
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif "lora_magnitude_vector" in pname:
                    p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        pm.eval()
        path = os.path.join(OUT, name)
        pm.save_pretrained(path)
        readme = os.path.join(path, "README.md")  # PEFT's model-card template: not a golden
        if os.path.exists(readme):
            os.remove(readme)
        write(name, model, ids, base_logits, logits(pm, ids))

    for name, (model, *_rest) in OURS_CASES.items():
        path = os.path.join(OUT, name)
        if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
            sys.exit(f"{path}: run --stage ours first (with rtpjax's Python)")
        base = load(model)
        ids = input_ids(base.config.vocab_size)
        base_logits = logits(base, ids)
        pm = PeftModel.from_pretrained(base, path).eval()
        write(name, model, ids, base_logits, logits(pm, ids))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("ours", "peft"), default="peft")
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    stage_ours() if args.stage == "ours" else stage_peft()
