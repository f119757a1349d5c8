"""`GET /tokenizer_info`, as vLLM serves it behind `--enable-tokenizer-info-endpoint`: the
tokenizer's configuration in the shape of a `tokenizer_config.json`, so that a client can
tokenize, detokenize and render chats through the server alone (lm-eval's
`tokenizer_backend=remote` reads `eos_token`, `bos_token`, `pad_token` and `chat_template`).
"""

from __future__ import annotations

from nanovllm.models.tokenizer import Tokenizer

PROBE = "a"  # any text: does encoding it with special tokens add a BOS?


def tokenizer_info(tokenizer: Tokenizer, max_model_len: int) -> dict:
    bos = tokenizer.bos_token_id
    with_special = tokenizer.encode(PROBE, add_special_tokens=True)
    info = {
        # transformers' class for a tokenizer.json-backed tokenizer, which ours is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": None,
        "add_bos_token": bos is not None and with_special[:1] == [bos],
        "add_eos_token": tokenizer.eos_token_id is not None
        and with_special[-1:] == [tokenizer.eos_token_id],
        "model_max_length": max_model_len,
        "vocab_size": tokenizer.vocab_size,
    }
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    return info
