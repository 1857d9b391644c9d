"""The ASGI application: the dialects' routers behind the safety checks, `/health`, `/metrics`.

FastAPI on uvicorn: the request bodies are pydantic models (schemas.py), which give the
OpenAPI schema (`/openapi.json`) and the 400s for wrong types without hand-written checks, and
uvicorn is the ASGI server the Python ecosystem runs in production. The checks are plain ASGI
middleware, outermost first: an access-log line per request (and a JSON 500, never a
traceback, for a bug), the Host allow-list (DNS rebinding), the API key (the chat page's own
files need none: webui.py), the body-size cap.
Errors take the shape of the dialect of the path: ollama's `{"error": "..."}` under `/api/`,
OpenAI's `{"error": {"message", "type", "param", "code"}}` elsewhere.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from localmix.frontends.server import fim, ollama, openai, webui
from localmix.frontends.server.common import ApiError, State

log = logging.getLogger("localmix.server")
access = logging.getLogger("localmix.access")


def error_response(path: str, status: int, message: str, param=None, kind="invalid_request_error", code=None,
                   headers=None) -> JSONResponse:
    if path.startswith("/api/"):
        body = {"error": message}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(state: State) -> FastAPI:
    """The app over `state`; until its engine and scheduler are set (run.py loads them),
    /health says 503 and the API answers 503 with Retry-After."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if state.scheduler is not None:
            state.scheduler.close()

    app = FastAPI(title="localmix", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(openai.router(state))
    app.include_router(ollama.router(state))
    app.include_router(fim.router(state))
    if state.options.webui:
        app.include_router(webui.router())

    @app.get("/health")
    async def health():
        if state.load_error:
            lost = {} if state.lost_workers is None else {"lost_workers": state.lost_workers}
            return JSONResponse({"status": "error", "error": state.load_error, **lost}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": state.options.model_name}

    @app.get("/props")
    async def props():
        """What a client shows of the server (llama-server's `/props`): the model, the context of
        a slot, the slots (--parallel) and the sampling a request gets by default."""
        s, sampling = state.scheduler, state.options.sampling
        status = "error" if state.load_error else "ok" if state.ready else "loading"
        return {"model": state.options.model_name, "status": status, "error": state.load_error,
                "n_ctx": s.n_ctx if s is not None else None, "total_slots": s.parallel if s is not None else None,
                "default_generation_settings": {
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                    "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty, "seed": sampling.seed,
                    "max_tokens": sampling.max_tokens}}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(state), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e.status, e.message, e.param, e.kind, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", []
        else:
            message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
        return error_response(request.url.path, 400, message, ".".join(where) or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_response(request.url.path, e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    wrapped = BodyLimit(app, state.options.max_body)
    if state.options.cors:
        wrapped = CORSMiddleware(wrapped, allow_origins=list(state.options.cors), allow_methods=["*"],
                                 allow_headers=["*"])
    wrapped = Guard(wrapped, state)
    return AccessLog(wrapped, state)


async def _send_json(send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()]})
    await send({"type": "http.response.body", "body": response.body})


class AccessLog:
    """One line per request on stderr; a bug becomes a JSON 500 and a log entry, never a traceback to the client."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, started = time.perf_counter(), [0], [False]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        except Exception:
            log.exception("bug while serving %s %s", scope["method"], scope["path"])
            if not started[0]:
                status[0] = 500
                await _send_json(send, error_response(scope["path"], 500, "internal error (see the server's log)",
                                                      kind="server_error"))
        finally:
            key = (scope["path"], status[0])
            self.state.http_requests[key] = self.state.http_requests.get(key, 0) + 1
            client = scope.get("client") or ("-", 0)
            access.info('%s "%s %s" %d %.1fms', client[0], scope["method"], scope["path"], status[0],
                        1000 * (time.perf_counter() - t0))


class Guard:
    """The Host allow-list and the API key (`Authorization: Bearer KEY`; /health needs none)."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.lower() not in self.state.options.allowed_hosts:
            return await _send_json(send, error_response(scope["path"], 400, f"Host {host!r} is not allowed "
                                                         "(start the server with --allow-host to add it)",
                                                         code="host_not_allowed"))
        key = self.state.options.api_key
        page = self.state.options.webui and webui.is_page(scope["path"])
        if key and scope["path"] != "/health" and not page:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "wrong API key"
                return await _send_json(send, error_response(scope["path"], 401, message, kind="authentication_error",
                                                             code="invalid_api_key",
                                                             headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a body over `limit` bytes with a 413, by its Content-Length or as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_big = error_response(scope["path"], 413, f"the request body is over the server's limit of {self.limit} "
                                 "bytes (--max-body)", code="body_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, too_big)
        chunks, size = [], 0
        while True:  # read the body up front, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_json(send, too_big)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), [False]
        kind = headers.get(b"content-type", b"")
        if body and (not kind or kind.startswith(b"application/x-www-form-urlencoded")):
            # `curl -d '{...}'` labels JSON as a form: read it as the JSON it is
            headers[b"content-type"] = b"application/json"
            scope = {**scope, "headers": list(headers.items())}

        async def replay():
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def prometheus(state: State) -> str:
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP localmix_{name} {help_}")
        lines.append(f"# TYPE localmix_{name} {kind}")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"localmix_{name}{label} {value}")

    metric("http_requests_total", "counter", "HTTP requests by path and status.",
           [({"path": p, "status": s}, n) for (p, s), n in sorted(state.http_requests.items())])
    s = state.scheduler
    if s is not None:
        m = s.metrics
        metric("requests_total", "counter", "Generations submitted to the scheduler.", [({}, m.requests)])
        metric("prompt_tokens_total", "counter", "Prompt tokens evaluated.", [({}, m.prompt_tokens)])
        metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's KV cache.",
               [({}, m.cached_tokens)])
        metric("prompt_tokens_borrowed_total", "counter",
               "Of the cached prompt tokens, those copied from another slot's KV cache or from RAM.",
               [({}, m.borrowed_tokens)])
        metric("prompt_cache_bytes", "gauge", "KV cells of earlier requests kept in RAM (--cache-ram).",
               [({}, m.saved_bytes)])
        metric("generated_tokens_total", "counter", "Tokens generated.", [({}, m.generated_tokens)])
        metric("cancelled_total", "counter", "Generations cancelled (client gone, shutdown).", [({}, m.cancelled)])
        metric("cancel_lag_steps_max", "gauge", "Most decode steps between a cancel and its slot being freed.",
               [({}, m.max_cancel_lag)])
        metric("busy_rejections_total", "counter", "Requests refused with 503: queue full.", [({}, m.busy_rejections)])
        metric("decode_steps_total", "counter", "llama_decode calls.", [({}, m.steps)])
        metric("batch_sequences_max", "gauge", "Most sequences one llama_decode served.",
               [({}, m.max_batch_sequences)])
        metric("decode_seconds_total", "counter", "Time in llama_decode.", [({}, round(m.decode_seconds, 6))])
        tps = m.generated_tokens / m.decode_seconds if m.decode_seconds > 0 else 0.0
        metric("tokens_per_second", "gauge", "Generated tokens per second of decoding.", [({}, round(tps, 3))])
        metric("queue_depth", "gauge", "Requests waiting for a slot.", [({}, s.queued)])
        metric("active_sequences", "gauge", "Slots generating now.", [({}, s.active)])
        metric("slots", "gauge", "Sequences decoded together (--parallel).", [({}, s.parallel)])
    return "\n".join(lines) + "\n"


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()
