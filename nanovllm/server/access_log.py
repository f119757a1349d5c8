"""One log line per finished or refused request, as vLLM's access log gives (uvicorn's, there):
who asked, what, the status, the response id, its tokens and how long it took.

    INFO ... [nanovllm.access] 127.0.0.1 "POST /v1/completions" 200 cmpl-3f.. prompt_tokens=12 completion_tokens=16 0.412s

A Falcon middleware writes it when the response is ready: for generation requests and for
every request answered with an error. A stream's line waits for its end (the route writes it
then, with the tokens it sent). `nanovllm serve --disable-access-log` turns it off.
"""

from __future__ import annotations

import logging
import time

import falcon

logger = logging.getLogger("nanovllm.access")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class AccessLog:
    """Falcon middleware; routes find it as `req.context.access_log` to defer a stream's line."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.access_log = self
        req.context.access_start = time.monotonic()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool
    ) -> None:
        if req.context.get("access_deferred"):
            return  # a stream: its line comes when it ends
        status = resp.status_code
        if status >= 400 or req.path.rstrip("/") in GENERATION_PATHS:
            self.write(req, status, req.context.get("usage"))

    def write(self, req: falcon.Request, status: int, usage: dict | None, note: str = "") -> None:
        start = req.context.get("access_start", time.monotonic())
        tokens = ""
        if usage is not None:
            tokens = (
                f" prompt_tokens={usage['prompt_tokens']}"
                f" completion_tokens={usage['completion_tokens']}"
            )
        logger.info(
            '%s "%s %s" %d %s%s%s %.3fs',
            req.remote_addr, req.method, req.path, status,
            req.context.get("response_id", "-"), tokens, note, time.monotonic() - start,
        )  # fmt: skip
