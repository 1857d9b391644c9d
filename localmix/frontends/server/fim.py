"""Mistral's fill in the middle: `POST /v1/fim/completions` (the mistralai client's
`client.fim.complete` and `stream`), `prompt` and `suffix` in, the middle out, in Mistral's
chat-completion shape. The prompt is mistral-common's FIM encoding (runtime/prompt.py); a model
whose vocabulary lacks the [PREFIX]/[SUFFIX] tokens (Mixtral 8x7B) gets a 400 that says so.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from localmix.errors import InputError
from localmix.frontends.server.common import ApiError, Run, State, check_context, collect_all
from localmix.frontends.server.openai import FINISH, check_params, event_stream, request_jobs, token_usage
from localmix.frontends.server.schemas import FIMRequest
from localmix.runtime.prompt import fim_tokens


def router(state: State) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/fim/completions")
    async def fim(body: FIMRequest, request: Request):
        state.require()
        check_params(body)
        state.check_model(body.model)
        try:
            tokens = fim_tokens(state.engine.vocab, body.prompt, body.suffix or "")
        except InputError as e:
            raise ApiError(400, str(e), param="model", code="fim_not_supported") from None
        # the middle continues the prompt's text: its first token's word-start space is kept
        run = Run(state, request_jobs(state, body, check_context(state, tokens), max_tokens=body.max_tokens,
                                      strip_space=False))
        head = {"id": "fim-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": state.options.model_name}
        if body.stream:
            return event_stream(run, head, "chat.completion.chunk", False, None)
        dones = await collect_all(run, request)
        return {**head, "object": "chat.completion", "usage": token_usage(dones),
                "choices": [{"index": i, "message": {"role": "assistant", "content": d.text},
                             "finish_reason": FINISH[d.reason]} for i, d in enumerate(dones)]}

    return api
