"""Mixture-of-experts decoders: Mixtral, Qwen3-MoE and Qwen2-MoE on Llama's attention.

The MLP of a sparse layer is a router and E experts. The router's linear scores the experts for
each token, `moe_route` keeps the top K softmax probabilities (Mixtral and models with
`norm_topk_prob` rescale them to sum to 1), and `moe_experts` runs each token through its K
experts, grouped by expert, and sums the weighted outputs. Qwen2-MoE adds a shared expert that
every token goes through, scaled by a sigmoid gate. Qwen2/3-MoE may keep dense MLPs on some
layers (`mlp_only_layers`, `decoder_sparse_step`), which load and run as Llama's.

Expert weights are fused at load like Llama's gate/up: gate_up [E, 2F, H], down [E, H, F].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.backends.base import Array, Backend
from nanovllm.errors import ModelLoadError
from nanovllm.models.llama import DenseMLP, LlamaForCausalLM, _check_shapes
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.quantized import dequantize_weight


@dataclass(slots=True)
class SparseMoE:
    router: Array  # [E, H]
    gate_up: Array  # [E, 2F, H]: each expert's gate rows, then its up rows
    down: Array  # [E, H, F]
    shared: DenseMLP | None = None  # Qwen2-MoE's shared expert
    shared_gate: Array | None = None  # [1, H]


class MixtralForCausalLM(LlamaForCausalLM):
    moe_prefix = "block_sparse_moe."
    expert_projections = ("w1", "w3", "w2")  # gate, up, down
    always_renormalize = True  # Mixtral rescales its top-k weights whatever the config says
    shared_expert = False

    def __init__(self, config: ModelConfig, backend: Backend, max_positions: int) -> None:
        super().__init__(config, backend, max_positions)
        if not 0 < config.num_experts_per_tok <= config.num_experts:
            raise ModelLoadError(
                f"{config.architecture} needs 1 <= num_experts_per_tok <= num_experts, got "
                f"{config.num_experts_per_tok} of {config.num_experts}"
            )
        if config.hidden_act != "silu":
            raise ModelLoadError(f"experts with activation {config.hidden_act!r} are not supported")
        self.renormalize = self.always_renormalize or config.norm_topk_prob

    def _feed_forward(self, mlp, x: Array) -> Array:
        if isinstance(mlp, DenseMLP):
            return super()._feed_forward(mlp, x)
        ops = self.backend
        router_logits = ops.linear(x, mlp.router)
        weights, ids = ops.moe_route(
            router_logits, self.config.num_experts_per_tok, self.renormalize
        )
        out = ops.moe_experts(x, mlp.gate_up, mlp.down, weights, ids)
        if mlp.shared is not None:
            gate = ops.linear(x, mlp.shared_gate)  # [T, 1]
            out = out + super()._feed_forward(mlp.shared, x) / (1.0 + ops.xp.exp(-gate))
        return out

    # ---- weights ---------------------------------------------------------------------------
    def _expert_key(self, expert: int, projection: str) -> str:
        return f"{self.moe_prefix}experts.{expert}.{projection}.weight"

    def _mlp_keys(self, index: int) -> list[str]:
        if not self.config.is_moe_layer(index):
            return super()._mlp_keys(index)
        keys = [self.moe_prefix + "gate.weight"]
        for expert in range(self.config.num_experts):
            keys += [self._expert_key(expert, p) for p in self.expert_projections]
        if self.shared_expert:
            shared = self.moe_prefix + "shared_expert."
            keys += [shared + f"{p}_proj.weight" for p in ("gate", "up", "down")]
            keys += [self.moe_prefix + "shared_expert_gate.weight"]
        return keys

    def _build_mlp(self, index: int, t: dict[str, np.ndarray]) -> DenseMLP | SparseMoE:
        cfg = self.config
        if not cfg.is_moe_layer(index):
            return super()._build_mlp(index, t)
        hidden, width, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        gate, up, down = self.expert_projections
        expect = {self.moe_prefix + "gate.weight": (experts, hidden)}
        for e in range(experts):
            expect[self._expert_key(e, gate)] = (width, hidden)
            expect[self._expert_key(e, up)] = (width, hidden)
            expect[self._expert_key(e, down)] = (hidden, width)
        _check_shapes(index, t, expect)
        moe = SparseMoE(
            router=self._matrix(t[self.moe_prefix + "gate.weight"]),
            gate_up=self._experts(t, experts, (gate, up)),
            down=self._experts(t, experts, (down,)),
        )
        if self.shared_expert:
            prefix = self.moe_prefix + "shared_expert."
            shared_width = cfg.shared_expert_intermediate_size
            moe.shared = self._dense_mlp(index, t, prefix, shared_width)
            gate_key = self.moe_prefix + "shared_expert_gate.weight"
            _check_shapes(index, t, {gate_key: (1, hidden)})
            moe.shared_gate = self._matrix(t[gate_key])
        return moe

    def _experts(self, t: dict, experts: int, projections: tuple[str, ...]) -> Array:
        """Each expert's matrices for these projections, rows fused, stacked [E, rows, cols] in
        the compute dtype: the expert kernels (kernels/moe.cu) read dense weights, so stored
        ones are dequantized here."""
        return self._param(
            np.stack(
                [
                    np.concatenate(
                        [dequantize_weight(t[self._expert_key(e, p)]) for p in projections]
                    )
                    for e in range(experts)
                ]
            )
        )


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    qk_norm = True
    moe_prefix = "mlp."
    expert_projections = ("gate_proj", "up_proj", "down_proj")
    always_renormalize = False  # config.norm_topk_prob decides


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    qkv_bias = True
    shared_expert = True
