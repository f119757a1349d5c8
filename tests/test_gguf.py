"""GGUF loading: dequantization, HF tensor names and layout, ModelConfig, the rebuilt tokenizer,
and clear errors for files nanovllm cannot use.

Oracles: ggml's block formats re-implemented literally (tests/_gguf_reference.py), transformers'
own GGUF dequantizer, tokenizer and model loader on the real SmolLM2 GGUF, and the original
SmolLM2 / Llama 3 / Qwen tokenizer.json pipelines where transformers' GGUF tokenizer departs from them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
from _gguf_fixtures import (
    TinyShape,
    byte_level_vocab,
    gguf_tensors,
    hf_state_dict,
    llama3_rope_factors,
    smollm2_vocab,
    write_gguf,
)
from _gguf_reference import (
    HALF_FIELDS,
    SPEC,
    random_blocks,
    random_float_bytes,
    reference_dequantize,
)
from _gguf_strings import sample_strings

from nanovllm.demo import demo_model_path
from nanovllm.errors import ModelLoadError
from nanovllm.models import quantized
from nanovllm.models.gguf_loader import DEQUANTIZABLE, dequantize, load_gguf
from nanovllm.models.quantized import QuantizedTensor, dequantize_weight

Q = gguf.GGMLQuantizationType

# The pre-tokenizer SmolLM2's own tokenizer.json (HuggingFaceTB/SmolLM2-135M*) declares.
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def smol(smol_path):
    return load_gguf(smol_path)


@pytest.fixture(scope="module")
def hf_smol_tokenizer(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def hf_smol_state_dict(smol_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32
    )
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def _hf_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("name", sorted(SPEC))
def test_dequantize_equals_ggml_reference(name, monkeypatch):
    monkeypatch.setattr(quantized, "_CHUNK_VALUES", 700)  # several steps per tensor
    _, elems, block_bytes, halves = SPEC[name]
    rng = np.random.default_rng(1)
    rows, cols = 3, 512
    if elems == 1:
        raw = random_float_bytes(rng, rows * cols, name).reshape(rows, -1)
    else:
        raw = random_blocks(rng, rows * cols // elems, block_bytes, halves).reshape(rows, -1)
    ours = dequantize(raw, Q[name], (rows, cols))
    want = reference_dequantize(name, raw).reshape(rows, cols)
    print(f"{name}: max |ours - ggml reference| = {np.max(np.abs(ours - want))}")
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_equals_transformers_dequantizer(name):
    import torch
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    elems, block_bytes, halves = HALF_FIELDS.get(name) or SPEC[name][1:]
    rows, cols = 4, 512
    raw = random_blocks(
        np.random.default_rng(2), rows * cols // elems, block_bytes, halves
    ).reshape(rows, -1)
    ours = dequantize(raw, Q[name], (rows, cols))
    want = (
        torch_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(Q[name]))
        .numpy()
        .reshape(rows, cols)
    )
    print(f"{name}: max |ours - transformers| = {np.max(np.abs(ours - want))}")
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(ours, want)


def test_q5_0_hand_built_block_has_the_spec_values():
    # ggml's block_q5_0: fp16 d, 32 high bits qh, 16 bytes of nibbles; x = (nibble | high << 4) - 16.
    block = np.zeros(22, dtype=np.uint8)
    block[0:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[2:6] = np.array([1 << 1 | 1 << 16], dtype="<u4").view(
        np.uint8
    )  # high bit of x[1] and x[16]
    block[6] = 0x3A  # x[0] low nibble 0xA, x[16] low nibble 0x3
    block[7] = 0x0F  # x[1] low nibble 0xF
    values = dequantize(block.reshape(1, 22), Q.Q5_0, (1, 32))[0]
    assert values[0] == (0xA - 16) * 0.5
    assert values[1] == (0x1F - 16) * 0.5
    assert values[16] == (0x13 - 16) * 0.5
    assert values[2] == values[31] == -16 * 0.5


@pytest.mark.parametrize(
    "name, bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4), ("Q5_0", 5), ("Q5_1", 5), ("BF16", 8)]
)
def test_gguf_quantize_then_dequantize_is_within_one_step(name, bits):
    values = np.random.default_rng(3).normal(0, 1, (8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, Q[name])
    back = dequantize(raw, Q[name], values.shape)
    blocks = values.reshape(-1, 32)
    step = (blocks.max(1) - blocks.min(1)) / (2**bits - 1)
    if name == "BF16":  # 8 bits of mantissa, relative to each value
        step = np.abs(blocks).max(1) * 2.0**-7
    error = np.abs(back - values).reshape(-1, 32).max(1)
    print(f"{name}: max round-trip error {error.max():.4f}, max step {step.max():.4f}")
    assert np.all(error <= step * 1.05)


def test_every_claimed_type_is_checked_here():
    checked = set(SPEC) | set(HALF_FIELDS) | {"F32"}
    assert {q.name for q in DEQUANTIZABLE} == checked


def test_dequantize_refuses_an_unsupported_type():
    with pytest.raises(ModelLoadError, match="IQ2_XXS"):
        dequantize(np.zeros((1, 66), np.uint8), Q.IQ2_XXS, (1, 256))


# ---------------------------------------------------------------- SmolLM2: weights and config


def test_smollm2_weights_equal_transformers(smol, hf_smol_state_dict):
    names, worst = set(), 0.0
    for name, stored in smol.weights():
        names.add(name)
        weight = dequantize_weight(stored)
        want = hf_smol_state_dict[name]
        assert weight.dtype == np.float32 and weight.shape == want.shape, name
        worst = max(worst, float(np.max(np.abs(weight - want))))
    print(f"SmolLM2: {len(names)} tensors, max |ours - transformers| = {worst}")
    assert worst == 0.0
    # tied: no lm_head in the file; transformers' lm_head is the embedding
    assert names == set(hf_smol_state_dict) - {"lm_head.weight"}
    embed = dict(smol.weights())["model.embed_tokens.weight"].dequantize()
    np.testing.assert_array_equal(hf_smol_state_dict["lm_head.weight"], embed)


def test_smollm2_config_comes_from_metadata(smol):
    c = smol.config
    assert c.architecture == "LlamaForCausalLM"
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (9, 3, 64)
    assert c.vocab_size == 49152 and c.max_position_embeddings == 8192
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.tie_word_embeddings and not c.qkv_bias and not c.qk_norm
    # eos 2 (<|im_end|>) first; <|endoftext|> also ends generation, as in llama.cpp
    assert smol.generation_config == {"bos_token_id": 1, "eos_token_id": [2, 0]}
    assert c.bos_token_id == 1 and c.eos_token_ids == [2, 0]


def test_matrices_stay_in_their_file_blocks_and_vectors_are_read_one_at_a_time(
    smol, smol_path, monkeypatch
):
    raw = {t.name: t for t in gguf.GGUFReader(smol_path).tensors}
    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(
        gguf.quants, "dequantize", lambda data, q: seen.append(data.nbytes) or real(data, q)
    )
    weights = smol.weights()
    name, first = next(weights)
    assert name == "model.embed_tokens.weight" and isinstance(first, QuantizedTensor)
    assert first.qtype == Q.Q8_0 and first.shape == (49152, 576)
    np.testing.assert_array_equal(first.data, raw["token_embd.weight"].data)  # the file's bytes
    assert seen == []  # nothing dequantized
    name, norm = next(weights)
    assert name == "model.layers.0.input_layernorm.weight" and norm.dtype == np.float32
    assert sum(seen) == raw["blk.0.attn_norm.weight"].data.nbytes


# ---------------------------------------------------------------- SmolLM2: tokenizer


def _original_smollm2(hf_tokenizer) -> tokenizers.Tokenizer:
    """transformers' tokenizer from the GGUF (vocab, merges, special tokens) with SmolLM2's own
    pre-tokenizer put back: the original model's tokenizer."""
    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def test_smollm2_encodes_200_strings_like_the_original_tokenizer(smol, hf_smol_tokenizer):
    original = _original_smollm2(hf_smol_tokenizer)
    strings = sample_strings(200)
    ours = {s: smol.tokenizer.encode(s) for s in strings}
    assert all(ours[s] == original.encode(s).ids for s in strings)
    # transformers' GGUF tokenizer splits with GPT-2's regex instead of SmolLM2's digits-first
    # pipeline; the two differ only where a run of 2+ whitespace characters precedes a digit.
    agree = [s for s in strings if ours[s] == hf_smol_tokenizer.encode(s)]
    differ = set(strings) - set(agree)
    print(
        f"SmolLM2: {len(strings)} strings equal to the original; {len(agree)} equal to transformers' GGUF tokenizer"
    )
    assert differ == {s for s in strings if re.search(r"\s\s\d", s)}
    assert len(agree) >= 150


def test_smollm2_splits_every_digit_off_like_the_original(smol, hf_smol_tokenizer):
    tokens = hf_smol_tokenizer.convert_ids_to_tokens
    assert tokens(smol.tokenizer.encode("a  1")) == ["a", "ĠĠ", "1"]
    assert tokens(hf_smol_tokenizer.encode("a  1")) == [
        "a",
        "Ġ",
        "Ġ",
        "1",
    ]  # transformers' departure
    assert tokens(smol.tokenizer.encode("x 2024")) == ["x", "Ġ", "2", "0", "2", "4"]


def test_smollm2_decode_round_trips_200_strings(smol):
    for s in sample_strings(200):
        assert smol.tokenizer.decode(smol.tokenizer.encode(s), skip_special_tokens=False) == s


def test_smollm2_chat_markup_and_special_tokens(smol, hf_smol_tokenizer):
    tok = smol.tokenizer
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[:3] == [1, 4093, 198] and ids[-2:] == [
        2,
        198,
    ]  # <|im_start|> user \n ... <|im_end|> \n
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nHi\n"
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_smol_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    # add_bos_token is false in the file, as in SmolLM2's tokenizer: nothing is prepended
    assert (
        tok.encode("Hello")
        == tok.encode("Hello", add_special_tokens=False)
        == hf_smol_tokenizer.encode("Hello")
    )
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.chat_template.startswith("{% for message in messages %}")


# ---------------------------------------------------------------- other pre-tokenizers


def _vocab_file(tmp_path, smol_path, pre: str, extra=None) -> Path:
    """A tiny model file carrying SmolLM2's real vocabulary but naming another pre-tokenizer."""
    vocab = smollm2_vocab(smol_path)
    shape = TinyShape(hidden=8, intermediate=8, layers=1, heads=1, kv_heads=1, head_dim=8)
    embed = np.zeros((len(vocab["tokens"]), 8), np.float32)
    return write_gguf(
        tmp_path / f"{pre}.gguf", "llama", {"token_embd.weight": embed}, shape, vocab, pre, extra
    )


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_pre_tokenizer_matches_transformers(tmp_path, smol_path, pre):
    path = _vocab_file(tmp_path, smol_path, pre, {"tokenizer.ggml.add_bos_token": False})
    ours, theirs = load_gguf(path).tokenizer, _hf_gguf_tokenizer(path)
    # Qwen's tokenizer.json normalizes to NFC, transformers' GGUF tokenizer does not: compare
    # on text that NFC leaves alone (the NFC behaviour is checked below).
    strings = [s for s in sample_strings(200) if unicodedata.normalize("NFC", s) == s]
    agree = sum(ours.encode(s) == theirs.encode(s) for s in strings)
    print(f"{pre}: {agree}/{len(strings)} strings equal to transformers")
    assert agree == len(strings)


def test_qwen2_pre_tokenizer_normalizes_to_nfc_like_qwens_tokenizer(tmp_path, smol_path):
    tok = load_gguf(_vocab_file(tmp_path, smol_path, "qwen2")).tokenizer
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.decode(tok.encode("cafe\u0301")) == "caf\u00e9"


def test_llama_bpe_adds_bos_and_takes_vocabulary_words_whole(tmp_path):
    # Llama 3's tokenizer.json prepends <|begin_of_text|> and sets BPE ignore_merges: a pre-token
    # found in the vocabulary is used whole even if no merge builds it. llama.cpp does both.
    vocab = byte_level_vocab()
    vocab = {**vocab, "tokens": vocab["tokens"] + ["hello"], "types": vocab["types"] + [1]}
    shape = TinyShape()
    tensors = gguf_tensors(
        hf_state_dict("llama", shape, np.random.default_rng(0), tied=True), "llama", shape
    )
    tensors["token_embd.weight"] = np.zeros((len(vocab["tokens"]), shape.hidden), np.float32)
    tok = load_gguf(
        write_gguf(tmp_path / "l3.gguf", "llama", tensors, shape, vocab, pre="llama-bpe")
    ).tokenizer
    bos, hello = vocab["tokens"].index("<|bos|>"), vocab["tokens"].index("hello")
    assert tok.encode("hello") == [bos, hello]
    assert tok.encode("hello", add_special_tokens=False) == [hello]
    assert tok.decode([bos, hello]) == "hello"


# ---------------------------------------------------------------- tiny files: names, layout, config


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_weights_come_back_under_hf_names(tmp_path, arch):
    shape = TinyShape()
    expected = hf_state_dict(arch, shape, np.random.default_rng(0), tied=arch == "llama")
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, gguf_tensors(expected, arch, shape), shape)
    checkpoint = load_gguf(path)
    got = dict(checkpoint.weights())
    assert set(got) == set(expected)
    for name, weight in got.items():
        np.testing.assert_array_equal(
            dequantize_weight(weight), expected[name], err_msg=name
        )  # llama: Q/K un-permuted
    c = checkpoint.config
    assert (
        c.architecture
        == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[
            arch
        ]
    )
    assert c.head_dim == 24 and (c.num_heads, c.num_kv_heads, c.num_layers) == (4, 2, 2)
    assert c.qkv_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert c.tie_word_embeddings == (arch == "llama")


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    shape = TinyShape(hidden=128, heads=2, kv_heads=1, head_dim=64)
    tensors = gguf_tensors(
        hf_state_dict("llama", shape, np.random.default_rng(0), tied=True), "llama", shape
    )
    tensors["rope_freqs.weight"] = llama3_rope_factors(10000.0, 64, factor=8.0)
    checkpoint = load_gguf(write_gguf(tmp_path / "l3.gguf", "llama", tensors, shape))
    assert checkpoint.config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in dict(checkpoint.weights())


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path):
    shape = TinyShape(hidden=128, heads=2, kv_heads=1, head_dim=64)
    tensors = gguf_tensors(
        hf_state_dict("llama", shape, np.random.default_rng(0), tied=True), "llama", shape
    )
    tensors["rope_freqs.weight"] = np.linspace(1, 3, 32, dtype=np.float32)
    with pytest.raises(ModelLoadError, match="rope_freqs.weight does not match Llama 3"):
        load_gguf(write_gguf(tmp_path / "bad.gguf", "llama", tensors, shape))


def test_yarn_rope_scaling_keys_are_read(tmp_path):
    shape = TinyShape()
    tensors = gguf_tensors(
        hf_state_dict("qwen3", shape, np.random.default_rng(0), tied=False), "qwen3", shape
    )
    extra = {
        "qwen3.rope.scaling.type": "yarn",
        "qwen3.rope.scaling.factor": 4.0,
        "qwen3.rope.scaling.original_context_length": 32768,
    }
    config = load_gguf(write_gguf(tmp_path / "y.gguf", "qwen3", tensors, shape, extra=extra)).config
    assert config.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }


# ---------------------------------------------------------------- bad input


def _tiny(tmp_path, arch="qwen3", **changes) -> Path:
    shape = TinyShape(hidden=256, intermediate=256, heads=4, kv_heads=2, head_dim=64)
    tensors = gguf_tensors(
        hf_state_dict(arch, shape, np.random.default_rng(0), tied=False), arch, shape
    )
    return write_gguf(
        tmp_path / "m.gguf", arch, tensors | changes.pop("tensors", {}), shape, **changes
    )


def test_unsupported_quantization_names_tensor_and_type(tmp_path):
    iq2 = np.zeros(
        (256, 66), dtype=np.uint8
    )  # 256 rows of one IQ2_XXS block (256 values, 66 bytes)
    path = _tiny(tmp_path, tensors={"blk.0.ffn_down.weight": (iq2, Q.IQ2_XXS)})
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    message = str(err.value)
    assert "tensor blk.0.ffn_down.weight uses quantization IQ2_XXS" in message
    assert "supported: " in message and "Q4_K" in message and "Q8_0" in message


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    shape = TinyShape()
    path = write_gguf(
        tmp_path / "f.gguf", "falcon", {"token_embd.weight": np.zeros((263, 64), np.float32)}, shape
    )
    with pytest.raises(
        ModelLoadError,
        match=r"architecture 'falcon' is not supported; supported: llama, qwen2, qwen3",
    ):
        load_gguf(path)


def test_truncated_file_is_reported_as_truncated(tmp_path):
    path = _tiny(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"m\.gguf is truncated or corrupt"):
        load_gguf(path)


def test_file_cut_inside_the_header_is_reported_as_truncated(tmp_path):
    path = _tiny(tmp_path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_gguf(path)


def test_non_gguf_file_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_gguf(junk)
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_gguf(tmp_path / "absent.gguf")


def test_unknown_tensor_is_refused(tmp_path):
    path = _tiny(tmp_path, tensors={"blk.0.ffn_gate_exps.weight": np.zeros((4, 256), np.float32)})
    with pytest.raises(ModelLoadError, match="blk.0.ffn_gate_exps.weight has no counterpart"):
        load_gguf(path)


def test_tensor_shape_that_contradicts_metadata_is_refused(tmp_path):
    path = _tiny(tmp_path, tensors={"blk.1.attn_k.weight": np.zeros((64, 256), np.float32)})
    with pytest.raises(
        ModelLoadError,
        match=r"blk.1.attn_k.weight has shape \(64, 256\), but the metadata implies \(128, 256\)",
    ):
        load_gguf(path)


def test_unknown_pre_tokenizer_lists_the_supported_ones(tmp_path):
    with pytest.raises(
        ModelLoadError,
        match=r"pre-tokenizer 'deepseek-llm' is not supported; supported: .*smollm.*qwen2.*llama-bpe",
    ):
        load_gguf(_tiny(tmp_path, pre="deepseek-llm"))


def test_sentencepiece_vocabulary_is_refused_clearly(tmp_path):
    path = _tiny(tmp_path, extra={"tokenizer.ggml.model": "llama"})
    with pytest.raises(
        ModelLoadError, match="tokenizer model 'llama' is not supported.*SentencePiece"
    ):
        load_gguf(path)


def test_a_folder_holding_one_gguf_file_loads_it(tmp_path):
    from nanovllm.errors import ModelLoadError
    from nanovllm.models.loader import load_checkpoint

    shape = TinyShape()
    expected = hf_state_dict("llama", shape, np.random.default_rng(0), tied=True)
    folder = tmp_path / "model"
    folder.mkdir()
    write_gguf(folder / "tiny.gguf", "llama", gguf_tensors(expected, "llama", shape), shape)
    checkpoint = load_checkpoint(str(folder))
    assert checkpoint.config.num_layers == shape.layers
    assert checkpoint.num_weights == len(expected) == len(list(checkpoint.weights()))
    (folder / "other.gguf").write_bytes((folder / "tiny.gguf").read_bytes())
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(other.gguf, tiny.gguf\)"):
        load_checkpoint(str(folder))
    with pytest.raises(ModelLoadError, match=r"no config.json and no .gguf file"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("name", ["smollm2-demo", "qwen2.5-coder-demo"])
def test_the_header_reader_reads_what_ggufs_reader_reads(name):
    import mmap

    from nanovllm.models.gguf_file import read_header

    path = demo_model_path(name)
    reader = gguf.GGUFReader(path)
    with open(path, "rb") as f:
        file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta, tensors = read_header(file_map)
    want = {
        key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
    }
    assert meta == want
    assert len(meta["tokenizer.ggml.tokens"]) > 40_000  # the vocabulary is in it
    assert list(tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        ours = tensors[t.name]
        assert (ours.tensor_type, ours.shape, ours.n_bytes, ours.data_offset) == (
            t.tensor_type, tuple(int(n) for n in t.shape), t.n_bytes, t.data_offset
        )  # fmt: skip
        assert ours.data.tobytes() == t.data.view(np.uint8).tobytes()
