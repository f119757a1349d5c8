"""The Falcon WSGI app: routes, API-key check, JSON bodies, and serving generation requests.

Request threads (waitress workers) validate a request (protocol.py), check its prompts' size
(limits.py), take an admission slot, hand the prompts to the engine thread and then either wait
for the final outputs or stream them as server-sent events; the connection's close wakes them
(connections.py). They never call the engine themselves; the tokenizer (thread-safe) is used
here only for /tokenize, /detokenize, chat templates and logprob token strings.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import falcon

from nanovllm import __version__
from nanovllm.models.tokenizer import Tokenizer
from nanovllm.sampling_params import RequestOutputKind
from nanovllm.server.access_log import AccessLog
from nanovllm.server.admission import Admission
from nanovllm.server.chat_outputs import ChatParsing
from nanovllm.server.engine_client import ClientGone, EngineClient, EngineFailure, Submission
from nanovllm.server.errors import APIError, bad_request, install_error_handlers
from nanovllm.server.limits import PromptLimit
from nanovllm.server.metrics import ServerMetrics
from nanovllm.server.protocol import (
    GenerateRequest,
    ProtocolContext,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from nanovllm.server.responses import ResponseBuilder
from nanovllm.server.streaming import EventStream, stream_events
from nanovllm.server.tokenizer_info import tokenizer_info

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
ROUTES = (
    ("/v1/completions", "completions"),
    ("/v1/chat/completions", "chat"),
    ("/v1/models", "models"),
    ("/health", "health"),
    ("/version", "version"),
    ("/metrics", "metrics"),
    ("/v1/engine/state", "engine_state"),
    ("/tokenize", "tokenize"),
    ("/detokenize", "detokenize"),
)


@dataclass(slots=True)
class ServerState:
    """Everything the routes share; built once by serve.py (or a test)."""

    engine: EngineClient  # one engine thread, or the router of data-parallel replicas
    tokenizer: Tokenizer
    protocol: ProtocolContext
    metrics: ServerMetrics
    admission: Admission
    max_model_len: int
    prompt_limit: PromptLimit
    model_root: str  # what --model pointed at
    max_body_bytes: int
    api_key: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    access_log: bool = True  # one INFO line per finished or refused request
    tokenizer_info: bool = False  # serve GET /tokenizer_info (vLLM: behind a flag)


def build_app(state: ServerState) -> falcon.App:
    middleware = [AccessLog()] if state.access_log else []
    middleware += [APIKeyAuth(state.api_key)] if state.api_key else []
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    install_error_handlers(app)
    routes = Routes(state)
    for path, suffix in ROUTES:
        app.add_route(path, routes, suffix=suffix)
    if state.tokenizer_info:
        app.add_route("/tokenizer_info", routes, suffix="tokenizer_info")
    return app


class APIKeyAuth:
    """With --api-key, every /v1 path needs `Authorization: Bearer <key>`; the rest stay open."""

    def __init__(self, key: str) -> None:
        self.key = key.encode("utf-8")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not (req.path == "/v1" or req.path.startswith("/v1/")):
            return
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8"), self.key
        ):
            raise APIError(
                401,
                "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )


class Routes:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    # ---- generation ------------------------------------------------------------------------
    def on_post_completions(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._generate(req, resp, parse_completion)

    def on_post_chat(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._generate(req, resp, parse_chat)

    def _generate(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        parse: Callable[[dict, ProtocolContext], GenerateRequest],
    ) -> None:
        state = self.state
        request = parse(read_json(req, state.max_body_bytes), state.protocol)
        for prompt in request.prompts:
            if isinstance(prompt, str):
                state.prompt_limit.check(prompt, request.prompt_field)
        state.admission.enter()
        try:
            sub = self._submit(request)
        except BaseException:
            state.admission.leave()
            raise
        on_close = req.env.get("nanovllm.on_close")
        if on_close is not None:  # only under our waitress server (connections.py)
            on_close(lambda: state.engine.client_gone(sub))
        builder = ResponseBuilder(
            request, state.tokenizer, state.protocol.model_name, chat_parsing(request, state)
        )
        req.context.response_id = builder.id
        if request.stream:
            self._stream(req, resp, sub, builder, request.include_usage)
        else:
            self._respond(resp, sub, builder)
            req.context.usage = builder.usage()

    def _submit(self, request: GenerateRequest) -> Submission:
        # A stream reads what is new at each step; a plain response only the finished output.
        kind = RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
        params = request.params.clone(output_kind=kind)
        try:
            return self.state.engine.submit(request.prompts, params, request.add_special_tokens)
        except ValueError as e:  # the engine's checks: prompt length, token ids, max_tokens
            raise bad_request(str(e), _refused_field(str(e), request)) from e
        except EngineFailure as e:
            raise APIError(503, str(e), code=e.code) from e

    def _respond(self, resp: falcon.Response, sub: Submission, builder: ResponseBuilder) -> None:
        engine = self.state.engine
        try:
            finals = {i: out for i, out in engine.results(sub) if out.finished}
            resp.media = builder.response([finals[i] for i in range(len(sub.prompts))])
        except ClientGone:
            resp.status = 499  # nginx's "client closed request"; nobody reads it
        except EngineFailure as e:
            raise APIError(503, str(e), code=e.code) from e
        finally:
            engine.abort(sub)  # a no-op unless something above failed
            self.state.admission.leave()

    def _stream(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        sub: Submission,
        builder: ResponseBuilder,
        include_usage: bool,
    ) -> None:
        engine, admission = self.state.engine, self.state.admission
        access = req.context.get("access_log")
        req.context.access_deferred = True

        def cleanup() -> None:  # the stream ended, failed, or its client went away
            engine.abort(sub)
            admission.leave()
            if access is not None:
                note = "" if sub.done else " (ended early)"
                access.write(req, 200, builder.usage(), note)

        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-cache")
        resp.stream = EventStream(stream_events(engine, sub, builder, include_usage), cleanup)

    # ---- everything else -------------------------------------------------------------------
    def on_get_models(self, req: falcon.Request, resp: falcon.Response) -> None:
        state = self.state
        model = {
            "id": state.protocol.model_name,
            "object": "model",
            "created": state.started,
            "owned_by": "nanovllm",
            "root": state.model_root,
            "parent": None,
            "max_model_len": state.max_model_len,
        }
        resp.media = {"object": "list", "data": [model]}

    def on_get_health(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.state.admission.closed:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if not self.state.engine.is_alive():
            raise APIError(503, "the engine has stopped", code="engine_failure")
        resp.status = 200
        resp.text = ""

    def on_get_version(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"version": __version__}

    def on_get_metrics(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data, resp.content_type = self.state.metrics.render()

    def on_get_engine_state(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Under /v1 on purpose: it lists requests, so --api-key guards it (unlike /metrics).
        resp.media = self.state.engine.state()

    def on_post_tokenize(self, req: falcon.Request, resp: falcon.Response) -> None:
        state = self.state
        request = parse_tokenize(read_json(req, state.max_body_bytes), state.protocol)
        state.prompt_limit.check(request.text, request.field)
        tokens = state.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        strs = [state.tokenizer.id_to_token(t) for t in tokens] if request.return_token_strs else None  # fmt: skip
        resp.media = {
            "count": len(tokens),
            "max_model_len": state.max_model_len,
            "tokens": tokens,
            "token_strs": strs,
        }

    def on_get_tokenizer_info(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = tokenizer_info(self.state.tokenizer, self.state.max_model_len)

    def on_post_detokenize(self, req: falcon.Request, resp: falcon.Response) -> None:
        state = self.state
        tokens = parse_detokenize(read_json(req, state.max_body_bytes), state.protocol)
        resp.media = {"prompt": state.tokenizer.decode(tokens)}


def chat_parsing(request: GenerateRequest, state: ServerState) -> ChatParsing:
    """How the request's chat choices are read back (reasoning, tool calls)."""
    protocol = state.protocol
    return ChatParsing(
        reasoning=protocol.reasoning_parser,
        tool_parser=protocol.tool_parser,
        tools=request.tools,
        template_kwargs=request.chat_template_kwargs,
    )


def _refused_field(message: str, request: GenerateRequest) -> str | None:
    """The field an engine refusal is about: the engine names it only in its message."""
    if message.startswith("prompt"):  # too long, or a token id outside the vocabulary
        return request.prompt_field
    if "to generate" in message:  # max_tokens beyond the room the prompt leaves
        return request.max_tokens_field
    for name in ("logit_bias", "allowed_token_ids", "stop_token_ids", "bad_words"):
        if message.startswith(name):  # a token id outside the model's vocabulary
            return name
    return None


def read_json(req: falcon.Request, limit: int) -> dict:
    """The body as a JSON object: 415 for another media type, 413 over `limit`, else 400."""
    media_type = (req.content_type or "application/json").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(
            415, f"the body must be JSON (Content-Type: application/json), not {media_type!r}"
        )
    length = req.content_length
    if length is not None and length > limit:
        raise APIError(413, f"the request body has {length} bytes; the limit is {limit}")
    raw = req.bounded_stream.read(limit + 1)
    if len(raw) > limit:
        raise APIError(413, f"the request body is over the limit of {limit} bytes")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise bad_request("the body is nested too deeply", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    _reject_surrogates(raw, body)
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _reject_surrogates(raw: bytes, body: dict) -> None:
    """400 for a string holding a lone UTF-16 surrogate: JSON's escapes allow `"\\ud800"`, but
    it is no character, and neither the tokenizer nor UTF-8 can take it."""
    if not _ESCAPED_SURROGATE.search(raw):
        return  # the common case: no string of the body can hold one
    stack: list[tuple[Any, str]] = [(key, key) for key in body]
    stack += [(value, key) for key, value in body.items()]
    while stack:  # no recursion: the depth is the client's choice
        value, field = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            raise bad_request(
                f"{field} holds a lone UTF-16 surrogate (an escape between \\ud800 and "
                "\\udfff that is not half of a pair), which is not valid Unicode",
                field,
                "invalid_json",
            )
        if isinstance(value, dict):
            stack += [(key, field) for key in value]
            stack += [(item, field) for item in value.values()]
        elif isinstance(value, list):
            stack += [(item, field) for item in value]
