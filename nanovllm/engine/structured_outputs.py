"""StructuredOutputs: from a request's SamplingParams to a TokenConstraint on each of its samples.

What a request may restrict (vLLM's SamplingParams fields): `structured_outputs` (a grammar: JSON
schema, any JSON object, regex, choice, Lark/GBNF, structural tag), `allowed_token_ids` and
`bad_words`; together they combine by AND. (`logit_bias` restricts nothing: the sampler adds it.)

- `prepare(request)`, at add_request: checks the words, and starts compiling the grammar on the
  compiler's threads (llguidance, cached by grammar text). A front end that wants a bad grammar
  refused before the request is queued compiles it first in its own thread (`validate`).
- `attach(seq)`, for each of the n samples as it is created: the sample gets its own constraint
  (its own matcher state), or waits with `awaiting_grammar` set while its grammar compiles. The
  scheduler passes such a sequence by and keeps its place in the queue (vLLM's WAITING_FOR_FSM),
  so one slow grammar holds up no one else.
- `resolve()`, before each schedule: sequences whose grammar is ready get their constraint; the
  ones whose grammar failed to compile are returned, for the engine to end with an error.
- With a reasoning parser (`EngineConfig.reasoning_parser`), the grammar applies only once the
  output has closed its think block (ReasoningGate); the prompt may have closed it already.

nanovllm.structured (and llguidance) load only when a request asks for a constraint.
"""

from __future__ import annotations

import concurrent.futures
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from nanovllm.engine.constraints import TokenConstraint
from nanovllm.engine.sequence import Request, Sequence
from nanovllm.sampling_params import SamplingParams

# How long an engine step with nothing to run waits for a grammar to finish compiling.
GRAMMAR_WAIT_S = 0.01


@dataclass(slots=True)
class ReasoningEnd:
    """Where a request's reasoning ends: the token ids of `</think>`, and whether the prompt
    already closed the think block."""

    end_ids: list[int]
    ended: bool


@dataclass(slots=True)
class RequestConstraints:
    """What a request's samples are constrained by; `build` gives each its own state."""

    grammar: Future | None = None  # of a CompiledGrammar
    allowed_token_ids: list[int] | None = None
    bad_words: list[list[int]] = field(default_factory=list)  # token ids of each bad word
    reasoning: ReasoningEnd | None = None

    def build(self, seq: Sequence, vocab_size: int) -> TokenConstraint | None:
        from nanovllm.structured.reasoning import ReasoningGate
        from nanovllm.structured.token_filters import AllowedTokens, BadWords, combine

        grammar = self.grammar.result().constraint() if self.grammar is not None else None
        if grammar is not None and self.reasoning is not None:
            grammar = ReasoningGate(grammar, self.reasoning.end_ids, self.reasoning.ended)
        allowed = self.allowed_token_ids
        return combine([
            grammar,
            AllowedTokens(allowed, vocab_size) if allowed is not None else None,
            BadWords(self.bad_words, seq.output_token_ids) if self.bad_words else None,
        ])  # fmt: skip


class StructuredOutputs:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: list[int],
        reasoning_parser: str | None = None,
        compiler: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits: the width of every mask
        self.eos_token_ids = eos_token_ids
        self.reasoning_parser = reasoning_parser
        self._compiler = compiler  # a GrammarCompiler, built at the first grammar
        self._lock = threading.Lock()
        self.awaiting: list[Sequence] = []
        self.num_constrained_requests = 0

    @property
    def compiler(self):
        with self._lock:  # front ends' request threads validate grammars too
            if self._compiler is None:
                from nanovllm.structured.compiler import GrammarCompiler

                vocab, eos = self.vocab_size, self.eos_token_ids
                self._compiler = GrammarCompiler(self.tokenizer, vocab, eos)
            return self._compiler

    def validate(self, params: SamplingParams, field: str | None = None) -> None:
        """Compile params' grammar now, in the calling thread (cached for the engine's own
        compile). A bad schema, regex or grammar raises a ParameterError (a ValueError) naming
        `field`, or the field it came from."""
        if params.structured_outputs is not None:
            self.compiler.compile(params.structured_outputs, field)

    def prepare(self, request: Request) -> None:
        """Start what the request's constraints need; a ValueError for words that tokenize to
        nothing."""
        params = request.params
        if params.structured_outputs is None and params.allowed_token_ids is None:
            if not params.bad_words:
                return
        spec = RequestConstraints(allowed_token_ids=params.allowed_token_ids)
        if params.bad_words:
            from nanovllm.structured.token_filters import tokenize_bad_words

            spec.bad_words = tokenize_bad_words(params.bad_words, self.tokenizer)
        if params.structured_outputs is not None:
            spec.grammar = self.compiler.submit(params.structured_outputs)
            spec.reasoning = self._reasoning_end(request.prompt_token_ids)
        request.constraints = spec
        self.num_constrained_requests += 1

    def attach(self, seq: Sequence) -> None:
        """Give a new sample its constraint, or mark it as waiting for its grammar."""
        spec = seq.request.constraints
        if spec is None:
            return
        if spec.grammar is not None and not spec.grammar.done():
            seq.awaiting_grammar = True
            self.awaiting.append(seq)
            return
        self._build(seq)

    def resolve(self) -> list[tuple[Sequence, str]]:
        """Sequences whose grammar compiled get their constraint and may be scheduled; returns
        those whose grammar failed, with the reason."""
        failed, still = [], []
        for seq in self.awaiting:
            if seq.is_finished:  # aborted while it waited
                continue
            if not seq.request.constraints.grammar.done():
                still.append(seq)
                continue
            seq.awaiting_grammar = False
            error = self._build(seq)
            if error is not None:
                failed.append((seq, error))
        self.awaiting = still
        return failed

    def wait(self, timeout: float = GRAMMAR_WAIT_S) -> None:
        """Block until a pending grammar is ready (or `timeout`): an engine with nothing else to
        run waits here rather than spin."""
        pending = {seq.request.constraints.grammar for seq in self.awaiting}
        if pending:
            concurrent.futures.wait(pending, timeout, concurrent.futures.FIRST_COMPLETED)

    def _build(self, seq: Sequence) -> str | None:
        try:
            seq.constraint = seq.request.constraints.build(seq, self.vocab_size)
        except Exception as e:  # the grammar did not compile (a ParameterError names the field)
            return str(e) or type(e).__name__
        return None

    def _reasoning_end(self, prompt_token_ids: list[int]) -> ReasoningEnd | None:
        if self.reasoning_parser is None:
            return None
        from nanovllm.structured.reasoning import END, START, reasoning_ended

        encode = self.tokenizer.encode
        end_ids = encode(END, add_special_tokens=False)
        start_ids = encode(START, add_special_tokens=False)
        return ReasoningEnd(end_ids, reasoning_ended(prompt_token_ids, start_ids, end_ids))
