"""SamplingParams: how one request is sampled and when it stops (vLLM's field names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from nanovllm.structured.params import StructuredOutputsParams

_EPS = 1e-5


class RequestOutputKind(Enum):
    """Which outputs a request produces, as in vLLM. CUMULATIVE: one per step that changed it
    (with the text so far and the step's delta); DELTA: one per step that changed it, holding
    only what is new (streaming); FINAL_ONLY: only the finished one, which spares the engine
    building outputs nobody reads (offline generation, non-streamed requests)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# Stop strings are matched as text is generated; their number and length are bounded like a
# request body's size, so one request cannot make every step of its neighbours slow.
MAX_STOP_STRINGS = 128
MAX_STOP_LENGTH = 512
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as OpenAI and vLLM take


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    # Logprobs of the prompt's tokens, each with this many most likely alternatives (vLLM's
    # prompt_logprobs; computed in the prefill's forward pass).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Constraints on the tokens (nanovllm/structured): a grammar, OpenAI's logit_bias (token id
    # -> bias added to its logit, clamped to [-100, 100]), only these ids, never these words.
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(dict.fromkeys(self.bad_words or []))
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.validate()

    def validate(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=-1)
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=SEED_RANGE[0])
            if self.seed > SEED_RANGE[1]:
                raise ValueError(f"seed must be a 64-bit integer, got {self.seed}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
            )
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_LENGTH:
            raise ValueError(
                f"stop strings may have at most {MAX_STOP_LENGTH} characters, one has {longest}"
            )
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
            for token_id in self.allowed_token_ids:
                _check_int("allowed_token_ids", token_id, minimum=0)
        if not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be a list of non-empty strings")

    def validate_token_ids(self, vocab_size: int) -> None:
        """Token ids the request names must exist in the model's vocabulary (`vocab_size` logits)."""
        for name, ids in (
            ("logit_bias", self.logit_bias or {}),
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("stop_token_ids", self.stop_token_ids),
        ):
            outside = sorted({i for i in ids if i >= vocab_size})
            if outside:
                raise ValueError(
                    f"{name} has token id(s) {', '.join(map(str, outside[:5]))} outside the "
                    f"model's vocabulary of {vocab_size} tokens"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (0, -1) else self.top_k

    def clone(self, **changes) -> SamplingParams:
        return replace(self, **changes)

    @classmethod
    def from_generation_config(cls, gen_config: dict, **overrides) -> SamplingParams:
        """Sampling defaults from a model's generation_config.json, as vLLM applies them."""
        known = {f.name for f in fields(cls)}
        values = {
            k: gen_config[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in gen_config
        }
        if "repetition_penalty" in gen_config:
            values["repetition_penalty"] = gen_config["repetition_penalty"]
        if gen_config.get("do_sample") is False:
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if k in known})
        return cls(**values)


def _logit_bias(bias: Any) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (JSON object keys are strings) -> bias in [-100, 100]."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        if isinstance(key, float | bool) or token_id < 0:
            raise ValueError(f"logit_bias key {key!r} is not a token id")
        _check_number(f"logit_bias[{key!r}]", value)
        out[token_id] = min(100.0, max(-100.0, float(value)))
    return out


def _check_int(name: str, value, minimum: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _check_number(name: str, value) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
