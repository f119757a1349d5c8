"""Side by side on one machine: transformers `generate` vs nanovllm, SmolLM2-135M from its GGUF.

Both load the same GGUF file (transformers with `gguf_file=`, dequantized to float32), get the
same random token-id prompts and decode greedily without stopping at EOS. transformers runs at
its best settings for a CPU: batched with left padding, KV cache on, torch threads = cores.

Workloads:
  mix     a serving mix: input and output lengths drawn uniformly from ranges; transformers runs
          one padded batch to the longest output, as its users do, so only each request's own
          tokens count as useful output.
  batch   16 prompts x 48 tokens, 32 output tokens each.
  single  one prompt, 64 output tokens.

Usage: python scripts/compare_transformers.py [--workloads mix,batch,single] [--json]
(needs the test extra: torch==2.13.0, transformers, accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def make_workload(name: str, vocab: int, rng: np.random.Generator):
    if name == "mix":
        inputs = rng.integers(16, 257, size=32)
        outputs = rng.integers(16, 257, size=32)
    elif name == "batch":
        inputs, outputs = np.full(16, 48), np.full(16, 32)
    elif name == "single":
        inputs, outputs = np.full(1, 48), np.full(1, 64)
    else:
        raise SystemExit(f"unknown workload {name!r}")
    prompts = [rng.integers(100, vocab, size=n).tolist() for n in inputs]
    return prompts, outputs.tolist()


def run_transformers(model, prompts, outputs) -> tuple[float, int]:
    """Seconds for one padded batch to the longest output; useful output tokens."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    longest = max(outputs)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
            do_sample=False, use_cache=True, pad_token_id=0,
        )  # fmt: skip
    return time.perf_counter() - start, sum(outputs)


def run_nanovllm(llm, prompts, outputs) -> tuple[float, int]:
    from nanovllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(r.outputs[0].token_ids) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="mix,batch,single")
    parser.add_argument(
        "--max-requests", type=int, default=32, help="nanovllm's max running sequences"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from nanovllm import LLM
    from nanovllm.demo import demo_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = demo_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    llm = LLM(str(path), device="cpu", max_num_seqs=args.max_requests, num_blocks=2048,
              max_num_batched_tokens=2048)  # fmt: skip
    vocab = hf.config.vocab_size
    for name in args.workloads.split(","):
        prompts, outputs = make_workload(name, vocab, np.random.default_rng(0))
        run_transformers(hf, prompts[:1], [2])  # warm-up both
        run_nanovllm(llm, prompts[:1], [2])
        hf_s, hf_tokens = run_transformers(hf, prompts, outputs)
        nv_s, nv_tokens = run_nanovllm(llm, prompts, outputs)
        row = {
            "workload": name,
            "requests": len(prompts),
            "useful_output_tokens": hf_tokens,
            "transformers_tok_s": hf_tokens / hf_s,
            "nanovllm_tok_s": nv_tokens / nv_s,
            "ratio": (nv_tokens / nv_s) / (hf_tokens / hf_s),
        }
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{name:>6}: transformers {row['transformers_tok_s']:7.1f} tok/s | nanovllm "
                  f"{row['nanovllm_tok_s']:7.1f} tok/s | ratio {row['ratio']:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
