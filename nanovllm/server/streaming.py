"""Server-sent events: `data: {json}\\n\\n` chunks ending with `data: [DONE]`.

waitress sends each item of a WSGI body as it is produced, so a generator of events streams.
When the client goes away, the connection's close wakes the generator (ClientGone, even while
the request still waits in the engine's queue) or waitress notices on the next write; either
way waitress calls the body's `close()`, and `EventStream.close` runs its cleanup whether or
not the generator ever started, which is how a dropped client's request gets aborted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

from nanovllm.server.engine_client import ClientGone, EngineClient, EngineFailure, Submission
from nanovllm.server.errors import APIError, error_body
from nanovllm.server.responses import ResponseBuilder

logger = logging.getLogger("nanovllm.server")

DONE = b"data: [DONE]\n\n"


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


class EventStream:
    """A WSGI body: the events, plus cleanup that runs exactly once however the stream ends."""

    def __init__(self, events: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._events = events
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        try:
            self._events.close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def stream_events(
    engine: EngineClient, sub: Submission, builder: ResponseBuilder, include_usage: bool
) -> Iterator[bytes]:
    """The SSE body of one request. An error after the headers went out becomes a last chunk."""
    try:
        for chunk in builder.first_chunks():
            yield sse(chunk)
        for prompt_index, output in engine.results(sub):
            for chunk in builder.delta_chunks(prompt_index, output):
                yield sse(chunk)
        if include_usage:
            yield sse(builder.usage_chunk())
    except ClientGone:
        return  # nobody to tell
    except EngineFailure as e:
        yield sse(error_body(503, str(e), code=e.code))
    except APIError as e:  # a choice ended with an error (responses.py)
        yield sse(e.body())
    except Exception:
        logger.exception("internal error while streaming %s", builder.id)
        yield sse(error_body(500, "internal server error (see the server log)"))
    yield DONE
