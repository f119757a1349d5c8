"""Capturing decode steps as CUDA graphs: one graph per batch-size bucket in one private memory
pool, through CuPy (on a GPU; in the tests, through tests/_fake_cupy.py, a stand-in that
enforces CuPy's capture rules on the emulated device). nanovllm/engine/cuda_graphs.py decides
what runs as a graph and checks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

Array = Any


class CapturedGraphs:
    """One CUDA graph per bucket, captured largest first into one private memory pool.

    The pool is why this class exists: the arrays a graph allocates while it is captured are the
    addresses every replay writes. Were they returned to CuPy's shared pool, later eager work
    would be handed the same memory and the next replay would overwrite it. So capture runs
    under `using_allocator(pool.malloc)`, and the pool lives as long as the graphs. The graphs
    share it safely: they never run at once (one engine thread, one stream), and the only array
    that outlives a replay is the runner's logits buffer, shared by every bucket.

    Capture happens on a side stream (the legacy default stream cannot be captured) after one
    eager warm-up run of the same step on it: that compiles every kernel (and lets cuBLAS set up
    its workspace) and fills the pool with blocks of the right sizes, so capture compiles nothing
    and rarely mallocs (cudaMalloc is allowed in the relaxed mode CuPy captures in; a sync or a
    pageable host copy is not, and would make capture raise). Replays launch on the
    current stream, so they are ordered after the eager work before them (prefill writes to the
    KV cache) and before the sampler after them without any event.
    """

    def __init__(self, cupy: Any, forward: Callable[[int], Array], buckets: list[int]) -> None:
        self.cupy = cupy
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, Any] = {}
        self.logits: dict[int, Array] = {}
        # The side stream does not wait for the null stream: let the buffers' uploads land.
        cupy.cuda.runtime.deviceSynchronize()
        for bucket in sorted(buckets, reverse=True):  # smaller graphs reuse the largest's blocks
            self.graphs[bucket], self.logits[bucket] = self._capture(forward, bucket)

    def _capture(self, forward: Callable[[int], Array], bucket: int) -> tuple[Any, Array]:
        with self.cupy.cuda.using_allocator(self.pool.malloc), self.stream:
            forward(bucket)  # warm-up, see the class docstring
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                logits = forward(bucket)
            except BaseException:
                # Leave capture mode, but report what broke the capture, not that it ended.
                with contextlib.suppress(Exception):
                    self.stream.end_capture()
                raise
            graph = self.stream.end_capture()
        return graph, logits

    def replay(self, bucket: int) -> Array:
        self.graphs[bucket].launch(stream=self.cupy.cuda.get_current_stream())
        return self.logits[bucket]

    def release(self) -> None:
        self.graphs.clear()
        self.logits.clear()
        self.pool.free_all_blocks()
