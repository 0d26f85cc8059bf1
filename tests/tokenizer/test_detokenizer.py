"""IncrementalDetokenizer: deltas concatenate to decode() on every golden id sequence, and never
show a replacement character the full decode does not have."""

from __future__ import annotations

import json
import pathlib
import random

import pytest
from tokenizers import AddedToken

from rtpjax.tokenizer import IncrementalDetokenizer, Tokenizer

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "smollm2")


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "tiny_spm.gguf")


def _sequences(name: str, tok: Tokenizer) -> list[list[int]]:
    g = json.loads((FIXTURES / f"{name}_goldens.json").read_text(encoding="utf-8"))
    # Random ids too: byte tokens that never complete a character, specials between bytes.
    rng = random.Random(7)
    special = sorted(tok.special_added_ids)
    tokens = tok.convert_ids_to_tokens(range(tok.vocab_size))
    bytes_like = [i for i, t in enumerate(tokens) if len(t) <= 1 or t.startswith("<0x")]
    noise = [
        [rng.choice(special + bytes_like * 3 + [rng.randrange(tok.vocab_size)]) for _ in range(20)]
        for _ in range(300)
    ]
    return g["ids"] + g["random_ids"] + [c["ids"] for c in g["chats"]] + noise


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str]:
    det = IncrementalDetokenizer(tok, prompt_ids=[1, 2, 3], skip_special_tokens=skip)
    deltas = [det.add(i) for i in ids]
    tail = det.finish()
    assert det.token_ids == ids
    assert det.text == "".join(deltas) + tail
    return deltas, tail


@pytest.mark.parametrize("name", ["smollm2", "tiny_spm"])
@pytest.mark.parametrize("skip", [True, False])
def test_deltas_concatenate_to_decode(name, skip, byte_level, sentencepiece):
    tok = byte_level if name == "smollm2" else sentencepiece
    assert (tok.byte_level_pieces() is not None) == (name == "smollm2")  # both paths covered
    bad_text, bad_fffd = [], []
    sequences = _sequences(name, tok)
    assert len(sequences) > 1000
    for ids in sequences:
        full = tok.decode(ids, skip_special_tokens=skip)
        deltas, tail = _stream(tok, ids, skip)
        if "".join(deltas) + tail != full:
            bad_text.append(ids)
        if FFFD not in full and any(FFFD in d for d in deltas):
            bad_fffd.append(ids)
        # The deltas alone hold all of decode() but what may still change: a trailing incomplete
        # character, or (byte fallback) a trailing run of byte tokens.
        last = tok.convert_ids_to_tokens([i for i in ids if i < tok.vocab_size][-1:] or [0])[0]
        may_change = full.endswith(FFFD) or (name == "tiny_spm" and last.startswith("<0x"))
        if tail and not may_change and not (skip and ids[-1] in tok.special_added_ids):
            bad_text.append(ids)
    assert bad_text == [] and bad_fffd == []


def test_multibyte_character_waits_for_its_last_byte(byte_level):
    ids = byte_level.encode("a😀", add_special_tokens=False)
    assert len(ids) >= 3  # the emoji is split over byte tokens in this vocabulary
    det = IncrementalDetokenizer(byte_level, [])
    deltas = [det.add(i) for i in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "😀"


def test_unfinished_character_shows_at_finish(byte_level):
    ids = byte_level.encode("😀", add_special_tokens=False)[:-1]
    det = IncrementalDetokenizer(byte_level, [])
    assert "".join(det.add(i) for i in ids) == ""
    assert det.finish() == byte_level.decode(ids) == FFFD


def test_sentencepiece_byte_run_waits_for_its_end(sentencepiece):
    tok = sentencepiece
    k, bad, word = tok.backend.token_to_id("<0x4B>"), tok.backend.token_to_id("<0xAC>"), 1340
    # "K" alone is valid, but the run K,0xAC decodes to two U+FFFD: nothing leaves before the run
    # ends.
    det = IncrementalDetokenizer(tok, [])
    assert [det.add(k), det.add(bad)] == ["", ""]
    assert det.add(word) == tok.decode([k, bad, word]) == FFFD * 2 + " study"
    det = IncrementalDetokenizer(tok, [])
    assert [det.add(k), det.add(word)] == ["", "K study"]


def test_skipped_special_tokens(byte_level):
    ids = [1, *byte_level.encode("hi", add_special_tokens=False), 2]
    det = IncrementalDetokenizer(byte_level, [], skip_special_tokens=True)
    assert [det.add(i) for i in ids] == ["", "hi", ""]
    det = IncrementalDetokenizer(byte_level, [], skip_special_tokens=False)
    assert [det.add(i) for i in ids] == ["<|im_start|>", "hi", "<|im_end|>"]


def test_prompt_does_not_change_the_text(sentencepiece):
    # SentencePiece strips the leading space of the first output token, as decode() does.
    ids = sentencepiece.encode("Hello world", add_special_tokens=False)
    for prompt in ([], [1], sentencepiece.encode("Say hi")):
        det = IncrementalDetokenizer(sentencepiece, prompt)
        assert "".join(det.add(i) for i in ids) + det.finish() == "Hello world"


def test_added_tokens_outside_the_byte_alphabet(tmp_path):
    """The ByteLevel decoder takes a token's UTF-8 as is when it has characters outside the byte
    alphabet ('中'), and maps it byte by byte otherwise ('é' is byte 0xE9: one U+FFFD)."""
    (tmp_path / "tokenizer.json").write_bytes(
        (FIXTURES / "smollm2" / "tokenizer.json").read_bytes()
    )
    tok = Tokenizer.from_dir(tmp_path)
    tok.backend.add_tokens(
        [AddedToken("héllo", normalized=False), AddedToken("中文X", normalized=False)]
    )
    ids = tok.backend.encode("a héllo b 中文X c").ids
    det = IncrementalDetokenizer(tok, [])
    out = "".join(det.add(i) for i in ids) + det.finish()
    assert out == tok.decode(ids) == "a h" + FFFD + "llo b 中文X c"


def test_unknown_ids_are_dropped_like_decode(byte_level, sentencepiece):
    for tok in (byte_level, sentencepiece):
        ids = [*tok.encode("ok", add_special_tokens=False), tok.vocab_size + 5]
        det = IncrementalDetokenizer(tok, [])
        assert "".join(det.add(i) for i in ids) + det.finish() == tok.decode(ids) == "ok"
