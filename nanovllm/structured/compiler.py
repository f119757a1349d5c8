"""Compile StructuredOutputsParams into llguidance grammars, validated, cached and off the engine thread.

`grammar_text` turns a request's constraint into llguidance's serialized grammar (pure, cheap).
`GrammarCompiler` binds it to one model's tokenizer: it validates the grammar there (a bad
schema, regex or grammar raises a ParameterError naming the problem, before any KV block is
used), builds llguidance's matcher once per distinct grammar text (lexer and parser tables:
~2 ms for a typical schema, up to seconds for huge ones), keeps the last `cache_size` of them,
and hands each sequence a cheap copy in its initial state. `submit` runs the build on a small
thread pool (llguidance releases the GIL while it compiles) and returns a Future the engine polls.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance

from nanovllm.models.tokenizer import Tokenizer
from nanovllm.structured.constraint import GrammarConstraint
from nanovllm.structured.errors import ParameterError
from nanovllm.structured.params import StructuredOutputsParams
from nanovllm.structured.tokenizer import ll_tokenizer

DEFAULT_CACHE_SIZE = 256


def grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for the request's constraint (not yet checked against a tokenizer)."""
    kind = params.kind
    if kind == "json":
        return _json_grammar(params.schema(), params)
    if kind == "json_object":
        return _json_grammar({"type": "object"}, params)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        # Each option as a Lark string literal: JSON string syntax is Lark's.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: "
            + " | ".join(json.dumps(option, ensure_ascii=False) for option in params.choice)
        )
    if kind == "grammar":
        try:
            return llguidance.grammar_from("grammar", params.grammar)  # Lark as is, GBNF converted
        except ValueError as e:
            raise ParameterError("grammar", f"invalid grammar: {e}") from None
    return _structural_tag_grammar(params)


def _json_grammar(schema: dict[str, Any], params: StructuredOutputsParams) -> str:
    if params.disable_additional_properties:
        schema = closed_objects(schema)
    options: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
    if params.whitespace_pattern is not None:
        options["whitespace_pattern"] = params.whitespace_pattern
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except (ValueError, TypeError) as e:
        raise ParameterError(params.kind, f"invalid JSON schema: {e}") from None


# Keywords whose value maps names to subschemas, and those whose value is a subschema or a list.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "items", "prefixItems", "contains", "propertyNames",
               "allOf", "anyOf", "oneOf", "not", "if", "then", "else")  # fmt: skip


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` in which every object schema that names its properties and says nothing
    about others forbids them (`"additionalProperties": false`), as vLLM's
    disable_additional_properties does."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _close(item)
        return
    if not isinstance(node, dict):
        return
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for sub in node[key].values():
                _close(sub)
    for key in _SUBSCHEMAS:
        _close(node.get(key))
    names_properties = isinstance(node.get("properties"), dict) or isinstance(
        node.get("patternProperties"), dict
    )
    if names_properties and "additionalProperties" not in node:
        node["additionalProperties"] = False


def _structural_tag_grammar(params: StructuredOutputsParams) -> str:
    """vLLM's structural tag: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}."""
    try:
        spec = json.loads(params.structural_tag)
        triggers = spec["triggers"]
        tags = []
        for structure in spec["structures"]:
            begin = structure["begin"]
            trigger = next((t for t in triggers if begin.startswith(t)), None)
            if trigger is None:
                raise ValueError(f"no trigger in {triggers} starts the begin {begin!r}")
            schema = _json_grammar(structure["schema"], params)
            tags.append(
                llguidance.StructTag(
                    trigger=trigger, begin=begin, grammar=schema, end=structure["end"]
                )
            )
        if not tags:
            raise ValueError("no structures given")
        return llguidance.StructTag.to_grammar(tags)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ParameterError("structural_tag", f"invalid structural tag: {detail}") from None


@dataclass(slots=True)
class CompiledGrammar:
    """A grammar built for one tokenizer: a matcher in its initial state, never advanced."""

    text: str
    template: llguidance.LLMatcher
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    matcher_vocab_size: int

    def constraint(self) -> GrammarConstraint:
        """A fresh constraint for one sequence (a copy of the template, ~10-100 us)."""
        return GrammarConstraint(
            self.template.deep_copy(), self.vocab_size, self.eos_token_ids, self.matcher_vocab_size
        )


class GrammarCompiler:
    """Compiles constraints for one model; safe to use from several threads. Creating one is
    instant: llguidance's tokenizer (0.3-2 s, more on a busy machine) is built on the
    compiler's threads, and the first compile waits for it."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_token_ids: Sequence[int] = (),
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_workers: int = 2,
    ) -> None:
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="nanovllm-grammar")
        self._tokenizer = self._executor.submit(ll_tokenizer, tokenizer, vocab_size, eos_token_ids)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        return self._tokenizer.result()

    def compile(self, params: StructuredOutputsParams, field: str | None = None) -> CompiledGrammar:
        """The compiled grammar for `params`, from the cache or built now (in this thread). A bad
        constraint raises a ParameterError; `field` names the request field it came from."""
        return self._compile_text(self._text(params, field), params.kind, field)

    def submit(
        self, params: StructuredOutputsParams, field: str | None = None
    ) -> Future[CompiledGrammar]:
        """compile() on the compiler's threads; a cached grammar comes back already done. A bad
        constraint raises its ParameterError here or from `result()`."""
        text = self._text(params, field)
        with self._lock:
            cached = self._cache.get(text)
        if cached is not None:
            done: Future[CompiledGrammar] = Future()
            done.set_result(cached)
            return done
        return self._executor.submit(self._compile_text, text, params.kind, field)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _text(self, params: StructuredOutputsParams, field: str | None) -> str:
        try:
            return grammar_text(params)
        except ParameterError as e:
            raise ParameterError(field or e.param, str(e).split(": ", 1)[1]) from None

    def _compile_text(self, text: str, kind: str, field: str | None) -> CompiledGrammar:
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        matcher = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ParameterError(field or kind, _describe(kind, matcher.get_error()))
        tokenizer = self.ll_tokenizer
        compiled = CompiledGrammar(
            text, matcher, self.vocab_size, tuple(tokenizer.eos_tokens), tokenizer.vocab_size
        )
        with self._lock:
            self._cache[text] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled


_WHAT = {
    "json": "invalid or unsupported JSON schema",
    "json_object": "invalid JSON options",
    "regex": "invalid or unsupported regex",
    "choice": "invalid choice",
    "grammar": "invalid grammar",
    "structural_tag": "invalid structural tag",
}


def _describe(kind: str, error: str) -> str:
    # llguidance's messages are precise but multi-line (the grammar's lines with a caret under
    # the place): keep the first line, the lines that say what is wrong, and the grammar line
    # the error points at.
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    detail = [line for line in lines[1:] if line.startswith("error:")]
    where = re.match(r"(?:at )?(\d+)\(\d+\)", lines[0]) if lines else None
    if where is not None:
        shown = [line for line in lines[1:] if line.startswith(f"{where.group(1)} | ")]
        detail += [f"(line {shown[0]})"] if shown else []
    return f"{_WHAT[kind]}: {' '.join(lines[:1] + detail)}"
