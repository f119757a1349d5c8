"""Chat templates: render a model's Jinja chat template exactly the way transformers does.

A chat template is code shipped with the model, so it runs in Jinja's immutable sandbox. The
environment matches transformers' (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, the
`raise_exception` and `strftime_now` globals, its `tojson` filter, namespaces that refuse
underscore names), so a template renders here byte for byte as it does there.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanovllm.errors import NanovllmError


class ChatTemplateError(NanovllmError, ValueError):
    """The chat template refused the conversation (raise_exception) or could not be run."""


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict] | None = None,
    **extra: Any,
) -> str:
    """The prompt text; a ChatTemplateError (a ValueError) if the template refuses or fails."""
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    if not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("each chat message must be a dict with 'role' and 'content'")
    # transformers leaves a missing special token undefined (rendering as ""), never "None".
    special = {"bos_token": bos_token, "eos_token": eos_token}
    variables = {
        "documents": None,
        **{name: value for name, value in special.items() if value is not None},
        **extra,
        "messages": [_without_none(m) for m in messages],
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return _compile(template).render(variables)
    except _TEMPLATE_FAILURES as e:
        raise ChatTemplateError(_describe(e)) from e


# A template is code run on user input: these are the input's or the template's fault, not
# ours (e.g. '<|im_start|>' + content, when content is a list of parts, is a TypeError).
_TEMPLATE_FAILURES = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    ArithmeticError,
)


def _without_none(message: dict) -> dict:
    # OpenAI clients send content=None beside tool_calls; templates expect the key to be absent.
    message = {key: value for key, value in message.items() if value is not None}
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [_call_for_template(call) for call in message["tool_calls"]]
    return message


def _call_for_template(call: Any) -> Any:
    """OpenAI sends a call's arguments as JSON text; templates (Qwen's, Llama 3's) render them
    with `tojson` and expect the object, as vLLM hands it to them."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except ValueError:
        return call  # not JSON: the template gets the text as it came
    return {**call, "function": {**function, "arguments": arguments}}


def _describe(error: jinja2.TemplateError) -> str:
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"invalid chat template (line {error.lineno}): {error.message}"
    if isinstance(error, _TemplateRaised):
        return str(error)  # the template's own words, e.g. "Conversation roles must alternate"
    return f"chat template failed: {error}"


class _TemplateRaised(jinja2.TemplateError):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes ("<" -> "\u003c"); chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' {% generation %} marks assistant text for training masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, minus underscore attributes (a way out of the sandbox otherwise)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]  # Jinja's trick so that namespace(self=...) still works
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot set underscore attributes on a namespace: {name!r}"
        )


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)
