"""The start-up self-check (nanovllm/backends/self_check.py) on the emulated device: what it covers
(the kernels, linear() on each path and embedding() for the formats in use, one step of the
real model against the reference backend), that a model step giving other numbers stops the
engine, and how its pass is remembered (keyed by versions and model files; an unwritable cache
only means checking again)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from _gguf_fixtures import write_quantized_qwen2

from nanovllm.backends import self_check
from nanovllm.backends.cuda import CUDABackend
from nanovllm.backends.kernel_cases import CheckResult
from nanovllm.backends.self_check import LoadedForCheck, model_step_check, self_check_results
from nanovllm.errors import NanovllmError
from nanovllm.models.loader import build_model, load_checkpoint


def loaded_on(backend: CUDABackend, path: str) -> LoadedForCheck:
    checkpoint = load_checkpoint(path)
    return LoadedForCheck(build_model(checkpoint, backend, 64), checkpoint, path)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[CUDABackend, LoadedForCheck]:
    """The tiny Qwen2 GGUF of mixed formats (Q8_0, Q6_K, Q5_0, Q4_1, Q4_K) in float16."""
    path = str(write_quantized_qwen2(tmp_path_factory.mktemp("gguf") / "mix.gguf"))
    backend = CUDABackend("float16", emulated=True)
    return backend, loaded_on(backend, path)


def test_it_checks_the_formats_and_paths_in_use_and_a_step_of_the_model(quantized):
    backend, loaded = quantized
    results = self_check_results(backend, [32], [loaded])
    failed = [(r.name, r.detail) for r in results if not r.passed]
    assert failed == []
    names = {r.name for r in results}
    for fmt in ("Q8_0", "Q6_K", "Q5_0", "Q4_1", "Q4_K"):  # decode kernel, linear paths, lookup
        assert {
            f"matmul {fmt} float16",
            f"linear {fmt} float16",
            f"embedding {fmt} float16",
        } <= names
    assert {"linear float16", "embedding float16", "linear fused Q4_1+Q4_K float16"} <= names
    assert not any("Q5_1" in name or "float32" in name for name in names)  # not in use
    assert "paged_attention d32 float16" in names
    assert f"{loaded.source}: one step against the reference (float16)" in names


def test_a_model_step_that_differs_from_the_reference_stops_the_engine(
    quantized, monkeypatch, tmp_path
):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    backend, loaded = quantized
    monkeypatch.setattr(loaded.model, "norm", loaded.model.norm * np.float16(1.5))
    result = model_step_check(backend, loaded)
    assert not result.passed and "relative logits error" in result.detail
    with pytest.raises(NanovllmError, match="one step against the reference"):
        self_check.startup_self_check(backend, [32], [loaded])
    assert not (tmp_path / "selfcheck").exists()  # a failure is not remembered


def test_float16_overflow_in_the_model_step_names_its_layer(checkpoint_factory):
    backend = CUDABackend("float16", emulated=True)
    loaded = loaded_on(backend, str(checkpoint_factory("llama3")))
    mlp = loaded.model.layers[1].mlp
    for weight in (mlp.gate_up, mlp.down):
        weight *= np.float16(100)  # activations 10^4 larger in that layer: past float16
    result = model_step_check(backend, loaded)
    assert not result.passed
    assert "after model.layers.1" in result.detail and "--dtype float32" in result.detail


def counting(monkeypatch) -> list:
    calls = []
    passing = [CheckResult("rotary float16", True, "")]
    monkeypatch.setattr(
        self_check, "self_check_results", lambda *args: calls.append(args) or passing
    )
    return calls


def test_a_pass_is_remembered_per_versions_and_model_files(monkeypatch, tmp_path, quantized):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    calls = counting(monkeypatch)
    backend, loaded = quantized
    self_check.startup_self_check(backend, [32], [loaded])
    self_check.startup_self_check(backend, [32], [loaded])
    assert len(calls) == 1
    versions = {"cupy": "14.2.0", "nvrtc": "12.9", "runtime": "12090", "driver": "13000"}
    monkeypatch.setattr(self_check, "device_versions", lambda backend: versions)
    self_check.startup_self_check(backend, [32], [loaded])
    versions["driver"] = "13010"  # a driver update: check again
    self_check.startup_self_check(backend, [32], [loaded])
    assert len(calls) == 3
    stat = os.stat(loaded.source)  # the model file changed: check again
    os.utime(loaded.source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    self_check.startup_self_check(backend, [32], [loaded])
    assert len(calls) == 4
    assert len(list((tmp_path / "cache" / "selfcheck").iterdir())) == 4


def test_an_unwritable_cache_only_means_checking_again(monkeypatch, tmp_path, caplog):
    (tmp_path / "home").write_text("a file where the cache directory would go")
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "home" / "nanovllm"))
    calls = counting(monkeypatch)
    backend = CUDABackend("float16", emulated=True)
    with caplog.at_level(logging.INFO, logger="nanovllm.engine"):
        self_check.startup_self_check(backend, [64])
        self_check.startup_self_check(backend, [64])
    assert len(calls) == 2
    assert "could not remember the self-check's pass" in caplog.text


def test_building_an_engine_checks_the_target_and_the_draft_where_the_backend_asks(
    checkpoint_factory, monkeypatch
):
    from nanovllm import LLM
    from nanovllm.backends.cpu_reference import ReferenceBackend

    calls = []

    def record(backend, head_dims, loaded):
        calls.append(
            (head_dims, [(item.source, item.checkpoint.config.head_dim) for item in loaded])
        )

    monkeypatch.setattr(ReferenceBackend, "needs_startup_check", True)
    monkeypatch.setattr(self_check, "startup_self_check", record)
    target, draft = str(checkpoint_factory("llama3")), str(checkpoint_factory("gemma2"))
    LLM(target, device="cpu-reference", num_blocks=16, block_size=4)
    LLM(target, device="cpu-reference", num_blocks=16, block_size=4, speculative_method="draft",
        draft_model=draft)  # fmt: skip
    dims = {path: load_checkpoint(path).config.head_dim for path in (target, draft)}
    assert calls == [
        ([dims[target]], [(target, dims[target])]),
        (sorted(set(dims.values())), [(target, dims[target]), (draft, dims[draft])]),
    ]
