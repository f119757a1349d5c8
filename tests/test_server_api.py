"""The OpenAI-compatible server answers like the offline engine, through the official client.

One real server process for the module (tiny llama3 checkpoint, 127.0.0.1, a free port); the
same checkpoint loaded in-process with `LLM` is the oracle for every text, token count and
logprob.
"""

from __future__ import annotations

import json

import pytest
from _server_fixtures import assert_openai_error, parse_chunk, start_server, stream_events

from nanovllm import LLM, SamplingParams

MODEL = "tiny-llama"
PROMPT = "Beautiful is better than"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about the scheduler."},
]


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("llama3")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    proc = start_server(
        checkpoint, tmp_path_factory.mktemp("server"), "--served-model-name", MODEL,
        "--max-body-size", "65536",
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


# ---- completions -------------------------------------------------------------------------
def test_completion_equals_llm_generate(client, llm):
    expected = llm.generate(PROMPT, greedy(), use_tqdm=False)[0]
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.object == "text_completion" and response.model == MODEL
    assert response.id.startswith("cmpl-")
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens  # fmt: skip


def test_streamed_completion_equals_llm_generate(client, llm):
    expected = llm.generate(PROMPT, greedy(20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len(chunks) > 3  # token by token, not one blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_prompt_list_and_token_ids_give_one_choice_each_in_order(client, llm):
    prompts = [PROMPT, "The quick brown fox", [0, 17, 42, 99, 7]]
    expected = llm.generate(prompts, greedy(8), use_tqdm=False)
    for prompt_list in (prompts[:2], [prompts[2]]):
        response = client.completions.create(
            model=MODEL, prompt=prompt_list, max_tokens=8, temperature=0
        )
        want = expected[:2] if len(prompt_list) == 2 else expected[2:]
        assert [c.index for c in response.choices] == list(range(len(want)))
        assert [c.text for c in response.choices] == [w.outputs[0].text for w in want]
        assert response.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)


def test_n2_seeded_choices_equal_llm_generate(client, llm):
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, seed=7, max_tokens=10)
    expected = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, n=2, temperature=1.0, top_p=1.0, seed=7, max_tokens=10
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [o.text for o in expected]
    assert response.usage.completion_tokens == sum(len(o.token_ids) for o in expected)


def test_completion_logprobs_match_the_engine(client, llm):
    expected = llm.generate(PROMPT, greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)  # fmt: skip
    assert len(logprobs.tokens) == len(logprobs.top_logprobs) == len(expected.token_ids)
    assert all(1 <= len(top) <= 4 for top in logprobs.top_logprobs)
    lengths = [len(t) for t in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]


def test_echo_prefixes_the_prompt(client, llm):
    expected = llm.generate(PROMPT, greedy(5), use_tqdm=False)[0].outputs[0].text
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True
    )
    assert response.choices[0].text == PROMPT + expected


def test_echo_with_logprobs_gives_the_prompt_tokens_their_logprobs(client, llm):
    """vLLM's answer: the prompt's tokens lead `logprobs`, the first one with null entries."""
    params = greedy(3, logprobs=2, prompt_logprobs=2)
    expected = llm.generate(PROMPT, params, use_tqdm=False)[0]
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = response.choices[0]
    assert choice.text == PROMPT + expected.outputs[0].text
    ids = expected.prompt_token_ids
    prompt_lps = [entry[token].logprob for entry, token in zip(expected.prompt_logprobs[1:], ids[1:], strict=True)]  # fmt: skip
    sampled = [entry.logprob for entry in expected.outputs[0].logprobs]
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(prompt_lps + sampled, abs=1e-4)
    assert len(logprobs.tokens) == len(ids) + 3
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])
    lengths = [len(t) for t in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    # Streamed, the first chunk carries the prompt's entries: the same lists in the end.
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2,
        stream=True,
    )  # fmt: skip
    chunks = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert sum((c.token_logprobs for c in chunks), []) == logprobs.token_logprobs
    assert sum((c.tokens for c in chunks), []) == logprobs.tokens


def test_prompt_logprobs_field_gives_vllms_shape(server, llm):
    expected = llm.generate(PROMPT, greedy(1, prompt_logprobs=1), use_tqdm=False)[0]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}  # fmt: skip
    scored = server.post(COMP, body).json()["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(expected.prompt_logprobs)
    for got, entry in zip(scored[1:], expected.prompt_logprobs[1:], strict=True):
        assert list(got) == [str(t) for t in entry]  # the prompt's token first
        for token_id, logprob in entry.items():
            assert got[str(token_id)]["rank"] == logprob.rank
            assert got[str(token_id)]["decoded_token"] == logprob.decoded_token
            assert got[str(token_id)]["logprob"] == pytest.approx(logprob.logprob, abs=1e-4)


def test_stop_string_ends_the_text_before_it(client, llm):
    full = llm.generate(PROMPT, greedy(30, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    stop = full[5:7]
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]


# ---- chat --------------------------------------------------------------------------------
def test_chat_equals_llm_chat(client, llm):
    expected = llm.chat(MESSAGES, greedy(12), use_tqdm=False)[0]
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streamed_chat_with_text_parts_equals_llm_chat(client, llm):
    expected = llm.chat(MESSAGES, greedy(15, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    parts = [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]},
    ]
    stream = client.chat.completions.create(
        model=MODEL, messages=parts, max_tokens=15, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15


def test_chat_logprobs_match_the_engine(client, llm):
    expected = llm.chat(MESSAGES, greedy(5, logprobs=2), use_tqdm=False)[0].outputs[0]
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = response.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)  # fmt: skip
    for entry, want in zip(content, expected.logprobs, strict=True):
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in want.top], abs=1e-4)  # fmt: skip
        assert bytes(entry.bytes).decode("utf-8") == entry.token


def test_chat_n2_streams_both_choices(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, n=2, seed=3, temperature=1.0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}  # fmt: skip
    assert finished == {0: "length", 1: "length"}


# ---- the other endpoints -----------------------------------------------------------------
def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"


def test_health_and_version(server):
    assert server.get("/health").status_code == 200
    assert server.get("/version").json() == {"version": "0.1.0"}


def test_tokenize_and_detokenize_round_trip(server, llm):
    tokens = llm.tokenizer.encode(PROMPT)
    body = server.post("/tokenize", {"model": MODEL, "prompt": PROMPT}).json()
    assert body == {"count": len(tokens), "max_model_len": 256, "tokens": tokens, "token_strs": None}  # fmt: skip
    assert server.post("/detokenize", {"tokens": tokens}).json() == {"prompt": PROMPT}


def test_tokenize_messages_uses_the_chat_template(server, llm):
    text = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    body = server.post("/tokenize", {"messages": MESSAGES}).json()
    assert body["tokens"] == llm.tokenizer.encode(text, add_special_tokens=False)


def test_metrics_counters_move_as_requests_complete(server, client):
    before = server.metrics()
    client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = server.metrics()

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("vllm:generation_tokens_total") == 5
    assert moved("vllm:prompt_tokens_total") >= 1
    assert moved("vllm:request_success_total", (("finished_reason", "length"),)) == 1
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    # Per token after the first (vLLM's inter-token latency, and its deprecated name)...
    assert moved("vllm:inter_token_latency_seconds_count") == 4
    assert moved("vllm:time_per_output_token_seconds_count") == 4
    # ... and once per request.
    assert moved("vllm:request_time_per_output_token_seconds_count") == 1
    assert moved("vllm:request_generation_tokens_sum") == 5
    assert after[("vllm:num_requests_running", ())] == 0
    assert after[("vllm:kv_cache_usage_perc", ())] == 0


# ---- bad requests ------------------------------------------------------------------------
TOO_LONG = list(range(3, 303))  # 300 token ids; the model's maximum length is 256
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
# (id, path, body (dict, or raw bytes), extra headers, status, param)
BAD_REQUESTS = [
    ("invalid-json", COMP, b'{"prompt": ', {}, 400, None),
    ("body-not-object", COMP, b"[1, 2]", {}, 400, None),
    ("nan-constant", COMP, b'{"prompt": "x", "temperature": NaN}', {}, 400, None),
    ("empty-body", COMP, b"", {}, 400, None),
    ("missing-prompt", COMP, {"max_tokens": 4}, {}, 400, "prompt"),
    ("missing-messages", CHAT, {"max_tokens": 4}, {}, 400, "messages"),
    ("prompt-wrong-type", COMP, {"prompt": 5}, {}, 400, "prompt"),
    ("prompt-empty", COMP, {"prompt": ""}, {}, 400, "prompt"),
    ("prompt-mixed-list", COMP, {"prompt": ["a", 1]}, {}, 400, "prompt"),
    ("max-tokens-negative", COMP, {"prompt": "x", "max_tokens": -1}, {}, 400, "max_tokens"),
    ("max-tokens-string", COMP, {"prompt": "x", "max_tokens": "10"}, {}, 400, "max_tokens"),
    ("max-tokens-huge", COMP, {"prompt": "x", "max_tokens": 10**6}, {}, 400, "max_tokens"),
    (
        "max-completion-tokens-huge",
        CHAT,
        {"messages": USER, "max_completion_tokens": 10**6},
        {},
        400,
        "max_completion_tokens",
    ),  # fmt: skip
    (
        "max-completion-tokens-zero",
        CHAT,
        {"messages": USER, "max_completion_tokens": 0},
        {},
        400,
        "max_completion_tokens",
    ),  # fmt: skip
    ("temperature-negative", COMP, {"prompt": "x", "temperature": -1}, {}, 400, "temperature"),
    ("temperature-string", COMP, {"prompt": "x", "temperature": "hot"}, {}, 400, "temperature"),
    ("top-p-2", COMP, {"prompt": "x", "top_p": 2}, {}, 400, "top_p"),
    ("min-p-1.5", COMP, {"prompt": "x", "min_p": 1.5}, {}, 400, "min_p"),
    (
        "presence-penalty-3",
        CHAT,
        {"messages": USER, "presence_penalty": 3},
        {},
        400,
        "presence_penalty",
    ),  # fmt: skip
    ("n-0", COMP, {"prompt": "x", "n": 0}, {}, 400, "n"),
    ("n-too-many", COMP, {"prompt": "x", "n": 1000}, {}, 400, "n"),
    ("seed-beyond-64-bits", COMP, {"prompt": "x", "seed": 2**63}, {}, 400, "seed"),
    ("ignore-eos-string", COMP, {"prompt": "x", "ignore_eos": "yes"}, {}, 400, "ignore_eos"),
    ("stop-empty-string", COMP, {"prompt": "x", "stop": [""]}, {}, 400, "stop"),
    (
        "stop-token-ids-not-list",
        COMP,
        {"prompt": "x", "stop_token_ids": 5},
        {},
        400,
        "stop_token_ids",
    ),  # fmt: skip
    ("logprobs-21", COMP, {"prompt": "x", "logprobs": 21}, {}, 400, "logprobs"),
    (
        "prompt-logprobs-streamed",
        COMP,
        {"prompt": "x", "prompt_logprobs": 1, "stream": True},
        {},
        400,
        "prompt_logprobs",
    ),
    (
        "prompt-logprobs-21",
        CHAT,
        {"messages": USER, "prompt_logprobs": 21},
        {},
        400,
        "prompt_logprobs",
    ),
    (
        "top-logprobs-without-logprobs",
        CHAT,
        {"messages": USER, "top_logprobs": 2},
        {},
        400,
        "top_logprobs",
    ),  # fmt: skip
    (
        "stream-options-without-stream",
        COMP,
        {"prompt": "x", "stream_options": {"include_usage": True}},
        {},
        400,
        "stream_options",
    ),  # fmt: skip
    ("unknown-model", COMP, {"prompt": "x", "model": "gpt-9"}, {}, 404, "model"),
    ("unknown-model-tokenize", "/tokenize", {"prompt": "x", "model": "gpt-9"}, {}, 404, "model"),
    ("prompt-too-long", COMP, {"prompt": TOO_LONG, "max_tokens": 1}, {}, 400, "prompt"),
    (
        "prompt-too-long-chat",
        CHAT,
        {"messages": [{"role": "user", "content": "ab " * 200}]},
        {},
        400,
        "messages",
    ),  # fmt: skip
    ("prompt-over-char-bound", COMP, {"prompt": "x" * 60_000}, {}, 400, "prompt"),
    (
        "chat-over-char-bound",
        CHAT,
        {"messages": [{"role": "user", "content": "x" * 60_000}]},
        {},
        400,
        "messages",
    ),  # fmt: skip
    ("tokenize-over-char-bound", "/tokenize", {"prompt": "x" * 60_000}, {}, 400, "prompt"),
    ("token-id-out-of-vocab", COMP, {"prompt": [99999]}, {}, 400, "prompt"),
    ("deep-json", COMP, b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", {}, 400, None),
    ("surrogate-prompt", COMP, b'{"prompt": "a\\ud800b"}', {}, 400, "prompt"),
    ("surrogate-in-list", COMP, b'{"prompt": ["ok", "\\udfff"]}', {}, 400, "prompt"),
    (
        "surrogate-chat",
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}',
        {},
        400,
        "messages",
    ),  # fmt: skip
    ("surrogate-tokenize", "/tokenize", b'{"prompt": "\\udc00"}', {}, 400, "prompt"),
    ("suffix-refused", COMP, {"prompt": "x", "suffix": "end"}, {}, 400, "suffix"),
    ("best-of-refused", COMP, {"prompt": "x", "best_of": 2}, {}, 400, "best_of"),
    (
        "tool-without-function",
        CHAT,
        {"messages": USER, "tools": [{"type": "function"}]},
        {},
        400,
        "tools[0].function",
    ),  # fmt: skip
    (
        "tool-choice-missing-tool",
        CHAT,
        {"messages": USER, "tool_choice": "required"},
        {},
        400,
        "tool_choice",
    ),  # fmt: skip
    (
        "bad-regex",
        COMP,
        {"prompt": "x", "structured_outputs": {"regex": "("}},
        {},
        400,
        "structured_outputs",
    ),  # fmt: skip
    (
        "logit-bias-out-of-vocab",
        COMP,
        {"prompt": "x", "logit_bias": {"99999": 1}},
        {},
        400,
        "logit_bias",
    ),  # fmt: skip
    ("unknown-field", COMP, {"prompt": "x", "frobnicate": 1}, {}, 400, "frobnicate"),
    ("messages-empty", CHAT, {"messages": []}, {}, 400, "messages"),
    (
        "unknown-role",
        CHAT,
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {},
        400,
        "messages[0].role",
    ),  # fmt: skip
    (
        "content-not-string",
        CHAT,
        {"messages": [{"role": "user", "content": 5}]},
        {},
        400,
        "messages[0].content",
    ),  # fmt: skip
    (
        "content-image-part",
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        {},
        400,
        "messages[0].content[0]",
    ),  # fmt: skip
    ("message-not-object", CHAT, {"messages": ["hi"]}, {}, 400, "messages[0]"),
    ("detokenize-bad-id", "/detokenize", {"tokens": [-1]}, {}, 400, "tokens"),
    ("oversized-body", COMP, {"prompt": "x" * 100_000}, {}, 413, None),
    ("wrong-content-type", COMP, b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, None),
    ("unknown-route", "/v1/nope", {"prompt": "x"}, {}, 404, None),
]


@pytest.mark.parametrize(
    "path, body, headers, status, param", [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)  # fmt: skip
def test_bad_request_gets_openai_error(server, path, body, headers, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers}
    error = assert_openai_error(server.post(path, data=raw, headers=headers), status)
    if param is not None:
        assert error["param"] == param, error


def test_prompt_too_long_message_gives_both_lengths(server):
    error = assert_openai_error(server.post(COMP, {"prompt": TOO_LONG}), 400)
    assert "300" in error["message"] and "256" in error["message"]


def test_a_surrogate_pair_is_one_character_not_an_error(server, llm):
    # The escaped pair \ud83d\ude42 is U+1F642; only a lone half is refused.
    raw = b'{"prompt": "\\ud83d\\ude42"}'
    response = server.post("/tokenize", data=raw, headers={"Content-Type": "application/json"})
    assert response.json()["tokens"] == llm.tokenizer.encode("\U0001f642")


def test_a_20_mb_body_gets_a_readable_413(server):
    # The server refuses it from its Content-Length, then reads and drops the rest, so the
    # client, which sends the whole body before reading, still gets the answer.
    body = b'{"prompt": "' + b"x" * 20_000_000 + b'"}'
    response = server.post(COMP, data=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 413)
    assert "20000014" in error["message"] and "65536" in error["message"]
    assert server.get("/health").status_code == 200


def test_requests_beyond_the_character_bound_name_the_bound(server):
    # 256 tokens x 13 characters (the longest entry of the test vocabulary) = 3,328.
    fits = assert_openai_error(server.post(COMP, {"prompt": "ab " * 1100}), 400)  # 3,300 chars
    over = assert_openai_error(server.post(COMP, {"prompt": "ab " * 1110}), 400)  # 3,330 chars
    assert "tokens" in fits["message"] and "characters" not in fits["message"]
    assert "3330 characters" in over["message"] and "3328" in over["message"]


def test_wrong_method_gets_405(server):
    response = server.get(COMP)
    assert_openai_error(response, 405)
    assert "POST" in response.headers["Allow"]


def test_server_still_serves_after_bad_requests(server, client):
    assert server.get("/health").status_code == 200
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert response.usage.completion_tokens >= 1
    metrics = server.metrics()
    assert metrics[("vllm:num_requests_running", ())] == 0
    assert metrics[("vllm:kv_cache_usage_perc", ())] == 0


def test_raw_stream_ends_with_done(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True}
    with server.post(COMP, body, stream=True) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [data for _, data in stream_events(response)]
    assert events[-1] == "[DONE]"
    assert all(parse_chunk(e)["object"] == "text_completion" for e in events[:-1])


def test_streamed_logprobs_equal_the_full_response(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    full = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True)]
    assert sum((lp.token_logprobs for lp in chunks if lp), []) == full.token_logprobs
    assert sum((lp.text_offset for lp in chunks if lp), []) == full.text_offset
