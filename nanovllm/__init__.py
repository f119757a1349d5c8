"""nanovllm: a small, readable LLM inference engine shaped like vLLM."""

import os as _os

from nanovllm.llm import LLM
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

# The wheel installs the top-level kernels/ and tui/ folders as nanovllm.kernels and
# nanovllm.tui. In a source checkout that is first on sys.path (`python -m nanovllm.cli` run
# from the repository) they sit beside this package instead: look there too.
_package = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_package)
if _os.path.isfile(_os.path.join(_checkout, "tui", "__init__.py")) and not _os.path.isdir(
    _os.path.join(_package, "tui")
):
    __path__.append(_checkout)
