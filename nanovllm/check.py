"""`nanovllm check`: are the CUDA kernels sound here? Also the engine's start-up self-check.

On a GPU: compile every kernel with NVRTC for the device (registers and spills from ptxas), run
each against the NumPy reference (nanovllm/backends/cpu.py) on random inputs in float32,
float16 and bfloat16, and run a tiny random model greedily on the GPU and on the CPU. Without
a GPU: compile for sm_80 and sm_90 and say that the runtime checks need a GPU, or run them on
the CPU emulator with --emulated.

The op cases below (case_*) are also what tests/test_kernels.py runs through the emulator.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nanovllm.backends.base import AttentionMetadata
from nanovllm.backends.cpu import CPUBackend
from nanovllm.backends.cuda import CUDABackend, from_storage, to_storage
from nanovllm.backends.kernel_library import ATTENTION_HEAD_DIMS, sources_digest
from nanovllm.errors import NanovllmError

DTYPES = ("float32", "float16", "bfloat16")
# (atol, rtol) against the float32 reference computed on the same rounded inputs: about two
# units in the last place of the output dtype (float16 2^-10, bfloat16 2^-7 near 1).
TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}

Results = tuple[list[np.ndarray], list[np.ndarray]]  # (kernel outputs, reference), float32


@dataclass(slots=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


# ---- op cases: random inputs, the backend's result and the NumPy reference ------------------
def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale=1.0):
    """Float32 values exactly representable in dtype, so kernel and reference see the same input."""
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    return from_storage(to_storage(values, dtype))


def _device(backend, x: np.ndarray, dtype: str):
    return backend.asarray(to_storage(x, dtype))


def _host(backend, x) -> np.ndarray:
    return from_storage(backend.to_numpy(x))


def case_rms_norm(backend, dtype, rng, tokens=5, hidden=96, residual=False) -> Results:
    x = _random(rng, (tokens, hidden), dtype)
    weight = _random(rng, (hidden,), dtype) * 0.5 + 1.0
    weight = from_storage(to_storage(weight, dtype))
    res = _random(rng, (tokens, hidden), dtype) if residual else None
    ref = CPUBackend().rms_norm(x, weight, 1e-5, res)
    dev_res = _device(backend, res, dtype) if residual else None
    out = backend.rms_norm(
        _device(backend, x, dtype), _device(backend, weight, dtype), 1e-5, dev_res
    )
    return [_host(backend, a) for a in out], list(ref)


def _qkv(rng, dtype, tokens, heads, kv_heads, head_dim) -> np.ndarray:
    return _random(rng, (tokens, (heads + 2 * kv_heads) * head_dim), dtype)


def _views(qkv, heads, kv_heads, head_dim):
    """q, k, v sliced from a fused qkv output the way models/llama.py does: strided views."""
    tokens, q_size, kv_size = qkv.shape[0], heads * head_dim, kv_heads * head_dim
    return (
        qkv[:, :q_size].reshape(tokens, heads, head_dim),
        qkv[:, q_size : q_size + kv_size].reshape(tokens, kv_heads, head_dim),
        qkv[:, q_size + kv_size :].reshape(tokens, kv_heads, head_dim),
    )


def case_head_norm(backend, dtype, rng, tokens=3, heads=4, kv_heads=2, head_dim=32) -> Results:
    """Qwen3's per-head q norm, on a strided view of the fused qkv output."""
    qkv = _qkv(rng, dtype, tokens, heads, kv_heads, head_dim)
    weight = from_storage(to_storage(rng.uniform(0.5, 1.5, head_dim).astype(np.float32), dtype))
    q_ref, _, _ = _views(qkv, heads, kv_heads, head_dim)
    q_dev, _, _ = _views(_device(backend, qkv, dtype), heads, kv_heads, head_dim)
    out, _ = backend.rms_norm(q_dev, _device(backend, weight, dtype), 1e-6)
    return [_host(backend, out)], [CPUBackend().rms_norm(q_ref, weight, 1e-6)[0]]


def case_rotary(backend, dtype, rng, tokens=5, heads=4, kv_heads=2, head_dim=32) -> Results:
    from nanovllm.models.rope import rope_cos_sin

    qkv = _qkv(rng, dtype, tokens, heads, kv_heads, head_dim)
    table = rope_cos_sin(head_dim, 10000.0, 64, None)
    positions = rng.integers(0, 64, tokens).astype(np.int64)
    q_ref, k_ref, _ = _views(qkv, heads, kv_heads, head_dim)
    q_dev, k_dev, _ = _views(_device(backend, qkv, dtype), heads, kv_heads, head_dim)
    out = backend.rotary(q_dev, k_dev, backend.asarray(positions), backend.asarray(table))
    ref = CPUBackend().rotary(q_ref, k_ref, positions, table)
    return [_host(backend, a) for a in out], list(ref)


def case_silu_and_mul(backend, dtype, rng, tokens=5, width=80) -> Results:
    x = _random(rng, (tokens, 2 * width), dtype, scale=3.0)
    out = backend.silu_and_mul(_device(backend, x, dtype))
    return [_host(backend, out)], [CPUBackend().silu_and_mul(x)]


def case_gelu_tanh_and_mul(backend, dtype, rng, tokens=5, width=80) -> Results:
    x = _random(rng, (tokens, 2 * width), dtype, scale=3.0)
    out = backend.gelu_tanh_and_mul(_device(backend, x, dtype))
    return [_host(backend, out)], [CPUBackend().gelu_tanh_and_mul(x)]


def _router_logits(rng, dtype, tokens: int, experts: int) -> np.ndarray:
    """Logits whose values differ by at least 0.25 within a row (exact in every dtype), so that
    rounding in the kernel's softmax cannot reorder experts."""
    rows = [rng.permutation(experts) * 0.25 - experts * 0.125 for _ in range(tokens)]
    return from_storage(to_storage(np.array(rows, dtype=np.float32), dtype))


def case_moe_route(backend, dtype, rng, tokens=7, experts=40, top_k=4, renormalize=True) -> Results:
    logits = _router_logits(rng, dtype, tokens, experts)
    weights, ids = backend.moe_route(_device(backend, logits, dtype), top_k, renormalize)
    ref_weights, ref_ids = CPUBackend().moe_route(logits, top_k, renormalize)
    got = [backend.to_numpy(weights), backend.to_numpy(ids).astype(np.float32)]
    return got, [ref_weights, ref_ids.astype(np.float32)]


def case_moe_experts(
    backend, dtype, rng, tokens=21, experts=6, top_k=2, hidden=48, width=40
) -> Results:
    """Uneven routing: expert e is drawn with probability ~ 2^-e, the last one never, so tiles
    are full, partial and absent; each token's experts are distinct."""
    x = _random(rng, (tokens, hidden), dtype)
    gate_up = _random(rng, (experts, 2 * width, hidden), dtype, scale=hidden**-0.5)
    down = _random(rng, (experts, hidden, width), dtype, scale=width**-0.5)
    odds = 2.0 ** -np.arange(experts - 1)
    ids = np.array(
        [rng.choice(experts - 1, top_k, replace=False, p=odds / odds.sum()) for _ in range(tokens)],
        dtype=np.int32,
    )
    weights = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    ref = CPUBackend().moe_experts(x, gate_up, down, weights, ids)
    dev = [_device(backend, a, dtype) for a in (x, gate_up, down)]
    out = backend.moe_experts(*dev, backend.asarray(weights), backend.asarray(ids))
    return [_host(backend, out)], [ref]


def case_write_kv(
    backend, dtype, rng, tokens=6, kv_heads=2, head_dim=32, block_size=4, num_blocks=5
) -> Results:
    qkv = _qkv(rng, dtype, tokens, kv_heads, kv_heads, head_dim)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [_random(rng, shape, dtype), _random(rng, shape, dtype)]
    slots = rng.permutation(num_blocks * block_size)[:tokens].astype(np.int64)
    _, k_ref, v_ref = _views(qkv, kv_heads, kv_heads, head_dim)
    _, k_dev, v_dev = _views(_device(backend, qkv, dtype), kv_heads, kv_heads, head_dim)
    dev_caches = [_device(backend, c, dtype) for c in caches]
    backend.write_kv(k_dev, v_dev, *dev_caches, backend.asarray(slots))
    CPUBackend().write_kv(k_ref, v_ref, *caches, slots)
    return [_host(backend, c) for c in dev_caches], caches


def attention_metadata(
    rng, seqs: Sequence[tuple[int, int]], block_size: int, to_device: Callable
) -> tuple[AttentionMetadata, int]:
    """Metadata for sequences given as (query_len, context_len), their blocks scattered over
    the cache in random order. Returns it and the number of cache blocks needed."""
    needed = [-(-context // block_size) for _, context in seqs]
    num_blocks = sum(needed) + 1  # one block no sequence owns
    ids = iter(rng.permutation(num_blocks).astype(np.int32))
    tables = np.zeros((len(seqs), max(needed)), dtype=np.int32)
    for row, count in enumerate(needed):
        tables[row, :count] = [next(ids) for _ in range(count)]
    query_start = np.concatenate(([0], np.cumsum([q for q, _ in seqs]))).astype(np.int32)
    context_lens = np.array([c for _, c in seqs], dtype=np.int32)
    positions = np.concatenate([np.arange(c - q, c) for q, c in seqs])
    slots = tables[np.repeat(np.arange(len(seqs)), [q for q, _ in seqs]), positions // block_size]
    meta = AttentionMetadata(
        slot_mapping=to_device(slots.astype(np.int64) * block_size + positions % block_size),
        block_tables=to_device(tables),
        query_start=to_device(query_start),
        context_lens=to_device(context_lens),
        block_size=block_size,
        query_start_host=query_start,
        context_lens_host=context_lens,
        block_tables_host=tables,
    )
    return meta, num_blocks


def case_paged_attention(
    backend,
    dtype,
    rng,
    seqs: Sequence[tuple[int, int]] = ((4, 9), (1, 7), (3, 3)),
    heads=4,
    kv_heads=2,
    head_dim=32,
    block_size=4,
    window=0,
    soft_cap=0.0,
) -> Results:
    """Sequences as (query_len, context_len): prefill, chunked prefill, decode, verification;
    optionally a sliding window and soft-capped scores (Gemma)."""
    meta, num_blocks = attention_metadata(rng, seqs, block_size, backend.asarray)
    tokens = int(meta.query_start_host[-1])
    shape = (num_blocks, block_size, kv_heads, head_dim)
    # Queries scaled up so the online softmax has to rescale as larger scores turn up.
    q = _random(rng, (tokens, heads, head_dim), dtype, scale=2.0)
    k_cache, v_cache = _random(rng, shape, dtype), _random(rng, shape, dtype)
    scale = 1.0 / np.sqrt(head_dim)
    # The reference reads only the host copies of the metadata.
    ref = CPUBackend().paged_attention(q, k_cache, v_cache, meta, scale, window, soft_cap)
    out = backend.paged_attention(
        _device(backend, q, dtype),
        _device(backend, k_cache, dtype),
        _device(backend, v_cache, dtype),
        meta,
        scale,
        window,
        soft_cap,
    )
    return [_host(backend, out)], [ref]


def compare(got: list[np.ndarray], want: list[np.ndarray], dtype: str) -> tuple[bool, float]:
    """All arrays within the dtype's tolerance; also the worst error relative to the tolerance."""
    atol, rtol = TOLERANCES[dtype]
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return False, float("inf")
        excess = np.abs(g - w) / (atol + rtol * np.abs(w))
        worst = max(worst, float(np.nan_to_num(excess, nan=np.inf).max(initial=0.0)))
    return worst <= 1.0, worst


# ---- runtime checks ------------------------------------------------------------------------
def kernel_checks(
    backend: CUDABackend,
    dtypes: Sequence[str] = DTYPES,
    head_dims: Sequence[int] = ATTENTION_HEAD_DIMS,
    seed: int = 0,
) -> list[CheckResult]:
    """Every kernel entry point for the given dtypes and head dims, against the NumPy reference."""
    cases: list[tuple[str, Callable[..., Results], dict]] = [
        ("rms_norm", case_rms_norm, {}),
        ("add_rms_norm", case_rms_norm, {"residual": True}),
        ("rms_norm per head", case_head_norm, {}),
        ("rotary", case_rotary, {}),
        ("silu_and_mul", case_silu_and_mul, {}),
        ("gelu_tanh_and_mul", case_gelu_tanh_and_mul, {}),
        ("write_kv", case_write_kv, {}),
        ("moe_route", case_moe_route, {}),
        ("moe_experts", case_moe_experts, {}),
    ]
    windowed = {"head_dim": head_dims[0], "block_size": 16, "seqs": ((5, 40), (1, 150), (2, 2))}
    windowed |= {"window": 37, "soft_cap": 2.0}
    cases.append((f"paged_attention window d{head_dims[0]}", case_paged_attention, windowed))
    for head_dim in head_dims:
        kwargs = {"head_dim": head_dim, "block_size": 16, "seqs": ((5, 40), (1, 150), (2, 2))}
        cases.append((f"paged_attention d{head_dim}", case_paged_attention, kwargs))
    results = []
    for dtype in dtypes:
        for name, case, kwargs in cases:
            rng = np.random.default_rng(seed)
            try:
                ok, worst = compare(*case(backend, dtype, rng, **kwargs), dtype)
                detail = f"max error {worst:.2f} x tolerance"
            except Exception as exc:  # a launch failure is a failed check, not a crash
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            results.append(CheckResult(f"{name} {dtype}", ok, detail))
    return results


def tiny_checkpoint(seed: int = 0):
    """A random Llama with GQA and head_dim 64, built in memory: no files, no tokenizer. Weights
    are drawn large enough that greedy tokens are decisive, not near-ties."""
    from nanovllm.models.loader import Checkpoint
    from nanovllm.models.model_config import ModelConfig

    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128,
        intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
        rms_norm_eps=1e-5, max_position_embeddings=64,
    )  # fmt: skip
    rng = np.random.default_rng(seed)

    def dense(rows: int, cols: int, std: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return rng.uniform(0.5, 1.5, size).astype(np.float32)

    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
    tensors = {
        "model.embed_tokens.weight": dense(config.vocab_size, hidden, 0.5),
        "model.norm.weight": norm(hidden),
        "lm_head.weight": dense(config.vocab_size, hidden, 4.0 / np.sqrt(hidden)),
    }
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (q_rows, hidden),
            "self_attn.k_proj.weight": (kv_rows, hidden),
            "self_attn.v_proj.weight": (kv_rows, hidden),
            "self_attn.o_proj.weight": (hidden, q_rows),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        for key, (rows, cols) in shapes.items():
            tensors[prefix + key] = dense(rows, cols, 1.5 / np.sqrt(cols))
        tensors[prefix + "input_layernorm.weight"] = norm(hidden)
        tensors[prefix + "post_attention_layernorm.weight"] = norm(hidden)
    return Checkpoint(config, None, {}, lambda: iter(tensors.items()))


def greedy_margins(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Top-1 minus top-2 logit at each step of a greedy path (model: a LoadedModel)."""
    logits = model.logits(prompt + tokens[:-1])[len(prompt) - 1 :]
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def decisive_prefix(margins: np.ndarray, logits_error: float) -> int:
    """How many greedy steps must agree: up to the first step whose top-2 margin on the CPU is
    within twice the measured logits error, where rounding may pick either token."""
    close = np.flatnonzero(margins <= 2 * logits_error)
    return int(close[0]) if len(close) else len(margins)


def model_check(backend: CUDABackend, new_tokens: int = 8, seed: int = 0) -> CheckResult:
    """Greedy tokens of the tiny model on the backend and on the CPU must agree, up to the first
    near-tie that float16 rounding may break either way."""
    from nanovllm.models.loader import LoadedModel

    checkpoint = tiny_checkpoint(seed)
    prompt = np.random.default_rng(seed).integers(3, 256, 12).tolist()
    name = f"tiny model greedy {backend.dtype.name}"
    try:
        device = LoadedModel(checkpoint, backend, 64)
        cpu = LoadedModel(checkpoint, CPUBackend(), 64)
        logits_error = float(np.abs(device.logits(prompt) - cpu.logits(prompt)).max())
        got, want = device.greedy(prompt, new_tokens), cpu.greedy(prompt, new_tokens)
        must_agree = decisive_prefix(greedy_margins(cpu, prompt, want), logits_error)
    except Exception as exc:
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}")
    same = sum(g == w for g, w in zip(got, want, strict=True))
    detail = (
        f"{same}/{new_tokens} tokens as on the CPU ({must_agree} before any near-tie); "
        f"logits max diff {logits_error:.3g}"
    )
    passed = got[:must_agree] == want[:must_agree] and logits_error < 0.25
    return CheckResult(name, passed, detail)


# ---- start-up self-check -------------------------------------------------------------------
def device_arch(backend: CUDABackend) -> str:
    """sm_XY of the current GPU, or "emulated"."""
    if backend.emulated:
        return "emulated"
    import cupy

    return f"sm_{cupy.cuda.Device().compute_capability}"


def device_name(backend: CUDABackend) -> str:
    if backend.emulated:
        return "CUDA emulator (CPU)"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def startup_self_check(backend: CUDABackend, head_dim: int | None = None) -> None:
    """Check the kernels the engine will use once per (kernel sources, GPU arch, dtype): a
    kernel that gives wrong numbers on this GPU stops the engine with a clear message, instead
    of serving garbage. Passing runs are remembered in the nanovllm cache directory."""
    from nanovllm.demo import cache_dir

    dtype = backend.dtype.name
    head_dims = ATTENTION_HEAD_DIMS if head_dim is None else (head_dim,)
    dims = "-".join(map(str, head_dims))
    marker = (
        cache_dir() / "selfcheck" / f"{sources_digest()}-{device_arch(backend)}-{dtype}-d{dims}"
    )
    if marker.exists():
        return
    failed = [r for r in kernel_checks(backend, (dtype,), head_dims) if not r.passed]
    if failed:
        first = failed[0]
        raise NanovllmError(
            f"CUDA kernel self-check failed on {device_name(backend)} ({device_arch(backend)}): "
            f"{first.name}: {first.detail} ({len(failed)} failing); run `nanovllm check` for "
            "the full table, or use --device cpu"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


# ---- the command ---------------------------------------------------------------------------
def add_check_parser(subparsers) -> None:
    check = subparsers.add_parser(
        "check",
        help="compile the CUDA kernels and check them against the NumPy reference",
        description=__doc__.split("\n\n")[1],
    )
    check.add_argument(
        "--arch",
        action="append",
        default=None,
        help="GPU architecture to compile for (repeatable; default: the GPU's own, or sm_80 "
        "and sm_90 without a GPU)",
    )
    check.add_argument(
        "--emulated",
        action="store_true",
        help="without a GPU, run the runtime checks on the CPU emulator (slow)",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from nanovllm.backends import cuda_available

    gpu = cuda_available()
    backend = None
    if gpu or args.emulated:
        backend = CUDABackend("float16", emulated=not gpu)
    archs = tuple(args.arch or ((device_arch(backend),) if gpu else ("sm_80", "sm_90")))
    report: dict = {"device": device_name(backend) if backend else "no CUDA GPU", "builds": []}
    build_ok = _run_builds(archs, report)
    checks: list[CheckResult] = []
    if backend is not None:
        checks = kernel_checks(backend)
        checks += [model_check(backend), model_check(CUDABackend("float32", backend.emulated))]
    report["checks"] = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, archs, checks, gpu or args.emulated)
    return 0 if build_ok and all(c.passed for c in checks) else 1


def _run_builds(archs: tuple[str, ...], report: dict) -> bool:
    from nanovllm.backends.kernel_library import KERNEL_FILES
    from nanovllm.backends.nvrtc_check import compile_family

    ok = True
    for arch in archs:
        for family in KERNEL_FILES:
            try:
                build = compile_family(family, arch)
            except NanovllmError as exc:
                ok = False
                report["builds"].append({"family": family, "arch": arch, "error": str(exc)})
                continue
            for k in build.kernels:
                report["builds"].append(
                    {"family": family, "arch": arch, "kernel": k.name, "registers": k.registers,
                     "spill_bytes": k.spills, "stack_bytes": k.stack_bytes,
                     "shared_bytes": k.shared_bytes}
                )  # fmt: skip
                ok = ok and k.spills == 0
    return ok


def _print_report(report: dict, archs, checks: list[CheckResult], ran: bool) -> None:
    print(f"nanovllm check: {report['device']}")
    print(f"\nNVRTC build, registers / spill bytes per architecture ({', '.join(archs)}):")
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    for b in report["builds"]:
        if "error" in b:
            print(f"  FAIL {b['family']}.cu for {b['arch']}:\n{b['error']}")
            continue
        rows.setdefault(b["kernel"], {})[b["arch"]] = (b["registers"], b["spill_bytes"])
    print("  " + "kernel".ljust(28) + "".join(a.rjust(12) for a in archs) + "  result")
    for name, per_arch in rows.items():
        cells = "".join(
            (f"{per_arch[a][0]:>4} / {per_arch[a][1]}" if a in per_arch else "-").rjust(12)
            for a in archs
        )
        spills = any(spill for _, spill in per_arch.values())
        print(f"  {name:<28}{cells}  {'FAIL (spills)' if spills else 'pass'}")
    if not ran:
        print(
            "\nRuntime checks (each kernel against the NumPy reference, a tiny model on GPU vs "
            "CPU) need a CUDA GPU, and none is usable here (cupy.cuda.is_available() is False)."
            "\n`nanovllm check --emulated` runs them on the CPU emulator instead."
        )
        return
    print("\nRuntime checks against the NumPy reference:")
    for c in checks:
        print(f"  {c.name:<36} {'pass' if c.passed else 'FAIL'}  {c.detail}")
