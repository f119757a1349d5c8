"""The OpenAI-compatible HTTP server behind `nanovllm serve` (see docs/api.md).

The engine never imports this package; the server drives the engine from one thread.
"""
