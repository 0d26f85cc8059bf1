"""Chat templates: transformers' rendered text and ids for every golden conversation, and the
Jinja environment's behaviour (helpers, sandbox, errors). test_tokenizer.py checks the same
conversations through the GGUF path; here the tokenizer.json path (faster to load) is used."""

from __future__ import annotations

import json
import pathlib
from datetime import datetime

import pytest

from rtpjax.tokenizer import Tokenizer, render_chat

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def goldens() -> dict:
    return json.loads((FIXTURES / "smollm2_goldens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "smollm2")


def _apply(tok: Tokenizer, case: dict, tokenize: bool):
    return tok.apply_chat_template(
        case["messages"],
        add_generation_prompt=case["add_generation_prompt"],
        tokenize=tokenize,
        tools=case.get("tools"),
        chat_template=case.get("chat_template"),
        **(case.get("kwargs") or {}),
    )


def test_golden_conversations(tok, goldens):
    chats = goldens["chats"]
    assert len(chats) >= 100
    assert any(c.get("tools") for c in chats) and any(c.get("kwargs") for c in chats)
    assert {c["add_generation_prompt"] for c in chats} == {True, False}
    assert any(m["role"] == "system" for c in chats for m in c["messages"])
    bad = []
    for n, case in enumerate(chats):
        if _apply(tok, case, tokenize=False) != case["text"]:
            bad.append((n, "text"))
        if _apply(tok, case, tokenize=True) != case["ids"]:
            bad.append((n, "ids"))
    assert bad == []


def test_sentencepiece_gguf_conversations():
    goldens = json.loads((FIXTURES / "tiny_spm_goldens.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_pretrained(FIXTURES / "tiny_spm.gguf")
    assert len(goldens["chats"]) >= 20
    for case in goldens["chats"]:
        assert _apply(tok, case, tokenize=False) == case["text"]
        # No BOS on top of the template, although this tokenizer adds one to plain text.
        assert _apply(tok, case, tokenize=True) == case["ids"]


def test_defaults_and_tokenize(tok):
    text = tok.apply_chat_template(USER, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")  # add_generation_prompt defaults to True
    assert tok.apply_chat_template(USER) == tok.encode(text, add_special_tokens=False)
    no_prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("hi<|im_end|>\n")


def test_no_template(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(
        (FIXTURES / "smollm2" / "tokenizer.json").read_bytes()
    )
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="the model has no chat template"):
        tok.apply_chat_template(USER)
    assert tok.apply_chat_template(USER, chat_template="{{ messages[0].content }}") == [6004]


def _render(template: str, messages=USER, **kw) -> str:
    return render_chat(template, messages, add_generation_prompt=False, **kw)


def test_whitespace_control_and_loop_controls():
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "    {% if m.role == 'stop' %}{% break %}{% endif %}\n"
        "{{ m.content }};\n"
        "{% endfor %}"
    )
    msgs = [{"role": "a", "content": "1"}, {"role": "skip", "content": "2"}]
    msgs += [
        {"role": "b", "content": "3"},
        {"role": "stop", "content": "4"},
        {"role": "c", "content": "5"},
    ]
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one.
    assert _render(template, msgs) == "1;\n3;\n"


def test_tojson_like_transformers():
    value = {"b": "<é&>", "a": [1, None, True]}
    assert (
        _render("{{ v | tojson }}", variables={"v": value}) == '{"b": "<é&>", "a": [1, null, true]}'
    )
    out = _render("{{ v | tojson(indent=2, sort_keys=true) }}", variables={"v": value})
    assert out == json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    out = _render("{{ v | tojson(separators=(',', ':')) }}", variables={"v": value})
    assert out == '{"b":"<é&>","a":[1,null,true]}'


def test_raise_exception_becomes_value_error():
    with pytest.raises(ValueError, match="chat template error: roles must alternate"):
        _render("{{ raise_exception('roles must alternate') }}")


def test_syntax_error_becomes_value_error():
    with pytest.raises(ValueError, match="chat template error"):
        _render("{% for m in messages %}")


def test_strftime_now():
    before = datetime.now().strftime("%Y-%m-%d %H")
    out = _render("{{ strftime_now('%Y-%m-%d %H') }}")
    assert out in {before, datetime.now().strftime("%Y-%m-%d %H")}


def test_sandbox_blocks_internals():
    with pytest.raises(ValueError, match="chat template error"):
        _render("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="underscore"):
        _render("{% set ns = namespace(_x=1) %}")
    with pytest.raises(ValueError, match="chat template error"):
        _render("{% set d = {} %}{% do d.update({'a': 1}) %}")  # `do` is not enabled
    # Immutable sandbox: mutating a list the template got is refused.
    with pytest.raises(ValueError, match="chat template error"):
        _render("{{ messages.append(1) }}")


def test_namespace_dict_and_generation_block():
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}|{{ dict(a=1)['a'] }}|"
        "{% generation %}{{ messages[-1].content }}{% endgeneration %}"
    )
    assert _render(template, USER * 3) == "3|1|hi"


def test_message_preparation():
    template = (
        "{% for m in messages %}{{ m.role }}:{{ 'content' in m }}:{{ m.reasoning_content }}"
        ":{{ m.thinking }};{% endfor %}{{ tools }}|{{ documents }}|{{ bos_token is defined }}"
    )
    msgs = [
        {"role": "user", "content": None},
        {"role": "assistant", "content": "x", "reasoning": "because"},
    ]
    assert _render(template, msgs) == "user:False::;assistant:True:because:because;None|None|False"


def test_special_tokens_and_kwargs_are_variables(tok):
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ enable_thinking }}"
    out = tok.apply_chat_template(
        USER, tokenize=False, chat_template=template, enable_thinking=False
    )
    assert out == "<|im_start|>|<|im_end|>|<|im_end|>|False"


@pytest.mark.parametrize("messages", [[], "hi", [["user", "hi"]]])
def test_bad_messages(messages):
    with pytest.raises(ValueError, match="messages"):
        _render("{{ messages }}", messages)


def test_reserved_variable():
    with pytest.raises(ValueError, match="'messages' is set by apply_chat_template"):
        _render("x", variables={"messages": []})
