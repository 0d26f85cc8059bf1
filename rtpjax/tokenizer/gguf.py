"""Tokenizer backends rebuilt from a GGUF file's metadata, as transformers 5 builds them.

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`): the vocabulary and merges, with the split regex
`GGUF_PRE_TOKENIZERS` gives for `tokenizer.ggml.pre`. SentencePiece BPE (`"llama"`): the vocabulary
with its merges, or merges derived from the scores. `Tokenizer.from_gguf_metadata` adds the special
tokens and the post-processor on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

# GGUF token types (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> the split regex transformers uses, or None for GPT-2's own byte-level
# regex. transformers uses GPT-2's regex for every value it does not list; we accept only the
# values where llama.cpp's split is GPT-2's too, or GPT-2's with digits split one by one (the
# starcoder family, whose vocabularies have no multi-digit tokens), and refuse the rest.
GGUF_PRE_TOKENIZERS: dict[str, str | None] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion")),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone")),
    **dict.fromkeys(("minerva-7b",)),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# SentencePiece GGUFs whose architecture needs a tokenizer shape we do not build.
UNSUPPORTED_SPM_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "phi3")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the others (controls, space, soft hyphen...) take the code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return dict(sorted(mapping.items()))


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def gguf_byte_level(
    metadata: Mapping[str, Any], tokens: list[str], source: str
) -> tokenizers.Tokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`): merges, `tokenizer.ggml.pre`'s split."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre={pre!r} is not a known pre-tokenizer; known: "
            f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
        )
    merges = _merge_pairs(metadata, source)
    if not merges:
        raise ValueError(
            f"{source}: tokenizer.ggml.merges is missing or empty; byte-level BPE needs merges"
        )
    # Tokens are stored spelled in the byte alphabet; one that is not (some converters write raw
    # UTF-8) is respelled so the merges, which are in the alphabet, find it.
    alphabet = set(BYTE_TO_CHAR.values())
    vocab = {
        t if set(t) <= alphabet else "".join(BYTE_TO_CHAR[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    bpe = _bpe(source, vocab, merges, fuse_unk=False, byte_fallback=False)
    backend = tokenizers.Tokenizer(bpe)
    split = GGUF_PRE_TOKENIZERS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def gguf_sentencepiece(
    metadata: Mapping[str, Any], tokens: list[str], source: str
) -> tokenizers.Tokenizer:
    """SentencePiece BPE (`"llama"`): merges, or merges derived from the scores; byte fallback."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merge_pairs(metadata, source)
    if not merges:
        scores = metadata.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise ValueError(
                f"{source}: a SentencePiece GGUF needs tokenizer.ggml.merges or one "
                "tokenizer.ggml.scores entry per token; it has neither"
            )
        merges = _merges_from_scores(vocab, dict(zip(tokens, map(float, scores), strict=True)))
    backend = tokenizers.Tokenizer(
        _bpe(source, vocab, merges, fuse_unk=True, byte_fallback=True, subword_affixes=False)
    )
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a piece into two pieces,
    best score first (ties: shorter left part, then shorter right part, then vocabulary order)."""
    found = []
    for piece, score in scores.items():
        pairs = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        pairs.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(pairs)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _merge_pairs(metadata: Mapping[str, Any], source: str) -> list[tuple[str, str]]:
    pairs = []
    for n, merge in enumerate(metadata.get("tokenizer.ggml.merges") or []):
        parts = str(merge).split(" ")
        if len(parts) != 2:
            raise ValueError(
                f"{source}: tokenizer.ggml.merges[{n}]={merge!r} must be two tokens separated "
                "by one space"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def _bpe(
    source: str,
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    fuse_unk: bool,
    byte_fallback: bool,
    subword_affixes: bool = True,
) -> models.BPE:
    affixes = {"continuing_subword_prefix": "", "end_of_word_suffix": ""} if subword_affixes else {}
    try:
        return models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            fuse_unk=fuse_unk,
            byte_fallback=byte_fallback,
            **affixes,
        )
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise ValueError(f"{source}: invalid BPE vocabulary or merges: {one_line(e)}") from None


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
