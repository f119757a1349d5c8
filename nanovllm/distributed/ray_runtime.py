"""Joining a Ray cluster or starting a private one, and leaving it as it was found.

`ray` is an optional dependency (`pip install 'nanovllm[distributed]'`), imported here and only
when a front end asks for replicas or GPU ranks. Without an address a new local instance is
started for this process alone (Ray's `address="local"`, which may also be given: never a
cluster someone else started) and stopped when the process leaves; with one (`ray start --head` printed it; "auto" finds the
cluster started on this machine) the process joins as a driver, and leaving only disconnects:
its actors, owned by this driver, end with it.
"""

from __future__ import annotations

import logging
from typing import Any

from nanovllm.errors import NanovllmError

logger = logging.getLogger("nanovllm.distributed")
NAMESPACE = "nanovllm"  # named actors (replicas) live here


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise NanovllmError(
            "data and tensor parallelism across processes need Ray: "
            "pip install 'nanovllm[distributed]'"
        ) from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local instance; True when this process started
    Ray (and `disconnect` must stop it). A process already connected stays as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    local = address in (None, "local")
    options = dict(namespace=NAMESPACE, include_dashboard=False, logging_level=logging.WARNING)
    try:
        ray.init(address="local" if local else address, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray instance" if local else f"the Ray cluster at {address}"
        raise NanovllmError(f"could not start or join {where}: {e}") from None
    logger.info(
        "%s Ray (%s): %s",
        "started a local" if local else "joined",
        ray.get_runtime_context().gcs_address,
        _resources(ray.cluster_resources()),
    )
    return local


def disconnect(started_here: bool) -> None:
    """Leave Ray: stop it if this process started it (its processes exit with it)."""
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()
    if started_here:
        logger.info("stopped the local Ray instance")


def _resources(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or k.startswith("node:")}
    nodes = sum(1 for k in shown if k.startswith("node:") and not k.startswith("node:__"))
    return f"{nodes} node(s), {shown.get('CPU', 0):g} CPUs, {shown.get('GPU', 0):g} GPUs"


def get_within(ray: Any, refs: Any, timeout_s: float, late: str, failed: str) -> Any:
    """ray.get with a deadline: NanovllmError(late) when it passes, and NanovllmError(failed:
    the cause's line) when an actor died (a creation task that raised, a process killed)."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise NanovllmError(late) from None
    except ray.exceptions.RayActorError as e:
        raise NanovllmError(f"{failed}: {cause(e)}") from None


def cause(error: Exception) -> str:
    """The line that says what happened, without Ray's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):  # a creation task's own exception comes last
        if ": " in line and not line.startswith(("File ", "Traceback")):
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]
