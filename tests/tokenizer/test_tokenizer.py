"""Tokenizer against transformers' goldens (scripts/goldens/make_tokenizer_goldens.py), both from
the SmolLM2 GGUF and from the tokenizer.json directory transformers saved; plus the error cases."""

from __future__ import annotations

import json
import pathlib

import pytest

from rtpjax.env import default_model_path
from rtpjax.tokenizer import Tokenizer

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
SMOLLM2_DIR = FIXTURES / "smollm2"


@pytest.fixture(scope="module")
def goldens() -> dict:
    return json.loads((FIXTURES / "smollm2_goldens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def spm_goldens() -> dict:
    return json.loads((FIXTURES / "tiny_spm_goldens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def gguf_metadata() -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(default_model_path())
    return {
        k: f.contents()
        for k, f in reader.fields.items()
        if k.startswith("tokenizer.") or k == "general.architecture"
    }


@pytest.fixture(scope="module")
def from_gguf(gguf_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata, default_model_path())


@pytest.fixture(scope="module")
def from_dir() -> Tokenizer:
    return Tokenizer.from_pretrained(SMOLLM2_DIR)


@pytest.fixture(scope="module", params=["gguf", "dir"])
def tok(request, from_gguf, from_dir) -> Tokenizer:
    return from_gguf if request.param == "gguf" else from_dir


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "tiny_spm.gguf")


def _mismatches(strings, got, want) -> list:
    return [(s, g, w) for s, g, w in zip(strings, got, want, strict=True) if g != w]


def check_goldens(tok: Tokenizer, g: dict) -> None:
    assert len(g["strings"]) >= 500
    for key, flag in (("ids", True), ("ids_no_special", False)):
        got = [tok.encode(s, add_special_tokens=flag) for s in g["strings"]]
        assert _mismatches(g["strings"], got, g[key]) == [], key
        assert tok.encode_batch(g["strings"], add_special_tokens=flag) == g[key], key
    for key, flag in (("decode_skip", True), ("decode_keep", False)):
        got = [tok.decode(ids, skip_special_tokens=flag) for ids in g["ids"]]
        assert _mismatches(g["ids"], got, g[key]) == [], key
    for key, flag in (("random_decode_skip", True), ("random_decode_keep", False)):
        got = [tok.decode(ids, skip_special_tokens=flag) for ids in g["random_ids"]]
        assert _mismatches(g["random_ids"], got, g[key]) == [], key
    assert tok.convert_ids_to_tokens(g["probe_ids"]) == g["probe_tokens"]
    for case in g["chats"]:  # test_chat_template.py has the details; here: every path agrees
        args = dict(
            add_generation_prompt=case["add_generation_prompt"],
            tools=case.get("tools"),
            chat_template=case.get("chat_template"),
            **(case.get("kwargs") or {}),
        )
        assert tok.apply_chat_template(case["messages"], tokenize=False, **args) == case["text"]
        assert tok.apply_chat_template(case["messages"], **args) == case["ids"]
    t = g["tokenizer"]
    assert tok.vocab_size == t["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id) == (t["bos_token_id"], t["eos_token_id"])
    assert (tok.pad_token_id, tok.unk_token_id) == (t["pad_token_id"], t["unk_token_id"])
    assert tok.chat_template == t["chat_template"]
    # Ours: the ids decode(skip_special_tokens=True) drops, a superset of transformers' named ones.
    assert sorted(tok.all_special_ids) == t["special_added_ids"]
    assert set(t["all_special_ids"]) <= tok.all_special_ids


def test_smollm2_goldens(tok, goldens):
    assert len(goldens["strings"]) >= 1000
    check_goldens(tok, goldens)


def test_goldens_cover_what_the_brief_lists(goldens):
    strings = goldens["strings"]
    assert "" in strings
    assert any("<|im_start|>" in s and s != "<|im_start|>" for s in strings)
    assert any("\u200d" in s for s in strings)  # emoji ZWJ sequences
    assert any(len(s) >= 1000 for s in strings)
    for probe in ("你", "ا", "न", "\u0301", "\t", "     "):
        assert any(probe in s for s in strings), probe
    # Special tokens embedded in text become their ids (encode treats added tokens as tokens).
    assert 1 in goldens["ids"][strings.index("<|im_start|>user\nHello<|im_end|>\n")]


def test_gguf_builds_what_transformers_saved(from_gguf):
    ours = json.loads(from_gguf.backend.to_str())
    saved = json.loads((SMOLLM2_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    for key in (
        "model",
        "pre_tokenizer",
        "decoder",
        "normalizer",
        "post_processor",
        "added_tokens",
    ):
        assert ours[key] == saved[key], key


def test_smollm2_special_ids(tok):
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 2
    # <|im_end|> is both eos and the template's end of turn; <|endoftext|> is neither here.
    assert tok.eos_token_ids == frozenset({2})
    assert {0, 1, 2, 3, 16} <= tok.all_special_ids
    assert tok.encode("Hello world") == [19556, 905]  # no BOS: add_bos_token is false
    assert tok.decode([1, 19556, 2]) == "Hello"
    assert tok.decode([1, 19556, 2], skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"


PRE_VARIANTS = ["default", "gpt2", "starcoder", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"]


@pytest.mark.parametrize("pre", PRE_VARIANTS)
def test_gguf_pre_tokenizer_variants(pre, goldens, gguf_metadata):
    """Each `tokenizer.ggml.pre` splits text as transformers' GGUF conversion does."""
    tok = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": pre}, "variant")
    strings = goldens["strings"][:: goldens["pre_variant_step"]]
    want = goldens["pre_variants"][pre]
    got = tok.encode_batch(strings, add_special_tokens=False)
    assert _mismatches(strings, got, want) == []
    if pre in ("llama-bpe", "qwen2"):  # the variants really differ from GPT-2's split
        assert want != goldens["pre_variants"]["default"]


def test_gguf_add_bos_and_eos(gguf_metadata):
    meta = {
        **gguf_metadata,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
    }
    tok = Tokenizer.from_gguf_metadata(meta, "x")
    assert tok.encode("Hello world") == [1, 19556, 905, 2]
    assert tok.encode("Hello world", add_special_tokens=False) == [19556, 905]


def test_gguf_eot_id_joins_eos_ids(gguf_metadata):
    tok = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.eot_token_id": 0}, "x")
    assert tok.eos_token_ids == frozenset({0, 2})


def test_tiny_sentencepiece_gguf_goldens(spm, spm_goldens):
    check_goldens(spm, spm_goldens)
    assert spm.encode("Hello")[0] == 1  # llama GGUFs add BOS
    assert spm.encode("<think>") == [1, 3267]  # a user-defined token stays whole


# -- errors -------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "Nope"}}', "[]"])
def test_unreadable_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json: unreadable tokenizer") as e:
        Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_bpe_without_merges(tmp_path):
    spec = json.loads((SMOLLM2_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="BPE model has no merges"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((SMOLLM2_DIR / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: unreadable JSON"):
        Tokenizer.from_dir(tmp_path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"model\.gguf: not a readable GGUF file"):
        Tokenizer.from_pretrained(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": None}, r"tokenizer\.ggml\.model is missing"),
        ({"tokenizer.ggml.model": "bert"}, r"tokenizer\.ggml\.model='bert' is not supported"),
        (
            {"tokenizer.ggml.pre": "deepseek-llm"},
            r"tokenizer\.ggml\.pre='deepseek-llm' is not a known",
        ),
        ({"tokenizer.ggml.merges": []}, r"tokenizer\.ggml\.merges is missing or empty"),
        ({"tokenizer.ggml.merges": None}, r"tokenizer\.ggml\.merges is missing or empty"),
        ({"tokenizer.ggml.merges": ["a b c"]}, r"tokenizer\.ggml\.merges\[0\]='a b c'"),
        ({"tokenizer.ggml.merges": ["zz qq"]}, "invalid BPE vocabulary or merges"),
        ({"tokenizer.ggml.tokens": []}, r"tokenizer\.ggml\.tokens is missing or empty"),
        ({"tokenizer.ggml.token_type": [1, 1]}, r"token_type has 2 entries for 49152 tokens"),
        ({"tokenizer.ggml.eos_token_id": 10**6}, r"eos_token_id=1000000 is outside"),
    ],
)
def test_gguf_metadata_errors(gguf_metadata, change, message):
    meta = {k: v for k, v in {**gguf_metadata, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message) as e:
        Tokenizer.from_gguf_metadata(meta, "some.gguf")
    assert str(e.value).startswith("some.gguf: ") and "\n" not in str(e.value)


def test_sentencepiece_gguf_errors(spm_goldens):
    from gguf import GGUFReader

    reader = GGUFReader(FIXTURES / "tiny_spm.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items()}
    with pytest.raises(
        ValueError, match=r"needs tokenizer\.ggml\.merges or one tokenizer\.ggml\.scores"
    ):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.scores": [0.0]}, "s.gguf")
    with pytest.raises(ValueError, match=r"general\.architecture='gemma'"):
        Tokenizer.from_gguf_metadata({**meta, "general.architecture": "gemma"}, "s.gguf")


# -- directory extras ---------------------------------------------------------------------------


def _copy_smollm2(tmp_path: pathlib.Path, config: dict | None = None) -> pathlib.Path:
    (tmp_path / "tokenizer.json").write_bytes((SMOLLM2_DIR / "tokenizer.json").read_bytes())
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_generation_config_eos_ids(tmp_path):
    d = _copy_smollm2(tmp_path, {"eos_token": "<|im_end|>"})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_dir(d).eos_token_ids == frozenset({0, 2})


def test_end_of_turn_token_needs_the_template(tmp_path):
    # eos is <|endoftext|>; <|im_end|> joins the end ids only because the template writes it.
    d = _copy_smollm2(tmp_path, {"eos_token": "<|endoftext|>"})
    assert Tokenizer.from_dir(d).eos_token_ids == frozenset({0})
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    )
    assert Tokenizer.from_dir(d).eos_token_ids == frozenset({0, 2})


def test_special_tokens_map_and_config_forms(tmp_path):
    d = _copy_smollm2(tmp_path, {"bos_token": {"content": "<|im_start|>", "special": True}})
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 0, None)
    assert tok.chat_template is None


def test_config_added_tokens_and_new_special_token(tmp_path):
    config = {
        "eos_token": "<|my_eos|>",
        "added_tokens_decoder": {
            "49153": {"content": "<tool>", "special": False, "normalized": False},
        },
    }
    tok = Tokenizer.from_dir(_copy_smollm2(tmp_path, config))
    assert tok.vocab_size == 49154
    tool = tok.encode("<tool>", add_special_tokens=False)
    assert len(tool) == 1 and tool[0] not in tok.all_special_ids
    assert tok.eos_token_id in tok.all_special_ids and tok.eos_token_id >= 49152
    assert tok.decode([*tool, tok.eos_token_id]) == "<tool>"


def test_named_chat_templates_from_config(tmp_path):
    config = {
        "chat_template": [
            {"name": "default", "template": "D"},
            {"name": "tool_use", "template": "T"},
        ]
    }
    tok = Tokenizer.from_dir(_copy_smollm2(tmp_path, config))
    assert tok.chat_template == "D"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "D"
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs, tokenize=False, tools=[{"name": "f"}]) == "T"
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template="tool_use") == "T"
    extra = tmp_path / "additional_chat_templates"
    extra.mkdir()
    (extra / "rag.jinja").write_text("R")
    (tmp_path / "chat_template.jinja").write_text("F")
    tok = Tokenizer.from_dir(tmp_path)  # template files win over the config's templates
    assert tok.chat_templates == {"default": "F", "rag": "R"}


def test_convert_ids_out_of_range(tok):
    with pytest.raises(
        ValueError, match=r"token id 49152 is outside the vocabulary \(0\.\.49151\)"
    ):
        tok.convert_ids_to_tokens([0, 49152])
