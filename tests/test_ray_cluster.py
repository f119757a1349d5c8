"""`nanovllm serve --ray-address ADDR` joins a Ray cluster that `ray start --head` started, as on
a cluster's head node (README, "Scaling out"), and leaves it as it found it.

One `ray start --head --block` for the module, stopped at the end through its own process (never
`ray stop`, which would stop every Ray instance of this user on the machine). Token
authentication is off for this test cluster (RAY_AUTH_MODE=disabled for the head and the
server: the mode must be the same on every node and driver), so no token file is needed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _server_fixtures import free_port, start_server
from test_data_parallel import alive, complete, descendants, greedy, state, token_prompt

from nanovllm import LLM

START_TIMEOUT_S = 240.0


AUTH = {"RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, the `ray start` process) of a one-node cluster with 2 CPUs."""
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    ray = Path(sys.executable).parent / "ray"
    command = [str(ray), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
               "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **AUTH})  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while "block forever" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    # What it tells other nodes to run: ray start --address='IP:PORT'
    address = re.search(r"ray start --address='([^']+)'", log.read_text()).group(1)
    yield address, proc
    processes = descendants(proc.pid) | {proc.pid}
    proc.send_signal(signal.SIGINT)  # `ray start --block` stops what it started
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in processes:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_server_joins_the_cluster_and_leaves_it_running(cluster, checkpoint_factory, tmp_path):
    address, head = cluster
    checkpoint = checkpoint_factory("llama3")
    core = {p for p in descendants(head.pid) if _name(p) in ("raylet", "gcs_server")}
    assert len(core) == 2
    server = start_server(
        checkpoint, tmp_path, "--data-parallel-size", "2", "--ray-address", address,
        env=AUTH, start_timeout=START_TIMEOUT_S,
    )  # fmt: skip
    try:
        replicas = state(server)["replicas"]
        # The replicas are workers of the cluster's raylet, not processes of the server.
        pids = {r["pid"] for r in replicas}
        assert pids <= descendants(head.pid) and not pids & descendants(server.proc.pid)
        prompt = token_prompt(24, seed=5)
        assert complete(server, prompt, 8, stream=True) == greedy(LLM(str(checkpoint), device="cpu"), [prompt], 8)[0]  # fmt: skip
        assert re.search(r"joined Ray \(", server.log())
    finally:
        assert server.stop() == 0, server.log()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids):  # the server's replicas ended with it...
        assert time.monotonic() < deadline, "a replica outlived its server"
        time.sleep(0.1)
    assert all(alive(pid) for pid in core)  # ...and the cluster runs on
    assert head.poll() is None


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_a_start_up_wait_ends_in_one_line_for_a_deadline_or_a_dead_actor():
    import ray

    from nanovllm.distributed.ray_runtime import get_within
    from nanovllm.errors import NanovllmError

    ray.init(address="local", num_cpus=1, include_dashboard=False, namespace="test_get_within")
    try:

        @ray.remote
        class Broken:
            def __init__(self):
                raise ValueError("checkpoint model.gguf is truncated")

            def ping(self):
                return 1

        @ray.remote
        def slow():
            time.sleep(30)

        with pytest.raises(NanovllmError, match=r"^no answer in time$"):
            get_within(ray, slow.remote(), 0.5, "no answer in time", "unused")
        with pytest.raises(NanovllmError) as error:
            get_within(ray, Broken.remote().ping.remote(), 60, "unused", "a rank failed to start")
        assert (
            str(error.value)
            == "a rank failed to start: ValueError: checkpoint model.gguf is truncated"
        )
    finally:
        ray.shutdown()
