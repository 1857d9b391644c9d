"""The OpenAI dialect: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

Streaming is server-sent events ending in `data: [DONE]`; usage comes as a last chunk only when
`stream_options.include_usage` asks for it, as OpenAI does. Mistral's client talks to the same
chat endpoint (`random_seed`, `safe_prompt`, `tool_choice: "any"`: see mistral.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from localmix.frontends.server import logprobs, mistral, structured
from localmix.frontends.server.common import (
    ApiError,
    Run,
    State,
    coalesced,
    collect_all,
    sampling_from,
    sse,
    text_prompt,
)
from localmix.frontends.server.schemas import ACCEPTED, UNSUPPORTED, ChatRequest, Common, CompletionRequest
from localmix.runtime.prompt import FIM_TOKENS
from localmix.runtime.scheduler import Scored
from localmix.runtime.stream import Done, Piece

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


def router(state: State) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @api.get("/v1/models/{name}")
    async def model(name: str):
        state.check_model(name)
        return _model_card(state)

    @api.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        state.require()
        check_params(body)
        state.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = mistral.with_safe_prompt([m.model_dump(exclude_none=True) for m in body.messages], body.safe_prompt)
        plan = structured.plan(state, body, messages)
        tokens = plan.prompt(state)
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = Run(state, request_jobs(state, body, tokens, max_tokens=body.max_completion_tokens or body.max_tokens,
                                      grammar=plan.grammar, logprobs=top, bias=plan.bias, shown=plan.shown))
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        head = {"id": rid, "created": created, "model": state.options.model_name}
        names = logprobs.Names(state.engine.vocab.piece)
        if not body.stream:
            choices, dones = [], await collect_all(run, request)
            for i, done in enumerate(dones):
                message, finish = plan.reply(done.text), FINISH[done.reason]
                if message.get("tool_calls"):
                    finish = "tool_calls"
                scored = logprobs.chat(run.scores[i], names) if top is not None else None
                choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": scored})
            return {**head, "object": "chat.completion", "system_fingerprint": "localmix", "choices": choices,
                    "usage": token_usage(dones)}
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(run, head, "chat.completion.chunk", usage, plan,
                       (lambda scores, _: logprobs.chat(scores, names)) if top is not None else None)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.require()
        check_params(body)
        state.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request: 'prompt' must be a string or a list of one string",
                           param="prompt")
        run = Run(state, request_jobs(state, body, text_prompt(state, prompts[0]), max_tokens=body.max_tokens,
                                      strip_space=False, logprobs=body.logprobs))
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        head = {"id": rid, "created": created, "model": state.options.model_name}
        names = logprobs.Names(state.engine.vocab.piece)
        offset = len(prompts[0])

        def scored(scores, at):
            return logprobs.legacy(scores, names, offset + at) if body.logprobs is not None else None

        if not body.stream:
            dones = await collect_all(run, request)
            choices = [{"index": i, "text": done.text, "finish_reason": FINISH[done.reason],
                        "logprobs": scored(run.scores[i], 0)} for i, done in enumerate(dones)]
            return {**head, "object": "text_completion", "system_fingerprint": "localmix", "choices": choices,
                    "usage": token_usage(dones)}
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(run, head, "text_completion", usage, None, scored if body.logprobs is not None else None)

    return api


def check_params(body: Common) -> None:
    """Every parameter is used, harmless (ACCEPTED) or a 400 that names it."""
    for name, value in (body.model_extra or {}).items():
        if name in ACCEPTED:
            continue
        if name in UNSUPPORTED:
            if value in (None, False, 0):  # clients that send the default
                continue
            raise ApiError(400, f"the parameter {name!r} is not supported by localmix", param=name,
                           code="unsupported_parameter")
        raise ApiError(400, f"unknown parameter {name!r}", param=name, code="unknown_parameter")
    if body.seed is not None and body.random_seed is not None and body.seed != body.random_seed:
        raise ApiError(400, "'seed' and 'random_seed' disagree; give one", param="random_seed")
    if None not in (body.repetition_penalty, body.repeat_penalty) and body.repetition_penalty != body.repeat_penalty:
        raise ApiError(400, "'repetition_penalty' and 'repeat_penalty' disagree; give one", param="repeat_penalty")


def request_jobs(state: State, body: Common, tokens: list[int], max_tokens: int | None, grammar: str | None = None,
                 strip_space: bool = True, logprobs: int | None = None, bias: dict[int, float] | None = None,
                 shown: frozenset[int] = frozenset()) -> list[dict]:
    """The scheduler jobs of a request: `n` choices of one prompt, choice i seeded with seed + i."""
    if body.n > state.scheduler.parallel:
        raise ApiError(400, f"n={body.n} choices need as many slots and this server has {state.scheduler.parallel} "
                       "(restart it with a larger --parallel)", param="n")
    seed = body.seed if body.seed is not None else body.random_seed
    repeat = body.repetition_penalty if body.repetition_penalty is not None else body.repeat_penalty
    sampling = sampling_from(state, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                             min_p=body.min_p, repeat_penalty=repeat, seed=seed, max_tokens=max_tokens, stop=body.stop)
    if len(sampling.stop) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop")
    bias = dict(bias or {})  # the plan's, then the request's
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < state.engine.llm.n_vocab():
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model", param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, "logit_bias values must lie in [-100, 100]", param="logit_bias")
        bias[int(key)] = float("-inf") if value == -100 else value
    job = dict(tokens=tokens, sampling=sampling, frequency_penalty=body.frequency_penalty or 0.0,
               presence_penalty=body.presence_penalty or 0.0, logit_bias=bias, grammar=grammar,
               strip_space=strip_space, logprobs=logprobs, shown=shown)
    seeded = [dataclasses.replace(sampling, seed=(seed + i) % 2**32) for i in range(body.n)] if seed is not None \
        else [sampling] * body.n
    return [{**job, "sampling": s} for s in seeded]


def token_usage(dones: list[Done]) -> dict:
    """The prompt once (its choices share it), and every choice's tokens."""
    generated = sum(d.generated_tokens for d in dones)
    return {"prompt_tokens": dones[0].prompt_tokens, "completion_tokens": generated,
            "total_tokens": dones[0].prompt_tokens + generated}


def _model_card(state: State) -> dict:
    card = {"id": state.options.model_name, "object": "model", "created": int(state.started), "owned_by": "localmix"}
    # Mistral's model card adds these (its client requires `type`); OpenAI's clients ignore them
    n_ctx = state.scheduler.n_ctx if state.scheduler is not None else None
    return {**card, "type": "base", "name": state.options.model_name, "max_context_length": n_ctx, "aliases": [],
            "capabilities": {"completion_chat": True, "completion_fim": _fim(state), "function_calling": True,
                             "fine_tuning": False, "vision": False}}


def _fim(state: State) -> bool:
    vocab = state.engine.vocab if state.engine is not None else None
    return vocab is not None and all(vocab.special_id(t) is not None for t in FIM_TOKENS)


def event_stream(run: Run, head: dict, kind: str, include_usage: bool, plan, scored=None) -> StreamingResponse:
    """Server-sent chunks, each choice's by its `index`; with `scored(scores, at)`, a chunk
    carries the log-probabilities of the tokens that made its text (`at`: where the text starts)."""
    chat = kind == "chat.completion.chunk"
    n = len(run.jobs)

    def chunk(index, delta=None, finish=None, text=None, scores=None):
        choice = {"index": index, "finish_reason": finish,
                  "logprobs": scored(scores, sent[index]) if scored is not None and scores else None}
        choice.update({"delta": delta or {}} if chat else {"text": text or ""})
        if text:
            sent[index] += len(text)
        return sse({**head, "object": kind, "system_fingerprint": "localmix", "choices": [choice],
                    **({"usage": None} if include_usage else {})})

    def take(index) -> list:
        scores, pending[index] = pending[index], []
        return scores

    sent, pending = [0] * n, [[] for _ in range(n)]

    async def body():
        parsers = [plan.stream_parser() if plan is not None else None for _ in range(n)]
        dones: list[Done] = []
        try:
            if chat:
                for i in range(n):
                    yield chunk(i, {"role": "assistant", "content": ""})
            async for i, event in run.tagged():
                parser = parsers[i]
                if isinstance(event, Scored):
                    pending[i].append(event)
                elif isinstance(event, Piece):
                    if not event.text:
                        continue
                    if not chat:
                        yield chunk(i, text=event.text, scores=take(i))
                    else:
                        for delta in (parser.feed(event.text) if parser else [{"content": event.text}]):
                            yield chunk(i, delta, scores=take(i))
                elif isinstance(event, Done):
                    dones.append(event)
                    finish = FINISH[event.reason]
                    if parser:
                        for delta in parser.close():
                            yield chunk(i, delta, scores=take(i))
                        if parser.called:
                            finish = "tool_calls"
                    yield chunk(i, finish=finish, scores=take(i))  # the tokens no text came of (a stop string's)
            if include_usage:
                yield sse({**head, "object": kind, "system_fingerprint": "localmix", "choices": [],
                           "usage": token_usage(dones)})
            yield b"data: [DONE]\n\n"
        except ApiError as e:  # after the headers went out: the error goes in the stream
            yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
        finally:
            run.close()

    return StreamingResponse(coalesced(body(), run), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def error_body(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=e.headers)


def json_dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
