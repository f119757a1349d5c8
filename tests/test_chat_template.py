"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False) renders them."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import jinja2
import pytest
from _text_fixtures import qwen3_folder, smollm2_folder

from nanovllm.models.chat_template import ChatTemplateError, _compile, render_chat_template
from nanovllm.models.tokenizer import Tokenizer

SYSTEM_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本 <b>&</b>"},
]
USER_CHAT = SYSTEM_CHAT[1:]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 °C.", "reasoning_content": "The tool said 21."},
    {"role": "user", "content": "Thanks!"},
]
# OpenAI clients send content=None beside tool calls; transformers drops None-valued keys.
NONE_CONTENT_CHAT = [USER_CHAT[0], {"role": "assistant", "content": None, "tool_calls": []}]

ALTERNATING = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
TOJSON = (
    "{{ tools | tojson }}\n"
    "{{ tools | tojson(indent=2) }}\n"
    "{{ messages | tojson(sort_keys=True, separators=(',', ':')) }}\n"
    "{{ messages[-1] | tojson(ensure_ascii=True) }}"
)
LOOP_CONTROLS = (
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{% continue %}{% endif %}"
    "{% if message.role == 'assistant' %}{% break %}{% endif %}"
    "<{{ message.role }}>{{ message.content }}"
    "{% endfor %}"
)
# trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before it.
WHITESPACE = """{% for message in messages %}
    {% if message.role == 'user' %}
        U: {{ message.content }}
    {% else %}
        A: {{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:{% endif %}"""
SPECIAL_TOKENS = "[{{ bos_token }}][{{ eos_token }}]{{ messages[0].content }}"
MISSING_KEYS = (
    "{% for m in messages %}{{ m.role }}:"
    "{% if m.content is defined %}{{ m.content }}{% else %}(no content){% endif %};"
    "{% endfor %}"
)

# Gemma's turn format: no system role, the assistant called "model", contents trimmed.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

HANDWRITTEN = {
    "gemma_turns": (GEMMA_TURNS, USER_CHAT),
    "alternating": (ALTERNATING, USER_CHAT),
    "tojson": (TOJSON, SYSTEM_CHAT),
    "loop_controls": (LOOP_CONTROLS, SYSTEM_CHAT),
    "whitespace": (WHITESPACE, USER_CHAT),
    "special_tokens": (SPECIAL_TOKENS, USER_CHAT),
    "missing_keys": (MISSING_KEYS, NONE_CONTENT_CHAT),
}


def _load(folder: Path) -> tuple[Tokenizer, object]:
    from transformers import PreTrainedTokenizerFast

    return Tokenizer.from_folder(folder), PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Tokenizer, object]:
    return _load(smollm2_folder())


@pytest.fixture(scope="module")
def qwen3() -> tuple[Tokenizer, object]:
    return _load(qwen3_folder())


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(
        tok.backend, chat_template=template, bos_token=tok.bos_token, eos_token=tok.eos_token
    )


def _expected(hf, messages, template=None, **kwargs) -> str:
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("messages", [SYSTEM_CHAT, USER_CHAT], ids=["system", "no_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm2, messages, add_generation_prompt) -> None:
    ours, hf = smollm2
    expected = _expected(hf, messages, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize(
    ("messages", "kwargs"),
    [
        (SYSTEM_CHAT, {}),
        (USER_CHAT, {"enable_thinking": False}),
        (TOOL_CHAT, {"tools": [WEATHER_TOOL]}),
        (TOOL_CHAT, {"tools": [WEATHER_TOOL], "enable_thinking": False}),
    ],
    ids=["system", "no_thinking", "tools", "tools_no_thinking"],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen3_template_matches_transformers(
    qwen3, messages, kwargs, add_generation_prompt
) -> None:
    ours, hf = qwen3
    expected = _expected(hf, messages, add_generation_prompt=add_generation_prompt, **kwargs)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == expected
    if "tools" in kwargs:
        assert '"description": "Weather for a city, in °C"' in got  # tojson kept the non-ASCII


@pytest.mark.parametrize("name", sorted(HANDWRITTEN))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_handwritten_template_matches_transformers(smollm2, qwen3, name, add_generation_prompt):
    template, messages = HANDWRITTEN[name]
    for ours, hf in (smollm2, qwen3):
        kwargs = {"add_generation_prompt": add_generation_prompt, "tools": [WEATHER_TOOL]}
        expected = _expected(hf, messages, template, **kwargs)
        assert _with_template(ours, template).apply_chat_template(messages, **kwargs) == expected


def test_missing_bos_token_renders_empty_not_none(qwen3) -> None:
    ours, _ = qwen3
    got = _with_template(ours, SPECIAL_TOKENS).apply_chat_template(USER_CHAT)
    assert got == "[][<|im_end|>]What is the capital of France?"


def test_raise_exception_surfaces_the_template_message(smollm2) -> None:
    ours, hf = smollm2
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.TemplateError) as theirs:
        _expected(hf, bad, ALTERNATING)
    with pytest.raises(ValueError) as mine:
        _with_template(ours, ALTERNATING).apply_chat_template(bad)
    assert isinstance(mine.value, ChatTemplateError)
    assert str(mine.value) == str(theirs.value)
    assert str(mine.value) == "Conversation roles must alternate user/assistant/user/assistant/..."


def test_tojson_is_plain_json_not_html_escaped() -> None:
    got = render_chat_template(
        "{{ messages[0] | tojson }}",
        [{"role": "user", "content": "<b>&</b> 日本"}],
        add_generation_prompt=False,
    )
    assert got == '{"role": "user", "content": "<b>&</b> 日本"}'


def test_strftime_now_gives_todays_date() -> None:
    before = date.today().strftime("%d %b %Y")
    got = render_chat_template(
        "Today is {{ strftime_now('%d %b %Y') }}.",
        USER_CHAT,
        add_generation_prompt=True,
    )
    after = date.today().strftime("%d %b %Y")
    assert got in (f"Today is {before}.", f"Today is {after}.")


def test_extra_variables_reach_the_template() -> None:
    template = "{{ documents }}|{{ custom }}|{{ tools[0].function.name }}"
    got = render_chat_template(
        template, USER_CHAT, add_generation_prompt=False, tools=[WEATHER_TOOL], custom=7
    )
    assert got == "None|7|get_weather"


def test_template_cannot_mutate_the_messages() -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template(
            "{{ messages.append({'role': 'x'}) }}", messages, add_generation_prompt=False
        )
    assert messages == [{"role": "user", "content": "hi"}]


def test_namespace_refuses_underscore_attributes() -> None:
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template(
            "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
            USER_CHAT,
            add_generation_prompt=False,
        )
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template(
            "{% set ns = namespace(x=1) %}{% set ns._y = 2 %}",
            USER_CHAT,
            add_generation_prompt=False,
        )


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"invalid chat template \(line 2\)"):
        render_chat_template(
            "ok\n{% for m in messages %}{{ m.content }}", USER_CHAT, add_generation_prompt=False
        )


def test_runtime_error_in_template_is_a_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        render_chat_template("{{ messages[5].content }}", USER_CHAT, add_generation_prompt=False)


def test_python_error_inside_the_template_is_a_chat_template_error(smollm2) -> None:
    ours, _ = smollm2
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(ChatTemplateError, match="chat template failed: can only concatenate"):
        ours.apply_chat_template(parts)


def test_empty_conversation_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        render_chat_template("{{ messages }}", [], add_generation_prompt=True)


def test_non_dict_message_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="must be a dict"):
        render_chat_template("{{ messages }}", ["hello"], add_generation_prompt=True)


def test_template_is_compiled_once() -> None:
    template = "{{ messages | length }} compiled-once-check"
    before = _compile.cache_info()
    for _ in range(3):
        render_chat_template(template, USER_CHAT, add_generation_prompt=True)
    after = _compile.cache_info()
    assert after.misses - before.misses == 1
    assert after.hits - before.hits == 2


GENERATION_TAG = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% generation %}"
    "{{ m['content'] }}{% endgeneration %}\n{% else %}U: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def test_generation_tag_renders_its_body_as_transformers_does(smollm2) -> None:
    # Fine-tuned models mark assistant turns with transformers' {% generation %} tag (for
    # training masks); transformers renders its body, so a chat request must not fail on it.
    ours, hf = smollm2
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    expected = _expected(hf, messages, GENERATION_TAG, add_generation_prompt=True)
    rendered = _with_template(ours, GENERATION_TAG).apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert rendered == expected
    assert "A: yo" in rendered  # the tag's body is rendered, not dropped
