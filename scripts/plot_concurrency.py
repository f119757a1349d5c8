"""Throughput against concurrency: run `nanovllm bench throughput` at several --max-requests and
draw the result as a small SVG line chart (plain SVG, so no plotting library is needed).

Usage: python scripts/plot_concurrency.py [--out docs/throughput_vs_concurrency.svg]
           [--levels 1,2,4,8,16,32,64] [--num-prompts 64] [--output-len 64] [--input-len 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WIDTH, HEIGHT, PAD = 640, 360, 60


def measure(level: int, args) -> float:
    command = [
        sys.executable, "-m", "nanovllm.cli", "bench", "throughput", "--model", args.model,
        "--device", "cpu", "--num-prompts", str(args.num_prompts), "--input-len", args.input_len,
        "--output-len", args.output_len, "--max-requests", str(level), "--num-blocks", "2048",
        "--max-num-batched-tokens", "4096", "--json",
    ]  # fmt: skip
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return result["output_tokens_per_s"]


def svg(points: list[tuple[int, float]], title: str) -> str:
    top = max(y for _, y in points) * 1.1
    n = len(points)

    def xy(i: int, y: float) -> tuple[float, float]:
        x = PAD + i * (WIDTH - 2 * PAD) / max(n - 1, 1)
        return x, HEIGHT - PAD - y / top * (HEIGHT - 2 * PAD)

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, (_, v) in enumerate(points)))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="black"/>',
        f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="2"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 18}" text-anchor="middle">max running requests (--max-requests)</text>',
        f'<text x="16" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 16 {HEIGHT / 2})">output tokens/s</text>',
    ]  # fmt: skip
    for i, (level, value) in enumerate(points):
        x, y = xy(i, value)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#1f77b4"/>')
        parts.append(f'<text x="{x:.1f}" y="{y - 10:.1f}" text-anchor="middle">{value:.0f}</text>')
        parts.append(
            f'<text x="{x:.1f}" y="{HEIGHT - PAD + 18}" text-anchor="middle">{level}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-demo")
    parser.add_argument("--levels", default="1,2,4,8,16,32,64")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="64")
    parser.add_argument("--output-len", default="64")
    parser.add_argument("--out", default="docs/throughput_vs_concurrency.svg")
    args = parser.parse_args()
    points = []
    for level in map(int, args.levels.split(",")):
        points.append((level, measure(level, args)))
        print(f"max-requests {level}: {points[-1][1]:.1f} output tokens/s", flush=True)
    title = (f"{args.model}, CPU: {args.num_prompts} prompts x {args.input_len} in / "
             f"{args.output_len} out tokens, greedy")  # fmt: skip
    with open(args.out, "w") as f:
        f.write(svg(points, title))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
