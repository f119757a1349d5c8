"""IncrementalDetokenizer: streamed text equals the full decode, never shows a broken character,
and stop strings cut the text exactly where a character-by-character reader would stop."""

from __future__ import annotations

from pathlib import Path

import pytest
from _text_fixtures import byte_level_folder, qwen3_folder, sentencepiece_folder, smollm2_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.engine.detokenizer import PROMPT_CONTEXT_IDS, IncrementalDetokenizer, StopStrings
from nanovllm.models.tokenizer import Tokenizer

MULTIBYTE = "Bonjour 😀 le monde! Zürich 東京 日本語のテキスト 👍🏽 🇫🇷 crème brûlée ∑√∞"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "byte_level": byte_level_folder(tmp_path_factory.mktemp("byte_level")),
        "sentencepiece": sentencepiece_folder(tmp_path_factory.mktemp("sentencepiece")),
        "smollm2": smollm2_folder(),
        "qwen3": qwen3_folder(),
    }


@pytest.fixture(scope="module")
def tokenizers(folders: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_folder(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def byte_level(tokenizers: dict[str, Tokenizer]) -> Tokenizer:
    return tokenizers["byte_level"]


@pytest.fixture(scope="module")
def smollm2(tokenizers: dict[str, Tokenizer]) -> Tokenizer:
    return tokenizers["smollm2"]


def stream(
    tok: Tokenizer, prompt: list[int], output: list[int], **kwargs
) -> tuple[IncrementalDetokenizer, list[str], list[str]]:
    """Feed output one id at a time; return the detokenizer, each step's text and the deltas."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    texts, deltas = [], []
    for token_id in output:
        detok.add_tokens([token_id])
        texts.append(detok.text)
        deltas.append(detok.take_delta(finished=False))
    deltas.append(detok.take_delta(finished=True))
    return detok, texts, deltas


def in_context(tok: Tokenizer, prompt: list[int], output: list[int]) -> str:
    """What the output reads as after the prompt: the reference for the streamed text."""
    before = tok.decode(prompt)
    return tok.decode(prompt + output)[len(before) :]


def char_by_char_stop(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Reference stop-string semantics: read one character at a time, stop at the first match."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            longest = max(hits, key=len)
            return text[: end if include else end - len(longest)], longest
    return text, None


# --- UTF-8 safety and agreement with the full decode -----------------------------------------


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece", "smollm2", "qwen3"])
@pytest.mark.parametrize("prompt_text", ["", "Translate: "])
def test_streamed_text_equals_transformers_decode(folders, tokenizers, name, prompt_text) -> None:
    from transformers import PreTrainedTokenizerFast

    tok, hf = tokenizers[name], PreTrainedTokenizerFast.from_pretrained(folders[name])
    prompt = tok.encode(prompt_text) if prompt_text else []
    output = tok.encode(MULTIBYTE, add_special_tokens=False)
    # The test means something only if some tokens hold part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in output)

    detok, texts, deltas = stream(tok, prompt, output)

    before = hf.decode(prompt, skip_special_tokens=True)
    expected = hf.decode(prompt + output, skip_special_tokens=True)[len(before) :]
    assert detok.text == expected
    if name != "sentencepiece":  # only its decoder reads a first piece differently alone
        assert expected == hf.decode(output, skip_special_tokens=True)
    assert detok.text.strip() == MULTIBYTE
    assert all("\ufffd" not in text and expected.startswith(text) for text in texts)
    assert "".join(deltas) == expected


def test_sentencepiece_output_keeps_its_leading_space_after_a_prompt(tokenizers) -> None:
    tok = tokenizers["sentencepiece"]
    output = tok.encode("world", add_special_tokens=False)
    assert tok.decode(output) == "world"  # alone, the decoder strips the "▁" of the first piece
    assert stream(tok, tok.encode("Hello"), output)[0].text == " world"
    assert stream(tok, [], output)[0].text == "world"


def test_byte_level_output_keeps_its_leading_space_with_or_without_prompt(smollm2) -> None:
    output = smollm2.encode(" world", add_special_tokens=False)
    assert stream(smollm2, smollm2.encode("Hello"), output)[0].text == " world"
    assert stream(smollm2, [], output)[0].text == " world"


def test_prompt_ending_inside_a_character_does_not_swallow_output(smollm2) -> None:
    ids = smollm2.encode("x😀 ok", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if smollm2.decode(ids[:i]).endswith("\ufffd"))
    prompt, output = ids[:cut], ids[cut:]
    detok = stream(smollm2, prompt, output)[0]
    assert detok.text == smollm2.decode(output)
    assert detok.text.endswith(" ok")


def test_prompt_tail_starting_inside_a_character_still_gives_context(tokenizers) -> None:
    tok = tokenizers["sentencepiece"]
    prompt = tok.encode("日日")  # <s> ▁ and two runs of three <0xNN> pieces
    assert "\ufffd" in tok.decode(prompt[-PROMPT_CONTEXT_IDS:])  # the tail cuts the first 日
    output = tok.encode("a", add_special_tokens=False)
    assert stream(tok, prompt, output)[0].text == in_context(tok, prompt, output) == " a"


def test_unfinished_character_is_held_until_finish(smollm2) -> None:
    ids = smollm2.encode("ok 😀", add_special_tokens=False)
    output = ids[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(smollm2, [])
    detok.add_tokens(output)
    assert detok.text == "ok"
    assert detok.take_delta(finished=False) == "ok"
    assert detok.take_delta(finished=True) == smollm2.decode(output)[2:]
    assert detok.text == smollm2.decode(output) and detok.text.endswith("\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_the_flag(tokenizers, skip: bool) -> None:
    tok = tokenizers["qwen3"]
    output = tok.encode("Hi<|im_end|>There<|endoftext|>", add_special_tokens=False)
    detok = stream(tok, tok.encode("<|im_start|>assistant\n"), output, skip_special_tokens=skip)[0]
    assert detok.text == ("HiThere" if skip else "Hi<|im_end|>There<|endoftext|>")


def test_several_tokens_at_once_give_the_same_text(smollm2) -> None:
    output = smollm2.encode(MULTIBYTE, add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, [])
    for start in range(0, len(output), 3):  # as speculative decoding delivers them
        detok.add_tokens(output[start : start + 3])
    assert detok.text == MULTIBYTE


def test_each_step_decodes_a_small_window_not_the_whole_output(byte_level) -> None:
    windows: list[int] = []
    decode = byte_level.decode

    class Spy(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            windows.append(len(ids))
            return decode(ids, skip_special_tokens)

    spy = Spy(byte_level.backend)
    output = byte_level.encode("Hello world, the quick brown fox. " * 200, add_special_tokens=False)
    prompt = byte_level.encode("Paris is the capital of France.")
    detok = stream(spy, prompt, output)[0]
    assert detok.text == byte_level.decode(output)
    assert len(output) > 1000
    assert max(windows) <= PROMPT_CONTEXT_IDS + 1
    assert len(windows) <= 2 * len(output) + 3


# --- stop strings -----------------------------------------------------------------------------


def test_stop_string_spanning_tokens_is_found_on_the_token_that_completes_it(smollm2) -> None:
    output = smollm2.encode("The capital is Paris. Next question", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, [], stop=["Paris."])
    results = [detok.add_tokens([i]) for i in output]
    completes = next(n for n in range(len(output)) if "Paris." in smollm2.decode(output[: n + 1]))
    assert smollm2.decode(output[completes : completes + 1]) == "."  # spans " Paris" + "."
    assert results[:completes] == [None] * completes
    assert results[completes:] == ["Paris."] * (len(output) - completes)
    assert detok.text == "The capital is "
    assert detok.matched_stop == "Paris."


def test_include_stop_str_in_output_keeps_the_stop_string(smollm2) -> None:
    output = smollm2.encode("The capital is Paris. Next question", add_special_tokens=False)
    detok = stream(smollm2, [], output, stop=["Paris."], include_stop_str_in_output=True)[0]
    assert detok.text == "The capital is Paris."


def test_tokens_after_a_stop_are_ignored(smollm2) -> None:
    detok = IncrementalDetokenizer(smollm2, [], stop=["END"])
    assert detok.add_tokens(smollm2.encode("a END b", add_special_tokens=False)) == "END"
    assert detok.add_tokens(smollm2.encode(" more text", add_special_tokens=False)) == "END"
    assert detok.take_delta(finished=True) == "a "
    assert detok.text == "a "


def test_stop_string_in_the_prompt_does_not_stop_the_output(smollm2) -> None:
    prompt = smollm2.encode("Say END")
    detok = stream(
        smollm2, prompt, smollm2.encode(" fine", add_special_tokens=False), stop=["END"]
    )[0]
    assert detok.matched_stop is None
    assert detok.text == " fine"


def test_deltas_never_show_text_a_stop_string_later_removes(byte_level) -> None:
    text = "xx E EN EN ENDyy"
    output = [i for c in text for i in byte_level.encode(c, add_special_tokens=False)]
    detok, _, deltas = stream(byte_level, [], output, stop=["END"])
    assert detok.text == "xx E EN EN "
    sent = ""
    for delta in deltas:
        sent += delta
        assert detok.text.startswith(sent)
    assert sent == detok.text


def test_deltas_hold_back_one_char_less_than_the_longest_stop(byte_level) -> None:
    output = byte_level.encode("Hello world", add_special_tokens=False)
    with_stop = IncrementalDetokenizer(byte_level, [], stop=["STOP", "x"])
    with_stop.add_tokens(output)
    assert with_stop.take_delta(finished=False) == "Hello wo"
    assert with_stop.take_delta(finished=True) == "rld"
    without = IncrementalDetokenizer(byte_level, [])
    without.add_tokens(output)
    assert without.take_delta(finished=False) == "Hello world"


def test_a_stop_completed_by_the_final_flush_is_still_cut(smollm2) -> None:
    ids = smollm2.encode("ab 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, [], stop=["b \ufffd"])
    assert detok.add_tokens(ids[:-1]) is None
    assert detok.finish() == "b \ufffd"
    assert detok.text == "a"


def test_a_single_stop_string_is_not_split_into_characters(byte_level) -> None:
    detok = IncrementalDetokenizer(byte_level, [], stop="END")
    detok.add_tokens(byte_level.encode("Now E N D, then END.", add_special_tokens=False))
    assert (detok.text, detok.matched_stop) == ("Now E N D, then ", "END")


def test_empty_stop_string_is_rejected(byte_level) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(byte_level, [], stop=["ok", ""])


@pytest.mark.parametrize(
    ("text", "new_from", "stop", "expected"),
    [
        ("xabcx", 0, ["abc", "b"], (2, "b")),  # "b" ends first
        ("xabcx", 0, ["bc", "abc"], (1, "abc")),  # same end: the longer one
        ("xabcx", 3, ["ab"], None),  # "ab" lies wholly in the old text
        ("xabcx", 3, ["abc"], (1, "abc")),  # reaches into the new text
        ("abab", 0, ["ab"], (0, "ab")),
    ],
)
def test_first_stop(text, new_from, stop, expected) -> None:
    assert StopStrings(stop).first(text, new_from) == expected


# --- properties over random token sequences ---------------------------------------------------


@FAST
@given(data=st.data(), skip=st.booleans())
def test_random_ids_stream_to_the_full_decode(byte_level, data, skip) -> None:
    ids = st.integers(0, byte_level.vocab_size - 1)
    prompt = data.draw(st.lists(ids, max_size=8))
    output = data.draw(st.lists(ids, max_size=40))
    detok, texts, deltas = stream(byte_level, prompt, output, skip_special_tokens=skip)
    expected = byte_level.decode(output, skip_special_tokens=skip)
    assert detok.text == expected
    assert all(expected.startswith(text) for text in texts)  # nothing shown is ever taken back
    assert "".join(deltas) == expected


@pytest.fixture(scope="module")
def smollm2_pool(smollm2) -> list[int]:
    """Ids that stress UTF-8 handling: partial-character tokens, words, specials."""
    partial = [i for i in range(smollm2.vocab_size) if "\ufffd" in smollm2.decode([i])]
    words = smollm2.encode(MULTIBYTE + " The capital of France is Paris.", add_special_tokens=False)
    return partial[:400] + words + sorted(smollm2.all_special_ids)


@FAST
@given(data=st.data())
def test_random_smollm2_ids_stream_to_the_full_decode(smollm2, smollm2_pool, data) -> None:
    pool = st.sampled_from(smollm2_pool)
    prompt = data.draw(st.lists(pool, max_size=6))
    output = data.draw(st.lists(pool, max_size=30))
    detok, texts, _ = stream(smollm2, prompt, output)
    expected = smollm2.decode(output)
    assert detok.text == expected
    assert all(expected.startswith(text) for text in texts)


@FAST
@given(data=st.data())
def test_sentencepiece_text_reads_as_it_does_after_the_prompt(tokenizers, data) -> None:
    # Valid UTF-8 only: the ByteFallback decoder turns a whole run of <0xNN> pieces into U+FFFD
    # once the run turns out invalid, rewriting a character that was already complete.
    tok = tokenizers["sentencepiece"]
    words = st.text(alphabet="ab cé日😀жñ\n", max_size=6)
    prompt = tok.encode(data.draw(words))
    pieces = data.draw(st.lists(words, max_size=8))
    output = [i for piece in pieces for i in tok.encode(piece, add_special_tokens=False)]
    detok, texts, _ = stream(tok, prompt, output)
    expected = in_context(tok, prompt, output)
    assert detok.text == expected
    assert all(expected.startswith(text) for text in texts)


@FAST
@given(data=st.data(), include=st.booleans())
def test_stop_strings_cut_where_a_char_by_char_reader_stops(byte_level, data, include) -> None:
    output = data.draw(st.lists(st.integers(3, byte_level.vocab_size - 1), max_size=30))
    full = byte_level.decode(output)
    spans = st.tuples(st.integers(0, max(len(full) - 1, 0)), st.integers(1, 6))
    stop = [full[a : a + n] for a, n in data.draw(st.lists(spans, max_size=3)) if full[a : a + n]]
    stop += data.draw(st.lists(st.text(alphabet="abe ", min_size=1, max_size=3), max_size=2))

    detok, _, deltas = stream(byte_level, [], output, stop=stop, include_stop_str_in_output=include)

    expected_text, expected_stop = char_by_char_stop(full, stop, include)
    assert (detok.text, detok.matched_stop) == (expected_text, expected_stop)
    assert "".join(deltas) == expected_text


def test_a_stop_kept_in_the_output_holds_nothing_back_while_streaming(smollm2) -> None:
    # A stop string that stays in the text can only cut what follows it, never what was already
    # sent, so (as in vLLM) nothing needs holding back; a dropped stop does need the holdback.
    ids = smollm2.encode("Hello world, hello there", add_special_tokens=False)
    stop = ["zzzzzzzzzz"]
    _, kept_texts, kept = stream(smollm2, [], ids, stop=stop, include_stop_str_in_output=True)
    _, _, held = stream(smollm2, [], ids, stop=stop)
    assert all("".join(kept[: i + 1]) == kept_texts[i] for i in range(len(ids)))
    assert "".join(held[:-1]) != kept_texts[-1]  # the dropped-stop stream still holds its tail
    assert "".join(held) == "".join(kept) == kept_texts[-1]
