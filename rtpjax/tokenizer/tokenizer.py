"""Tokenizer: text <-> ids and chat prompts, built from a tokenizer.json directory or a GGUF file.

The `tokenizers` package (Rust) does the encoding; this file builds the `tokenizers.Tokenizer`
that transformers 5 builds from the same source, so ids match transformers exactly:
- a directory: `tokenizer.json` as is, plus the special tokens, chat templates and extra end ids
  from `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`,
  `additional_chat_templates/*.jinja` and `generation_config.json`. Like transformers 5, the
  `add_bos_token`/`add_eos_token` flags of tokenizer_config.json are ignored when tokenizer.json
  exists: its post-processor decides.
- a GGUF file's metadata: byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and SentencePiece BPE
  (`"llama"`), rebuilt from the vocabulary, merges (or scores) and token types. The backends
  are built in `gguf`; special tokens and the post-processor are added here.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, processors

from rtpjax.tokenizer import chat_template as chat
from rtpjax.tokenizer.gguf import (
    BYTE_TO_CHAR,
    CHAR_TO_BYTE,
    CONTROL,
    GGUF_PRE_TOKENIZERS,
    UNSUPPORTED_SPM_ARCHITECTURES,
    USER_DEFINED,
    gguf_byte_level,
    gguf_sentencepiece,
    one_line,
)

__all__ = ["END_OF_TURN_TOKENS", "GGUF_PRE_TOKENIZERS", "ByteLevelPieces", "Tokenizer"]

# Tokens that end an assistant turn in common chat formats. One counts as an end id when it is a
# special token of this tokenizer and the chat template writes it (see `Tokenizer.eos_token_ids`).
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: SmolLM, Qwen, ...
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end|>",  # Phi-3
    "<end_of_turn>",  # Gemma
    "<|END_OF_TURN_TOKEN|>",  # Command-R
    "<|return|>",  # gpt-oss
    "<|call|>",  # gpt-oss
)

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Encode, decode and render chats, matching transformers' tokenizer for the same files.

    vocab_size counts every id the tokenizer can produce (added tokens included). all_special_ids
    holds the named special tokens and every added token flagged special (exactly the ids that
    decode(skip_special_tokens=True) drops). eos_token_ids holds eos, generation_config.json's
    eos ids (GGUF: tokenizer.ggml.eot/eom_token_id), and any END_OF_TURN_TOKENS entry that is a
    special token of this tokenizer and appears in one of its chat templates.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_ids: Iterable[int] = (),
        source: str = "<memory>",
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.backend = backend
        self.source = source
        self.special_tokens = {k: special_tokens.get(k) for k in _NAMED_SPECIAL}
        self.chat_templates = dict(chat_templates or {})
        # transformers skips the WordPiece-era space clean-up for BPE, whatever the config says.
        self._clean_up = clean_up_tokenization_spaces and not isinstance(backend.model, models.BPE)

        # Named special tokens the backend lacks become added special tokens, as in transformers.
        _add_special(backend, [t for t in self.special_tokens.values() if t is not None])
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        ids = {k: (backend.token_to_id(t) if t else None) for k, t in self.special_tokens.items()}
        self.bos_token_id: int | None = ids["bos_token"]
        self.eos_token_id: int | None = ids["eos_token"]
        self.unk_token_id: int | None = ids["unk_token"]
        self.pad_token_id: int | None = ids["pad_token"]
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        # The ids decode(skip_special_tokens=True) drops, plus the named ones. (transformers'
        # all_special_ids lists the named ones only, and misses e.g. SmolLM2's <repo_name>.)
        self.special_added_ids = frozenset(i for i, t in added.items() if t.special)
        self.all_special_ids: frozenset[int] = self.special_added_ids | {
            i for i in ids.values() if i is not None
        }
        # eos, generation_config's eos ids, and the end-of-turn token the chat template writes.
        eos = {i for i in (self.eos_token_id, *extra_eos_ids) if i is not None}
        template_text = "\n".join(self.chat_templates.values())
        for token in END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id in self.special_added_ids and token in template_text:
                eos.add(token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self._pieces: ByteLevelPieces | None = None

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """A directory with tokenizer.json, a tokenizer.json file, or a .gguf file."""
        p = pathlib.Path(path)
        if p.is_dir():
            return cls.from_dir(p)
        if p.is_file() and p.name == "tokenizer.json":
            return cls.from_dir(p.parent)
        if p.is_file():
            return cls.from_gguf_file(p)
        raise FileNotFoundError(f"{p}: no such tokenizer directory or .gguf file")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """tokenizer.json plus the optional config files around it (see the module docstring)."""
        d = pathlib.Path(path)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"{tok_file}: missing; a tokenizer directory needs tokenizer.json"
            )
        try:
            text = tok_file.read_text(encoding="utf-8")
            spec = json.loads(text)
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # OSError, JSONDecodeError, or the bare Exception tokenizers raises
            raise ValueError(f"{tok_file}: unreadable tokenizer: {one_line(e)}") from None
        model = spec.get("model") or {}
        if model.get("type") == "BPE" and not model.get("merges"):
            raise ValueError(
                f"{tok_file}: BPE model has no merges; a BPE tokenizer needs its merges"
            )

        config = _read_json(d / "tokenizer_config.json")
        if "added_tokens_decoder" in config:
            _add_config_tokens(backend, config["added_tokens_decoder"], d / "tokenizer_config.json")
        special = {k: _token_text(config.get(k)) for k in _NAMED_SPECIAL}
        if "added_tokens_decoder" not in config:  # transformers' legacy rule: the map wins
            for k, v in _read_json(d / "special_tokens_map.json").items():
                if k in special and _token_text(v) is not None:
                    special[k] = _token_text(v)
        if backend.post_processor is None:
            _set_post_processor(backend, bos=None, eos=None)

        generation = _read_json(d / "generation_config.json")
        extra_eos = generation.get("eos_token_id")
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos or [])
        return cls(
            backend,
            special_tokens=special,
            chat_templates=_dir_chat_templates(d, config),
            extra_eos_ids=[i for i in extra_eos if isinstance(i, int)],
            source=str(d),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @classmethod
    def from_gguf_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads only the file's metadata (gguf.GGUFReader maps the file; tensors stay on disk)."""
        import gguf  # deferred: only GGUF users pay for the import

        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(str(p))
        except Exception as e:
            raise ValueError(f"{p}: not a readable GGUF file: {one_line(e)}") from None
        metadata = {
            key: field.contents()
            for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"
        }
        return cls.from_gguf_metadata(metadata, str(p))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
        """GGUF metadata as plain Python values (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise ValueError(f"{source}: tokenizer.ggml.model is missing; cannot build a tokenizer")
        tokens = [str(t) for t in _require_list(metadata, "tokenizer.ggml.tokens", source)]
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or []]
        if types and len(types) != len(tokens):
            raise ValueError(
                f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                f"{len(tokens)} tokens; they must match"
            )
        special = {}
        for name, key in zip(_NAMED_SPECIAL, ("bos", "eos", "unknown", "padding"), strict=True):
            token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None and not 0 <= int(token_id) < len(tokens):
                raise ValueError(
                    f"{source}: tokenizer.ggml.{key}_token_id={token_id} is outside the "
                    f"vocabulary of {len(tokens)} tokens"
                )
            special[name] = tokens[int(token_id)] if token_id is not None else None

        if kind == "gpt2":
            add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
            backend = gguf_byte_level(metadata, tokens, source)
            alphabet = set(BYTE_TO_CHAR.values())
            # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it
            # would give it a second id, so (like transformers) it is skipped.
            control = [t for t, k in zip(tokens, types, strict=False) if k == CONTROL]
            control = [t for t in control if set(t) <= alphabet]
            # GPT2Tokenizer's default special token, kept only when the vocabulary has it:
            # transformers appends it as a new id otherwise, one the model has no row for.
            first = ["<|endoftext|>"] if "<|endoftext|>" in tokens else []
        elif kind == "llama":
            arch = str(metadata.get("general.architecture", ""))
            if arch in UNSUPPORTED_SPM_ARCHITECTURES:
                raise ValueError(
                    f"{source}: general.architecture={arch!r} with tokenizer.ggml.model='llama' "
                    "is not supported (its SentencePiece shape differs); use its tokenizer.json"
                )
            # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
            add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
            backend = gguf_sentencepiece(metadata, tokens, source)
            control = [t for t, k in zip(tokens, types, strict=False) if k == CONTROL]
            # LlamaTokenizer's default special tokens, when the vocabulary has them.
            first = [t for t in ("<unk>", "<s>", "</s>") if t in tokens]
        else:
            raise ValueError(
                f"{source}: tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2' "
                "(byte-level BPE) and 'llama' (SentencePiece BPE)"
            )
        _add_special(backend, first + control)
        vocab = backend.get_vocab(with_added_tokens=False)
        user = [t for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED and t in vocab]
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        _add_special(backend, [t for t in special.values() if t is not None])
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        _set_post_processor(
            backend,
            bos=_with_id(backend, special["bos_token"]) if add_bos else None,
            eos=_with_id(backend, special["eos_token"]) if add_eos else None,
        )
        template = metadata.get("tokenizer.chat_template")
        extra_eos = [
            int(metadata[k])
            for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if metadata.get(k) is not None
        ]
        return cls(
            backend,
            special_tokens=special,
            chat_templates={"default": str(template)} if template else {},
            extra_eos_ids=extra_eos,
            source=source,
        )

    # -- encoding and decoding --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            token = self.backend.id_to_token(int(i))
            if token is None:
                raise ValueError(
                    f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
            out.append(token)
        return out

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens["eos_token"]

    @property
    def chat_template(self) -> str | None:
        """The default chat template (None when the model has none)."""
        return self.chat_templates.get("default")

    # -- chats ------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` with the chat template; ids (no BOS/EOS added) or the text.

        `chat_template` is a template, or the name of one of this tokenizer's templates; without
        it, the "tool_use" template when tools are given and one exists, else the default.
        Extra keyword arguments become template variables (e.g. `enable_thinking=False`).
        """
        template = chat.select_template(self.chat_templates, chat_template, tools, self.source)
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        text = chat.render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            variables={**variables, **kwargs},
        )
        # The template writes the special tokens itself; transformers adds none on top.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- for the incremental detokenizer ----------------------------------------------------------

    def byte_level_pieces(self) -> ByteLevelPieces | None:
        """Per-token bytes when the decoder is plain byte-level (decode = UTF-8 of their concat)."""
        if not isinstance(self.backend.decoder, decoders.ByteLevel) or self._clean_up:
            return None
        if self._pieces is None:
            self._pieces = ByteLevelPieces(self)
        return self._pieces

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


class ByteLevelPieces:
    """The bytes each id contributes to a byte-level decode, with the decoder's own fallback."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._backend = tokenizer.backend
        self._special = tokenizer.special_added_ids
        self._cache: dict[int, bytes] = {}

    def get(self, token_id: int, skip_special_tokens: bool) -> bytes:
        if skip_special_tokens and token_id in self._special:
            return b""
        piece = self._cache.get(token_id)
        if piece is None:
            token = self._backend.id_to_token(token_id)
            if token is None:  # decode() drops unknown ids
                piece = b""
            elif all(c in CHAR_TO_BYTE for c in token):
                piece = bytes(CHAR_TO_BYTE[c] for c in token)
            else:  # the ByteLevel decoder takes such a token's UTF-8 as is
                piece = token.encode("utf-8")
            self._cache[token_id] = piece
        return piece


# -- shared helpers -------------------------------------------------------------------------------


def _add_special(backend: tokenizers.Tokenizer, tokens: Iterable[str]) -> None:
    """Add tokens as special added tokens unless already added (then their flags stay)."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = []
    for t in tokens:
        if t not in present:
            present.add(t)
            new.append(AddedToken(t, normalized=False, special=True))
    if new:
        backend.add_special_tokens(new)


def _add_config_tokens(
    backend: tokenizers.Tokenizer, decoder: Mapping, where: pathlib.Path
) -> None:
    """tokenizer_config.json's added_tokens_decoder: add the entries tokenizer.json lacks."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    for index, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if not isinstance(entry, dict) or "content" not in entry:
            raise ValueError(
                f"{where}: added_tokens_decoder[{index}] must be an object with content"
            )
        if entry["content"] in present:
            continue
        flags = {
            k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry
        }
        token = AddedToken(entry["content"], special=bool(entry.get("special", False)), **flags)
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])


def _set_post_processor(
    backend: tokenizers.Tokenizer, *, bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> None:
    """transformers' template: [bos] $A [eos] (and [bos] $B [eos] for pairs)."""
    head = f"{bos[0]}:0 " if bos else ""
    single = f"{head}$A:0" + (f" {eos[0]}:0" if eos else "")
    pair = single + (f" {bos[0]}:1" if bos else "") + " $B:1" + (f" {eos[0]}:1" if eos else "")
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t is not None]
    )


def _with_id(backend: tokenizers.Tokenizer, token: str | None) -> tuple[str, int] | None:
    return None if token is None else (token, backend.token_to_id(token))


def _dir_chat_templates(d: pathlib.Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Template files win over tokenizer_config.json's chat_template, as in transformers."""
    templates = {}
    if (d / "chat_template.jinja").is_file():
        templates["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        return {str(t["name"]): str(t["template"]) for t in value if isinstance(t, dict)}
    return {}


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON: {one_line(e)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _require_list(metadata: Mapping[str, Any], key: str, source: str) -> list:
    value = metadata.get(key)
    if value is None or len(value) == 0:
        raise ValueError(f"{source}: {key} is missing or empty; cannot build a tokenizer")
    return list(value)


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (WordPiece-era spaces before punctuation)."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text
