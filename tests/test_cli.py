"""`nanovllm generate`: text streamed to stdout, the start-up phases and a one-line summary on
stderr, and bad flag values reported as one `nanovllm: error: ...` line with a non-zero exit,
never a traceback — before the model loads when no model is needed to know."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanovllm import LLM, SamplingParams, cli

SUMMARY = re.compile(
    r"^\[(\d+) tokens in [\d.]+ s, [\d.]+ tok/s; prompt (\d+) tokens; finish: (\w+)\]$"
)
PHASE = re.compile(r"^INFO \S+ \S+ \[nanovllm\.engine\] .* in \d+\.\d s")  # a phase done


@pytest.fixture(scope="module")
def model(checkpoint_factory) -> str:
    return str(checkpoint_factory("llama3"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NANOVLLM_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "nanovllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_generate_prints_the_text_and_a_summary_line(model):
    result = run_cli("generate", "--model", model, "--prompt", "hi", "--max-tokens", "5", "--temperature", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = LLM(model, device="cpu").generate(
        "hi", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False
    )[0]
    completion = expected.outputs[0]
    assert result.stdout == completion.text + "\n"
    *logs, summary = result.stderr.strip().splitlines()
    # Start-up: each phase as it starts, then done with its duration; the engine's summary.
    phases = [line.split("] ", 1)[1].split(" in ")[0] for line in logs]
    assert phases[:5] + phases[6:] == [
        "set up the cpu backend", f"reading {model} (config, tokenizer) ...", f"read {model}",
        "loading the weights ...", "loaded the weights", "engine ready",
    ]  # fmt: skip
    assert re.fullmatch(r"model weights: \d+\.\d MiB \(\d+ dense\)", phases[5]), phases[5]
    done = [line for line in logs if not line.endswith("...") and "weights:" not in line]
    assert all(PHASE.match(line) for line in done), logs
    match = SUMMARY.match(summary)
    assert match, summary
    assert int(match[1]) == len(completion.token_ids)
    assert int(match[2]) == len(expected.prompt_token_ids)
    assert match[3] == completion.finish_reason


class Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


def test_generate_streams_the_text_piece_by_piece(model, monkeypatch, capsys):
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["generate", "--model", model, "--prompt", "hi", "--max-tokens", "12", "--temperature", "0", "--ignore-eos"]  # fmt: skip
    assert cli.main(argv) == 0
    pieces = [w for w in stdout.writes if w]
    assert len(pieces) > 2, "the text was written in one go, not streamed"
    assert stdout.flushes >= len(pieces) - 1
    expected = LLM(model, device="cpu").generate(
        "hi", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )[0]
    assert "".join(stdout.writes) == expected.outputs[0].text + "\n"


@pytest.mark.parametrize(
    "flags, words, needs_model",
    [
        (["--max-tokens", "0"], ["max_tokens"], False),
        (["--max-tokens", "-1"], ["max_tokens"], False),
        (["--model", "/nonexistent"], ["/nonexistent", "does not exist"], False),
        (["--temperature", "-1"], ["temperature"], False),
        (["--top-p", "1.5"], ["top_p"], False),
        (["--num-blocks", "0"], ["num_blocks"], False),
        (["--dtype", "float16"], ["float16", "--device cuda"], False),
        (["--prompt", ""], ["prompt"], False),
        (["--max-tokens", "100000"], ["100000"], True),  # the model's length decides
        (["--regex", "("], ["--regex", "invalid or unsupported regex"], True),
        (["--json-schema", "/nonexistent.json"], ["--json-schema", "/nonexistent.json"], False),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None,
)
def test_bad_flag_values_print_one_error_line_and_exit_non_zero(model, flags, words, needs_model):
    args = {"--model": model, "--prompt": "hi", "--max-tokens": "5", "--device": "cpu"}
    args.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    result = run_cli("generate", *[item for pair in args.items() for item in pair])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    *logs, error = result.stderr.strip().splitlines()
    # Nothing is logged before the error (no start-up phase) unless it needed the model.
    assert bool(logs) == needs_model, result.stderr
    assert all(line.startswith("INFO ") for line in logs), logs
    assert error.startswith("nanovllm: error: ")
    for word in words:
        assert word in error


def test_a_flag_value_of_the_wrong_type_is_a_usage_error_not_a_traceback(model):
    result = run_cli("generate", "--model", model, "--prompt", "hi", "--max-tokens", "abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--max-tokens" in result.stderr.strip().splitlines()[-1]


def test_threads_must_be_a_positive_count(model):
    result = run_cli("generate", "--model", model, "--prompt", "hi", "--threads", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--threads" in result.stderr.strip().splitlines()[-1]


def test_threads_reach_the_engine_config():
    import argparse

    from nanovllm.args import add_engine_args, engine_config
    from nanovllm.config import EngineConfig

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config(parser.parse_args(["--threads", "3"])).num_threads == 3
    assert engine_config(parser.parse_args([])).num_threads is None
    with pytest.raises(ValueError, match="num_threads"):
        EngineConfig(model="m", num_threads=0)


def test_generate_with_a_json_schema_or_a_regex_prints_output_that_follows_it(model, tmp_path):
    import json

    import jsonschema

    # A random model pads JSON objects with whitespace: an enum leaves it no room to wander.
    schema = {"enum": ["red", "green", "blue"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    flags = ["--model", model, "--prompt", "hi", "--max-tokens", "30", "--temperature", "0"]
    result = run_cli("generate", *flags, "--json-schema", str(path))
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)
    assert SUMMARY.match(result.stderr.strip().splitlines()[-1])[3] == "stop"
    result = run_cli("generate", *flags, "--regex", "[a-c]{2}-[0-9]{3}")
    assert re.fullmatch(r"[a-c]{2}-[0-9]{3}\n", result.stdout), result.stdout


def walk_options(parser: argparse.ArgumentParser, path: str = "nanovllm"):
    """(command, action) of every option and positional of every subcommand, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk_options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_flag_of_every_subcommand_has_help_text():
    options = list(walk_options(cli.build_parser()))
    commands = {command for command, _ in options}
    assert {"nanovllm generate", "nanovllm serve", "nanovllm top", "nanovllm check"} <= commands
    missing = [
        f"{c} {a.option_strings or a.dest}" for c, a in options if not (a.help or "").strip()
    ]
    assert missing == []


def without_cuda_extra(*argv: str) -> subprocess.CompletedProcess:
    """The CLI as it runs where the `cuda` extra is not installed: CuPy and NVIDIA's wheels
    cannot be imported (a None in sys.modules makes Python's import machinery refuse them)."""
    code = (
        "import sys\n"
        "for name in ('cupy', 'nvidia'): sys.modules[name] = None\n"
        "from nanovllm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "argv",
    [["check"], ["generate", "--device", "cuda-emulated", "--prompt", "hi", "--max-tokens", "2"]],
    ids=["check", "cuda-emulated"],
)
def test_without_the_cuda_extra_one_line_names_it(model, argv):
    if argv[0] == "generate":
        argv = [*argv, "--model", model]
    result = without_cuda_extra(*argv)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'nanovllm[cuda]'" in lines[0] and "`cuda` extra" in lines[0]


def test_every_readme_generate_example_has_a_token_cap():
    """The README's `nanovllm generate` examples end quickly on the demo model: none runs to the
    model's whole context (8,192 tokens for SmolLM2) when it does not emit EOS."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = [line for line in readme.splitlines() if line.startswith("nanovllm generate")]
    assert len(examples) >= 5
    for line in examples:
        assert "--max-tokens" in line, line
