"""Engine settings: one dataclass, its defaults, and its validation in one place."""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cpu-reference", "cuda", "cuda-emulated")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("auto", "none", "q8-activations")


@dataclass(slots=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # "auto": quantized weights (GGUF blocks) stay as stored where the backend has kernels for
    # them; "none": every weight is dequantized to the compute dtype at load; "q8-activations"
    # (the cpu backend): as "auto", and decode matmuls on GGUF block weights round their input
    # rows to Q8_0 blocks for integer dot products, as llama.cpp does (by default they round
    # one or two rows to 16-bit codes, nanovllm/backends/cpu.py).
    quantization: str = "auto"
    block_size: int = 16
    num_blocks: int | str = 512  # "auto": size the KV cache from free GPU memory
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    served_model_name: str | None = None
    # Speculative decoding: "draft" (needs draft_model) or "ngram" (prompt lookup), or None.
    speculative_method: str | None = None
    draft_model: str | None = None
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # Decode without CUDA graphs (the CPU backend always does).
    enforce_eager: bool = False
    # A <think> model's reasoning parser ("qwen3", "deepseek_r1"): a grammar then applies only
    # after the reasoning (the server also splits the reasoning out of responses with it).
    reasoning_parser: str | None = None
    # CPU threads of the compiled kernels and of BLAS; None: one per core (nanovllm/backends/cpu.py).
    num_threads: int | None = None
    # Ranks the model is split across (Megatron-style; nanovllm/models/sharding.py): GPUs on
    # `cuda`, in-process ranks with the reference communicator on the CPU and emulated devices.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string (Hub id, folder or .gguf file)")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.num_blocks != "auto":
            self._check_positive("num_blocks")
        if (
            not isinstance(self.gpu_memory_utilization, int | float)
            or not 0 < self.gpu_memory_utilization <= 1
        ):
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "tensor_parallel_size",
        ):
            self._check_positive(name)
        if self.max_num_seqs > 65535:  # paged attention puts sequences on gridDim.y
            raise ValueError(f"max_num_seqs must be at most 65535, got {self.max_num_seqs}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two up to 128, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.num_threads is not None:
            self._check_positive("num_threads")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        self._validate_speculation()
        if self.reasoning_parser is not None:
            from nanovllm.structured.reasoning import REASONING_PARSERS

            if self.reasoning_parser not in REASONING_PARSERS:
                raise ValueError(
                    f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                    f"got {self.reasoning_parser!r}"
                )

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def _validate_speculation(self) -> None:
        if self.speculative_method is None and self.draft_model is not None:
            self.speculative_method = "draft"
        if self.speculative_method not in (None, "draft", "ngram"):
            raise ValueError(
                f"speculative_method must be 'draft' or 'ngram', got {self.speculative_method!r}"
            )
        if self.speculative_method == "draft" and not self.draft_model:
            raise ValueError("speculative_method 'draft' needs a draft_model")
        if self.speculative_method == "ngram" and self.draft_model:
            raise ValueError("speculative_method 'ngram' takes no draft_model")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError("prompt_lookup_max must be at least prompt_lookup_min")
        if self.speculative_method == "draft" and self.tensor_parallel_size > 1:
            raise ValueError(
                "a draft model is not supported with tensor_parallel_size > 1 yet; use "
                "speculative_method 'ngram'"
            )

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
