"""`nanovllm generate`: text streamed to stdout, a one-line summary on stderr, and bad flag
values reported as one `nanovllm: error: ...` line with a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from nanovllm import LLM, SamplingParams, cli

SUMMARY = re.compile(
    r"^\[(\d+) tokens in [\d.]+ s, [\d.]+ tok/s; prompt (\d+) tokens; finish: (\w+)\]$"
)


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
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
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
    "flags, words",
    [
        (["--max-tokens", "0"], ["max_tokens"]),
        (["--model", "/nonexistent"], ["/nonexistent", "does not exist"]),
        (["--temperature", "-1"], ["temperature"]),
        (["--top-p", "1.5"], ["top_p"]),
        (["--num-blocks", "0"], ["num_blocks"]),
        (["--max-tokens", "100000"], ["100000"]),
        (["--prompt", ""], ["prompt"]),
        (["--regex", "("], ["--regex", "invalid or unsupported regex"]),
        (["--json-schema", "/nonexistent.json"], ["--json-schema", "/nonexistent.json"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None,
)
def test_bad_flag_values_print_one_error_line_and_exit_non_zero(model, flags, words):
    args = {"--model": model, "--prompt": "hi", "--max-tokens": "5"}
    args.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    result = run_cli("generate", *[item for pair in args.items() for item in pair])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nanovllm: error: ")
    for word in words:
        assert word in lines[0]


def test_a_flag_value_of_the_wrong_type_is_a_usage_error_not_a_traceback(model):
    result = run_cli("generate", "--model", model, "--prompt", "hi", "--max-tokens", "abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--max-tokens" in result.stderr.strip().splitlines()[-1]


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
    assert SUMMARY.match(result.stderr.strip())[3] == "stop"
    result = run_cli("generate", *flags, "--regex", "[a-c]{2}-[0-9]{3}")
    assert re.fullmatch(r"[a-c]{2}-[0-9]{3}\n", result.stdout), result.stdout
