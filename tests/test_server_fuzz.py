"""Property test: 2,000+ generated requests against `localmix serve` (conftest's `server`), valid
and broken bodies for the OpenAI, ollama and Mistral FIM endpoints: never a 5xx, never a hang, every error a
JSON body, and the server still serves afterwards. Replies are kept to a few tokens so the run
stays short; hypothesis is derandomized so CI sees the same requests every time."""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "mixtral-Q8_0"
SENT = {"n": 0}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-3, 3, allow_nan=False),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
                                 "content": st.one_of(st.text(max_size=40), json_values)})
messages = st.one_of(st.lists(message, min_size=1, max_size=4), json_values)
chat_fields = {
    "model": st.one_of(st.just(MODEL), st.text(max_size=10)),
    "messages": messages,
    "max_tokens": st.one_of(st.integers(-1, 3), st.text(max_size=3)),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), st.text(max_size=3)),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=6)),
    "seed": st.integers(-5, 2**33),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.just({"include_usage": True}), json_values),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-5, 40000).map(str), st.text(max_size=4)),
                                  st.floats(-200, 200, allow_nan=False), max_size=3),
    "response_format": st.one_of(st.just({"type": "json_object"}), json_values),
    "tools": json_values,
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", "any"]), json_values),
    "frequency_penalty": st.floats(-3, 3, allow_nan=False),
    "user": st.text(max_size=5),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 6)),
    "top_logprobs": st.integers(-1, 21),
    "n": st.integers(0, 5),
}
extra_key = st.text(min_size=1, max_size=8)


def request_for(path, fields, extra):
    body = dict(fields)
    if path in ("/v1/completions", "/v1/fim/completions"):
        body.pop("messages", None)
        body["prompt"] = extra.get("prompt", "Once")
    if path == "/v1/fim/completions":
        body["suffix"] = extra.get("prompt", "\n")
    if path == "/api/chat":
        body = {"model": body.get("model", MODEL), "messages": body.get("messages", []),
                "stream": body.get("stream", False), "options": {"num_predict": 2, **extra.get("options", {})}}
    if path != "/api/chat":
        body.setdefault("max_tokens", 2)
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
        body["max_tokens"] = 3
    return body


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/api/chat", "/v1/fim/completions"]),
       fields=st.fixed_dictionaries({}, optional=chat_fields),
       extra=st.fixed_dictionaries({}, optional={"prompt": st.one_of(st.text(max_size=20), json_values),
                                                 "options": st.dictionaries(
                                                     st.sampled_from(["temperature", "top_k", "seed", "mirostat",
                                                                      "num_ctx", "stop"]), scalars, max_size=2)}),
       junk=st.dictionaries(extra_key, json_values, max_size=1), raw=st.one_of(st.none(), st.binary(max_size=30)))
def fuzz_one(http, path, fields, extra, junk, raw):
    body = request_for(path, fields, extra)
    if junk:
        body.update(junk)
    content = raw if raw is not None else json.dumps(body).encode()
    SENT["n"] += 1
    with http.stream("POST", path, content=content, headers={"Content-Type": "application/json"}) as r:
        data = r.read()
    assert r.status_code < 500, (r.status_code, content[:300], data[:300])
    streaming = r.headers.get("content-type", "").startswith(("text/event-stream", "application/x-ndjson"))
    if r.status_code >= 400 or not streaming:
        json.loads(data)  # every answer that is not a stream is JSON, errors included
    elif path != "/api/chat":
        assert data.rstrip().endswith(b"data: [DONE]") or b'"error"' in data


def test_fuzz_requests(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=httpx.Timeout(30)) as http:
        fuzz_one(http)
    assert SENT["n"] >= 2000
    r = server.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert server.metrics()["busy_rejections_total"] == 0
