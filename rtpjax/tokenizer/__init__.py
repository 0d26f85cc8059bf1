"""Tokenizers and chat templates from tokenizer.json directories and GGUF files."""

from rtpjax.tokenizer.chat_template import render_chat
from rtpjax.tokenizer.detokenizer import IncrementalDetokenizer
from rtpjax.tokenizer.tokenizer import END_OF_TURN_TOKENS, GGUF_PRE_TOKENIZERS, Tokenizer

__all__ = [
    "END_OF_TURN_TOKENS",
    "GGUF_PRE_TOKENIZERS",
    "IncrementalDetokenizer",
    "Tokenizer",
    "render_chat",
]
