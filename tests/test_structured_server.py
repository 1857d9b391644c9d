"""Structured output from `localmix serve` (conftest's `server`, the tiny random Mixtral): the
model's choices are random, so only the grammar makes a reply fit its schema. A property test
draws schemas from OpenAI's supported subset and validates every reply with `jsonschema`
(formats included); each keyword the grammar cannot enforce is a 400 that names it and where it
is, through the OpenAI, ollama and Mistral clients and for a forced tool call's arguments; the
server goes on serving."""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistralai.client import Mistral
from mistralai.client.errors import SDKError
from test_structured_grammar import FORMAT_CHECKS

MODEL = "mixtral-Q8_0"
ASK = [{"role": "user", "content": "Answer in JSON."}]

FORMATS = jsonschema.FormatChecker()
for _name, _check in FORMAT_CHECKS.items():
    FORMATS.checks(_name, raises=(ValueError, TypeError))(_check)


def validate(value, schema) -> None:
    jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(value)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=120)


def ask_json(client, schema: dict, seed: int = 0, max_tokens: int = 600):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=max_tokens,
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", (schema, choice.message.content)  # not cut by max_tokens
    return json.loads(choice.message.content)


# Schemas of OpenAI's supported subset, kept small enough that a random model finishes them:
# strings have a maxLength, a format, a pattern or an enum; arrays a maxItems.
small = st.integers(0, 4)
bound = st.integers(-1000, 1000)


@st.composite
def strings(draw):
    kind = draw(st.sampled_from(["length", "format", "pattern"]))
    if kind == "format":
        return {"type": "string", "format": draw(st.sampled_from(sorted(FORMAT_CHECKS)))}
    if kind == "pattern":
        return {"type": "string", "pattern": draw(st.sampled_from(
            ["^[A-Z]{2}-[0-9]{3}$", "^(yes|no|maybe)$", "^\\d{1,3}(\\.\\d)?$", "^[a-f]+[0-9]?$", "^x\\w{0,3}$"]))}
    high = draw(st.integers(0, 6))
    return {"type": "string", "minLength": draw(st.integers(0, high)), "maxLength": high}


@st.composite
def numbers(draw):
    out = {"type": draw(st.sampled_from(["integer", "number"]))}
    lo, hi = sorted([draw(bound), draw(bound)])
    for key, value in (("minimum", lo), ("maximum", hi)):
        if draw(st.booleans()):
            exclusive = draw(st.booleans()) and lo < hi - 1
            out[("exclusiveM" + key[1:]) if exclusive else key] = value
    return out


leaves = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}), strings(), numbers(),
    st.lists(st.one_of(st.text("abc", max_size=3), st.integers(-5, 5)), min_size=1, max_size=4, unique=True)
    .map(lambda v: {"enum": v}),
    st.one_of(st.booleans(), st.text("xyz", max_size=3)).map(lambda v: {"const": v}),
    st.integers(0, 5).map(lambda n: {"type": ["string", "null"], "maxLength": n}),
    st.integers(1, 12).map(lambda k: {"type": "integer", "multipleOf": k}),
)


@st.composite
def objects(draw, inner):
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d e", "ünï"]), min_size=1, max_size=3, unique=True))
    props = {n: draw(inner) for n in names}
    required = [n for n in names if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@st.composite
def arrays(draw, inner):
    high = draw(st.integers(0, 3))
    return {"type": "array", "items": draw(inner), "minItems": draw(st.integers(0, high)), "maxItems": high}


def composites(inner):
    return st.one_of(objects(inner), arrays(inner), st.lists(inner, min_size=2, max_size=2).map(lambda a: {"anyOf": a}))


@st.composite
def with_defs(draw, inner):
    """A definition used twice through $ref."""
    item = draw(inner)
    return {"$defs": {"item": item}, "type": "object", "properties": {"x": {"$ref": "#/$defs/item"},
                                                                      "y": {"$ref": "#/$defs/item"}},
            "required": ["x", "y"], "additionalProperties": False}


schemas = st.recursive(leaves, composites, max_leaves=5)
schemas = st.one_of(schemas, with_defs(schemas))


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=schemas, seed=st.integers(0, 2**16))
def test_every_reply_validates_against_its_schema(client, schema, seed):
    validate(ask_json(client, schema, seed), schema)


def test_recursive_schema(client):
    linked = {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
              "required": ["v", "next"], "additionalProperties": False}
    for seed in range(3):
        validate(ask_json(client, linked, seed), linked)


REFUSED = [
    ({"type": "object", "properties": {"age": {"type": "number", "multipleOf": 0.5}}}, "multipleOf",
     "/properties/age/multipleOf"),
    ({"type": "integer", "multipleOf": 3, "maximum": 30}, "multipleOf", "/multipleOf"),
    ({"type": "object", "properties": {"p": {"type": "number", "minimum": 0.5}}}, "minimum", "/properties/p/minimum"),
    ({"type": "number", "maximum": 2.25}, "maximum", "/maximum"),
    ({"type": "number", "exclusiveMinimum": -1e10}, "exclusiveMinimum", "/exclusiveMinimum"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf", "/oneOf"),
    ({"allOf": [{"type": "string"}]}, "allOf", "/allOf"),
    ({"not": {"type": "string"}}, "not", "/not"),
    ({"type": "object", "if": {}, "then": {}}, "if", "/if"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", "/uniqueItems"),
    ({"type": "array", "prefixItems": [{"type": "integer"}]}, "prefixItems", "/prefixItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains", "/contains"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", "/patternProperties"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames", "/propertyNames"),
    ({"type": "object", "minProperties": 1}, "minProperties", "/minProperties"),
    ({"type": "object", "maxProperties": 1}, "maxProperties", "/maxProperties"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "/dependentRequired"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties", "/unevaluatedProperties"),
    ({"type": "string", "format": "uri"}, "format", "/format"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "pattern", "/pattern"),
    ({"type": "string", "pattern": "(?i)^abc$"}, "pattern", "/pattern"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}, "maxLength", "/maxLength"),
    ({"$ref": "https://example.com/schema.json"}, "$ref", "/$ref"),
    ({"$defs": {"d": {"type": "string", "contentEncoding": "base64"}}, "type": "array", "items": {"$ref": "#/$defs/d"}},
     "contentEncoding", "/$defs/d/contentEncoding"),
]


@pytest.mark.parametrize("schema, keyword, pointer", REFUSED, ids=[k for _, k, _ in REFUSED])
def test_refused_keyword_is_a_400_that_names_it_and_where(client, schema, keyword, pointer):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "out", "schema": schema}})
    error = e.value.response.json()["error"]
    assert f"'{keyword}' at {pointer}" in error["message"] and error["param"] == "response_format", error
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices[0].message.content


def test_forced_tool_call_arguments_follow_their_schema(client):
    params = {"$defs": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "type": "object",
              "properties": {"airport": {"$ref": "#/$defs/code"}, "passengers": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 9},
                             "date": {"type": "string", "format": "date"}},
              "required": ["airport", "passengers", "date"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "book", "parameters": params}}
    for choice in ("required", {"type": "function", "function": {"name": "book"}}):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[tool], tool_choice=choice,
                                               temperature=1.0, seed=5, max_tokens=200)
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "book"
        validate(json.loads(call.function.arguments), params)
    bad = {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.25}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[tool, bad], tool_choice="required",
                                       max_tokens=8)
    error = e.value.response.json()["error"]
    assert error["param"] == "tools" and error["message"].startswith("tools[1].function.parameters: ")
    assert "'multipleOf' at /properties/n/multipleOf" in error["message"]


def test_ollama_format_is_enforced_or_refused(server):
    olla = ollama.Client(host=server.url, headers=server.headers, timeout=120)
    schema = {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"},
                                               "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50}},
              "required": ["id", "n"], "additionalProperties": False}
    reply = olla.chat(MODEL, ASK, format=schema, options={"temperature": 1.0, "seed": 2, "num_predict": 200})
    assert reply.done_reason == "stop"
    validate(json.loads(reply.message.content), schema)
    done = olla.generate(MODEL, "JSON:", format=schema, options={"temperature": 1.0, "seed": 3, "num_predict": 200})
    validate(json.loads(done.response), schema)
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(MODEL, ASK, format={"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.5}}})
    assert e.value.status_code == 400
    assert str(e.value.error).startswith("format: ") and "'multipleOf' at /properties/x/multipleOf" in e.value.error


def test_mistral_response_format_is_enforced_or_refused(server):
    mistral = Mistral(api_key=server.key, server_url=server.url, timeout_ms=120000)
    schema = {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "minItems": 1, "maxItems": 2}},
              "required": ["when", "tags"], "additionalProperties": False}
    reply = mistral.chat.complete(model=MODEL, messages=ASK, temperature=1.0, random_seed=4, max_tokens=200,
                                  response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop"
    validate(json.loads(reply.choices[0].message.content), schema)
    with pytest.raises(SDKError) as e:
        mistral.chat.complete(model=MODEL, messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "array", "uniqueItems": True}}})
    assert e.value.status_code == 400 and "'uniqueItems' at /uniqueItems" in str(e.value.body)
