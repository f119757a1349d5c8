"""Grammar-constrained decoding with real tokenizers (SmolLM2's and Qwen2.5's as nanovllm's GGUF
loader builds them, Qwen3's tokenizer.json under Qwen3's wider logits).

Oracles: llguidance's own matcher (fed the same tokens, its mask must equal ours row by row, with
and without speculative drafts, one constraint at a time and batched), `jsonschema` (a walk that
always takes the best allowed token under random logits ends in text the schema validates, and
EOS is allowed exactly where the text so far validates), the `regex` module's partial matching
(a token is allowed exactly where the text plus the token can still become a match) and the
tokenizer (the walk's tokens decode to that text).
"""

from __future__ import annotations

import json

import jsonschema
import llguidance
import numpy as np
import pytest
import regex
from _structured_fixtures import (
    MODELS,
    Walk,
    assert_same_mask,
    compiler,
    oracle_mask,
    token_texts,
)

from nanovllm.structured.bitmask import allocate_bitmask, allowed_tokens
from nanovllm.structured.compiler import GrammarCompiler, closed_objects
from nanovllm.structured.constraint import GrammarConstraint, fill_bitmasks
from nanovllm.structured.errors import ParameterError
from nanovllm.structured.params import StructuredOutputsParams

ALL_MODELS = tuple(MODELS)

SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["name", "age", "address", "tags"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["id", "score"],
        },
        "minItems": 1,
        "maxItems": 4,
    },
    "enums_booleans_nulls": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error", "pending"]},
            "flag": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 8},
            "kind": {"const": "report"},
        },
        "required": ["status", "flag", "note", "kind"],
    },
    "refs_and_any_of": {
        "$defs": {
            "Point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": {"$ref": "#/$defs/Point"}, "maxItems": 3},
            "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}]},
        },
        "required": ["points", "label"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "t": {"type": "number", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
            "n": {"type": "integer", "minimum": -5, "maximum": 5},
            "big": {"type": "integer", "minimum": 1000, "maximum": 1005},
        },
        "required": ["t", "n", "big"],
    },
}


# ---- JSON schemas ----------------------------------------------------------------------------
@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.parametrize("schema", SCHEMAS)
def test_walk_under_json_schema_produces_valid_json(model, schema) -> None:
    spec = SCHEMAS[schema]
    validator = jsonschema.Draft202012Validator(spec)

    def eos_only_where_text_validates(text: str, eos_allowed: bool) -> None:
        try:
            valid = validator.is_valid(json.loads(text))
        except json.JSONDecodeError:
            valid = False
        assert eos_allowed == valid, f"EOS allowed={eos_allowed} after {text!r}"

    # Compact JSON for two tokenizers, flexible whitespace (vLLM's default) for the third.
    compact = model != "qwen2.5"
    walk = Walk(model, StructuredOutputsParams(json=spec, disable_any_whitespace=compact), seed=1)
    assert walk.run(check=eos_only_where_text_validates), f"no EOS after {walk.text!r}"
    validator.validate(json.loads(walk.text))


@pytest.mark.parametrize("model", ALL_MODELS)
def test_json_object_gives_any_json_object(model) -> None:
    walk = Walk(model, StructuredOutputsParams(json_object=True), seed=2)
    assert walk.run()
    assert isinstance(json.loads(walk.text), dict)


def test_schema_as_json_text_equals_schema_as_dict() -> None:
    spec = SCHEMAS["nested_object"]
    by_text = compiler("smollm2").compile(StructuredOutputsParams(json=json.dumps(spec)))
    assert by_text is compiler("smollm2").compile(StructuredOutputsParams(json=spec))


def test_disable_additional_properties_closes_every_named_object() -> None:
    spec = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "$defs": {"D": {"properties": {"c": {}}, "additionalProperties": True}},
    }
    closed = closed_objects(spec)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["$defs"]["D"]["additionalProperties"] is True  # said explicitly: kept
    assert "additionalProperties" not in spec  # the request's schema is not changed
    walk = Walk("smollm2", StructuredOutputsParams(json=spec, disable_additional_properties=True))
    assert walk.run()
    jsonschema.validate(json.loads(walk.text), closed)


# ---- regex and choice, against an independent matcher --------------------------------------
def assert_mask_is_the_language(
    name: str, row: np.ndarray, prefix: str, can_continue, is_complete
) -> None:
    """Every token with a text is allowed exactly when prefix + text can still be completed;
    EOS exactly when the prefix is complete; every other id (special, padding) never."""
    model = MODELS[name]()
    allowed = allowed_tokens(row, model.vocab_size)
    wrong = [
        t
        for t, text in enumerate(token_texts(name))
        if text is not None and allowed[t] != bool(can_continue(prefix + text))
    ]
    assert not wrong, f"after {prefix!r}: {[(t, token_texts(name)[t]) for t in wrong[:5]]}"
    eos = set(model.eos_token_ids)
    for token in np.flatnonzero(allowed):
        if token_texts(name)[token] is None:
            assert token in eos and is_complete(prefix), f"special token {token} allowed"
    assert allowed[min(eos)] == bool(is_complete(prefix))


REGEX = r"[A-Z][a-z]{2,6} (19|20)[0-9]{2}(-[0-9]{2})?"


@pytest.mark.parametrize("model", ["smollm2", "qwen3"])
def test_regex_mask_allows_exactly_the_tokens_that_keep_a_match_possible(model) -> None:
    pattern = regex.compile(REGEX)
    walk = Walk(model, StructuredOutputsParams(regex=REGEX), seed=3)
    steps = []
    assert walk.run(check=lambda text, eos: steps.append(text))
    assert pattern.fullmatch(walk.text), walk.text
    # The full-vocabulary check at three points of the walk (each scans every token).
    constraint = walk.compiled.constraint()
    mask = allocate_bitmask(1, walk.model.vocab_size)
    checked = {0, len(walk.ids) // 2, len(walk.ids)}
    for i, token in enumerate([*walk.ids, None]):
        if i in checked:
            constraint.fill_bitmask([], mask)
            assert_mask_is_the_language(
                model,
                mask[0],
                walk.model.tokenizer.decode(walk.ids[:i]),
                lambda s: pattern.fullmatch(s, partial=True),
                lambda s: pattern.fullmatch(s),
            )
        if token is not None:
            assert constraint.accept(token)


CHOICES = ["café au lait", "naïve ☕", "yes", "yes sir"]


@pytest.mark.parametrize("model", ALL_MODELS)
def test_choice_output_is_one_of_the_choices(model) -> None:
    for seed in range(4):
        walk = Walk(model, StructuredOutputsParams(choice=CHOICES), seed=seed)
        assert walk.run()
        assert walk.text in CHOICES


def test_choice_mask_allows_exactly_the_prefixes_of_a_choice() -> None:
    options = ["yes", "yes sir", "no"]
    walk = Walk("qwen2.5", StructuredOutputsParams(choice=options))
    constraint = walk.compiled.constraint()
    mask = allocate_bitmask(1, walk.model.vocab_size)
    for step in ("", "yes"):
        for token in walk.model.tokenizer.encode(step, add_special_tokens=False):
            assert constraint.accept(token)
        constraint.fill_bitmask([], mask)
        assert_mask_is_the_language(
            "qwen2.5",
            mask[0],
            step,
            lambda s: any(o.startswith(s) for o in options),
            lambda s: s in options,
        )


def test_finished_grammar_allows_only_eos_and_says_so() -> None:
    model = MODELS["smollm2"]()
    constraint = compiler("smollm2").compile(StructuredOutputsParams(choice=["no"])).constraint()
    mask = allocate_bitmask(1, model.vocab_size)
    assert not constraint.is_finished
    for token in model.tokenizer.encode("no", add_special_tokens=False):
        assert constraint.accept(token)
    assert constraint.is_finished
    constraint.fill_bitmask([], mask)
    assert set(np.flatnonzero(allowed_tokens(mask[0], model.vocab_size))) == set(
        model.eos_token_ids
    )
    assert constraint.accept(model.eos_token_ids[0])
    assert not constraint.accept(model.tokenizer.encode("x", add_special_tokens=False)[0])


def test_refused_token_is_reported_and_ends_the_grammar() -> None:
    model = MODELS["smollm2"]()
    constraint = compiler("smollm2").compile(StructuredOutputsParams(regex="[0-9]+")).constraint()
    assert not constraint.accept(model.tokenizer.encode("a", add_special_tokens=False)[0])
    assert constraint.is_finished
    mask = allocate_bitmask(1, model.vocab_size)
    constraint.fill_bitmask([], mask)
    assert set(np.flatnonzero(allowed_tokens(mask[0], model.vocab_size))) == set(
        model.eos_token_ids
    )


# ---- Lark and GBNF -----------------------------------------------------------------------------
GRAMMARS = {
    "lark": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/',
    "gbnf": 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] [0-9]? [0-9]?',
}


@pytest.mark.parametrize("syntax", GRAMMARS)
def test_lark_and_gbnf_grammars_constrain_the_output(syntax) -> None:
    walk = Walk("qwen2.5", StructuredOutputsParams(grammar=GRAMMARS[syntax]), seed=5)
    assert walk.run()
    assert regex.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", walk.text), walk.text


# ---- speculative drafts ----------------------------------------------------------------------
def completed_walk(name: str, params: StructuredOutputsParams, seed: int = 0) -> Walk:
    walk = Walk(name, params, seed)
    assert walk.run()
    return walk


@pytest.mark.parametrize("model", ["smollm2", "qwen3"])
def test_draft_rows_match_the_matcher_and_leave_the_state_unchanged(model) -> None:
    walk = completed_walk(model, StructuredOutputsParams(json=SCHEMAS["array_of_objects"]), 6)
    ids, vocab = walk.ids, walk.model.vocab_size
    eos = walk.model.eos_token_ids[0]
    refused = walk.model.tokenizer.encode("Z", add_special_tokens=False)[0]
    constraint = walk.compiled.constraint()
    oracle = llguidance.LLMatcher(compiler(model).ll_tokenizer, walk.compiled.text)
    for position in range(len(ids) + 1):
        drafts = [
            ids[position : position + 3],  # drafts the grammar takes
            ids[position : position + 1] + [refused] + ids[position + 1 : position + 3],
            ids[position:] + [eos],  # the rest of the output, then EOS
        ]
        before = allocate_bitmask(1, vocab)
        constraint.fill_bitmask([], before)
        for proposed in drafts:
            out = np.zeros((len(proposed) + 1, before.shape[1]), dtype=np.int32)
            constraint.fill_bitmask(proposed, out)
            valid = valid_prefix(proposed, refused, eos)
            for i in range(valid + 1):
                assert_same_mask(out[i], oracle)
                if i < valid:
                    assert oracle.consume_token(proposed[i])
            oracle.rollback(valid)
            assert out.any(axis=1).all(), "a row allows no token at all"
            after = allocate_bitmask(1, vocab)
            constraint.fill_bitmask([], after)
            assert np.array_equal(before, after), "fill_bitmask changed the state"
        if position < len(ids):
            assert constraint.accept(ids[position]) and oracle.consume_token(ids[position])


def valid_prefix(proposed: list[int], refused: int, eos: int) -> int:
    """How many leading drafts the grammar takes before a refused one or EOS."""
    count = 0
    for token in proposed:
        if token in (refused, eos):
            break
        count += 1
    return count


@pytest.mark.parametrize("model", ["smollm2", "qwen2.5"])
def test_batched_masks_equal_one_at_a_time(model) -> None:
    walk = completed_walk(model, StructuredOutputsParams(json=SCHEMAS["nested_object"]), 7)
    ids, eos = walk.ids, walk.model.eos_token_ids[0]
    refused = walk.model.tokenizer.encode("Z", add_special_tokens=False)[0]
    items = []
    for position, proposed in [
        (0, []),
        (3, ids[3:6]),
        (5, ids[5:7] + [refused, ids[7]]),
        (len(ids) - 2, ids[-2:] + [eos]),
        (len(ids), []),
        (1, []),
    ]:
        constraint = walk.compiled.constraint()
        for token in ids[:position]:
            assert constraint.accept(token)
        items.append((constraint, proposed))
    rows = sum(len(p) + 1 for _, p in items)
    batched = np.zeros((rows + 2, allocate_bitmask(1, walk.model.vocab_size).shape[1]), np.int32)
    fill_bitmasks(items, batched)
    row = 0
    for constraint, proposed in items:
        single = np.zeros((len(proposed) + 1, batched.shape[1]), dtype=np.int32)
        constraint.fill_bitmask(proposed, single)
        valid = valid_prefix(proposed, refused, eos)
        assert np.array_equal(batched[row : row + valid + 1], single[: valid + 1])
        assert batched[row : row + len(proposed) + 1].any(axis=1).all()
        row += len(proposed) + 1
    assert not batched[rows:].any(), "rows past the items were written"
    # And the batch left every state as it was.
    for constraint, _ in items:
        again = np.zeros((1, batched.shape[1]), dtype=np.int32)
        constraint.fill_bitmask([], again)
    again_batched = np.zeros_like(batched)
    fill_bitmasks(items, again_batched)
    assert np.array_equal(again_batched, batched)


# ---- vocabulary widths -----------------------------------------------------------------------
def test_masks_span_the_model_vocabulary_and_never_allow_padding_ids() -> None:
    model = MODELS["qwen3"]()
    assert model.tokenizer.vocab_size < model.vocab_size
    constraint = compiler("qwen3").compile(StructuredOutputsParams(json_object=True)).constraint()
    mask = allocate_bitmask(1, model.vocab_size)
    assert mask.shape == (1, model.vocab_size // 32)
    for token in model.tokenizer.encode('{"a": 1}', add_special_tokens=False):
        constraint.fill_bitmask([], mask)
        assert not allowed_tokens(mask[0], model.vocab_size)[model.tokenizer.vocab_size :].any()
        assert constraint.accept(token)


def test_model_vocabulary_narrower_than_the_tokenizer_cuts_the_masks() -> None:
    model = MODELS["smollm2"]()
    narrow = model.vocab_size - 64
    compiled = GrammarCompiler(model.tokenizer, narrow, model.eos_token_ids).compile(
        StructuredOutputsParams(regex="[a-z ]+")
    )
    constraint = compiled.constraint()
    out = np.zeros((2, narrow // 32), dtype=np.int32)
    first = model.tokenizer.encode("hello", add_special_tokens=False)[0]
    constraint.fill_bitmask([first], out)
    wide = llguidance.LLMatcher(compiler("smollm2").ll_tokenizer, compiled.text)
    assert np.array_equal(out[0], oracle_mask(wide)[: narrow // 32])
    assert wide.consume_token(first)
    assert np.array_equal(out[1], oracle_mask(wide)[: narrow // 32])


def test_fill_bitmask_refuses_arrays_llguidance_would_overrun() -> None:
    model = MODELS["smollm2"]()
    constraint = compiler("smollm2").compile(StructuredOutputsParams(regex="a")).constraint()
    words = model.vocab_size // 32
    for bad in (
        np.zeros((1, words - 1), np.int32),
        np.zeros((1, words), np.int64),
        np.zeros((words, 1), np.int32).T,
        np.zeros((1, words), np.int32),  # too few rows for one draft
    ):
        with pytest.raises(ValueError, match="bitmask"):
            constraint.fill_bitmask([5], bad)


# ---- errors ----------------------------------------------------------------------------------
BAD = [
    (dict(json={"type": "foo"}), "json", "Invalid type: foo"),
    (dict(json={"type": "array", "uniqueItems": True}), "json", "uniqueItems"),
    (dict(json={"$ref": "#/$defs/missing"}), "json", "does not exist"),
    (dict(json={"type": "integer", "minimum": 5, "maximum": 1}), "json", "Unsatisfiable"),
    (dict(regex="a(b"), "regex", "unclosed group"),
    (dict(regex=r"(a)\1"), "regex", "backreferences are not supported"),
    (dict(regex="a(?=b)"), "regex", "look-around"),
    (dict(grammar="start: foo"), "grammar", 'unknown name: "foo"'),
    (dict(grammar="root ::= foo"), "grammar", "Rule 'foo' not found"),
    (dict(structural_tag='{"structures": []}'), "structural_tag", "missing field 'triggers'"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_constraint_is_a_clear_error(fields, param, message) -> None:
    with pytest.raises(ParameterError, match=regex.escape(message)) as caught:
        compiler("smollm2").compile(StructuredOutputsParams(**fields))
    assert caught.value.param == param
    assert "\n" not in str(caught.value)
    with pytest.raises(ParameterError) as renamed:
        compiler("smollm2").compile(StructuredOutputsParams(**fields), field="response_format")
    assert renamed.value.param == "response_format"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(), "exactly one of"),
        (dict(regex="a", choice=["a"]), "got regex, choice"),
        (dict(json='{"type": '), "not valid JSON"),
        (dict(json="[1]"), "must be a JSON schema object"),
        (dict(choice=[]), "non-empty list"),
        (dict(choice=["a", 3]), "choice[1]"),
        (dict(regex=""), "non-empty string"),
        (dict(json_object="yes"), "must be a boolean"),
    ],
)
def test_malformed_params_are_refused_when_built(fields, message) -> None:
    with pytest.raises(ParameterError, match=regex.escape(message)):
        StructuredOutputsParams(**fields)


# ---- compilation off the engine thread -------------------------------------------------------
def test_compiled_grammars_are_cached_by_text_and_submit_returns_futures() -> None:
    model = MODELS["smollm2"]()
    own = GrammarCompiler(model.tokenizer, model.vocab_size, model.eos_token_ids, cache_size=2)
    first = own.submit(StructuredOutputsParams(regex="[0-9]{4}")).result(timeout=30)
    again = own.submit(StructuredOutputsParams(regex="[0-9]{4}"))
    assert again.done() and again.result() is first
    failing = own.submit(StructuredOutputsParams(regex="(x"), field="structured_outputs")
    with pytest.raises(ParameterError) as caught:
        failing.result(timeout=30)
    assert caught.value.param == "structured_outputs"
    own.compile(StructuredOutputsParams(regex="a"))
    own.compile(StructuredOutputsParams(regex="b"))
    assert own.compile(StructuredOutputsParams(regex="[0-9]{4}")) is not first  # evicted
    own.shutdown()


def test_each_constraint_has_its_own_state() -> None:
    model = MODELS["smollm2"]()
    compiled = compiler("smollm2").compile(StructuredOutputsParams(choice=["ab", "cd"]))
    one, two = compiled.constraint(), compiled.constraint()
    assert isinstance(one, GrammarConstraint)
    assert one.accept(model.tokenizer.encode("ab", add_special_tokens=False)[0])
    fresh = allocate_bitmask(1, model.vocab_size)
    two.fill_bitmask([], fresh)
    assert_same_mask(
        fresh[0], llguidance.LLMatcher(compiler("smollm2").ll_tokenizer, compiled.text)
    )
