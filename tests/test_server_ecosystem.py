"""What tools written for vLLM read from the server: `/metrics` as vLLM V1 exports it (checked
with prometheus_client's parser, and scraped by two vLLM dashboards' own code: vllm-metrics-
monitor's collector and vllm-top's fetch), `/tokenizer_info` behind vLLM's flag, and an access
log line per finished or refused request."""

from __future__ import annotations

import re
import time

import pytest
import requests
from _server_fixtures import start_server
from prometheus_client.parser import text_string_to_metric_families

from nanovllm.server.metrics import build_1_2_5_buckets

MODEL = "tiny"
PROMPT = "Beautiful is better than"
MAX_MODEL_LEN = 256  # the tiny checkpoints' max_position_embeddings
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
        10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
       20.0, 40.0, 80.0]  # fmt: skip
LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
TOKENS = [1, 2, 5, 10, 20, 50, 100, 200]  # vLLM's 1-2-5 buckets up to max_model_len 256
# Every family vLLM V1 (vllm/v1/metrics/loggers.py, 0.10-0.11) exports that applies to one
# engine without LoRA, KV connectors or multi-modal inputs: (type, buckets of a histogram).
VLLM_V1_FAMILIES = {
    "vllm:num_requests_running": ("gauge", None),
    "vllm:num_requests_waiting": ("gauge", None),
    "vllm:num_requests_swapped": ("gauge", None),  # vLLM V0's; dashboards still read it
    "vllm:kv_cache_usage_perc": ("gauge", None),
    "vllm:gpu_cache_usage_perc": ("gauge", None),  # deprecated name, still read
    "vllm:cache_config_info": ("gauge", None),
    "vllm:prefix_cache_queries": ("counter", None),
    "vllm:prefix_cache_hits": ("counter", None),
    "vllm:num_preemptions": ("counter", None),
    "vllm:prompt_tokens": ("counter", None),
    "vllm:generation_tokens": ("counter", None),
    "vllm:request_success": ("counter", None),
    "vllm:request_prompt_tokens": ("histogram", TOKENS),
    "vllm:request_generation_tokens": ("histogram", TOKENS),
    "vllm:request_max_num_generation_tokens": ("histogram", TOKENS),
    "vllm:request_params_max_tokens": ("histogram", TOKENS),
    "vllm:request_params_n": ("histogram", [1, 2, 5, 10, 20]),
    "vllm:iteration_tokens_total": (
        "histogram",
        [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    ),  # fmt: skip
    "vllm:time_to_first_token_seconds": ("histogram", TTFT),
    "vllm:inter_token_latency_seconds": ("histogram", ITL),
    "vllm:time_per_output_token_seconds": ("histogram", ITL),
    "vllm:request_time_per_output_token_seconds": ("histogram", ITL),
    "vllm:e2e_request_latency_seconds": ("histogram", LATENCY),
    "vllm:request_queue_time_seconds": ("histogram", LATENCY),
    "vllm:request_inference_time_seconds": ("histogram", LATENCY),
    "vllm:request_prefill_time_seconds": ("histogram", LATENCY),
    "vllm:request_decode_time_seconds": ("histogram", LATENCY),
}


@pytest.fixture(scope="module")
def server(checkpoint_factory, tmp_path_factory):
    srv = start_server(
        checkpoint_factory("llama3"), tmp_path_factory.mktemp("ecosystem"),
        "--served-model-name", MODEL, "--enable-tokenizer-info-endpoint",
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def traffic(server) -> dict:
    """Three finished requests (one of them streamed) of known lengths."""
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "ignore_eos": True}
    lengths = [5, 3, 1]
    for max_tokens, stream in zip(lengths, (False, True, False), strict=True):
        response = server.post("/v1/completions", {**body, "max_tokens": max_tokens, "stream": stream})  # fmt: skip
        assert response.status_code == 200
    prompt = server.post("/tokenize", {"prompt": PROMPT}).json()["count"]
    return {"lengths": lengths, "prompt_tokens": prompt}


def families(server) -> dict:
    return {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}


def test_every_vllm_v1_family_is_there_with_its_type_buckets_and_labels(server, traffic):
    found = families(server)
    assert VLLM_V1_FAMILIES.keys() <= found.keys(), sorted(VLLM_V1_FAMILIES.keys() - found.keys())
    for name, (kind, buckets) in VLLM_V1_FAMILIES.items():
        family = found[name]
        assert family.type == kind, name
        assert family.documentation, name  # # HELP
        for sample in family.samples:  # model_name and engine on every series, as vLLM
            if name != "vllm:cache_config_info":
                assert sample.labels["model_name"] == MODEL, sample
            assert sample.labels["engine"] == "0", sample
        if buckets is not None:
            bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
            assert bounds == [*map(float, buckets), float("inf")], name
    assert build_1_2_5_buckets(MAX_MODEL_LEN) == TOKENS
    reasons = {s.labels["finished_reason"] for s in found["vllm:request_success"].samples}
    assert {"stop", "length", "abort"} <= reasons
    info = found["vllm:cache_config_info"].samples[0].labels
    assert (info["block_size"], info["num_gpu_blocks"]) == ("16", "512")


def test_histograms_count_what_the_requests_did(server, traffic):
    found = families(server)

    def value(name: str, suffix: str) -> float:
        return sum(s.value for s in found[name].samples if s.name == name + suffix)

    lengths, requests_done = traffic["lengths"], len(traffic["lengths"])
    # One inter-token latency per token after each request's first (no speculation here).
    per_token = sum(n - 1 for n in lengths)
    assert value("vllm:inter_token_latency_seconds", "_count") == per_token
    assert value("vllm:time_per_output_token_seconds", "_count") == per_token
    # Per request: the one-token request has no time per output token.
    assert value("vllm:request_time_per_output_token_seconds", "_count") == 2
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds"):  # fmt: skip
        assert value(f"vllm:{name}", "_count") == requests_done, name
    assert value("vllm:request_generation_tokens", "_sum") == sum(lengths)
    assert value("vllm:request_prompt_tokens", "_sum") == requests_done * traffic["prompt_tokens"]
    assert value("vllm:request_params_max_tokens", "_sum") == sum(lengths)
    # The phases add up: queue + prefill = TTFT, prefill + decode = inference <= e2e.
    queue, prefill = value("vllm:request_queue_time_seconds", "_sum"), value("vllm:request_prefill_time_seconds", "_sum")  # fmt: skip
    decode, inference = value("vllm:request_decode_time_seconds", "_sum"), value("vllm:request_inference_time_seconds", "_sum")  # fmt: skip
    assert queue + prefill == pytest.approx(value("vllm:time_to_first_token_seconds", "_sum"))
    assert prefill + decode == pytest.approx(inference)
    assert inference <= value("vllm:e2e_request_latency_seconds", "_sum")
    assert value("vllm:num_requests_swapped", "") == 0
    kv = value("vllm:kv_cache_usage_perc", "")
    assert value("vllm:gpu_cache_usage_perc", "") == kv


def test_vllm_metrics_monitor_collects_from_the_server(server, traffic, tmp_path, monkeypatch):
    """vllm-metrics-monitor's own scrape, parse and store path (it crashed on every scrape of
    a server without vLLM V1's `engine` label)."""
    from vllm_metrics_monitor import collector

    monkeypatch.setattr(collector, "metrics_urls", [server.url + "/metrics"])
    monkeypatch.setattr(collector, "db_path", str(tmp_path / "data.db"))
    monkeypatch.setattr(collector, "sources", [])
    collector.init_db()
    source_id = collector.sources[0]["id"]
    data = collector.collect_metrics(source_id)
    collector.store_metrics(source_id, data)
    assert [engine["id"] for engine in data["engines"]] == [0]
    assert data["request_success_total"] == len(traffic["lengths"])
    assert data["gen_len_sum"] == sum(traffic["lengths"])
    assert data["itl_count"] == sum(n - 1 for n in traffic["lengths"])
    assert data["queue_time_count"] == data["ttft_count"] == len(traffic["lengths"])
    assert 0 < data["uptime"] < 3600  # from process_start_time_seconds
    current = collector.query_current(source_id)
    assert current is not None and [e["id"] for e in current["engines"]] == [0]
    assert current["itl_avg"] > 0 and current["ttft_avg"] > 0


def test_vllm_top_reads_the_cache_usage_and_totals(server, traffic):
    from vllm_top.monitor import VLLM_TOP

    port = int(server.url.rsplit(":", 1)[1])
    grouped = VLLM_TOP(port=port, host="127.0.0.1").fetch_metrics()
    ours = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    kv = ours["vllm:kv_cache_usage_perc"].samples[0].value
    assert grouped["vllm:gpu_cache_usage_perc"][0]["value"] == kv
    assert grouped["vllm:generation_tokens_total"][0]["value"] >= sum(traffic["lengths"])
    assert len(grouped["vllm:e2e_request_latency_seconds"]) > len(LATENCY)


def test_the_series_vllm_mon_matches_by_substring_are_there(server, traffic):
    """vllm-mon (`vllm-dash`) reads /metrics by substring: the finish counter as
    `vllm:request_success_total{engine="0",finished_reason=...` (labels sorted, as
    prometheus_client writes them for vLLM too), per-request TPOT as its mean."""
    text = server.get("/metrics").text
    for reason in ("stop", "length", "abort"):
        assert f'vllm:request_success_total{{engine="0",finished_reason="{reason}"' in text
    for name in ("vllm:request_time_per_output_token_seconds_sum",
                 "vllm:request_queue_time_seconds_count", "vllm:num_requests_swapped"):  # fmt: skip
        assert f"\n{name}{{" in text, name


def test_tokenizer_info_is_served_behind_vllms_flag(server, checkpoint_factory):
    from nanovllm.models.tokenizer import Tokenizer

    info = server.get("/tokenizer_info").json()
    tokenizer = Tokenizer.from_folder(checkpoint_factory("llama3"))
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    # lm-eval's RemoteTokenizer: the eos id through /tokenize is the tokenizer's.
    eos = server.post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [tokenizer.eos_token_id]


ACCESS = re.compile(
    r'\[nanovllm\.access\] 127\.0\.0\.1 "(\w+) (\S+)" (\d{3}) (\S+)'
    r"(?: prompt_tokens=(\d+) completion_tokens=(\d+))?(.*) (\d+\.\d{3})s$"
)


def access_lines(server) -> list[tuple]:
    return [m.groups() for line in server.log().splitlines() if (m := ACCESS.search(line))]


def test_one_access_log_line_per_finished_or_refused_request(server, traffic):
    # The traffic's stream (3 tokens; the others have 5 and 1) is logged when it ends.
    deadline = time.monotonic() + 5
    while not (streamed := [line for line in access_lines(server) if line[5] == "3"]):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert len(streamed) == 1 and streamed[0][2] == "200" and streamed[0][6] == ""
    before = len(access_lines(server))
    ok = server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).json()
    refused = server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": -1})
    assert refused.status_code == 400
    server.get("/health")  # not logged: neither generation nor refused
    deadline = time.monotonic() + 5
    while len(access_lines(server)) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = access_lines(server)[before:]
    assert len(lines) == 2, server.log()
    method, path, status, response_id, prompt, completion, _, latency = lines[0]
    assert (method, path, status, response_id) == ("POST", "/v1/completions", "200", ok["id"])
    assert int(prompt) == ok["usage"]["prompt_tokens"]
    assert int(completion) == ok["usage"]["completion_tokens"]
    assert float(latency) > 0
    assert lines[1][:3] == ("POST", "/v1/completions", "400")


def test_the_access_log_can_be_switched_off(checkpoint_factory, tmp_path):
    srv = start_server(checkpoint_factory("llama3"), tmp_path, "--disable-access-log")
    try:
        assert srv.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1}).status_code == 200
        assert srv.post("/v1/completions", {"prompt": ""}).status_code == 400
        assert requests.get(srv.url + "/tokenizer_info", timeout=5).status_code == 404
    finally:
        srv.stop()
    assert "nanovllm.access" not in srv.log()
