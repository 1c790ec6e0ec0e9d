"""What the simulator answers (issue 18 points 3 and 5, issue 20 point 7): Ollama's timings and OpenAI's usage,
capabilities (`think`, `tools`), structured output under `format`/`response_format`, tool calls in both
shapes, through the official `ollama` and `openai` clients and LangChain; and Go's 400s (not 500s) for
malformed fields."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import jsonschema
import ollama
import openai
import pytest
import requests
from pydantic import BaseModel

from simulator.prompt import render_chat, tokenize
from simulator.run import DEMO_FLEET, Fleet, fleet_from_dict, load_fleet
from simulator.structured import value_for

NODE = {
    "name": "new",
    "gpus": [{"name": "RTX 4090", "vram": "24GiB"}],
    "models": ["llama3.1:8b", "codellama:7b", "nomic-embed-text"],
    "token_rate": 0,
    "prefill_rate": 5000,
}
OLD = {**NODE, "name": "old", "version": "0.12.0"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "kelvin"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "address": {"$ref": "#/$defs/Address"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "address"],
    "$defs": {"Address": {"type": "object", "properties": {"zip": {"type": "string", "format": "uuid"}}}},
}


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str]


@pytest.fixture(scope="module")
def fleet():
    with Fleet(fleet_from_dict({"nodes": [NODE, OLD]})) as running:
        yield running


@pytest.fixture
def url(fleet):
    return fleet.urls["new"]


def post(url: str, path: str, body: object) -> requests.Response:
    return requests.post(url + path, data=json.dumps(body), timeout=30)


# -- 3. timings


def test_final_chunk_counts_cached_plus_new_tokens_from_v0_30_1_and_only_new_ones_before(fleet):
    messages = [{"role": "system", "content": "Cache me. " * 50}, {"role": "user", "content": "first"}]
    total = len(tokenize(render_chat(messages)))
    for name, cached_counted in (("new", True), ("old", False)):
        client = ollama.Client(host=fleet.urls[name])
        first = client.chat(model="llama3.1:8b", messages=messages)
        again = client.chat(model="llama3.1:8b", messages=messages)  # all cached but the last token
        assert first.prompt_eval_count == total
        assert again.prompt_eval_count == (total if cached_counted else 1)
        assert first.prompt_eval_duration == int(total / 5000 * 1e9)
        assert again.prompt_eval_duration == int(1 / 5000 * 1e9)  # new tokens only
        for final in (first, again):
            assert final.eval_count == 24 and final.eval_duration > 0
            assert final.total_duration >= final.load_duration + final.prompt_eval_duration
        generated = client.generate(model="llama3.1:8b", prompt="Why?", options={"num_predict": 5})
        assert (generated.eval_count, generated.done_reason) == (5, "length")
        assert generated.prompt_eval_count > 0 and generated.load_duration is not None


def test_openai_usage_is_ollamas_counts_without_cached_token_details(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    messages = [{"role": "user", "content": "Hello there, " * 20}]
    native = post(url, "/api/chat", {"model": "llama3.1:8b", "messages": messages, "stream": False}).json()
    reply = client.chat.completions.create(model="llama3.1:8b", messages=messages)
    assert reply.usage.prompt_tokens == native["prompt_eval_count"]
    assert reply.usage.completion_tokens == native["eval_count"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details is None  # Ollama's openai.Usage has no cached_tokens
    stream = client.chat.completions.create(
        model="llama3.1:8b", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == native["prompt_eval_count"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    completion = client.completions.create(model="llama3.1:8b", prompt="Say hi")
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens == 24


# -- 5. capabilities


def test_think_on_a_model_without_thinking_is_400_with_each_eras_text(fleet):
    body = {"model": "llama3.1:8b", "prompt": "x", "think": True}
    new = post(fleet.urls["new"], "/api/generate", body)
    assert (new.status_code, new.json()) == (400, {"error": '"llama3.1:8b" does not support thinking'})
    old = post(fleet.urls["old"], "/api/chat", {**body, "messages": [{"role": "user", "content": "x"}]})
    assert old.json() == {"error": "registry.ollama.ai/library/llama3.1:8b does not support thinking"}
    assert post(fleet.urls["new"], "/api/generate", {**body, "think": False}).status_code == 200
    bad = post(fleet.urls["new"], "/api/generate", {**body, "think": "hard"})
    assert bad.json()["error"] == (
        'invalid think value: "hard" (must be "high", "medium", "low", "max", true, or false)'
    )
    with pytest.raises(ollama.ResponseError, match="does not support thinking"):
        ollama.Client(host=fleet.urls["new"]).chat(model="llama3.1:8b", messages=[], think=True)
    client = openai.OpenAI(base_url=f"{fleet.urls['new']}/v1", api_key="x")
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="does not support thinking"):
        client.chat.completions.create(model="llama3.1:8b", messages=messages, reasoning_effort="high")
    with pytest.raises(openai.BadRequestError, match='invalid reasoning value: "huge"'):
        client.chat.completions.create(model="llama3.1:8b", messages=messages, reasoning_effort="huge")
    assert client.chat.completions.create(model="llama3.1:8b", messages=messages, reasoning_effort="none").choices


def test_tools_on_a_model_without_tools_is_400_on_api_chat_and_v1(url):
    messages = [{"role": "user", "content": "weather?"}]
    reply = post(url, "/api/chat", {"model": "codellama:7b", "messages": messages, "tools": [WEATHER]})
    expected = "registry.ollama.ai/library/codellama:7b does not support tools"
    assert (reply.status_code, reply.json()) == (400, {"error": expected})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="codellama:7b", messages=messages, tools=[WEATHER])
    assert raised.value.body["message"] == expected and raised.value.body["type"] == "invalid_request_error"


def test_value_for_a_schema_is_valid_and_deterministic():
    value = value_for(SCHEMA)
    jsonschema.validate(value, SCHEMA)
    assert value == value_for(SCHEMA) and value["age"] == 18 and len(value["tags"]) == 2
    for schema in (Person.model_json_schema(), {"type": ["integer", "null"], "exclusiveMinimum": 3}, {"enum": [7]}):
        jsonschema.validate(value_for(schema, "seed"), schema)


def test_format_json_and_a_schema_give_valid_json_on_both_apis(url):
    client = ollama.Client(host=url)
    plain = client.generate(model="llama3.1:8b", prompt="Give JSON", format="json")
    assert isinstance(json.loads(plain.response), dict)
    chunks = list(
        client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "x"}], format=SCHEMA, stream=True)
    )
    jsonschema.validate(json.loads("".join(c.message.content for c in chunks)), SCHEMA)
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    reply = oai.chat.completions.create(
        model="llama3.1:8b", messages=[{"role": "user", "content": "x"}], response_format=schema_format
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    parsed = oai.chat.completions.parse(
        model="llama3.1:8b", messages=[{"role": "user", "content": "x"}], response_format=Person
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)
    json_object = oai.chat.completions.create(
        model="llama3.1:8b", messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(json_object.choices[0].message.content), dict)
    bad = post(url, "/api/generate", {"model": "llama3.1:8b", "prompt": "x", "format": "xml"})
    assert (bad.status_code, bad.json()["error"]) == (
        500,
        'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object',
    )


def test_tools_give_a_tool_call_in_ollamas_shape_streaming_or_not(url):
    client = ollama.Client(host=url)
    messages = [{"role": "user", "content": "What time is it? Use get_time."}]
    reply = client.chat(model="llama3.1:8b", messages=messages, tools=[WEATHER, TIME])
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_time" and reply.message.content == "" and reply.done_reason == "stop"
    weather = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "Rain?"}], tools=[WEATHER])
    arguments = weather.message.tool_calls[0].function.arguments
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    chunks = list(client.chat(model="llama3.1:8b", messages=messages, tools=[WEATHER, TIME], stream=True))
    assert [c.message.tool_calls[0].function.name for c in chunks if c.message.tool_calls] == ["get_time"]
    assert chunks[-1].done and not chunks[-1].message.tool_calls
    raw = post(url, "/api/chat", {"model": "llama3.1:8b", "messages": messages, "tools": [TIME], "stream": False})
    assert raw.json()["message"]["tool_calls"][0]["id"].startswith("call_")
    assert raw.json()["message"]["tool_calls"][0]["function"] == {"index": 0, "name": "get_time", "arguments": {}}
    answered = [*messages, reply.message, {"role": "tool", "content": "12:00", "tool_name": "get_time"}]
    final = client.chat(model="llama3.1:8b", messages=answered, tools=[WEATHER, TIME])
    assert not final.message.tool_calls and final.message.content  # after a tool's result, words


def test_tools_give_a_tool_call_in_openais_shape_streaming_or_not(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    reply = client.chat.completions.create(model="llama3.1:8b", messages=messages, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].type == "function"
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(model="llama3.1:8b", messages=messages, tools=[WEATHER], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [c[0].function.name for c in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    followed = [
        *messages,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    final = client.chat.completions.create(model="llama3.1:8b", messages=followed, tools=[WEATHER])
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content


def test_langchain_structured_output_and_bound_tools_on_the_demo_cluster():
    chat_ollama = pytest.importorskip("langchain_ollama").ChatOllama
    demo = load_fleet(DEMO_FLEET)
    nodes = tuple(replace(n, port=0, load_speed=0) for n in demo.nodes)  # its speeds, no fixed ports
    with Fleet(replace(demo, control_port=0, nodes=nodes)) as running:
        _langchain_against(chat_ollama(model="llama3.1:latest", base_url=running.urls["gpu-large"]))


def _langchain_against(model: Any) -> None:
    person = model.with_structured_output(Person).invoke("Describe a person")
    assert isinstance(person, Person)
    as_tool = model.with_structured_output(Person, method="function_calling").invoke("Describe a person")
    assert isinstance(as_tool, Person)
    called = model.bind_tools([WEATHER]).invoke("Weather in Rome?")
    assert [c["name"] for c in called.tool_calls] == ["get_weather"]
    assert isinstance(called.tool_calls[0]["args"]["city"], str)


# -- issue 20, point 7: what Ollama answers with 400 (or takes) is never a 500


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", {"model": "llama3.1:8b", "prompt": "x", "keep_alive": "\ud800"}, 400,
         'time: invalid duration "\\xef\\xbf\\xbd"'),
        ("/api/chat", {"model": "llama3.1:8b", "keep_alive": "\ud800"}, 400, 'time: invalid duration "\\xef\\xbf\\xbd"'),
        ("/api/embed", {"model": "nomic-embed-text", "keep_alive": "\ud800"}, 400, 'time: invalid duration "\\xef\\xbf\\xbd"'),
        ("/api/generate", {"model": "\ud800"}, 404, "model '\ufffd' not found"),
        ("/api/generate", {"model": "llama3.1:8b", "prompt": "\ud800", "stream": False}, 200, None),
        ("/api/chat", {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "\ud800"}], "stream": False},
         200, None),
        ("/api/embed", {"model": "nomic-embed-text", "input": ["\ud800"]}, 200, None),
        ("/api/embeddings", {"model": "nomic-embed-text", "prompt": "\ud800"}, 200, None),
        ("/api/chat", {"model": "llama3.1:8b", "messages": [{"role": "user", "images": 5}]}, 400,
         "json: cannot unmarshal number into Go struct field Message.messages.images of type []api.ImageData"),
        ("/api/chat", {"model": "llama3.1:8b", "messages": [{"role": "user", "tool_calls": "x"}]}, 400,
         "json: cannot unmarshal string into Go struct field Message.messages.tool_calls of type []api.ToolCall"),
        ("/api/chat", {"model": "llama3.1:8b", "messages": [], "tools": "x"}, 400,
         "json: cannot unmarshal string into Go struct field ChatRequest.tools of type api.Tools"),
        ("/v1/chat/completions", {"model": "llama3.1:8b", "messages": 1}, 400,
         "json: cannot unmarshal number into Go struct field ChatCompletionRequest.messages of type []openai.Message"),
        ("/v1/chat/completions", {"model": "llama3.1:8b", "messages": ["s"]}, 400,
         "json: cannot unmarshal string into Go struct field ChatCompletionRequest.messages of type openai.Message"),
        ("/v1/chat/completions", {"model": "llama3.1:8b", "messages": [{"role": "user", "tool_call_id": [1]}]},
         400, "json: cannot unmarshal array into Go struct field Message.messages.tool_call_id of type string"),
        ("/v1/chat/completions", {"model": "llama3.1:8b", "messages": [], "max_tokens": 1.5}, 400,
         "json: cannot unmarshal number 1.5 into Go struct field ChatCompletionRequest.max_tokens of type int"),
        ("/v1/chat/completions", {"model": "llama3.1:8b", "messages": []}, 400, "[] is too short - 'messages'"),
        ("/v1/completions", {"model": "llama3.1:8b", "prompt": ["\ud800"]}, 200, None),
        ("/v1/embeddings", {"model": "nomic-embed-text", "input": "\ud800"}, 200, None),
    ],
)  # fmt: skip
def test_malformed_fields_get_gos_400_and_lone_surrogates_become_u_fffd(url, path, body, status, error):
    reply = requests.post(url + path, data=json.dumps(body), timeout=30)  # json.dumps keeps "\ud800" escaped
    assert reply.status_code == status, reply.text
    if error is not None:
        shown = reply.json()["error"]
        assert (shown["message"] if isinstance(shown, dict) else shown) == error
