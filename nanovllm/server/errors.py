"""OpenAI error bodies: the one exception the server raises on purpose, and Falcon's handlers.

Every failure reaches the client as `{"error": {"message", "type", "param", "code"}}` with a
matching status. Unexpected exceptions become a 500 with a generic message; the traceback goes
to the server log only.
"""

from __future__ import annotations

import json
import logging

import falcon

logger = logging.getLogger("nanovllm.server")

_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses or cannot serve, rendered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | int | None = None
) -> dict:
    kind = _TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(retry_after_s)})


def _render(resp: falcon.Response, status: int, body: dict) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)
    resp.stream = None


def handle_api_error(req: falcon.Request, resp: falcon.Response, ex: APIError, params) -> None:
    resp.set_headers(ex.headers)
    _render(resp, ex.status, ex.body())


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params
) -> None:
    """Falcon's own errors (unknown route, wrong method, ...) in OpenAI's shape."""
    status = ex.status_code
    if status == 404:
        message = f"no such endpoint: {req.path}"
    elif status == 405:
        allowed = (ex.headers or {}).get("Allow", "")
        message = f"method {req.method} is not allowed on {req.path} (allowed: {allowed})"
    else:
        message = ex.description or ex.title or "request refused"
    resp.set_headers(ex.headers or {})
    _render(resp, status, error_body(status, message, code=status))


def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params) -> None:
    logger.exception("internal error while serving %s %s", req.method, req.path)
    _render(resp, 500, error_body(500, "internal server error (see the server log)"))


def install_error_handlers(app: falcon.App) -> None:
    # Falcon picks the most specific handler for an exception, so the order does not matter.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(APIError, handle_api_error)
