"""Admission control: how many generation requests may be in flight, and refusing the rest.

Requests beyond the running batch wait in the engine's queue, as in vLLM; this bounds them.
Each request in flight holds one waitress worker thread that only waits on its queue, and the
pool has a thread for every admitted request plus spares, so the bound is also what keeps the
pool from running dry. Beyond it the answer is 503 with `Retry-After` at once, instead of a
request queued invisibly inside waitress. At shutdown it refuses everything and lets the drain
wait for zero.
"""

from __future__ import annotations

import threading

from nanovllm.server.errors import APIError, overloaded


class Admission:
    def __init__(self, limit: int, running: int) -> None:
        self.limit = limit  # running + waiting
        self.running = running  # --max-requests, for the message
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
                    f"({self.running} running and {self.limit - self.running} waiting); "
                    "retry later"
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
