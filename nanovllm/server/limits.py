"""The prompt-size bound checked before tokenizing: a prompt that cannot fit is refused by its
length in characters, so no request makes the server tokenize (and hold) an arbitrary text.

Tokenizing costs memory in proportion to the text: the tokenizers library keeps ids, offsets
and token strings per token. No token covers more than `max_token_chars` characters (the
longest vocabulary entry), so a text longer than max_model_len x max_token_chars characters
needs more than max_model_len tokens and is refused without looking further. A normalizer can
shorten the text before it is split (Unicode composition joins up to four code points into
one), so with one the bound allows four times as much.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm.models.tokenizer import Tokenizer
from nanovllm.server.errors import bad_request

NORMALIZER_SLACK = 4


@dataclass(frozen=True, slots=True)
class PromptLimit:
    max_model_len: int
    max_token_chars: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, max_model_len: int) -> PromptLimit:
        longest = max(len(token) for token in tokenizer.backend.get_vocab(with_added_tokens=True))
        slack = NORMALIZER_SLACK if tokenizer.backend.normalizer is not None else 1
        return cls(max_model_len, longest * slack)

    @property
    def max_chars(self) -> int:
        return self.max_model_len * self.max_token_chars

    def check(self, text: str, param: str) -> None:
        """Raise a 400 naming `param` if `text` cannot fit in max_model_len tokens."""
        if len(text) > self.max_chars:
            raise bad_request(
                f"the prompt has {len(text)} characters, more than the {self.max_model_len} "
                f"tokens of this model's maximum length can hold (at most {self.max_chars} "
                f"characters: a token covers at most {self.max_token_chars})",
                param,
            )
