"""Structured outputs end to end with the real SmolLM2-135M (the demo GGUF) behind `nanovllm
serve`, driven by real clients: the official `openai` client's `parse()` with Pydantic models,
LangChain's `with_structured_output` and `bind_tools`, litellm's tools. Oracles: Pydantic and
`jsonschema` validation, Python's `re`, and the same server's unconstrained output.

One server for the module (the model loads once); every request is short, and the 20 parse()
calls run concurrently so that they share decode steps.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Literal

import jsonschema
import openai
import pytest
from _server_fixtures import assert_openai_error, start_server
from pydantic import BaseModel, Field

from nanovllm.demo import demo_model_path

MODEL = "smollm2"
TIMEOUT_S = 600  # a loaded 2-core machine runs this model at a few tokens per second


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(
        demo_model_path(),
        tmp_path_factory.mktemp("smollm2_server"),
        "--served-model-name", MODEL, "--max-requests", "24", "--max-model-len", "1024",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        start_timeout=300,
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client(timeout=TIMEOUT_S)


def chat(client, content: str, **kwargs):
    kwargs.setdefault("max_tokens", 40)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )


# ---- 20 prompts, 10 schemas: nested objects, arrays, enums, bounded numbers, required fields --
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


class Address(BaseModel):
    city: str = Field(max_length=16)
    country: str = Field(max_length=16)


class Employee(BaseModel):
    person: Person
    address: Address
    manager: bool


class Weather(BaseModel):
    city: str = Field(max_length=16)
    temperature: float = Field(ge=-50, le=60)
    unit: Literal["C", "F"]


class Paint(BaseModel):
    color: Color
    liters: int = Field(ge=1, le=20)


class Recipe(BaseModel):
    name: str = Field(max_length=16)
    ingredients: list[str] = Field(max_length=3)
    minutes: int = Field(ge=1, le=240)


class Planet(BaseModel):
    name: str = Field(max_length=12)
    moons: int = Field(ge=0, le=99)
    has_rings: bool


class Item(BaseModel):
    name: str = Field(max_length=12)
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    items: list[Item] = Field(min_length=1, max_length=2)
    paid: bool


class Vote(BaseModel):
    choice: Literal["yes", "no", "abstain"]
    confidence: float = Field(ge=0, le=1)


class Book(BaseModel):
    title: str = Field(max_length=20)
    year: int = Field(ge=1400, le=2030)
    colors: list[Color] = Field(max_length=2)


CASES = [
    (Person, "Invent a person with a name and an age."),
    (Person, "Describe the astronaut Neil Armstrong."),
    (Employee, "Describe an employee who lives in Paris."),
    (Employee, "Make up a manager working in Tokyo."),
    (Weather, "What is the weather in Oslo today?"),
    (Weather, "Report the weather in Cairo in Fahrenheit."),
    (Paint, "I need blue paint for a small room."),
    (Paint, "Which paint would you buy for a garden fence?"),
    (Recipe, "Give me a quick pancake recipe."),
    (Recipe, "Give me a recipe for a tomato salad."),
    (Planet, "Tell me about Saturn."),
    (Planet, "Tell me about Mars."),
    (Order, "Order two apples and a bread."),
    (Order, "I want to buy one coffee."),
    (Vote, "Should the city build a new park? Vote."),
    (Vote, "Is pineapple good on pizza? Vote."),
    (Book, "Describe the book Moby Dick."),
    (Book, "Describe a famous novel about the sea."),
    (Item, "Add three eggs to my list."),
    (Address, "Where is the Eiffel Tower?"),
]


def test_parse_with_pydantic_models_returns_objects_that_validate(client):
    def parse(case):
        model, prompt = case
        return model, client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=model,
            temperature=0, max_tokens=120,
        )  # fmt: skip

    with ThreadPoolExecutor(len(CASES)) as pool:
        results = list(pool.map(parse, CASES))
    for model, completion in results:
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop", message.content
        assert isinstance(message.parsed, model)  # Pydantic validated it, bounds included
        jsonschema.validate(json.loads(message.content), model.model_json_schema())


def test_json_object_output_parses_as_an_object(client):
    reply = chat(client, "Give me a JSON object about a cat.", max_tokens=40,
                 response_format={"type": "json_object"})  # fmt: skip
    # max_tokens may cut it: the grammar keeps a valid prefix; when it ended, it parses.
    text = reply.choices[0].message.content
    assert text.lstrip().startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("constraint", "pattern"),
    [
        ({"choice": ["Paris", "London", "Berlin"]}, r"Paris|London|Berlin"),
        ({"regex": r"[0-9]{3}-[0-9]{4}"}, r"[0-9]{3}-[0-9]{4}"),
        ({"regex": r"(yes|no), because [a-z ]{5,20}\."}, r"(yes|no), because [a-z ]{5,20}\."),
    ],
)
def test_choice_and_regex_outputs_match_exactly(client, constraint, pattern):
    reply = chat(client, "Answer briefly: which city is the capital of France? Why?",
                 extra_body={"structured_outputs": constraint})  # fmt: skip
    assert re.fullmatch(pattern, reply.choices[0].message.content)
    completion = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=30,
                                           temperature=0, extra_body={"structured_outputs": constraint})  # fmt: skip
    assert re.fullmatch(pattern, completion.choices[0].text)


def own_characters(text: str) -> str:
    """A regex of any run of the characters `text` is made of (so `text` satisfies it)."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(set(text))) + "]*"


@pytest.mark.parametrize(
    ("prompt", "grammar"),
    [
        ("The capital of France is", lambda text: {"choice": [text, text + " and more"]}),
        ("List three colours:", lambda text: {"regex": own_characters(text)}),
        ("Once upon a time", lambda text: {"regex": own_characters(text)}),
    ],
)
def test_greedy_output_under_a_grammar_it_already_satisfies_is_unchanged(client, prompt, grammar):
    # Without ignore_eos: EOS (a special token, absent from the text) may only end the output.
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert text
    constrained = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body={"structured_outputs": grammar(text)})  # fmt: skip
    assert constrained.choices[0].text == text
    assert constrained.usage.completion_tokens == free.usage.completion_tokens


def test_logit_bias_and_bad_words_reach_the_sampler(client, server):
    ids = server.post("/tokenize", {"prompt": " Paris", "add_special_tokens": False}).json()[
        "tokens"
    ]
    free = chat(client, "What is the capital of France?", max_tokens=8)
    assert "Paris" in free.choices[0].message.content
    banned = chat(client, "What is the capital of France?", max_tokens=8,
                  extra_body={"bad_words": ["Paris"]})  # fmt: skip
    assert "Paris" not in banned.choices[0].message.content
    biased = chat(client, "Say hello.", max_tokens=3, logit_bias={str(ids[0]): 100})
    piece = server.post("/detokenize", {"tokens": [ids[0]]}).json()["prompt"]
    assert biased.choices[0].message.content == piece * 3


# ---- errors, before any KV block is used ----------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}},
         "response_format", "invalid or unsupported JSON schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "credit-card"}}}},
         "response_format", "format"),
        ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "structured_outputs",
         'Unimplemented keys: ["uniqueItems"]'),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "invalid or unsupported regex"),
        ({"structured_outputs": {"grammar": 'start: foo\nfoo: "a" bar'}}, "structured_outputs",
         'unknown name: "bar"'),
        ({"structured_outputs": {"grammar": "start: foo\nfoo: 'a'"}}, "structured_outputs",
         "(line 2 | foo: 'a')"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice.function.name", "the tool 'g' is not in `tools`"),
        ({"logit_bias": {"999999": 5}}, "logit_bias", "outside the model's vocabulary"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
         "response_format", "only one of them"),
    ],
)  # fmt: skip
def test_bad_constraints_are_a_400_naming_the_parameter(server, extra, param, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    error = assert_openai_error(server.post("/v1/chat/completions", body), 400)
    assert error["param"] == param and message in error["message"], error
    stats = server.get("/v1/engine/state").json()
    assert not stats["sequences"]  # nothing was queued


# ---- other clients ---------------------------------------------------------------------------
def test_langchain_with_structured_output_and_bind_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="x", temperature=0,
                     max_tokens=80, timeout=TIMEOUT_S, max_retries=0)  # fmt: skip
    person = llm.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)
    as_json = llm.with_structured_output(Person, method="json_mode").invoke(
        "Return a JSON object with the keys name (a short string) and age (a number) for a person."
    )
    assert isinstance(as_json, Person)  # json_object, parsed by LangChain into the model

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert [call["name"] for call in reply.tool_calls] == ["get_weather"]
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)


def test_litellm_tools(server):
    import litellm

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
    reply = litellm.completion(
        model=f"openai/{MODEL}", api_base=server.url + "/v1", api_key="x", timeout=TIMEOUT_S,
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=tools, tool_choice="required", temperature=0, max_tokens=60,
    )  # fmt: skip
    calls = reply.choices[0].message.tool_calls
    assert (
        reply.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
    )
    jsonschema.validate(json.loads(calls[0].function.arguments), tools[0]["function"]["parameters"])


def test_metrics_count_constrained_requests_and_mask_time(server):
    metrics = server.metrics()
    assert metrics[("nanovllm:structured_output_requests_total", ())] >= len(CASES)
    assert metrics[("nanovllm:structured_output_mask_rows_total", ())] > 100
    assert metrics[("nanovllm:structured_output_mask_seconds_total", ())] > 0
