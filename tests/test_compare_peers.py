"""scripts/compare_peers.py's own logic (the peers themselves never run in CI): the workloads
every engine gets, the peak-RSS sampler and the summary table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("compare_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_serving_mix_is_32_requests_of_16_to_256_tokens_in_and_out(peers):
    prompts, outputs = peers.workload("mix", vocab=49152)
    assert len(prompts) == len(outputs) == 32
    assert all(16 <= len(p) <= 256 for p in prompts) and all(16 <= n <= 256 for n in outputs)
    assert len({len(p) for p in prompts}) > 10  # lengths vary
    assert all(100 <= t < 49152 - 100 for p in prompts for t in p)


def test_every_engine_gets_the_same_token_ids(peers):
    for name in peers.WORKLOADS:
        assert peers.workload(name, 1000) == peers.workload(name, 1000)


def test_fixed_workloads_have_the_issues_shapes(peers):
    single, batch, ttft = (peers.workload(n, 1000) for n in ("single", "batch", "ttft"))
    assert [len(p) for p in single[0]] == [48] and single[1] == [128]
    assert [len(p) for p in batch[0]] == [48] * 16 and batch[1] == [32] * 16
    assert [len(p) for p in ttft[0]] == [512] and ttft[1] == [1]


def test_an_unknown_workload_is_refused(peers):
    with pytest.raises(SystemExit, match="unknown workload"):
        peers.workload("huge", 1000)


def test_peak_rss_counts_a_child_process(peers):
    """The sampler follows a process tree, as vLLM's engine core and llama-server are children."""
    code = (
        "import subprocess, sys;"
        "subprocess.run([sys.executable, '-c', 'import time; b = bytearray(200 << 20); "
        'b[::4096] = b"x" * len(b[::4096]); time.sleep(1.0)\'])'
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    peak = peers.PeakRSS(process.pid)
    process.wait()
    peak.stop()
    assert peak.peak > 200 << 20


def test_the_summary_shows_medians_and_failures(peers, capsys):
    runs = {
        "nanovllm": [
            {"single": {"tok_s": v}, "ttft": {"ttft_s": t}, "peak_rss_mb": 500.0}
            for v, t in ((10.0, 2.0), (30.0, 1.0), (20.0, 3.0))
        ],
        "vllm": [{"error": "exit 1: no vllm"}],
    }
    peers.summarize(runs, ["single", "ttft"])
    out = capsys.readouterr().out
    assert "20.00 tok/s" in out and "2.00 s" in out and "500 MB" in out
    assert "vllm           failed: exit 1: no vllm" in out
