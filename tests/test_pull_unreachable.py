"""`localmix pull` when the hub cannot be reached: one line at once and exit 1, not the hub
client's five retries (1+2+4+8+8 s of back-off, each logged with the URL). The hub here is a
port on 127.0.0.1 that nothing listens on; no traffic leaves the machine."""

from __future__ import annotations

import os
import socket
import time

from conftest import run_localmix

from localmix.frontends.hub import unreachable

RETRIES_TAKE = 15.0  # seconds: the client's first four back-offs alone; the one-line refusal takes none


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_refused_hub_is_one_line_at_once(tmp_path):
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    r = run_localmix("pull", "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M", env=env)
    elapsed = time.monotonic() - start
    assert r.returncode == 1 and r.stdout == "", r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the connection" in lines[0] and "localmix ls" in lines[0], r.stderr
    assert "Retry" not in r.stderr and "Traceback" not in r.stderr
    assert elapsed < RETRIES_TAKE, elapsed


def test_unreachable_says_why():
    port = _closed_port()
    assert unreachable(f"http://127.0.0.1:{port}") == f"127.0.0.1:{port} refused the connection"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert unreachable(f"http://127.0.0.1:{listening.getsockname()[1]}") is None
