"""The ollama dialect: `POST /api/chat` and `/api/generate` (NDJSON streaming, the default, with
`options` and `format`), `GET /api/tags`, `POST /api/show`, `GET /api/version`, `GET /api/ps`.

ollama's `options` map onto localmix's sampling; those that only tune ollama's own runtime
(`num_thread`, `num_gpu`, ...) are accepted and have no effect, `num_ctx` above the server's
context is a 400, anything else a 400 that names it. `format` is `"json"` or a JSON schema;
tools and tool calls go through structured.py as for OpenAI, with arguments as objects.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from localmix.frontends.server import structured
from localmix.frontends.server.common import (
    ApiError,
    Run,
    State,
    chat_prompt,
    coalesced,
    collect,
    json_line,
    sampling_from,
    text_prompt,
)
from localmix.frontends.server.schemas import JsonSchema, ResponseFormat, Tool
from localmix.runtime.stream import Done, Piece

VERSION = "0.6.3"  # the ollama API version whose shapes this follows
DONE = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, gt=0.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=0, lt=2**32)
    num_predict: Optional[int] = Field(None, ge=-1)
    stop: Optional[list[str]] = None
    num_ctx: Optional[int] = Field(None, ge=1)
    # ollama's runtime knobs: nothing about the reply depends on them
    num_thread: Optional[int] = None
    num_gpu: Optional[int] = None
    num_batch: Optional[int] = None
    main_gpu: Optional[int] = None
    use_mmap: Optional[bool] = None
    numa: Optional[bool] = None
    num_keep: Optional[int] = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: Optional[list[str]] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_name: Optional[str] = None
    thinking: Optional[str] = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    stream: bool = True
    format: Union[Literal["", "json"], dict[str, Any], None] = None
    options: Optional[Options] = None
    keep_alive: Union[str, int, float, None] = None
    think: Union[bool, str, None] = None


class ChatRequest(_Request):
    messages: list[Message] = Field(default_factory=list)
    tools: Optional[list[Tool]] = None


class GenerateRequest(_Request):
    prompt: str = ""
    system: Optional[str] = None
    raw: bool = False
    suffix: Optional[str] = None
    images: Optional[list[str]] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None


class ShowRequest(BaseModel):
    model: str
    verbose: Optional[bool] = None


def router(state: State) -> APIRouter:
    api = APIRouter()

    def check_model(name: str) -> None:
        state.check_model(name.removesuffix(":latest"))

    @api.get("/api/version")
    async def version():
        return {"version": VERSION}

    @api.get("/api/tags")
    async def tags():
        return {"models": [_card(state)]}

    @api.get("/api/ps")
    async def ps():
        return {"models": [_card(state) | {"expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}] if state.ready else []}

    @api.post("/api/show")
    async def show(body: ShowRequest):
        check_model(body.model)
        engine = state.require() and state.engine
        meta = engine.metadata
        return {"modelfile": "", "parameters": "", "template": meta.get("tokenizer.chat_template", ""),
                "details": _card(state)["details"], "model_info": {k: _num(v) for k, v in meta.items()
                                                                   if not k.startswith("tokenizer.")},
                "capabilities": ["completion", "tools"], "modified_at": _now()}

    @api.post("/api/chat")
    async def chat(body: ChatRequest, request: Request):
        state.require()
        check_model(body.model)
        if not body.messages:  # ollama's way to load a model: an empty chat
            return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        if any(m.images for m in body.messages):
            raise ApiError(400, "images are not supported by this model")
        messages = [_openai_message(m) for m in body.messages]
        shim = SimpleNamespace(response_format=_format(body.format), tools=body.tools, tool_choice=None)
        plan = structured.plan(state, shim, messages, format_param="format")
        job = _job(state, body.options, plan.prompt(state), plan.grammar, bias=plan.bias, shown=plan.shown)
        run = Run(state, job)
        if not body.stream:
            done = await collect(run, request)
            return _final(body.model, done, {"message": _message(plan, done.text)})
        return _ndjson(run, body.model, "message", plan)

    @api.post("/api/generate")
    async def generate(body: GenerateRequest, request: Request):
        state.require()
        check_model(body.model)
        if body.images or body.suffix or body.template or body.context:
            name = next(k for k in ("images", "suffix", "template", "context") if getattr(body, k))
            raise ApiError(400, f"'{name}' is not supported by localmix")
        if not body.prompt:
            return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
        fmt = _format(body.format)
        plan = structured.plan(state, SimpleNamespace(response_format=fmt, tools=None, tool_choice=None), [],
                               format_param="format")
        if body.raw:
            tokens = text_prompt(state, body.prompt)
        else:
            system = [{"role": "system", "content": body.system}] if body.system else []
            tokens = chat_prompt(state, system + [{"role": "user", "content": body.prompt}])
        run = Run(state, _job(state, body.options, tokens, plan.grammar, strip_space=not body.raw))
        if not body.stream:
            done = await collect(run, request)
            return _final(body.model, done, {"response": done.text})
        return _ndjson(run, body.model, "response", None)

    return api


def _job(state: State, options: Options | None, tokens: list[int], grammar: str | None, strip_space: bool = True,
         bias: dict[int, float] | None = None, shown: frozenset[int] = frozenset()):
    o = options or Options()
    if o.num_ctx is not None and o.num_ctx > state.scheduler.n_ctx:
        raise ApiError(400, f"num_ctx {o.num_ctx} is over the server's context of {state.scheduler.n_ctx} tokens "
                       "(restart it with a larger --ctx)")
    max_tokens = None if o.num_predict in (None, -1) else max(o.num_predict, 1)
    sampling = sampling_from(state, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p,
                             repeat_penalty=o.repeat_penalty, seed=o.seed, max_tokens=max_tokens, stop=o.stop)
    return dict(tokens=tokens, sampling=sampling, frequency_penalty=o.frequency_penalty or 0.0,
                presence_penalty=o.presence_penalty or 0.0, grammar=grammar, strip_space=strip_space,
                logit_bias=bias or {}, shown=shown)


def _format(fmt) -> ResponseFormat | None:
    if fmt == "json":
        return ResponseFormat(type="json_object")
    if isinstance(fmt, dict):
        return ResponseFormat(type="json_schema", json_schema=JsonSchema(schema=fmt))
    return None


def _openai_message(m: Message) -> dict:
    out = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": structured.call_id(), "type": "function",
                              "function": {"name": c.function.name, "arguments": json.dumps(c.function.arguments)}}
                             for c in m.tool_calls]
    if m.role == "tool" and m.tool_name:
        out["name"] = m.tool_name
    return out


def _message(plan, text: str) -> dict:
    calls = plan.parse_calls(text)
    if calls is None:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in calls]}


def _final(model: str, done: Done, body: dict) -> dict:
    ns = 1_000_000_000
    return {"model": model, "created_at": _now(), **body, "done": True, "done_reason": DONE[done.reason],
            "total_duration": int((done.prompt_seconds + done.generate_seconds) * ns), "load_duration": 0,
            "prompt_eval_count": done.prompt_tokens, "prompt_eval_duration": int(done.prompt_seconds * ns),
            "eval_count": done.generated_tokens, "eval_duration": int(done.generate_seconds * ns)}


def _ndjson(run: Run, model: str, field: str, plan) -> StreamingResponse:
    def line(obj) -> bytes:
        return json_line(obj).encode() + b"\n"

    async def body():
        held = []
        try:
            async for event in run:
                if isinstance(event, Piece) and event.text:
                    if plan is not None and plan.tools:
                        held.append(event.text)  # a tool call is known only when it is whole
                        continue
                    piece = {"role": "assistant", "content": event.text} if field == "message" else event.text
                    yield line({"model": model, "created_at": _now(), field: piece, "done": False})
                elif isinstance(event, Done):
                    last = ({"role": "assistant", "content": ""} if field == "message" else "")
                    if held:
                        last = _message(plan, "".join(held))
                    yield line(_final(model, event, {field: last}))
        except ApiError as e:
            yield line({"error": e.message})
        finally:
            run.close()

    return StreamingResponse(coalesced(body(), run), media_type="application/x-ndjson")


def _card(state: State) -> dict:
    name = state.options.model_name
    meta = state.engine.metadata if state.engine is not None else {}
    size = state.engine.path.stat().st_size if state.engine is not None else 0
    return {"name": name, "model": name, "modified_at": _now(), "size": size, "digest": "",
            "details": {"format": "gguf", "family": meta.get("general.architecture", ""),
                        "parameter_size": "", "quantization_level": str(meta.get("general.file_type", ""))}}


def _num(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
