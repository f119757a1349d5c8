"""`nanovllm bench` commands on a tiny model: they run, and their output has the documented
fields with values that agree with the workload they were given."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _server_fixtures import start_server


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanovllm.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return str(checkpoint_factory("llama3"))


def test_bench_throughput_json_counts_the_tokens_it_was_asked_for(model):
    result = run_cli(
        "bench", "throughput", "--model", model, "--device", "cpu", "--num-prompts", "6",
        "--input-len", "5:9", "--output-len", "4", "--max-requests", "3", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_requests"] == 6
    assert report["output_tokens"] == 6 * 4  # ignore_eos: exactly the output length
    assert 6 * 5 <= report["prompt_tokens"] <= 6 * 9
    assert report["max_requests"] == 3
    expected = report["output_tokens"] / report["elapsed_s"]
    assert report["output_tokens_per_s"] == pytest.approx(expected)
    assert report["total_tokens_per_s"] > report["output_tokens_per_s"]


def test_bench_structured_times_both_phases_of_every_round_and_the_masks(model):
    result = run_cli(
        "bench", "structured", "--model", model, "--device", "cpu", "--batch", "4",
        "--input-len", "6", "--output-len", "6", "--rounds", "2", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["batch"], report["output_len"], report["rounds"]) == (4, 6, 2)
    assert len(report["free_step_ms"]) == len(report["masked_step_ms"]) == 2
    assert report["mask_ms_per_step"] > 0 and report["mask_us_per_row"] > 0
    medians = [sum(report[k]) / 2 for k in ("masked_step_ms", "free_step_ms")]  # of 2 values
    # One row per sequence per masked step: per-step time = 4 rows x per-row time.
    assert report["mask_ms_per_step"] == pytest.approx(4 * report["mask_us_per_row"] / 1000)
    masks = report["mask_ms_per_step"] + report["apply_ms_per_step"]
    assert report["overhead"] == pytest.approx(masks / medians[1])
    assert report["ratio"] == pytest.approx(medians[0] / medians[1])


def test_bench_throughput_text_line(model):
    result = run_cli(
        "bench", "throughput", "--model", model, "--device", "cpu", "--num-prompts", "2",
        "--input-len", "4", "--output-len", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 requests in ")
    assert "output tokens/s" in result.stdout and "total tokens/s" in result.stdout


def test_bench_throughput_refuses_a_bad_range(model):
    result = run_cli("bench", "throughput", "--model", model, "--input-len", "9:3")
    assert result.returncode != 0
    assert "MIN <= MAX" in result.stderr and "Traceback" not in result.stderr


def test_bench_overhead_reports_every_output_kind_and_parts_that_add_up(model):
    result = run_cli(
        "bench", "overhead", "--model", model, "--device", "cpu", "--num-seqs", "8",
        "--steps", "5", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["outputs"] for r in reports] == ["final_only", "cumulative", "delta"]
    for r in reports:
        assert (r["num_seqs"], r["steps"]) == (8, 5)
        parts = r["ms_schedule"] + r["ms_runner"] + r["ms_sampler"] + r["ms_postprocess"]
        assert parts == pytest.approx(r["ms_per_step"], rel=1e-6)


def test_bench_serve_against_a_running_server(model, tmp_path):
    server = start_server(model, tmp_path, "--max-requests", "4")
    try:
        result = run_cli(
            "bench", "serve", "--url", server.url, "--num-prompts", "6", "--input-len", "4:8",
            "--output-len", "5", "--concurrency", "3", "--json",
        )  # fmt: skip
    finally:
        assert server.stop() == 0, server.log()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_requests"] == 6 and report["failed"] == 0
    assert (report["completed"], report["errored"], report["lost"]) == (6, 0, 0)
    assert report["output_tokens"] == 6 * 5
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        stats = report[name]
        assert set(stats) == {"mean", "p50", "p90", "p99"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    # The time to first token cannot exceed the whole run.
    assert report["ttft_ms"]["p99"] <= 1000 * report["duration_s"]


def test_bench_serve_counts_refusals_as_errored_not_lost(model, tmp_path):
    # One slot and no queue: of 6 requests sent 3 at a time, some are refused with 503.
    server = start_server(model, tmp_path, "--max-requests", "1", "--max-waiting", "0")
    try:
        result = run_cli(
            "bench", "serve", "--url", server.url, "--num-prompts", "6", "--input-len", "4",
            "--output-len", "60", "--concurrency", "3", "--json",
        )  # fmt: skip
    finally:
        assert server.stop() == 0, server.log()
    assert result.returncode == 1, result.stderr  # some failed
    report = json.loads(result.stdout)
    assert report["errored"] >= 1 and report["lost"] == 0
    assert report["completed"] + report["errored"] == 6
    assert all(error.startswith("HTTP 503") for error in report["errors"])


# ---- bench decode: the GPU benchmark's harness, on the emulated device ---------------------------
def test_bench_decode_cli_runs_every_case_on_the_emulated_device():
    result = run_cli(
        "bench", "decode", "--shapes", "tiny", "--batch", "1,3", "--context", "8", "--steps",
        "2", "--device", "cuda-emulated", "--weights", "q4_k", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["batch"], r["mode"]) for r in rows] == [
        (1, "padded"), (1, "eager"), (3, "padded"), (3, "eager")
    ]  # fmt: skip
    assert all(
        r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_step"]) for r in rows
    )


@pytest.mark.parametrize("weights", ["f16", "q4_k"])
def test_bench_decode_replays_graphs_that_give_the_eager_tokens(monkeypatch, weights):
    """With the CuPy stand-in the graphs are captured and replayed: same greedy tokens."""
    from _fake_cupy import FakeCuPy

    import nanovllm.backends
    from nanovllm.bench.decode import bench_decode

    fake, real = FakeCuPy(), nanovllm.backends.get_backend
    monkeypatch.setattr(nanovllm.backends, "get_backend", lambda *a: fake.attach(real(*a)))
    results = bench_decode("tiny", weights, [1, 3], 8, 2, "cuda-emulated")
    assert [r.mode for r in results] == ["graphs", "eager", "graphs", "eager"]
    for graphs, eager in zip(results[::2], results[1::2], strict=True):
        assert graphs.last_tokens == eager.last_tokens and len(graphs.last_tokens) == graphs.batch
    assert fake.graph_launches >= 2 * 3  # timed and warm-up steps replayed graphs


def test_the_projection_is_the_table_of_docs_kernels_md():
    """docs/kernels.md's projected Qwen3-0.6B step (ms) and launch count, from the same
    arithmetic as `nanovllm bench decode` prints."""
    from nanovllm.bench.decode import model_config
    from nanovllm.bench.projection import decode_step

    config = model_config("qwen3-0.6b")
    table = {("f16", 1): 1.29, ("q4_k", 1): 1.02, ("f16", 64): 5.1, ("q4_k", 64): 7.2}
    for (weights, batch), ms in table.items():
        step = decode_step(config, batch, 512, weights)
        assert 1000 * step.step_s == pytest.approx(ms, abs=0.01 if ms < 2 else 0.05)
        assert step.launches == 339
