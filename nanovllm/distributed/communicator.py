"""Tensor-parallel collectives: what a sharded model needs from its peers, and the reference.

A sharded model (nanovllm/models/sharding.py) calls two collectives. `all_reduce` sums every
rank's partial output of a row-parallel matmul (o_proj, down, the vocabulary-parallel embedding);
`all_gather` joins every rank's slice of the logits along the vocabulary. As with NCCL, every rank
calls the same collectives in the same order with arrays of the same shape and dtype.

`ReferenceGroup` runs all ranks of a group in one process, each in its own thread, in lock step
(`LockStep`): one rank computes at a time and hands over at each collective. A backend is thus
never called from two threads at once, and sums are always taken in rank order, so results are
reproducible. It is the test oracle of tensor parallelism on the CPU and emulated backends, not
a way to run across devices: that is NCCL (nanovllm/distributed/nccl.py).
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

Array = Any


class Communicator(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x: Array) -> Array:
        """The element-wise sum of `x` over all ranks (a new array; `x` is unchanged)."""

    def all_gather(self, x: Array) -> Array:
        """Every rank's `x` joined along the last axis, in rank order."""


_EMPTY = object()  # a slot no rank has filled yet


class CollectiveMismatch(RuntimeError):
    """The ranks did not call the same collectives with the same shapes and dtypes."""


class RankFailed(RuntimeError):
    """Another rank of the group raised; this one stops at its next collective."""


class LockStep:
    """Threads that take turns: rank r runs until its next collective, then rank r + 1 runs. The
    last rank to arrive combines everyone's contribution; each rank resumes, in rank order, with
    the combined value."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._reset()

    def _reset(self) -> None:
        self._turn = 0
        self._done: set[int] = set()
        self._failure: BaseException | None = None
        self._slots: list[Any] = [_EMPTY] * self.size
        self._arrived = 0
        self._generation = 0  # collectives completed
        self._result: Any = None

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run fns[r] as rank r; their results in rank order. If a rank raises, the others stop
        at their next collective and the first error is raised here."""
        if len(fns) != self.size:
            raise ValueError(f"a group of {self.size} ranks runs {self.size} functions, not {len(fns)}")  # fmt: skip
        self._reset()
        results: list[Any] = [None] * self.size
        threads = [
            threading.Thread(target=self._rank_main, args=(rank, fn, results), daemon=True)
            for rank, fn in enumerate(fns)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._failure is not None:
            raise self._failure
        return results

    def exchange(self, rank: int, value: Any, combine: Callable[[list[Any]], Any]) -> Any:
        """Contribute `value`; once every rank has, all get combine(values in rank order)."""
        with self._cond:
            if self._done:
                raise CollectiveMismatch(
                    f"rank {rank} called a collective that rank {min(self._done)} never called"
                )
            if self._slots[rank] is not _EMPTY:
                raise CollectiveMismatch(f"rank {rank} contributed twice to one collective")
            self._slots[rank] = value
            self._arrived += 1
            wanted = self._generation + 1
            if self._arrived == self.size:
                self._result = combine(list(self._slots))  # raises CollectiveMismatch
                self._slots = [_EMPTY] * self.size
                self._arrived, self._generation = 0, wanted
            self._pass_turn(rank)
            self._cond.wait_for(lambda: self._turn == rank or self._failure is not None)
            if self._failure is not None:
                raise RankFailed("another rank of the tensor-parallel group failed")
            if self._generation != wanted:
                raise CollectiveMismatch(f"rank {rank} waits on a collective no other rank joined")
            return self._result

    def _rank_main(self, rank: int, fn: Callable[[], Any], results: list[Any]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == rank or self._failure is not None)
            if self._failure is not None:
                return
        try:
            results[rank] = fn()
        except BaseException as e:
            with self._cond:
                if self._failure is None and not isinstance(e, RankFailed):
                    self._failure = e
                self._cond.notify_all()
            return
        with self._cond:
            self._done.add(rank)
            self._pass_turn(rank)

    def _pass_turn(self, rank: int) -> None:
        for step in range(1, self.size + 1):
            nxt = (rank + step) % self.size
            if nxt not in self._done:
                self._turn = nxt
                break
        self._cond.notify_all()


class ReferenceGroup:
    """All ranks of a tensor-parallel group in this process; collectives summed in NumPy (or
    whatever array module `xp` is) in rank order."""

    def __init__(self, size: int, xp: Any = np) -> None:
        self.size = size
        self.xp = xp
        self.steps = LockStep(size)

    def communicators(self) -> list[ReferenceCommunicator]:
        return [ReferenceCommunicator(self, rank) for rank in range(self.size)]

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run fns[r] as rank r, in lock step (see LockStep.run)."""
        return self.steps.run(fns)


class ReferenceCommunicator:
    def __init__(self, group: ReferenceGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.size

    def all_reduce(self, x: Array) -> Array:
        total = self.group.steps.exchange(self.rank, x, functools.partial(_combine, "all_reduce", _sum))  # fmt: skip
        return total.copy()  # each rank owns its result, as with NCCL

    def all_gather(self, x: Array) -> Array:
        join = functools.partial(self.group.xp.concatenate, axis=-1)
        return self.group.steps.exchange(self.rank, x, functools.partial(_combine, "all_gather", join)).copy()  # fmt: skip


def _sum(values: list[Array]) -> Array:
    return functools.reduce(operator.add, values)


def _combine(op: str, fn: Callable[[list[Array]], Array], values: list[Array]) -> Array:
    shapes = {(tuple(v.shape), str(v.dtype)) for v in values}
    if len(shapes) != 1:
        described = ", ".join(f"{tuple(v.shape)} {v.dtype}" for v in values)
        raise CollectiveMismatch(f"{op} over arrays of different shapes or dtypes: {described}")
    return fn(values)
