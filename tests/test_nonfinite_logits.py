"""Logits that are not finite stop the step with where they went wrong, instead of being sampled
(nanovllm/engine/numerics.py). float16 activations overflow past 65,504; a layer whose MLP
weights were scaled up makes the residual stream overflow in float16 and not in float32."""

from __future__ import annotations

import pytest
from checkpoints import prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.engine.numerics import NonFiniteLogitsError
from nanovllm.engine.sampler import Sampler

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def overflowing(path: str, dtype: str, device: str = "cuda-emulated") -> LLM:
    """The checkpoint with model.layers.1's MLP scaled by 100 twice: activations 10^4 times
    larger there, beyond float16 (and well within float32)."""
    llm = LLM(path, device=device, dtype=dtype, num_blocks=32, block_size=4)
    mlp = llm.engine.runner.model.layers[1].mlp
    for weight in (mlp.gate_up, mlp.down):
        weight *= weight.dtype.type(100)
    return llm


def test_float16_overflow_is_reported_with_its_layer_and_the_way_out(
    checkpoint_factory, monkeypatch
):
    path = str(checkpoint_factory("llama3"))
    sampled = []
    monkeypatch.setattr(Sampler, "verify", lambda self, *a: sampled.append(a) or [])
    llm = overflowing(path, "float16")
    with pytest.raises(NonFiniteLogitsError) as error:
        llm.generate([prompt_ids(6)], PARAMS, use_tqdm=False)
    message = str(error.value)
    assert "not finite (NaN or infinity) in 1 of 1 rows" in message
    assert "after model.layers.1 (of 2 layers)" in message
    assert "--dtype float32" in message
    assert sampled == []  # nothing was sampled from those logits


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # SiLU of gates below -88
def test_the_same_weights_run_in_float32(checkpoint_factory):
    path = str(checkpoint_factory("llama3"))
    got = overflowing(path, "float32").generate([prompt_ids(6)], PARAMS, use_tqdm=False)
    want = overflowing(path, "float32", "cpu-reference").generate(
        [prompt_ids(6)], PARAMS, use_tqdm=False
    )
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_a_nan_weight_in_float32_is_reported_with_its_layer(checkpoint_factory, monkeypatch):
    # float32 checks the hidden rows the logits come from; a NaN there is a NaN in the logits.
    path = str(checkpoint_factory("llama3"))
    sampled = []
    monkeypatch.setattr(Sampler, "verify", lambda self, *a: sampled.append(a) or [])
    llm = LLM(path, device="cpu-reference", num_blocks=32, block_size=4)
    llm.engine.runner.model.layers[1].mlp.down[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError) as error:
        llm.generate([prompt_ids(6)], PARAMS, use_tqdm=False)
    assert "in 1 of 1 rows" in str(error.value)
    assert "after model.layers.1 (of 2 layers)" in str(error.value)
    assert sampled == []
