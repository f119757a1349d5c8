"""Request validation for /v1/completions and /v1/chat/completions: one path for both.

`parse_completion` and `parse_chat` check what belongs to their endpoint (prompt or messages,
the logprobs shape, echo), then `_sampling_params` checks the shared fields: their JSON types
here, their ranges in `SamplingParams` (the one place that knows them). A field the server
cannot honour is refused with a 400 that names it; nothing is silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanovllm.sampling_params import SamplingParams
from nanovllm.server.errors import APIError, bad_request
from nanovllm.structured.errors import ParameterError
from nanovllm.structured.request import output_constraint
from nanovllm.structured.tool_parsers import tool_parser
from nanovllm.structured.tools import ToolRequest, parse_tools

Prompt = str | list[int]
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_CHOICES = 128  # prompts x n in one request
ROLES = ("system", "user", "assistant", "tool")

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "an array"}  # fmt: skip

# Fields both endpoints accept, with their JSON type (float means any number).
_SAMPLING_FIELDS: dict[str, type] = {
    "n": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
    "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
    "seed": int, "min_tokens": int, "ignore_eos": bool, "include_stop_str_in_output": bool,
    "skip_special_tokens": bool,
}  # fmt: skip
_COMMON_FIELDS = {
    *_SAMPLING_FIELDS, "model", "max_tokens", "stop", "stop_token_ids", "stream",
    "stream_options", "user", "logprobs", "logit_bias", "prompt_logprobs", "allowed_token_ids",
    "bad_words", "response_format", "structured_outputs",
}  # fmt: skip
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of", "add_special_tokens"}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "chat_template_kwargs",
}  # fmt: skip

# Accepted only with the value that asks for nothing; anything else is refused by name.
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (lambda v: v == "", "suffix (text after the insertion) is not supported"),
    "best_of": (lambda v: v == 1, "best_of other than 1 is not supported"),
    "functions": (
        lambda v: v == [],
        "functions (deprecated by OpenAI) are not supported; use tools",
    ),  # fmt: skip
    "function_call": (
        lambda v: v == "none",
        "function_call (deprecated by OpenAI) is not supported; use tool_choice",
    ),  # fmt: skip
}


@dataclass(slots=True)
class ProtocolContext:
    """What validation needs from the server: defaults, names, the chat template."""

    defaults: SamplingParams  # generation_config + the command line's sampling flags
    model_name: str  # the name responses carry
    accepted_names: frozenset[str]  # names a request may ask for
    # (messages, add_generation_prompt=True, tools=None, **chat_template_kwargs) -> prompt text
    render_chat: Callable[..., str]
    vocab_size: int  # of the tokenizer: the ids /detokenize accepts
    # The parser of free-form tool calls (--enable-auto-tool-choice --tool-call-parser NAME),
    # which tool_choice "auto" needs; the reasoning parser (--reasoning-parser NAME).
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    # Compiles a request's grammar for the model (in the request's thread), raising a
    # ParameterError naming the field for a bad one: (params, field) -> None.
    check_constraint: Callable[[SamplingParams, str | None], None] | None = None


@dataclass(slots=True)
class GenerateRequest:
    """A validated generation request, whichever endpoint it came from."""

    endpoint: str  # "completion" or "chat"
    prompts: list[Prompt]
    params: SamplingParams
    add_special_tokens: bool
    stream: bool
    include_usage: bool
    echo: bool = False
    prompt_field: str = "prompt"  # what errors about the prompt name: "prompt" or "messages"
    max_tokens_field: str = "max_tokens"  # or "max_completion_tokens", as the request said
    tools: ToolRequest | None = None  # chat: the tools, and how the request asks for them
    constraint_field: str | None = None  # the field params.structured_outputs came from
    chat_template_kwargs: dict | None = None

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


# ---- the two endpoints -------------------------------------------------------------------
def parse_completion(body: dict, ctx: ProtocolContext) -> GenerateRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    check_model(body, ctx)
    prompts = parse_prompt(_required(body, "prompt"))
    logprobs = _bounded_int(body, "logprobs", 0, MAX_LOGPROBS)
    echo = _typed(body, "echo", bool) or False
    changes: dict[str, Any] = {"logprobs": logprobs}
    if echo and logprobs is not None:  # the prompt's tokens come with their logprobs (vLLM)
        changes["prompt_logprobs"] = logprobs
    max_tokens = _typed(body, "max_tokens", int)
    if max_tokens is not None:  # else the default (16, as in OpenAI's legacy API)
        changes["max_tokens"] = max_tokens
    return _request(body, ctx, "completion", prompts, changes,
                    add_special_tokens=_typed(body, "add_special_tokens", bool) is not False,
                    echo=echo)  # fmt: skip


def parse_chat(body: dict, ctx: ProtocolContext) -> GenerateRequest:
    _check_fields(body, _CHAT_FIELDS)
    check_model(body, ctx)
    messages = parse_messages(_required(body, "messages"))
    tools = _parameter(lambda: parse_tools(
        body.get("tools") or None, body.get("tool_choice"), body.get("parallel_tool_calls"),
        auto_tools=ctx.tool_parser is not None,
    ))  # fmt: skip
    template_kwargs = _typed(body, "chat_template_kwargs", dict) or {}
    changes: dict[str, Any] = {"logprobs": _chat_logprobs(body)}
    legacy_max = _typed(body, "max_tokens", int)
    max_tokens = _typed(body, "max_completion_tokens", int)
    max_name = "max_tokens" if max_tokens is None else "max_completion_tokens"
    # Without a limit, a reply may fill the rest of the context (vLLM's behaviour).
    changes["max_tokens"] = legacy_max if max_tokens is None else max_tokens
    if tools.choice == "auto" and tool_parser(ctx.tool_parser).keep_special_tokens:
        changes["skip_special_tokens"] = False  # its tags may be special tokens (as vLLM does)
    prompt = _render(ctx, messages, tools, template_kwargs)
    # The template already holds the BOS token if the model wants one.
    request = _request(body, ctx, "chat", [prompt], changes, add_special_tokens=False,
                       aliases={"max_tokens": max_name}, tools=tools)  # fmt: skip
    request.prompt_field, request.max_tokens_field = "messages", max_name
    request.tools, request.chat_template_kwargs = tools, template_kwargs
    return request


def _render(ctx: ProtocolContext, messages: list[dict], tools: ToolRequest, kwargs: dict) -> str:
    """The prompt: the template gets the tools (also with tool_choice "none", as in vLLM)."""
    extra = dict(kwargs)
    if tools.tools:
        extra["tools"] = [tool.to_dict() for tool in tools.tools]
    try:
        return ctx.render_chat(messages, **extra)
    except ValueError as e:  # the template refused the conversation, or there is none
        raise bad_request(str(e), "messages") from e
    except TypeError as e:  # a chat_template_kwargs key that clashes with the template's own
        raise bad_request(f"chat_template_kwargs: {e}", "chat_template_kwargs") from e


def _request(
    body: dict, ctx: ProtocolContext, endpoint: str, prompts: list[Prompt], changes: dict,
    add_special_tokens: bool, echo: bool = False, aliases: dict | None = None,
    tools: ToolRequest | None = None,
) -> GenerateRequest:  # fmt: skip
    stream = _typed(body, "stream", bool) or False
    _typed(body, "user", str)  # accepted for OpenAI compatibility; it changes nothing here
    prompt_logprobs = _bounded_int(body, "prompt_logprobs", 0, MAX_LOGPROBS)
    if prompt_logprobs is not None:  # vLLM's extension; echo with logprobs sets it as well
        if stream:
            raise bad_request("prompt_logprobs are not available with stream=true", "prompt_logprobs")  # fmt: skip
        changes.setdefault("prompt_logprobs", prompt_logprobs)
    constraint = _parameter(
        lambda: output_constraint(
            body.get("response_format"), body.get("structured_outputs"), tools
        )
    )
    if constraint is not None:
        changes["structured_outputs"] = constraint.params
    params = _sampling_params(body, ctx.defaults, changes, aliases or {})
    request = GenerateRequest(endpoint, prompts, params, add_special_tokens, stream,
                              _include_usage(body, stream), echo)  # fmt: skip
    if constraint is not None:
        request.constraint_field = constraint.field
        if ctx.check_constraint is not None:  # a bad grammar is a 400 before any KV block
            _parameter(lambda: ctx.check_constraint(params, constraint.field))
    if request.num_choices > MAX_CHOICES:
        raise bad_request(
            f"this request asks for {request.num_choices} choices ({len(prompts)} prompts x "
            f"n={params.n}); the limit is {MAX_CHOICES}",
            "n",
        )
    return request


@dataclass(slots=True)
class TokenizeRequest:
    text: str
    add_special_tokens: bool
    return_token_strs: bool
    field: str = "prompt"  # where the text came from: "prompt" or "messages"


def parse_tokenize(body: dict, ctx: ProtocolContext) -> TokenizeRequest:
    """vLLM's /tokenize: a `prompt` string, or chat `messages` rendered by the template."""
    chat = body.get("messages") is not None
    fields = {"model", "add_special_tokens", "return_token_strs"}
    chat_fields = {"messages", "add_generation_prompt", "tools", "chat_template_kwargs"}
    _check_fields(body, fields | (chat_fields if chat else {"prompt"}))
    check_model(body, ctx)
    strs = _typed(body, "return_token_strs", bool) or False
    special = _typed(body, "add_special_tokens", bool)
    if not chat:
        _required(body, "prompt")
        prompt = _typed(body, "prompt", str)
        return TokenizeRequest(prompt, special is not False, strs)
    messages = parse_messages(body["messages"])
    kwargs = dict(_typed(body, "chat_template_kwargs", dict) or {})
    kwargs["add_generation_prompt"] = _typed(body, "add_generation_prompt", bool) is not False
    tools = _parameter(lambda: parse_tools(body.get("tools") or None, "none"))
    text = _render(ctx, messages, tools, kwargs)
    return TokenizeRequest(text, special is True, strs, "messages")


def parse_detokenize(body: dict, ctx: ProtocolContext) -> list[int]:
    _check_fields(body, {"model", "tokens"})
    check_model(body, ctx)
    tokens = _int_list(_required(body, "tokens"), "tokens")
    bad = [t for t in tokens if not 0 <= t < ctx.vocab_size]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is not in the vocabulary [0, {ctx.vocab_size})", "tokens"
        )
    return tokens


# ---- shared fields -----------------------------------------------------------------------
def _sampling_params(
    body: dict, defaults: SamplingParams, changes: dict, aliases: dict[str, str]
) -> SamplingParams:
    for name, (is_neutral, message) in _NEUTRAL.items():
        if body.get(name) is not None and not is_neutral(body[name]):
            raise bad_request(message, name, "unsupported_parameter")
    values = {name: _typed(body, name, kind) for name, kind in _SAMPLING_FIELDS.items()}
    values = {name: value for name, value in values.items() if value is not None}
    if body.get("stop") is not None:
        values["stop"] = _stop(body["stop"])
    if body.get("stop_token_ids") is not None:
        values["stop_token_ids"] = _int_list(body["stop_token_ids"], "stop_token_ids")
    if body.get("allowed_token_ids") is not None:
        values["allowed_token_ids"] = _int_list(body["allowed_token_ids"], "allowed_token_ids")
    if body.get("logit_bias") is not None:
        values["logit_bias"] = _typed(body, "logit_bias", dict) or None
    if body.get("bad_words") is not None:
        values["bad_words"] = _typed(body, "bad_words", list)
    values.update(changes)
    try:
        return defaults.clone(**values)
    except ValueError as e:  # SamplingParams' range checks; its message starts with the field
        name = str(e).split(" ", 1)[0]
        raise bad_request(_rename(str(e), aliases), aliases.get(name, name)) from e


def _parameter(build: Callable[[], Any]) -> Any:
    """build(), with a structured-output or tool field's ParameterError as a 400 naming it."""
    try:
        return build()
    except ParameterError as e:
        raise bad_request(str(e), e.param) from e


def _rename(message: str, aliases: dict[str, str]) -> str:
    for name, alias in aliases.items():
        message = message.replace(name, alias)
    return message


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of non-empty strings", "stop")
    return stops


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    _check_fields(options, {"include_usage"}, where="stream_options.")
    return _typed(options, "include_usage", bool, where="stream_options.") or False


def _chat_logprobs(body: dict) -> int | None:
    wanted = _typed(body, "logprobs", bool) or False
    top = _bounded_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    return (top or 0) if wanted else None


def check_model(body: dict, ctx: ProtocolContext) -> None:
    """`model` may be left out; if given, it must name the model this server serves. Otherwise
    404, as OpenAI and vLLM answer; the message names no served model (that name may be a path
    on the server) and quotes at most 100 characters of the client's."""
    model = _typed(body, "model", str)
    if model is not None and model not in ctx.accepted_names:
        shown = model if len(model) <= 100 else model[:100] + "..."
        raise APIError(404, f"the model '{shown}' does not exist", "model", "model_not_found")


# ---- prompts and messages ----------------------------------------------------------------
def parse_prompt(value: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        prompts: list[Prompt] = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        prompts = [list(value)]
    elif isinstance(value, list) and value and all(_is_id_list(p) for p in value):
        prompts = [list(p) for p in value]
    else:
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids, or a list of "
            "token-id lists (none of them empty)",
            "prompt",
        )
    if any(p == "" for p in prompts):
        raise bad_request("prompt must not be empty", "prompt")
    return prompts


def parse_messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty array of messages", "messages")
    return [_message(message, f"messages[{i}]") for i, message in enumerate(value)]


# Fields a message may carry besides role and content, by role.
_MESSAGE_FIELDS = {"assistant": {"name", "tool_calls"}, "tool": {"tool_call_id", "name"}}


def _message(message: Any, where: str) -> dict:
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(
            f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role"
        )
    unknown = sorted(set(message) - {"role", "content"} - _MESSAGE_FIELDS.get(role, {"name"}))
    if unknown:
        raise bad_request(f"{where} has unsupported field(s): {', '.join(unknown)}", where)
    parsed: dict[str, Any] = {"role": role}
    calls = message.get("tool_calls")
    if calls is not None:
        parsed["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
    if not (calls and message.get("content") is None):  # a call may come without content
        parsed["content"] = _content(message.get("content"), f"{where}.content")
    for name in ("name", "tool_call_id"):
        value = _typed(message, name, str, where=f"{where}.")
        if value is not None:
            parsed[name] = value
    if role == "tool" and "tool_call_id" not in parsed:
        raise bad_request(f"{where}.tool_call_id is missing: a tool message answers a call", where)
    return parsed


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's earlier tool calls, in OpenAI's shape (the template renders them)."""
    usage = '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "{...}"}}'
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be an array of calls {usage}", where)
    parsed = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or call.get("type", "function") != "function"
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments", ""), str)
            or not isinstance(call.get("id", ""), str)
        ):
            raise bad_request(f"{where}[{i}] must be a call {usage}", f"{where}[{i}]")
        parsed.append({"id": call.get("id", ""), "type": "function",
                       "function": {"name": function["name"],
                                    "arguments": function.get("arguments", "")}})  # fmt: skip
    return parsed


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where} must be a string or a non-empty array of text parts", where)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(
                f"{where}[{i}] must be a text part {{'type': 'text', 'text': ...}}; got {kind!r} "
                "(only text is supported)",
                f"{where}[{i}]",
            )
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise bad_request(f"{where}[{i}] must have a string 'text' and nothing else", where)
        texts.append(part["text"])
    return "\n".join(texts)


# ---- JSON type checks --------------------------------------------------------------------
def _check_fields(body: dict, allowed: set[str], where: str = "") -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(
            f"unrecognized request argument: {where}{unknown[0]}",
            where + unknown[0],
            "unknown_parameter",
        )


def _required(body: dict, name: str) -> Any:
    if body.get(name) is None:
        raise bad_request(f"missing required field '{name}'", name, "missing_required_parameter")
    return body[name]


def _typed(body: dict, name: str, kind: type, where: str = "") -> Any:
    """body[name] if present and not null, after checking its JSON type; else None."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int | float) if kind is float else isinstance(value, kind)
    if ok and (kind is bool or not isinstance(value, bool)):
        return value
    raise bad_request(
        f"{where}{name} must be {_TYPE_NAMES[kind]}, got {_json_type(value)}",
        where + name,
        "invalid_type",
    )


def _bounded_int(body: dict, name: str, low: int, high: int) -> int | None:
    value = _typed(body, name, int)
    if value is not None and not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise bad_request(f"{name} must be an array of integers", name, "invalid_type")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def _json_type(value: Any) -> str:
    for kind in (bool, int, float, str, dict, list):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind].split(" ", 1)[1]
    return type(value).__name__
