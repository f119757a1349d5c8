"""GGUF files of the new families, written by the `gguf` package from the tiny checkpoints with
llama.cpp's tensor names and metadata keys (tests/_gguf_convert.py), load into the same model:
logits within 1e-4 of transformers on the original checkpoint, and the same architecture facts
(windows per layer, caps, experts, LongRoPE) in the config.

Mistral is the exception llama.cpp makes: its converter writes Mistral as `llama` without the
sliding window, and llama.cpp attends over the whole context; so do we, and the oracle for a
Mistral GGUF is transformers with the window removed."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from _gguf_convert import convert
from checkpoints import PHI3_ORIGINAL_LENGTH, prompt_ids
from transformers import AutoConfig, AutoModelForCausalLM

from nanovllm.models import load_model
from nanovllm.models.gguf_loader import load_gguf
from nanovllm.models.loader import load_checkpoint

KINDS = ["mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe"]
LOAD_ARGS = {"phi3": dict(max_model_len=PHI3_ORIGINAL_LENGTH)}
TOLERANCE = 1e-4
WITHOUT_WINDOW = {"mistral"}  # llama.cpp's `llama` architecture has no sliding window


@pytest.fixture(scope="module")
def gguf_file(checkpoint_factory, tmp_path_factory):
    files = {}

    def get(kind: str):
        if kind not in files:
            out = tmp_path_factory.mktemp(f"gguf_{kind}") / f"{kind}.gguf"
            files[kind] = convert(checkpoint_factory(kind), out)
        return files[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_of_the_checkpoint_gives_transformers_logits(checkpoint_factory, gguf_file, kind):
    config = AutoConfig.from_pretrained(checkpoint_factory(kind))
    if kind in WITHOUT_WINDOW:
        config.sliding_window = None
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_factory(kind), config=config, dtype=torch.float32
    )
    with torch.no_grad():
        expected = model.eval()(torch.tensor([prompt_ids()])).logits[0].numpy()
    lm = load_model(str(gguf_file(kind)), device="cpu", **LOAD_ARGS.get(kind, {}))
    assert float(np.abs(lm.logits(prompt_ids()) - expected).max()) <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_config_states_what_config_json_does(checkpoint_factory, gguf_file, kind):
    from_json = load_checkpoint(str(checkpoint_factory(kind))).config
    from_gguf = load_gguf(gguf_file(kind)).config
    layers = range(from_json.num_layers)
    # llama.cpp converts Mistral as `llama`: the same model class here.
    expected_arch = "LlamaForCausalLM" if kind == "mistral" else from_json.architecture
    assert from_gguf.architecture == expected_arch
    windows = [0 if kind in WITHOUT_WINDOW else from_json.window(i) for i in layers]
    assert [from_gguf.window(i) for i in layers] == windows
    assert [from_gguf.is_moe_layer(i) for i in layers] == [
        from_json.is_moe_layer(i) for i in layers
    ]
    for field in (
        "hidden_act", "attn_logit_softcapping", "final_logit_softcapping", "num_experts",
        "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
        "shared_expert_intermediate_size", "tie_word_embeddings",
    ):  # fmt: skip
        assert getattr(from_gguf, field) == getattr(from_json, field), field
    assert from_gguf.query_pre_attn_scalar == pytest.approx(from_json.query_pre_attn_scalar)


def test_gemma_gguf_without_the_extra_keys_takes_llama_cpps_defaults(checkpoint_factory, tmp_path):
    """A Gemma 3 file as llama.cpp's converter writes it (no window pattern, no query scale):
    five of every six layers slide and scores scale by head_dim^-1/2, as llama.cpp assumes."""
    path = convert(checkpoint_factory("gemma3"), tmp_path / "plain.gguf")
    reader = gguf.GGUFReader(path)
    keys = {name: field.contents() for name, field in reader.fields.items()}
    assert "gemma3.attention.sliding_window_pattern" in keys
    from nanovllm.models import gguf_loader

    meta = {k: v for k, v in keys.items() if not k.endswith(("window_pattern", "attention.scale"))}
    config = gguf_loader._model_config(meta, "gemma3", {t.name: t for t in reader.tensors})
    assert config.layer_types == ["sliding_attention", "sliding_attention"]
    assert config.query_pre_attn_scalar == config.head_dim == 16
    assert config.rope_local_theta == 10000.0
