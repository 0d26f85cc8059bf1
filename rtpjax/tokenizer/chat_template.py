"""Chat templates: Jinja rendered the way transformers renders them, so prompts match exactly.

The environment is sandboxed and immutable (templates come from model repositories and are
untrusted), with trim_blocks, lstrip_blocks, the loop-controls extension, a no-op `{% generation %}`
block (transformers uses it to mark assistant tokens; here it only renders its body), and the
helpers templates expect: `raise_exception`, `strftime_now`, a `tojson` filter that does not
escape HTML and takes indent/separators/sort_keys, and `dict`/`namespace` that cannot reach
Python internals.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning may come under; templates read `reasoning_content`
# (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def select_template(
    templates: Mapping[str, str],
    chat_template: str | None,
    tools: list[dict] | None,
    source: str,
) -> str:
    """The template to render: a name among `templates`, a template given inline, or the default
    ("tool_use" instead when tools are given and the tokenizer has one)."""
    if chat_template is not None:
        return templates.get(chat_template, chat_template)
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if templates:
        raise ValueError(
            f"{source}: several chat templates and no default; pass chat_template= one of "
            f"{sorted(templates)}"
        )
    raise ValueError(f"{source}: the model has no chat template; pass chat_template=")


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render one conversation. `variables` (special tokens, extra flags) are template globals."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for n, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ValueError(
                f"messages[{n}] must be a dict with 'role' and 'content', not {message!r}"
            )
        # APIs send content=None or tool_calls=None; templates handle a missing key, not a None.
        chat.append(_alias_reasoning({k: v for k, v in message.items() if v is not None}))
    extra = _plain(dict(variables or {}))
    for name in ("messages", "tools", "add_generation_prompt"):
        if name in extra:
            raise ValueError(f"template variable {name!r} is set by apply_chat_template itself")
    extra.setdefault("documents", None)  # transformers always defines it
    try:
        compiled = compile_template(template)
        return compiled.render(
            **extra, messages=chat, tools=_plain(tools), add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e.message or type(e).__name__}") from None


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per template text (templates are long; compiling is milliseconds)."""
    return _environment().from_string(template)


# -- environment ----------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads this class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat prompts want the JSON as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` in templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (no path to dunders)."""

    # No `self` parameter: jinja's own signature trick, so namespace(self=...) still works.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}"
            )


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


# -- inputs ---------------------------------------------------------------------------------------


def _alias_reasoning(message: dict) -> dict:
    """Fill `reasoning_content` (and gpt-oss's `thinking`) from whichever reasoning name is set."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, so the sandbox never sees objects whose
    methods it does not know (pydantic models become dicts, other objects a `<TypeName>` string)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"
