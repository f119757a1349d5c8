"""The projected decode step on an H100 (docs/kernels.md), as arithmetic: a projection from the
kernels' geometry and a launch count, not a measurement. `nanovllm bench decode` prints it next
to what a GPU measures.

Assumptions (each stated in docs/kernels.md): an H100 SXM's 3.35 TB/s of HBM, of which a kernel
with enough loads in flight gets 80% (the small kernels 50%, paged attention 55%); 132 SMs x 128
lanes x 1.98 GHz of lane-instructions, 70% of them issued; 2 us per kernel inside a graph beyond
its work; paged attention at batch 1 latency-bound at 8 us a layer. Matmul instructions per
weight value, counted from kernels/matmul.cu: 0.5 per tile of 4 rows plus 1.31 per row for
float16 weights, 5.7 per tile plus 1.31 per row for Q4_K (the decode of a value is redone for
each tile of 4 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm.models.model_config import ModelConfig

BANDWIDTH = 3.35e12  # bytes/s
LANE_RATE = 132 * 128 * 1.98e9 * 0.7  # lane-instructions issued per second
LAUNCH_S = 2e-6
ATTENTION_LATENCY_S = 8e-6
BYTES_PER_VALUE = {"f16": 2.0, "q4_k": 144 / 256}
DECODE_PER_TILE = {"f16": 0.5, "q4_k": 5.7}
PER_ROW = 1.31


@dataclass(slots=True)
class StepProjection:
    matmuls_s: float
    small_kernels_s: float
    attention_s: float
    launches: int

    @property
    def step_s(self) -> float:
        return self.matmuls_s + self.small_kernels_s + self.attention_s


def matmul_seconds(n: int, k: int, rows: int, weights: str, item: int = 2) -> float:
    """One launch of kernels/matmul.cu: the larger of its memory and issue times, plus launch."""
    moved = n * k * BYTES_PER_VALUE[weights] + rows * (k + n) * item
    issued = n * k * (DECODE_PER_TILE[weights] * -(-rows // 4) + PER_ROW * rows)
    return max(moved / (0.8 * BANDWIDTH), issued / LANE_RATE) + LAUNCH_S


def decode_step(c: ModelConfig, batch: int, context: int, weights: str) -> StepProjection:
    """A decode step of `batch` sequences at `context` cached tokens, float16 activations: the
    launches a graph of this model holds (docs/kernels.md, "What a decode graph contains")."""
    s, h, f = 2, c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer_matmuls = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)]
    matmuls = c.num_layers * sum(matmul_seconds(n, k, batch, weights) for n, k in layer_matmuls)
    matmuls += matmul_seconds(c.vocab_size, h, batch, weights)  # the LM head
    # Per layer: two (add_)rms_norms, q and k norms (Qwen3), rotary, write_kv, silu_and_mul.
    small = [4 * batch * h * s] * 2 + [2 * batch * (q + kv) * s] * (2 if c.qk_norm else 0)
    small += [
        2 * batch * (q + kv) * s + 4 * batch * c.head_dim,
        4 * batch * kv * s,
        3 * batch * f * s,
    ]
    small_s = c.num_layers * sum(LAUNCH_S + b / (0.5 * BANDWIDTH) for b in small)
    small_s += 2 * (LAUNCH_S + batch * h * s / (0.5 * BANDWIDTH))  # embedding, final norm
    kv_bytes = 2 * batch * context * kv * s  # one layer's keys and values
    attention = c.num_layers * max(ATTENTION_LATENCY_S, kv_bytes / (0.55 * BANDWIDTH))
    launches = c.num_layers * (len(layer_matmuls) + len(small) + 1) + 3
    return StepProjection(matmuls, small_s, attention, launches)
