"""Tokenizer.from_folder reads a tokenizer folder as transformers does; encode/decode agree with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _text_fixtures import (
    CHATML_TEMPLATE,
    byte_level_folder,
    qwen3_folder,
    sentencepiece_folder,
    smollm2_folder,
)

from nanovllm.errors import ModelLoadError
from nanovllm.models.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces  ",
    "Déjà vu — naïve café, 日本語のテキスト, 😀🚀 👍🏽 🇫🇷",
    "def f(x):\n\treturn x ** 2\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece", "smollm2", "qwen3"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "byte_level":
        return byte_level_folder(tmp_path_factory.mktemp("byte_level"))
    if request.param == "sentencepiece":
        return sentencepiece_folder(tmp_path_factory.mktemp("sentencepiece"))
    return {"smollm2": smollm2_folder, "qwen3": qwen3_folder}[request.param]()


@pytest.fixture(scope="module")
def pair(folder: Path) -> tuple[Tokenizer, object]:
    from transformers import PreTrainedTokenizerFast

    return Tokenizer.from_folder(folder), PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens: bool) -> None:
    ours, hf = pair
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair, skip_special_tokens: bool) -> None:
    ours, hf = pair
    for text in TEXTS:
        ids = hf.encode(text)
        expected = hf.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected, text


def test_special_tokens_and_template_match_transformers(pair) -> None:
    ours, hf = pair
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.vocab_size == len(hf)
    assert ours.chat_template == hf.chat_template
    assert set(hf.all_special_ids) <= ours.all_special_ids


def test_all_special_ids_are_exactly_what_decode_skips(pair) -> None:
    ours, _ = pair
    for token_id in range(ours.vocab_size):
        skipped = ours.decode([token_id], skip_special_tokens=True) == ""
        kept = ours.decode([token_id], skip_special_tokens=False) != ""
        assert (token_id in ours.all_special_ids) == (skipped and kept), token_id


def test_token_to_id_and_id_to_token_round_trip(pair) -> None:
    ours, hf = pair
    for token_id in (0, 1, ours.vocab_size // 2, ours.vocab_size - 1):
        token = ours.id_to_token(token_id)
        assert token == hf.convert_ids_to_tokens(token_id)
        assert ours.token_to_id(token) == token_id
    assert ours.token_to_id("no such token \u2603\u2603\u2603") is None
    assert ours.id_to_token(ours.vocab_size + 10) is None


def test_qwen3_marks_think_tokens_as_added_but_not_special() -> None:
    tok = Tokenizer.from_folder(qwen3_folder())
    think = tok.token_to_id("<think>")
    assert think is not None and think not in tok.all_special_ids
    assert tok.decode([think], skip_special_tokens=True) == "<think>"
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") == 151645
    assert tok.bos_token is None and tok.bos_token_id is None


def test_sentencepiece_style_adds_bos_only_with_special_tokens(tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(sentencepiece_folder(tmp_path))
    assert tok.encode("Hello")[0] == tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.bos_token_id not in tok.encode("Hello", add_special_tokens=False)


def test_missing_tokenizer_json_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_json_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_config_is_a_model_load_error(tmp_path: Path) -> None:
    folder = byte_level_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_folder(folder)


def _write_config(folder: Path, config: dict) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_special_tokens_given_as_added_token_dicts(tmp_path: Path) -> None:
    folder = byte_level_folder(tmp_path)
    _write_config(
        folder,
        {
            "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        },
    )
    tok = Tokenizer.from_folder(folder)
    assert (tok.bos_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tok.bos_token_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") == 2


def test_legacy_special_tokens_map_fills_in_missing_tokens(tmp_path: Path) -> None:
    folder = byte_level_folder(tmp_path)
    _write_config(folder, {})
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}),
        encoding="utf-8",
    )
    tok = Tokenizer.from_folder(folder)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_named_chat_templates_pick_default(tmp_path: Path) -> None:
    folder = byte_level_folder(tmp_path)
    templates = [
        {"name": "tool_use", "template": "TOOLS {{ messages[0].content }}"},
        {"name": "default", "template": "DEFAULT {{ messages[0].content }}"},
    ]
    _write_config(folder, {"chat_template": templates})
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT x"


def test_chat_template_jinja_file_wins_over_config(tmp_path: Path) -> None:
    folder = byte_level_folder(tmp_path)
    (folder / "chat_template.jinja").write_text("FILE {{ messages[0].content }}", encoding="utf-8")
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "FILE x"


def test_chat_template_read_from_config(tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(byte_level_folder(tmp_path))
    assert tok.chat_template == CHATML_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_apply_chat_template_without_template_is_a_clear_value_error(tmp_path: Path) -> None:
    folder = byte_level_folder(tmp_path)
    _write_config(folder, {"eos_token": "<|im_end|>"})
    tok = Tokenizer.from_folder(folder)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_apply_chat_template_kwargs_override_special_tokens(tmp_path: Path) -> None:
    folder = byte_level_folder(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ eos_token }}|{{ flavour }}", encoding="utf-8")
    tok = Tokenizer.from_folder(folder)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages, flavour="salt") == "<|im_end|>|salt"
    assert tok.apply_chat_template(messages, eos_token="</s>", flavour="") == "</s>|"
