"""The cpu backend's matmul kernels per stored format, against float32 BLAS on the same shape.

For each format, `linear` on a random [rows, cols] matrix for batches of M rows, through the
quantized kernels — on activations rounded to 8-bit (q8) and 16-bit (q16) codes where the
format has integer kernels (nanovllm/backends/cpu_int8.py), and on float32 activations — and
through the tiled path (dequantize tiles, BLAS), so the crossovers (MAX_INTEGER_ROWS and
MAX_KERNEL_ROWS in nanovllm/backends/cpu.py) can be read off. Times are the best of several
runs in process CPU time (`--clock cpu`, the default: robust on a shared machine, meaningful
with one thread) or wall time (`--clock wall`).

Usage: NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/bench_cpu_kernels.py \\
           [--shape 3072x576] [--formats Q4_1,Q8_0] [--rows 1,4,16,24,32,64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _gguf_reference import random_matrix_bytes  # noqa: E402

from nanovllm.backends import cpu  # noqa: E402
from nanovllm.backends.cpu_int8 import Q8, Q16  # noqa: E402
from nanovllm.backends.cpu_quant import FORMATS  # noqa: E402
from nanovllm.models.quantized import QuantizedTensor  # noqa: E402

Q = gguf.GGMLQuantizationType


def best(fn, clock, *args, repeats: int = 7) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = clock()
        fn(*args)
        times.append(clock() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="3072x576", help="rows x cols of the weight")
    parser.add_argument("--formats", default=",".join(sorted(q.name for q in FORMATS)))
    parser.add_argument("--rows", default="1,4,16,24,32,64", help="batch rows M")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows, cols = (int(n) for n in args.shape.split("x"))
    backend = cpu.CPUBackend()
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(rows, cols)).astype(np.float32)
    print(f"{rows}x{cols}, {backend.threads.num_threads} thread(s), {args.clock} time")
    for m in (int(n) for n in args.rows.split(",")):
        x = rng.normal(size=(m, cols)).astype(np.float32)
        blas = best(np.matmul, clock, x, dense.T)
        cells = [f"M={m:3d} float32 BLAS {blas * 1e3:7.3f} ms"]
        for name in args.formats.split(","):
            if cols % gguf.GGML_QUANT_SIZES[Q[name]][0]:
                continue  # K-quants need rows of whole 256-value blocks
            stored = QuantizedTensor(
                Q[name], (rows, cols), random_matrix_bytes(rng, name, rows, cols)
            )
            weight = backend.weight(stored)
            cpu.MAX_KERNEL_ROWS = 1 << 30
            times = []
            for precision in (Q8, Q16) if weight.parts[0].kernels.integer else ():
                cpu.MAX_INTEGER_ROWS = {Q8: 1 << 30, Q16: 1 << 30}
                backend.activations = precision
                times.append(
                    f"q{precision.bits} {best(backend.linear, clock, x, weight) * 1e3:.3f}"
                )
            cpu.MAX_INTEGER_ROWS = {Q8: 0, Q16: 0}
            kernel = best(backend.linear, clock, x, weight)
            cpu.MAX_KERNEL_ROWS = 0
            tiled = best(backend.linear, clock, x, weight)
            gb_s = stored.nbytes / kernel / 1e9
            cells.append(
                f"{name} {' '.join(times)} float {kernel * 1e3:.3f} ms ({gb_s:4.1f} GB/s) "
                f"tiled {tiled * 1e3:.3f}"
            )
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
