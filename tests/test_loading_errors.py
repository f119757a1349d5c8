"""Loading a model that is missing, broken or unsupported raises ModelLoadError naming the problem;
the CLI turns it into one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanovllm.errors import ModelLoadError, NanovllmError

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
UNREACHABLE_HUB_ID = "nanovllm-tests/no-such-model"


def load(path) -> object:
    from nanovllm.models import load_model

    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture
def good_copy(checkpoint_factory, tmp_path) -> Path:
    """A private copy of a valid checkpoint that a test may break."""
    return Path(shutil.copytree(checkpoint_factory("llama3"), tmp_path / "model"))


@pytest.fixture
def unknown_architecture(good_copy) -> Path:
    config_path = good_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config_path.write_text(json.dumps(config))
    return good_copy


@pytest.fixture
def offline_hub(monkeypatch, tmp_path) -> None:
    """No network and an empty cache, whether or not huggingface_hub is already imported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these variables once, at import: patch its constants as well.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


def test_model_load_error_is_a_nanovllm_error():
    assert issubclass(ModelLoadError, NanovllmError)


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="(?i)does not exist|not found|no such") as err:
        load(missing)
    assert str(missing) in str(err.value)


def test_folder_without_config_json_says_so(good_copy):
    (good_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load(good_copy)


@pytest.mark.parametrize("keep", [0.5, 0.002], ids=["data-cut", "header-cut"])
def test_truncated_safetensors_names_the_file(good_copy, keep):
    weights = good_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*(truncated|corrupt|incomplete)"):
        load(good_copy)


def test_unknown_architecture_lists_the_supported_ones(unknown_architecture):
    with pytest.raises(ModelLoadError) as err:
        load(unknown_architecture)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for name in SUPPORTED:
        assert name in message


@pytest.mark.usefixtures("offline_hub")
def test_unreachable_hub_id_says_how_to_run_locally():
    with pytest.raises(ModelLoadError) as err:
        load(UNREACHABLE_HUB_ID)
    message = str(err.value)
    assert UNREACHABLE_HUB_ID in message
    assert "local" in message.lower()
    assert "gguf" in message.lower()


def run_cli_generate(model: str, hf_home: Path) -> subprocess.CompletedProcess:
    # Exactly what the `nanovllm` console script runs, without depending on where it is installed.
    code = "import sys; from nanovllm.cli import main; sys.exit(main())"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    args = [sys.executable, "-c", code, "generate", "--model", model, "--prompt", "hi"]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(params=["missing", "unknown-architecture", "hub-id"])
def bad_model(request, tmp_path) -> tuple[str, str]:
    """(--model argument, text its error line must contain)."""
    if request.param == "missing":
        path = str(tmp_path / "no-such-model")
        return path, path
    if request.param == "unknown-architecture":
        return str(request.getfixturevalue("unknown_architecture")), "GPT2LMHeadModel"
    return UNREACHABLE_HUB_ID, UNREACHABLE_HUB_ID


def test_cli_generate_with_bad_model_prints_one_line(bad_model, tmp_path):
    model, expected = bad_model
    result = run_cli_generate(model, tmp_path / "hf-home")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    # Start-up phases logged before the model was read, then the one error line.
    *logs, error = result.stderr.strip().splitlines()
    assert all(line.startswith("INFO ") for line in logs), result.stderr
    assert error.startswith("nanovllm: error: ") and expected in error
