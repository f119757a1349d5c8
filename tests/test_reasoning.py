"""Reasoning parsers (qwen3, deepseek_r1): complete and streaming splits agree with each other and
with the written rules, whatever the chunking (character by character, and the real Qwen3
tokenizer's tokens); the reasoning gate applies a grammar only after </think>."""

from __future__ import annotations

import numpy as np
import pytest
from _structured_fixtures import MODELS, compiler

from nanovllm.structured.bitmask import ALL_ALLOWED, allocate_bitmask, allowed_tokens
from nanovllm.structured.params import StructuredOutputsParams
from nanovllm.structured.reasoning import (
    ReasoningGate,
    reasoning_ended,
    reasoning_parser,
)

# (output, qwen3 thinking, qwen3 thinking off, deepseek_r1), each (reasoning, content).
CASES = [
    ("<think>\nplan</think>\n\nThe answer.", ("\nplan", "\n\nThe answer."), (None, "<think>\nplan</think>\n\nThe answer."), ("\nplan", "\n\nThe answer.")),
    ("plan only</think>answer", ("plan only", "answer"), (None, "plan only</think>answer"), ("plan only", "answer")),
    ("<think>cut short", ("cut short", None), (None, "<think>cut short"), ("cut short", None)),
    ("no tags at all", ("no tags at all", None), (None, "no tags at all"), ("no tags at all", None)),
    ("  <think>x</think>", ("x", None), (None, "  <think>x</think>"), ("x", None)),
    ("</think>", ("", None), (None, "</think>"), ("", None)),
    ("a </thin b </think> c", ("a </thin b ", " c"), (None, "a </thin b </think> c"), ("a </thin b ", " c")),
    ("<thi", (None, None), (None, "<thi"), (None, None)),
    ("", (None, None), (None, None), (None, None)),
]  # fmt: skip


def parsers():
    return {
        "qwen3": reasoning_parser("qwen3"),
        "qwen3_off": reasoning_parser("qwen3", {"enable_thinking": False}),
        "deepseek_r1": reasoning_parser("deepseek_r1", {"enable_thinking": False}),
    }


@pytest.mark.parametrize("case", range(len(CASES)))
def test_complete_split_follows_the_rules(case) -> None:
    text, *expected = CASES[case]
    for (name, parser), want in zip(parsers().items(), expected, strict=True):
        assert parser.split(text) == want, name


def stream(parser, pieces) -> tuple[str, str]:
    streamer = parser.streamer()
    deltas = [streamer.feed(piece) for piece in pieces] + [streamer.finish()]
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_streamed_pieces_add_up_to_the_complete_split(case) -> None:
    text = CASES[case][0]
    for name, parser in parsers().items():
        reasoning, content = parser.split(text)
        whole = (reasoning or "", content or "")
        assert stream(parser, list(text)) == whole, (name, "characters")
        assert stream(parser, [text]) == whole, (name, "one piece")
        assert stream(parser, [text[:3], text[3:9], text[9:]]) == whole, (name, "chunks")


def test_streaming_sends_no_tag_text_and_holds_back_only_a_possible_tag() -> None:
    streamer = reasoning_parser("qwen3").streamer()
    assert (streamer.feed("<thi").reasoning, streamer.feed("nk>abc</th").reasoning) == ("", "abc")
    delta = streamer.feed("ink>ok")
    assert (delta.reasoning, delta.content) == ("", "ok")


def test_streaming_with_the_real_qwen3_tokens() -> None:
    tok = MODELS["qwen3"]().tokenizer
    text = '<think>\nThe user wants JSON.\n</think>\n\n{"a": 1}'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.token_to_id("</think>") in ids
    pieces, previous = [], ""
    for i in range(1, len(ids) + 1):
        current = tok.decode(ids[:i], skip_special_tokens=False)
        pieces.append(current[len(previous) :])
        previous = current
    parser = reasoning_parser("qwen3")
    assert stream(parser, pieces) == ("\nThe user wants JSON.\n", '\n\n{"a": 1}')


def test_unknown_reasoning_parser_is_named() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser 'granite'; available: qwen3"):
        reasoning_parser("granite")


# ---- where the reasoning ended ---------------------------------------------------------------
def test_prompt_that_closes_the_think_block_has_ended_reasoning() -> None:
    start, end = [10], [11]
    assert reasoning_ended([1, 2, 10, 5, 11, 3], start, end)
    assert not reasoning_ended([1, 2, 10, 5], start, end)
    assert not reasoning_ended([1, 11, 4, 10], start, end)
    assert not reasoning_ended([1, 2, 3], start, end)
    assert reasoning_ended([7, 8, 1, 9, 8], [7], [9, 8])  # a two-token marker


# ---- the gate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3():
    model = MODELS["qwen3"]()
    tok = model.tokenizer
    grammar = compiler("qwen3").compile(StructuredOutputsParams(choice=["yes", "no"]))
    return model, tok, grammar


def test_gate_allows_everything_while_thinking_then_the_grammar(qwen3) -> None:
    model, tok, grammar = qwen3
    end = tok.token_to_id("</think>")
    gate = ReasoningGate(grammar.constraint(), [end])
    thinking = tok.encode("Hmm, let me think", add_special_tokens=False)
    proposed = thinking[:2] + [end] + tok.encode("yes", add_special_tokens=False)
    out = allocate_bitmask(len(proposed) + 1, model.vocab_size)
    gate.fill_bitmask(proposed, out)
    reference = grammar.constraint()
    expected = allocate_bitmask(2, model.vocab_size)
    reference.fill_bitmask(proposed[3:], expected)
    assert (out[:3] == ALL_ALLOWED).all()  # before and right at </think>
    assert np.array_equal(out[3:], expected)
    before = allocate_bitmask(1, model.vocab_size)
    gate.fill_bitmask([], before)
    assert (before == ALL_ALLOWED).all()
    for token in thinking + [end]:
        assert gate.accept(token) and not gate.is_finished
    gate.fill_bitmask([], before)
    allowed = {tok.decode([t]) for t in np.flatnonzero(allowed_tokens(before[0], model.vocab_size))}
    assert allowed and all("yes".startswith(t) or "no".startswith(t) for t in allowed)
    for token in tok.encode("no", add_special_tokens=False):
        assert gate.accept(token)
    assert gate.is_finished


def test_gate_for_a_prompt_whose_reasoning_ended_constrains_from_the_first_token(qwen3) -> None:
    model, tok, grammar = qwen3
    gate = ReasoningGate(grammar.constraint(), [tok.token_to_id("</think>")], ended=True)
    out = allocate_bitmask(1, model.vocab_size)
    gate.fill_bitmask([], out)
    assert not (out == ALL_ALLOWED).all()
    assert not gate.accept(tok.encode("maybe", add_special_tokens=False)[0])


def test_gate_finds_a_marker_split_over_committed_and_drafted_tokens(qwen3) -> None:
    model, _, grammar = qwen3
    gate = ReasoningGate(grammar.constraint(), [501, 502, 503])
    for token in (7, 501, 502):
        gate.accept(token)
    out = allocate_bitmask(3, model.vocab_size)
    gate.fill_bitmask([503, 9], out)
    assert (out[0] == ALL_ALLOWED).all()
    assert not (out[1] == ALL_ALLOWED).all()  # right after the marker: the grammar
    assert gate.accept(503) and gate.ended
