"""`localmix worker`: lend this machine's memory and compute to a `localmix run/chat/serve --rpc`
on another machine, through llama.cpp's RPC server (runtime/rpc.py).

llama.cpp's server never returns, so it runs on a thread of its own while the main thread
waits for SIGINT/SIGTERM and then ends the process (the server has no stop call). Its own
banner and connection lines go to stderr with --verbose, nowhere otherwise; localmix prints one
line saying where it serves what.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

from localmix.errors import InputError
from localmix.frontends.server.run import is_loopback

UNAUTHENTICATED_WARNING = ("warning: the RPC protocol has no authentication and no encryption: anyone who can reach "
                           "{endpoint} can read and write this process's memory and run graphs on it. Serve only on a "
                           "network you trust (a LAN behind a firewall, a VPN), never the internet.")


def check_host(host: str, unauthenticated_ok: bool) -> None:
    if not is_loopback(host) and not unauthenticated_ok:
        raise InputError(f"--host {host} would let other machines use this worker without any password: the RPC "
                         "protocol has none. Pass --unauthenticated-network as well to serve there, on a network "
                         "you trust, or keep the default 127.0.0.1")


def serve_worker(host: str = "127.0.0.1", port: int = 50052, threads: int | None = None, cache: Path | None = None,
                 unauthenticated_ok: bool = False, verbose: bool = False, announce=print) -> int:
    """Serve this machine's device at host:port until SIGINT/SIGTERM; returns the exit code."""
    from localmix.runtime.llama import usable_cpus
    from localmix.runtime.log import set_llama_log
    from localmix.runtime.memory import available_memory
    from localmix.runtime.rpc import local_devices, start_server
    from localmix.units import human_bytes

    check_host(host, unauthenticated_ok)
    if ":" in host:  # llama.cpp splits an endpoint at its first colon
        raise InputError(f"--host {host}: llama.cpp's RPC server takes an IPv4 address or a host name, not IPv6")
    endpoint = f"{host}:{port}"
    try:  # a port in use is a clean error, before llama.cpp's own (a line on stdout and a return)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {endpoint}: {e.strerror or e}") from None
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot use --cache {cache}: {e.strerror or e}") from None
    set_llama_log(verbose)  # llama.cpp's log (the tensor cache's lines...) only with --verbose
    served = local_devices()
    # llama.cpp prints to stdout: keep it off ours (stderr with --verbose), localmix's line on ours
    ours = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    target = os.dup(sys.stderr.fileno()) if verbose else os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, sys.stdout.fileno())
    os.close(target)
    n_threads = threads or usable_cpus()
    stopped = threading.Event()
    failed: list[str] = []

    def run() -> None:
        try:
            start_server(endpoint, str(cache) if cache else None, n_threads, [dev for dev, _ in served])
        finally:
            failed.append(endpoint)
            stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    threading.Thread(target=run, name="localmix-rpc-server", daemon=True).start()
    what = ", ".join(f"{d.name} ({d.description}, {human_bytes(d.free)} free of {human_bytes(d.total)})"
                     if d.kind != "cpu" else  # llama.cpp offers all RAM as free: say what is available now
                     f"{d.name} ({d.description}, {human_bytes(available_memory())} RAM available now; clients are "
                     f"offered all {human_bytes(d.total)})" for _, d in served)
    if not is_loopback(host):
        print(UNAUTHENTICATED_WARNING.format(endpoint=endpoint), file=sys.stderr, flush=True)
    print(f"localmix worker at {endpoint}: {what}, {n_threads} threads"
          f"{f', tensor cache {cache}' if cache else ''} (Ctrl-C stops it)", file=ours, flush=True)
    while not stopped.wait(0.5):
        pass
    if failed:
        print(f"localmix: error: llama.cpp's RPC server stopped at {endpoint} (could it listen there?)",
              file=sys.stderr, flush=True)
        return 1
    print("localmix worker stopped", file=ours, flush=True)
    return 0
