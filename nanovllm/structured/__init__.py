"""Structured outputs, tool calling and reasoning: constraints on a request's tokens and parsers of
its text.

- params.py: StructuredOutputsParams, the constraint a request asks for (vLLM's shape)
- request.py: OpenAI's response_format, vLLM's structured_outputs object and the tool fields
  of a request -> StructuredOutputsParams, or a ParameterError naming the field
- compiler.py: constraint -> llguidance grammar, validated, cached, compiled off the engine thread
- tokenizer.py: llguidance's view of the model's tokenizer
- constraint.py: TokenConstraint (the runner's seam) and the grammar-backed one
- token_filters.py: logit_bias, allowed_token_ids and bad_words
- reasoning.py: <think> reasoning parsers, and a constraint that waits for the reasoning to end
- tools.py: tool definitions, tool_choice and the grammars that force a call
- tool_parsers/: tool-call parsers (complete text and streaming), by name
- bitmask.py: the token bitmask layout and the NumPy op that applies it to logits

Only params.py is imported here: llguidance loads when a grammar is first compiled.
"""

from nanovllm.structured.errors import ParameterError
from nanovllm.structured.params import StructuredOutputsParams

__all__ = ["ParameterError", "StructuredOutputsParams"]
