"""Offline API shaped like vLLM's: `LLM(model=...).generate(prompts, params)` and `.chat(...)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from nanovllm.config import EngineConfig
from nanovllm.engine.assembly import build_engine
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int] | dict  # text, token ids, or vLLM's TextPrompt / TokensPrompt dict
Message = dict[str, object]


class LLM:
    """LLM(model, **engine_args) builds an engine (EngineConfig's fields are the arguments);
    LLM(engine=...) wraps one already built."""

    def __init__(
        self, model: str | None = None, *, engine: LLMEngine | None = None, **engine_args
    ) -> None:
        if engine is None:
            if "max_requests" in engine_args:  # the CLI's name for it
                engine_args["max_num_seqs"] = engine_args.pop("max_requests")
            engine = build_engine(EngineConfig(model=model, **engine_args))
        elif model is not None or engine_args:
            raise ValueError("pass either a model (and engine arguments) or an engine")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        return cls(engine=build_engine(config))

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string, a list of token ids, or
        vLLM's dicts: {"prompt": text} (TextPrompt) or {"prompt_token_ids": [...]} (TokensPrompt)."""
        prompts = [_engine_prompt(p) for p in _as_prompt_list(prompts)]
        params = self._params_per_prompt(sampling_params, len(prompts))
        return self._run([(p, sp, True) for p, sp in zip(prompts, params, strict=True)], use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate. `tools`
        (OpenAI's shape) and `chat_template_kwargs` (e.g. {"enable_thinking": False}) go to the
        template, as in vLLM; messages may carry assistant `tool_calls` and `tool` results."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kwargs = {**(chat_template_kwargs or {}), **template_kwargs}
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
            )
            for conv in conversations
        ]
        params = self._params_per_prompt(sampling_params, len(prompts))
        # The template already holds the BOS token if the model wants one.
        return self._run([(p, sp, False) for p, sp in zip(prompts, params, strict=True)], use_tqdm)

    def _params_per_prompt(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling params for {count} prompts")
        return list(params)

    def _run(self, jobs, use_tqdm: bool) -> list[RequestOutput]:
        engine, order = self.engine, []
        for params in {id(params): params for _, params, _ in jobs}.values():
            engine.structured.validate(params)  # a bad grammar raises here, before any step
        try:
            for prompt, params, special in jobs:
                params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, params, add_special_tokens=special)
                order.append(request_id)
            finished = self._drain(set(order), use_tqdm)
        except BaseException:
            for request_id in order:
                engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in order]

    def _drain(self, pending: set[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = _progress(len(pending)) if use_tqdm else None
        while len(finished) < len(pending):
            if not self.engine.has_unfinished_requests():
                missing = sorted(pending - finished.keys())
                raise RuntimeError(f"the engine finished without outputs for requests {missing}")
            for output in self.engine.step():
                if output.finished and output.request_id in pending:
                    finished[output.request_id] = output
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return finished


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, list | tuple) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def _engine_prompt(prompt: Prompt) -> str | list[int]:
    """What the engine takes: text, or token ids (vLLM's prompt dicts unwrapped)."""
    if not isinstance(prompt, dict):
        return prompt
    unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
    if unknown:
        raise ValueError(
            f"prompt dict has unsupported key(s) {', '.join(map(repr, unknown))}; a prompt dict "
            "is {'prompt': text} or {'prompt_token_ids': [ids]}"
        )
    if "prompt_token_ids" in prompt:  # TokensPrompt: the ids win, as in vLLM
        return prompt["prompt_token_ids"]
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("prompt dict needs 'prompt' (text) or 'prompt_token_ids' (a list of ids)")


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="Processed prompts", unit="req")
