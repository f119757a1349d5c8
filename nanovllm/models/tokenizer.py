"""Tokenizer: a `tokenizers.Tokenizer` plus the model's special tokens and chat template.

`Tokenizer.from_folder` reads a Hugging Face tokenizer folder the way transformers does:
`tokenizer.json` holds the vocabulary and the whole encode/decode pipeline,
`tokenizer_config.json` (or the legacy `special_tokens_map.json`) names BOS and EOS, and the
chat template comes from `chat_template.jinja`, else from `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers

from nanovllm.errors import ModelLoadError
from nanovllm.models.chat_template import render_chat_template


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.all_special_ids = self._special_ids()

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        folder = Path(path)
        backend = _load_backend(folder / "tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")
        return cls(
            backend,
            chat_template=_chat_template(folder, config),
            bos_token=_token_text(config.get("bos_token", special.get("bos_token"))),
            eos_token=_token_text(config.get("eos_token", special.get("eos_token"))),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template; send a plain completion prompt instead, "
                "or use a model (or tokenizer folder) that ships one"
            )
        # As in transformers, caller kwargs override the model's special tokens.
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **context,
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special_ids(self) -> set[int]:
        # The ids that decode(skip_special_tokens=True) drops, plus BOS/EOS.
        added = self.backend.get_added_tokens_decoder()
        ids = {token_id for token_id, token in added.items() if token.special}
        return ids | {i for i in (self.bos_token_id, self.eos_token_id) if i is not None}


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise ModelLoadError(f"no tokenizer.json in {path.parent}: a tokenizer folder needs one")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"cannot read {path}: expected a JSON object")
    return data


def _token_text(value: str | dict | None) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        # A list of named templates; "default" is the one transformers uses for plain chat.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template
