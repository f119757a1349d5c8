"""Hugging Face Hub download: fetch only the files an inference engine reads."""

from __future__ import annotations

import os
from pathlib import Path

from nanovllm.errors import ModelLoadError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


def download(model_id: str) -> Path:
    """Snapshot of `model_id` in the HF cache (HF_HOME / HF_HUB_OFFLINE honoured), with progress bars."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # the hub raises many types: offline, DNS, 401, 404, ...
        reason = (
            str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        )
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(
            f"could not get model {model_id!r} from the Hugging Face Hub{offline} and no local copy "
            f"is cached: {reason}. To run without the Hub, pass a local folder "
            f"(--model /path/to/model with config.json and *.safetensors) or a GGUF file "
            f"(--model /path/to/model.gguf)."
        ) from None
