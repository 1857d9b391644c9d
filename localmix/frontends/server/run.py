"""`localmix serve`: check the flags, start serving, load the model meanwhile, serve until
SIGINT/SIGTERM (stop accepting, let running requests finish for a few seconds, then the
scheduler cancels what is left and frees llama.cpp's context).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from localmix.errors import InputError
from localmix.frontends.options import Load
from localmix.frontends.server.common import Options, State

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


AUTO_PARALLEL = (4, 3, 2)  # without --parallel: llama-server's automatic 4 sequences, or as many as fit


def auto_parallel(path: Path, load: Load) -> tuple[int, Load]:
    """Without --parallel: as many sequences as memory leaves room for, up to llama-server's
    automatic 4, each with the context one sequence would get (--ctx, or the model's own capped
    by memory). Returns the number and `load` with that context."""
    from localmix.frontends.load import plan_engine

    ctx, _, _ = plan_engine(path, load.ctx, load.force, load.vram, load.ram, load.n_cpu_moe, rpc=load.rpc,
                            flash_attn=load.flash_attn)
    load = dataclasses.replace(load, ctx=ctx)
    for n in AUTO_PARALLEL:
        try:
            plan_engine(path, ctx, False, load.vram, load.ram, load.n_cpu_moe, sequences=n, rpc=load.rpc,
                        flash_attn=load.flash_attn)
            return n, load
        except InputError:  # n KV caches of ctx tokens do not fit
            continue
    return 1, load


def serve(path: Path, options: Options, host: str = "127.0.0.1", port: int = 8080, parallel: int | None = None,
          queue: int = 16, chunk: int = 128, load: Load | None = None, allow_hosts: tuple[str, ...] = (),
          announce=print, cache_ram: str = "1GiB") -> None:
    """Serve the model at `path` on host:port until SIGINT/SIGTERM; `load` says how to open it
    (the llama.cpp engine, `parallel` sequences of `load.ctx` tokens; None: `auto_parallel`)."""
    import uvicorn

    from localmix.frontends.server.app import build_app
    from localmix.gguf.check import check_gguf

    options.api_key = options.api_key or os.environ.get("LOCALMIX_API_KEY") or None
    if not is_loopback(host) and not options.api_key:
        raise InputError(f"--host {host} is reachable from other machines: set --api-key (or LOCALMIX_API_KEY) "
                         "to serve there, or keep the default 127.0.0.1")
    if parallel is not None and parallel < 1:
        raise InputError("--parallel must be at least 1")
    from localmix.runtime.devices import parse_size

    cache_bytes = parse_size(cache_ram)  # a clean error now, not after loading
    extra = {host.lower(), *(h.lower() for h in allow_hosts)}
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        extra.add(f"[{host}]" if ":" in host else host)
    options.allowed_hosts = tuple(sorted(set(options.allowed_hosts) | extra))
    check_gguf(path)  # a broken file is a clean error now, not a failed load later
    from localmix.frontends.load import plan_engine

    load = load or Load()
    chosen = parallel is None
    if chosen:
        parallel, load = auto_parallel(path, load)
    # --parallel KV caches that do not fit: an error now
    plan_engine(path, load.ctx, load.force, load.vram, load.ram, load.n_cpu_moe, sequences=parallel, rpc=load.rpc,
                flash_attn=load.flash_attn)
    try:  # a port in use is a clean error too
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]"), port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None

    def load_and_run(state: State) -> None:
        """Load the model, make the scheduler and run its loop, all on this one thread: llama.cpp's
        OpenMP threads decode 4x slower when a second thread has computed (runtime/scheduler.py)."""
        from localmix.frontends.load import open_engine
        from localmix.runtime.rpc import parse_endpoints
        from localmix.runtime.scheduler import Scheduler

        log = logging.getLogger("localmix.server")
        try:
            workers = parse_endpoints(load.rpc) if load.rpc else []
            engine = open_engine(path, load, sequences=parallel,
                                 on_lost=lambda gone, message: lost(state, gone, workers))
            state.engine = engine
            scheduler = Scheduler(engine.llm, parallel=parallel, n_ctx=engine.n_ctx, queue_size=queue, chunk=chunk,
                                  release_engine_context=True, thread=False, cache_bytes=cache_bytes)
        except Exception as e:  # shown on /health and in the log; the server keeps answering
            state.load_error = f"the model failed to load: {e}"
            log.error(state.load_error)
            return
        state.scheduler = scheduler
        log.info("model loaded: %s, %d slot(s) of %d tokens", path.name, parallel, engine.n_ctx)
        scheduler.run()

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    state = State(options)
    app = build_app(state)
    shown = f"[{host}]" if ":" in host else host
    announce(f"localmix serving {options.model_name} ({path}) at http://{shown}:{port}  "
             f"({'chat page: /, ' if options.webui else ''}OpenAI: /v1, ollama: /api, {parallel} slot(s){' (memory allows them; --parallel sets it)' if chosen else ''}"
             f"{', API key required' if options.api_key else ''})")
    # An idle kept-alive connection is closed after 65 s, longer than clients keep one (httpx, and
    # so the openai, ollama and mistralai clients: 5 s). With uvicorn's 5 s, equal to theirs, a
    # client could send its next request on a connection the server was closing that moment and
    # get "connection reset" (the soak met one in 20441 requests).
    config = uvicorn.Config(app, host=host.strip("[]"), port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, timeout_keep_alive=65, lifespan="on")
    server = uvicorn.Server(config)
    # HTTP in a thread, the model loaded and the scheduler run in another (/health says 503 until
    # it is loaded); the main thread gets the signals, even while llama.cpp waits on a lost worker.
    http = threading.Thread(target=server.run, name="localmix-http", daemon=True)
    compute = threading.Thread(target=load_and_run, args=(state,), name="localmix-engine", daemon=True)

    def stop(*_):
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http.start()
    compute.start()
    while http.is_alive():
        http.join(0.5)
    while compute.is_alive() and state.lost_workers is None:  # a load still running, a loop still stepping
        if state.scheduler is not None:
            state.scheduler.close()  # its loop returns (the app's shutdown has closed it already)
        compute.join(0.5)
    announce("localmix stopped")
    if state.lost_workers is not None:  # llama.cpp's threads wait on the lost worker forever: no exit handlers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def lost(state: State, gone: list[str], workers: list[str]) -> None:
    """An RPC worker stopped answering (runtime/rpc.py's `watch`): the requests in flight get a
    503, /health says which worker, the server goes on answering until it is stopped. Lost while
    loading (the main thread stuck in llama.cpp), the server ends with one line, as `run`."""
    from localmix.frontends.server.common import ApiError
    from localmix.runtime.rpc import exit_on_loss, lost_line

    if state.scheduler is None:
        exit_on_loss(gone, "")
    state.lost_workers = gone or workers
    state.load_error = lost_line(gone, workers) + ": restart localmix serve"
    logging.getLogger("localmix.server").error(state.load_error)
    state.scheduler.abandon(ApiError(503, state.load_error, kind="server_error", code="worker_lost"))
