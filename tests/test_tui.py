"""`nanovllm top`: the dashboard shows what the server reports, survives a missing server or a
wrong key, and answers its keys.

Against a real server under load, the app polls only when the test says so (its interval is an
hour; `r` polls now) and every HTTP body it receives is recorded on the way in. Each poll's
figures — the app's `Figures` and the text of its widgets — are compared with the test's own
reading of the very bodies of that poll, so the comparison is exact although the server keeps
moving. Once the load stops, a direct scrape of the idle server must match too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests
from _server_fixtures import REQUEST_TIMEOUT_S, free_port, start_server
from prometheus_client.parser import text_string_to_metric_families

from nanovllm.engine.spec_decode import SpecStats
from nanovllm.engine.stats import EngineStats, MaskStats
from nanovllm.server.metrics import ServerMetrics
from nanovllm.tui.app import TopApp
from nanovllm.tui.client import METRICS_PATH, STATE_PATH, Client, http_get
from nanovllm.tui.model import Histogram, histogram_quantile, parse_metrics
from nanovllm.tui.widgets import BLOCK_GLYPHS, BlockMap, HelpScreen, format_duration, format_percent

KEY = "tui-test-key"
K = 3  # speculative tokens
ROOT = Path(__file__).resolve().parent.parent
# `python scripts/x.py` puts scripts/ on sys.path (its helpers are imported from there); the
# tests' PYTHONSAFEPATH (conftest.py) would keep it off.
AS_RUN_BY_HAND = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
SIZE = (100, 30)
WAIT_S = 30.0  # the bound on every wait for a poll or the server
PREFIX = "A paged KV cache stores keys and values in fixed-size blocks. "


# ---- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(checkpoint_factory, tmp_path_factory):
    # The target is its own draft: greedy drafts are always accepted (100%), a value to check.
    # 64 blocks for 4 running sequences of ~200 tokens keep the cache busy.
    model = checkpoint_factory("llama3")
    proc = start_server(
        model, tmp_path_factory.mktemp("tui"), "--api-key", KEY, "--draft-model", str(model),
        "--num-speculative-tokens", str(K), "--num-blocks", "64", "--max-requests", "4",
        "--log-interval", "3600",
    )  # fmt: skip
    yield proc
    proc.stop()


class Load:
    """Streaming completions (ignore_eos, long max_tokens) from threads until the block ends."""

    def __init__(self, url: str, clients: int = 5) -> None:
        self.url, self.stop = url, threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]  # fmt: skip

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S)

    def _run(self, i: int) -> None:
        deadline = time.monotonic() + 2 * WAIT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            body = {"prompt": PREFIX + f"request {i}", "max_tokens": 150 + 10 * i,
                    "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
            headers = {"Authorization": f"Bearer {KEY}"}
            try:
                with requests.post(self.url + "/v1/completions", json=body, headers=headers,
                                   stream=True, timeout=REQUEST_TIMEOUT_S) as response:  # fmt: skip
                    for _ in response.iter_lines():
                        if self.stop.is_set():
                            break  # closing the stream aborts the request
            except requests.RequestException:
                time.sleep(0.2)  # the test decides what that means; the load goes on


class Recorder:
    """A fetch for the client that keeps every (url, body) it returns: the poll's own scrape."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []

    def __call__(self, url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
        status, body = http_get(url, headers, timeout)
        self.bodies.append((url, body))
        return status, body

    def last_poll(self) -> tuple[str, dict]:
        (metrics_url, metrics), (state_url, state) = self.bodies[-2:]
        assert metrics_url.endswith(METRICS_PATH) and state_url.endswith(STATE_PATH)
        return metrics.decode(), json.loads(state)


async def poll(app: TopApp, pilot) -> None:
    """Press r and wait until that poll is on screen."""
    count = app.poll_count
    await pilot.press("r")
    await wait_for(pilot, lambda: app.poll_count > count)


async def wait_for(pilot, condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the dashboard"
        await pilot.pause(0.05)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, labels without model_name and engine) -> value: the test's own reading."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(
                sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine"))
            )
            out[(s.name, labels)] = s.value
    return out


def buckets(scrape: dict, name: str) -> list[tuple[float, float]]:
    return sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in scrape.items()
        if sample == f"{name}_bucket"
    )


def text_of(app: TopApp, selector: str) -> str:
    return app.query_one(selector).content.plain


def running_first(state: dict) -> list[dict]:
    seqs = state["sequences"]
    return [s for s in seqs if s["state"] == "running"] + [s for s in seqs if s["state"] == "waiting"]  # fmt: skip


def assert_shows(app: TopApp, metrics_text: str, state: dict, first_metrics_text: str) -> bool:
    """The app's figures and widget text equal those read from this poll's bodies; True if the
    server had speculated by then (so the acceptance figures were compared)."""
    scrape, first = samples(metrics_text), samples(first_metrics_text)
    figures = app.figures
    value = lambda name: scrape[(name, ())]  # noqa: E731

    # Requests: the table lists every sequence of the JSON, the batch first.
    seqs = running_first(state)
    rows = [(s["request_id"], str(s["index"]), s["state"], str(s["prompt_tokens"]),
             str(s["output_tokens"]), str(s["computed_tokens"]), str(s["num_blocks"]),
             f"{s['age_s']:.1f}s") for s in seqs]  # fmt: skip
    table = app.query_one("#requests")
    assert [tuple(table.get_row_at(i)) for i in range(table.row_count)] == rows
    running = sum(s["state"] == "running" for s in seqs)
    assert [s.request_id for s in figures.engine.sequences] == [s["request_id"] for s in state["sequences"]]  # fmt: skip
    assert table.border_title == (
        f"requests: running {running}/{state['max_num_seqs']} (the batch) · waiting {len(seqs) - running}"
    )

    # KV cache: counts, and the map cell by cell (64 blocks fit one cell per block).
    blocks = state["blocks"]
    used, shared, cached, free = (blocks.count("u") + blocks.count("s"), blocks.count("s"),
                                  blocks.count("c"), blocks.count("."))  # fmt: skip
    engine = figures.engine
    assert (engine.blocks, engine.num_used, engine.num_cached, engine.num_free) == (blocks, used, cached, free)  # fmt: skip
    assert text_of(app, "#kv-summary").startswith(
        f"used {used}/{len(blocks)} ({100 * used / len(blocks):.1f}%)  shared {shared}  cached {cached}  free {free}"
    )
    block_map = app.query_one("#kv-map", BlockMap)
    lines = block_map.render().plain.split("\n")  # the bar, the legend, then the map
    assert block_map.blocks_per_cell == 1
    cells = "".join(lines[2:])
    assert cells == "".join(BLOCK_GLYPHS[ch][0] for ch in blocks)

    # Token counters and rates: counter deltas over the time between the last two polls.
    metrics = figures.metrics
    assert metrics.prompt_tokens == value("vllm:prompt_tokens_total")
    assert metrics.generation_tokens == value("vllm:generation_tokens_total")
    previous, latest = app.tracker.points[-2], app.tracker.points[-1]
    rate = (value("vllm:generation_tokens_total") - previous.metrics.generation_tokens) / (latest.t - previous.t)  # fmt: skip
    assert figures.generation_tps == pytest.approx(rate, rel=1e-12)
    assert text_of(app, "#generation-rate") == f"generation {rate:.1f} tok/s"

    # Latency: percentiles from the buckets, since the server started and since the first poll.
    for name, all_, recent, label in (
        ("vllm:time_to_first_token_seconds", figures.ttft_all, figures.ttft_recent, "TTFT"),
        ("vllm:time_per_output_token_seconds", figures.tpot_all, figures.tpot_recent, "TPOT"),
    ):
        now, then = buckets(scrape, name), buckets(first, name)
        since_first = [(le, n - m) for (le, n), (_, m) in zip(now, then, strict=True)]
        expect_all = [histogram_quantile(q, Histogram(now, 0, 0)) for q in (0.5, 0.9, 0.99)]
        expect_recent = [histogram_quantile(q, Histogram(since_first, 0, 0)) for q in (0.5, 0.9, 0.99)]  # fmt: skip
        assert list(all_.values) == expect_all and all_.count == scrape[(f"{name}_count", ())]
        assert list(recent.values) == expect_recent
        line = f"{label} all " + "".join(f"{format_duration(v):>9}" for v in expect_all)
        assert line + f"{all_.count:>7.0f}" in text_of(app, "#latency")

    # Counters and speculation (since the server started).
    counters = text_of(app, "#counters")
    finished = sum(v for (name, _), v in scrape.items() if name == "vllm:request_success_total")
    assert counters.startswith(f"finished {finished:.0f}")
    assert f"preemptions {value('vllm:num_preemptions_total'):.0f}" in counters
    hits, queries = value("vllm:prefix_cache_hits_total"), value("vllm:prefix_cache_queries_total")
    hit_rate = hits / queries if queries else None  # a poll before any prompt was looked up
    assert figures.prefix_cache_hit_rate == hit_rate
    assert f"prefix-cache hit rate {format_percent(hit_rate)}" in counters
    drafts, drafted = value("vllm:spec_decode_num_drafts_total"), value("vllm:spec_decode_num_draft_tokens_total")  # fmt: skip
    accepted = value("vllm:spec_decode_num_accepted_tokens_total")
    spec = figures.spec
    if drafts == 0:  # polled before the first speculative step: no ratio to show yet
        assert spec.num_drafts == 0 and spec.mean_acceptance_length is None
        assert spec.acceptance_rate is None and spec.per_position == [0.0] * K
        return False
    per_pos = [scrape[("vllm:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(p)),))] / drafts for p in range(K)]  # fmt: skip
    assert spec.acceptance_rate == accepted / drafted == 1.0  # the draft is the target
    assert spec.mean_acceptance_length == 1 + accepted / drafts
    assert spec.per_position == per_pos
    assert f"speculative: acceptance 100.0%  ({drafts:.0f} drafts)" in counters
    assert (
        f"mean length {1 + accepted / drafts:.2f}  per position "
        + " ".join(f"{p:.2f}" for p in per_pos)
        in counters
    )
    return True


# ---- against a real server -----------------------------------------------------------------
@pytest.mark.asyncio
async def test_dashboard_shows_what_the_server_reported_at_each_poll_under_load(server):
    recorder = Recorder()
    app = TopApp(Client(server.url, KEY, fetch=recorder), interval=3600)
    with Load(server.url):
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.poll_count == 1)  # the poll at start-up
            first_metrics, _ = recorder.last_poll()
            busy_polls = speculating_polls = 0
            for _ in range(40):
                await poll(app, pilot)
                metrics_text, state = recorder.last_poll()
                assert app.last_poll.error is None
                speculating_polls += assert_shows(app, metrics_text, state, first_metrics)
                busy_polls += any(s["state"] == "running" for s in state["sequences"])
                if busy_polls >= 3 and speculating_polls >= 1:
                    break
                await pilot.pause(0.1)
            assert busy_polls >= 3, "the load never showed up as running requests"
            assert speculating_polls >= 1, "no poll saw a speculative step"
            assert app.figures.metrics.generation_tokens > 0


@pytest.mark.asyncio
async def test_dashboard_matches_a_direct_scrape_of_the_idle_server(server):
    with Load(server.url, clients=3):  # some history for the histograms
        deadline = time.monotonic() + WAIT_S
        while samples(server.get("/metrics").text)[("vllm:request_success_total", (("finished_reason", "length"),))] < 3:  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.1)
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + WAIT_S
    while server.get(STATE_PATH, headers=headers).json()["sequences"]:  # aborts are done
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.5)  # the idle engine thread republishes at least once a second

    app = TopApp(Client(server.url, KEY), interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.poll_count == 1)
        await poll(app, pilot)  # a second poll, so that the rates exist (and are zero)
        scrape = samples(server.get("/metrics").text)
        state = server.get(STATE_PATH, headers=headers).json()
        assert_shows(app, server.get("/metrics").text, state, server.get("/metrics").text)
        figures = app.figures
        assert figures.engine.sequences == [] and "running 0/4" in app.query_one("#requests").border_title  # fmt: skip
        # The gauge counts blocks of the JSON map: used ones, shared included.
        assert scrape[("vllm:kv_cache_usage_perc", ())] == figures.engine.num_used / 64
        assert figures.engine.num_used == 0 and figures.engine.num_cached > 0
        assert figures.generation_tps == 0.0
        assert figures.ttft_all.count == scrape[("vllm:time_to_first_token_seconds_count", ())] >= 3  # fmt: skip


@pytest.mark.asyncio
async def test_a_wrong_api_key_is_shown_as_refused(server):
    app = TopApp(Client(server.url, "not-the-key"), interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.poll_count == 1)
        status = app.status_text().plain
        assert f"{server.url} refused the API key (401)" in status
        assert "Traceback" not in status
        # /metrics is open, as in vLLM: its figures still show; the request table does not.
        assert app.figures.engine is None and app.query_one("#requests").row_count == 0
        assert text_of(app, "#counters").startswith("finished ")


@pytest.mark.asyncio
async def test_a_missing_api_key_is_asked_for(server):
    app = TopApp(Client(server.url, None), interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.poll_count == 1)
        assert f"{server.url} needs an API key (401): pass --api-key" in app.status_text().plain


def test_screenshot_script_writes_an_svg_of_the_busy_dashboard(server, tmp_path):
    output = tmp_path / "shot.svg"
    script = ROOT / "scripts" / "screenshot_dashboard.py"
    result = subprocess.run(
        [sys.executable, str(script), "--url", server.url, "--api-key", KEY, "--output",
         str(output), "--polls", "3", "--interval", "0.2", "--clients", "3"],
        capture_output=True, text=True, timeout=90, env=AS_RUN_BY_HAND,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote"), result.stdout  # running requests were on screen
    root = ET.parse(output).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    shown = "".join(root.itertext()).replace("\xa0", " ")
    assert "KV cache" in shown and "running" in shown and "acceptance 100.0%" in shown


# ---- without a server ----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_an_unreachable_server_is_reported_and_the_keys_still_work():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    app = TopApp(Client(url), interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.poll_count >= 3)  # it keeps retrying
        assert app.status_text().plain == f"✖ cannot reach {url}: connection refused — retrying every 0.2s"  # fmt: skip
        assert app.query_one("#status").content.plain == app.status_text().plain

        await pilot.press("p")  # pause: the marker shows and polling stops
        assert app.status_text().plain.startswith(" PAUSED ")
        await pilot.pause(0.3)  # a poll already out may still land
        count = app.poll_count
        await pilot.pause(0.6)
        assert app.poll_count == count
        await pilot.press("p")  # resume
        await wait_for(pilot, lambda: app.poll_count > count)
        assert "PAUSED" not in app.status_text().plain

        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "p        pause / resume" in app.screen.query_one("#help-text").content
        await pilot.press("question_mark")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("question_mark", "escape")
        assert not isinstance(app.screen, HelpScreen)

        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running
    assert app.return_code == 0  # no error screen, no traceback


def canned_metrics(spec: SpecStats | None) -> bytes:
    """/metrics text from the server's own ServerMetrics, with known counters and latencies."""
    stats = EngineStats(
        num_running=1, num_waiting=0, num_blocks=8, num_free_blocks=6, num_cached_free_blocks=1,
        num_preemptions=2, prefix_cache_queries=40, prefix_cache_hits=10, prompt_tokens=100,
        generation_tokens=50, num_finished_requests=4, num_steps=60, spec=spec,
        num_constrained_requests=3, masks=MaskStats(num_seqs=40, num_rows=50, seconds=0.02),
    )  # fmt: skip
    metrics = ServerMetrics("m", lambda: [stats])
    for ttft in (0.03, 0.03, 0.07, 0.2):
        metrics.ttft["0"].observe(ttft)
    return metrics.render()[0]


CANNED_STATE = json.dumps({
    "object": "engine.state", "num_blocks": 8, "block_size": 16, "max_num_seqs": 4,
    "blocks": "uus.c...", "sequences": [{"request_id": "req-7-0", "index": 0, "state": "running",
    "prompt_tokens": 20, "output_tokens": 5, "computed_tokens": 24, "num_blocks": 2, "age_s": 1.25}],
}).encode()  # fmt: skip


class FlakyServer:
    """A fetch that is down (connection refused) or answers with canned bodies. A change of
    `down` takes effect at the next poll (its /metrics fetch), never between the two fetches of
    one poll, so the test never sees a poll that got /metrics but not the state."""

    def __init__(self, spec: SpecStats | None = None) -> None:
        self.down = True
        self.down_this_poll = True
        self.metrics = canned_metrics(spec)

    def __call__(self, url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
        if url.endswith(METRICS_PATH):
            self.down_this_poll = self.down
        if self.down_this_poll:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        return 200, self.metrics if url.endswith(METRICS_PATH) else CANNED_STATE


@pytest.mark.asyncio
async def test_the_dashboard_resumes_when_the_server_comes_back_and_keeps_data_when_it_goes():
    fake = FlakyServer()
    app = TopApp(Client("http://127.0.0.1:9", fetch=fake), interval=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.poll_count >= 2)
        assert "cannot reach http://127.0.0.1:9: connection refused — retrying every 0.1s" in app.status_text().plain  # fmt: skip
        assert app.figures is None

        fake.down = False
        await wait_for(pilot, lambda: app.last_poll.error is None)
        assert app.status_text().plain.startswith("● http://127.0.0.1:9  m  polled ")
        assert text_of(app, "#kv-summary").startswith(
            "used 3/8 (37.5%)  shared 1  cached 1  free 4"
        )
        assert tuple(app.query_one("#requests").get_row_at(0)) == ("req-7-0", "0", "running", "20", "5", "24", "2", "1.2s")  # fmt: skip

        fake.down = True
        await wait_for(pilot, lambda: app.last_poll.error is not None)
        assert "connection refused — retrying every 0.1s (showing data from " in app.status_text().plain  # fmt: skip
        assert text_of(app, "#kv-summary").startswith("used 3/8")  # the last data stays
    # run_test re-raises whatever exception the app met: reaching here means there was none.


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        (None, "speculative decoding: off"),
        (SpecStats(K, num_drafts=10, num_draft_tokens=30, num_accepted_tokens=24, accepted_per_pos=[10, 8, 6]),
         "speculative: acceptance 80.0%  (10 drafts)\nmean length 3.40  per position 1.00 0.80 0.60"),
    ],
)  # fmt: skip
async def test_counters_panel_shows_cache_preemptions_and_speculation(spec, shown):
    fake = FlakyServer(spec)
    fake.down = False
    app = TopApp(Client("http://127.0.0.1:9", fetch=fake), interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.poll_count == 1)
        assert text_of(app, "#counters") == (
            "finished 0  preemptions 2\nprefix-cache hit rate 25.0%\n"
            "structured 3 reqs  masks 0.400 ms/row (50 rows)\n" + shown
        )
        # TTFT 0.03, 0.03, 0.07, 0.2 s: p50 in (0.02, 0.04], p90 and p99 in (0.1, 0.25].
        assert "TTFT all    40.0ms  190.0ms  244.0ms      4" in text_of(app, "#latency")
        assert "TTFT 1m          -        -        -      0" in text_of(app, "#latency")


def test_histogram_quantile_interpolates_inside_buckets_as_prometheus_does():
    hist = Histogram([(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (float("inf"), 10.0)], 10.0, 5.0)
    assert histogram_quantile(0.1, hist) == pytest.approx(0.05)  # rank 1 of 2 in (0, 0.1]
    assert histogram_quantile(0.5, hist) == pytest.approx(0.4)  # rank 5: 3 of 4 in (0.1, 0.5]
    assert histogram_quantile(0.75, hist) == pytest.approx(0.875)  # rank 7.5 in (0.5, 1]
    assert histogram_quantile(0.9, hist) == 1.0  # in the +Inf bucket: the largest finite bound
    assert histogram_quantile(0.5, Histogram([(0.1, 0.0), (float("inf"), 0.0)], 0, 0)) is None


def test_parse_metrics_reads_vllm_names_and_spec_counters():
    spec = SpecStats(K, num_drafts=4, num_draft_tokens=12, num_accepted_tokens=7, accepted_per_pos=[4, 2, 1])  # fmt: skip
    sample = parse_metrics(canned_metrics(spec).decode())
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (1, 0, 0.25)
    assert (sample.prompt_tokens, sample.generation_tokens, sample.preemptions) == (100, 50, 2)
    assert (sample.prefix_cache_queries, sample.prefix_cache_hits) == (40, 10)
    assert sample.finished == {"stop": 0, "length": 0, "abort": 0, "error": 0}
    assert (sample.constrained_requests, sample.mask_rows, sample.mask_seconds) == (3, 50, 0.02)
    assert sample.ttft.count == 4 and sample.tpot.count == 0
    assert (sample.spec.num_drafts, sample.spec.num_draft_tokens, sample.spec.num_accepted_tokens) == (4, 12, 7)  # fmt: skip
    assert sample.spec.accepted_per_pos == [4, 2, 1]
    assert parse_metrics(canned_metrics(None).decode()).spec is None


def vllm_exposition(kv_name: str, latency_name: str) -> str:
    """/metrics in vLLM V1's shape (names, help, labels as vllm/v1/metrics/loggers.py writes
    them) from a data-parallel server with two engines; `kv_name` and `latency_name` are the
    KV-usage gauge and the per-token latency histogram of the vLLM version imitated."""
    rows = []
    for engine, (running, waiting, kv, prompt) in enumerate(((3, 1, 0.5, 100), (1, 0, 0.25, 40))):
        labels = f'model_name="meta-llama/Llama-3.1-8B",engine="{engine}"'
        rows += [
            f"vllm:num_requests_running{{{labels}}} {running}.0",
            f"vllm:num_requests_waiting{{{labels}}} {waiting}.0",
            f"{kv_name}{{{labels}}} {kv}",
            f"vllm:prompt_tokens_total{{{labels}}} {prompt}.0",
            f'vllm:request_success_total{{{labels},finished_reason="stop"}} 2.0',
            f'{latency_name}_bucket{{{labels},le="0.01"}} 1.0',
            f'{latency_name}_bucket{{{labels},le="0.025"}} 3.0',
            f'{latency_name}_bucket{{{labels},le="+Inf"}} 4.0',
            f"{latency_name}_count{{{labels}}} 4.0",
            f"{latency_name}_sum{{{labels}}} 0.07",
        ]
    types = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
             kv_name: "gauge", "vllm:prompt_tokens": "counter", "vllm:request_success": "counter",
             latency_name: "histogram"}  # fmt: skip
    head = [f"# HELP {name} (vLLM's text)\n# TYPE {name} {kind}" for name, kind in types.items()]
    by_family = {name: [r for r in rows if r.startswith(name)] for name in types}
    return (
        "\n".join(h + "\n" + "\n".join(by_family[n]) for h, n in zip(head, types, strict=True))
        + "\n"
    )


@pytest.mark.parametrize(
    ("kv_name", "latency_name"),
    [
        ("vllm:kv_cache_usage_perc", "vllm:inter_token_latency_seconds"),  # vLLM 0.11 on
        ("vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds"),  # vLLM 0.8
    ],
)
def test_parse_metrics_reads_a_vllm_servers_exposition(kv_name, latency_name):
    sample = parse_metrics(vllm_exposition(kv_name, latency_name))
    assert (sample.running, sample.waiting, sample.prompt_tokens) == (4, 1, 140)  # engines add up
    assert sample.kv_cache_usage == pytest.approx(0.375)  # the engines' mean
    assert sample.finished == {"stop": 4}
    assert sample.tpot.count == 8 and sample.tpot.buckets == [(0.01, 2), (0.025, 6), (float("inf"), 8)]  # fmt: skip
    assert sample.model_name == "meta-llama/Llama-3.1-8B"


def test_top_command_does_not_load_textual_until_it_runs():
    code = (
        "import argparse, sys; from nanovllm.tui.cli import add_top_parser; "
        "p = argparse.ArgumentParser(); add_top_parser(p.add_subparsers(dest='c')); "
        "a = p.parse_args(['top', '--url', 'h:1', '--interval', '2']); "
        "assert (a.url, a.interval, a.api_key) == ('h:1', 2.0, None); "
        "assert 'textual' not in sys.modules, 'textual was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_non_finite_metric_is_a_parse_error_not_a_crash():
    # A NaN counter would poison the rates and crash the sparkline while drawing.
    line = 'vllm:prompt_tokens_total{engine="0",model_name="m"} '
    text = canned_metrics(None).decode().replace(line + "100.0", line + "NaN")
    assert line + "NaN" in text
    with pytest.raises(ValueError, match="vllm:prompt_tokens_total is nan"):
        parse_metrics(text)


# ---- data-parallel replicas ------------------------------------------------------------------
def _seq(request_id: str, state: str) -> dict:
    return {"request_id": request_id, "index": 0, "state": state, "prompt_tokens": 9,
            "output_tokens": 3, "computed_tokens": 11, "num_blocks": 1, "age_s": 0.5}  # fmt: skip


def _replica(engine: str, status: str, blocks: str, sequences: list[dict]) -> dict:
    return {"engine": engine, "status": status, "restarts": int(engine), "outstanding": len(sequences),
            "num_blocks": len(blocks), "blocks": blocks, "sequences": sequences, "pid": 100 + int(engine),
            "node": "n", "error": None, "polled": 0.0}  # fmt: skip


# The shape RayEngineClient.state() answers with (nanovllm/distributed/ray_client.py).
DP_REPLICAS = [
    _replica("0", "up", "uu.c....", [_seq("req-1-0", "running"), _seq("req-2-0", "waiting")]),
    _replica("1", "restarting", "s.......", [_seq("req-3-0", "running")]),
]
CANNED_DP_STATE = json.dumps({
    "object": "engine.state", "data_parallel_size": 2, "num_blocks": 16, "block_size": 16,
    "max_num_seqs": 4, "blocks": "uu.c....s.......",
    "sequences": [s for r in DP_REPLICAS for s in r["sequences"]], "replicas": DP_REPLICAS,
    "router": {"outstanding": [2, 1], "recent_decisions": []},
}).encode()  # fmt: skip


def canned_dp_metrics() -> bytes:
    used = [0.25, 0.75]
    stats = [EngineStats(1, 0, 8, 8 - int(8 * u), 0, 0, 0, 0, 10, 5, 1, 3) for u in used]
    return ServerMetrics("m", lambda: stats, num_engines=2).render()[0]


@pytest.mark.asyncio
async def test_replicas_are_shown_side_by_side_with_their_status_and_requests():
    def fetch(url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
        return 200, canned_dp_metrics() if url.endswith(METRICS_PATH) else CANNED_DP_STATE

    app = TopApp(Client("http://127.0.0.1:9", fetch=fetch), interval=3600)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.poll_count == 1)
        assert app.figures.metrics.kv_cache_usage == 0.5  # the replicas' mean, not their sum
        assert app.query_one("#kv").border_title == "KV cache · 2 replicas × 8 blocks × 16 tokens"
        lines = app.query_one("#kv-map", BlockMap).render().plain.splitlines()
        title, load, cells = lines[2:5]  # after the usage bar and the legend
        right = title.index("engine 1 restarting")
        assert title.startswith("engine 0 up") and right > len("engine 0 up")
        assert load.startswith("1 run · 1 wait") and load[right:] == "1 run · 0 wait · 1 restarts"
        assert cells.startswith("".join(BLOCK_GLYPHS[ch][0] for ch in "uu.c...."))
        assert cells[right:] == "".join(BLOCK_GLYPHS[ch][0] for ch in "s.......")
        table = app.query_one("#requests")
        assert [table.get_row_at(i)[0] for i in range(table.row_count)] == [
            "req-1-0 @0", "req-3-0 @1", "req-2-0 @0",
        ]  # fmt: skip
