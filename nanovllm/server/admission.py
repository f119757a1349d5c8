"""Admission control: how many generation requests may be in flight, and refusing the rest.

Every open stream holds one waitress worker thread, so the server bounds the requests it takes
(running + waiting) and answers 503 at once beyond that bound, instead of letting requests queue
invisibly inside waitress. At shutdown it refuses everything and lets the drain wait for zero.
"""

from __future__ import annotations

import threading

from nanovllm.server.errors import APIError, overloaded


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def in_flight(self) -> int:
        return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    def enter(self) -> None:
        """Take a slot, or raise a 503 APIError: overloaded, or shutting down."""
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if self._count >= self.limit:
                raise overloaded(
                    f"the server is at its limit of {self.limit} requests in flight "
                    "(--max-requests + --max-waiting); retry later"
                )
            self._count += 1

    def leave(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)
