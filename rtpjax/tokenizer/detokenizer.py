"""IncrementalDetokenizer: the text of a generated sequence, growing one token at a time.

Contract: the deltas returned by `add` (plus `finish` at the end) concatenate to exactly
`tokenizer.decode(token_ids, skip_special_tokens)` of the output ids; a delta is "" while the
last tokens end inside a multi-byte UTF-8 character, so a stream never shows a replacement
character that the full decode would not show.

Two paths:
- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): decode is the UTF-8 of the tokens' bytes. A token
  whose bytes are whole characters (almost all of them) adds its text from a table shared by every
  detokenizer of the tokenizer; the bytes of a character split over tokens go through an
  incremental UTF-8 decoder. O(1) per token.
- any other decoder (SentencePiece's byte fallback and leading-space strip...): decode a short
  window of recent tokens and emit what it adds beyond the previous window (vLLM's offsets).
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Sequence

from rtpjax.tokenizer.tokenizer import ByteLevelPieces, Tokenizer

_REPLACEMENT = "\ufffd"
_UNSEEN = object()  # a _TokenTexts entry not looked up yet


class _TokenTexts:
    """Each id's text when its bytes are whole UTF-8 characters (None when they are not), filled
    as ids are met: one table per tokenizer and skip_special_tokens (`for_tokenizer`), shared by
    all of its detokenizers. A list indexed by id, so a lookup neither hashes nor allocates."""

    def __init__(self, pieces: ByteLevelPieces, skip_special_tokens: bool, size: int) -> None:
        self.pieces = pieces
        self.skip_special_tokens = skip_special_tokens
        self.texts: list = [_UNSEEN] * size  # str | None | _UNSEEN, by id

    def learn(self, token_id: int) -> str | None:
        piece = self.pieces.get(token_id, self.skip_special_tokens)
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        self.texts[token_id] = text
        return text

    @staticmethod
    def for_tokenizer(tokenizer: Tokenizer, skip_special_tokens: bool) -> _TokenTexts | None:
        """The tokenizer's table (None when its decoder is not plain byte-level)."""
        pieces = tokenizer.byte_level_pieces()
        if pieces is None:
            return None
        tables = _TABLES.setdefault(tokenizer, {})
        table = tables.get(skip_special_tokens)
        if table is None:
            table = _TokenTexts(pieces, skip_special_tokens, tokenizer.vocab_size)
            tables[skip_special_tokens] = table
        return table


# Tokenizer → {skip_special_tokens: _TokenTexts}. Weak keys: a table never keeps a tokenizer alive.
_TABLES: weakref.WeakKeyDictionary[Tokenizer, dict[bool, _TokenTexts]] = weakref.WeakKeyDictionary()


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens.

    `prompt_ids` is taken for the engine's convenience (vLLM's detokenizer takes it too) but not
    read: the text is defined as decode(output ids), which the prompt does not change.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = len(prompt_ids)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        # The text is kept as its deltas and joined when read: add() stays O(1) however long the
        # text grows. _text holds the first _num_joined deltas joined.
        self._deltas: list[str] = []  # every non-empty delta of add and finish, in order
        self._text = ""
        self._num_joined = 0
        self._pieces = tokenizer.byte_level_pieces()
        self._table = _TokenTexts.for_tokenizer(tokenizer, skip_special_tokens)
        self._texts = None if self._table is None else self._table.texts
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._utf8_buffered = False  # the incremental decoder holds part of a character
        # Window path: token_ids[prefix:read] was decoded last time and is text already emitted.
        self._prefix = 0
        self._read = 0
        self._byte_fallback = bool(getattr(tokenizer.backend.model, "byte_fallback", False))

    @property
    def text(self) -> str:
        """Everything returned so far (the deltas of add and finish, joined)."""
        if self._num_joined < len(self._deltas):
            self._text += "".join(self._deltas[self._num_joined :])
            self._num_joined = len(self._deltas)
        return self._text

    @property
    def num_deltas(self) -> int:
        """How many non-empty deltas add and finish have returned."""
        return len(self._deltas)

    def text_since(self, num_deltas: int) -> str:
        """The text of the deltas after the first `num_deltas`, in time proportional to it alone
        (for callers that stream what is new)."""
        return "".join(self._deltas[num_deltas:])

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        texts = self._texts
        if texts is None:
            delta = self._add_windowed()
        else:
            text = texts[token_id] if 0 <= token_id < len(texts) else None
            if text is _UNSEEN:
                text = self._table.learn(token_id)
            if text is not None and not self._utf8_buffered:
                delta = text  # whole characters, and no character pending: almost every token
            else:
                # Part of a character (or invalid bytes, or an id outside the table): the
                # incremental decoder keeps what belongs to the next token and replaces what is
                # invalid, as decode() does.
                delta = self._utf8.decode(self._pieces.get(token_id, self.skip_special_tokens))
                self._utf8_buffered = bool(self._utf8.getstate()[0])
        if delta:
            self._deltas.append(delta)
        return delta

    def finish(self) -> str:
        """End of stream: return what decode() shows beyond the deltas so far, e.g. U+FFFD for
        bytes of a character the sequence never completed."""
        if self._pieces is not None:
            delta = self._utf8.decode(b"", final=True)
            self._utf8_buffered = False
        else:
            full = self._decode(self.token_ids)
            text = self.text
            delta = full[len(text) :] if full.startswith(text) else ""
        if delta:
            self._deltas.append(delta)
        return delta

    def _add_windowed(self) -> str:
        ids = self.token_ids
        if self._adds_nothing_yet(ids[-1]):
            return ""
        before = self._decode(ids[self._prefix : self._read])
        after = self._decode(ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            # Nothing new, or the last token ends inside a character: wait for the next one.
            return ""
        # Move the window: the next call decodes from the tokens just emitted, so decoders that
        # treat the first token specially (SentencePiece strips its leading space) see the same
        # first token on both sides of the subtraction.
        self._prefix, self._read = self._read, len(ids)
        return after[len(before) :]

    def _adds_nothing_yet(self, token_id: int) -> bool:
        """True for a token whose text may still change or that decode() drops.

        Byte-fallback decoding turns a whole run of byte tokens (<0x..>) into U+FFFDs when the run
        is not valid UTF-8, so even a valid "K" can become U+FFFD when the next byte token comes:
        a run is emitted only once a token that is not a byte token closes it. A special token
        that decode() skips adds nothing and does not close a run (the bytes around it join).
        """
        if self.skip_special_tokens and token_id in self.tokenizer.special_added_ids:
            return True
        token = self.tokenizer.backend.id_to_token(token_id)
        if token is None:  # decode() drops unknown ids
            return True
        return self._byte_fallback and _is_byte_token(token)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _is_byte_token(token: str) -> bool:
    """SentencePiece's byte tokens: <0x00> .. <0xFF>."""
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")
