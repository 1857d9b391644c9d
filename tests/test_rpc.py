"""Several machines on one: `localmix worker` processes on 127.0.0.1 and `--rpc` on run, plan and
serve, against the single-process run of the same file (llama.cpp's RPC backend).

The models are the tiny Mixtral and the tiny 8x22B design with four layers (so that the local
process and two workers each get some), converted once. Workers are real `localmix worker`
processes on free ports, stopped with SIGTERM; a worker serves one client at a time, so the
tests use them one after another and each client closes its model before the next starts.
"""

from __future__ import annotations

import gc
import json
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, built_once, run_localmix
from server_util import Server, free_port

from localmix.fixtures.tiny import TinySpec, make_tiny_checkpoint

LAYERS = 4
SPECS = {"mixtral": TinySpec(num_hidden_layers=LAYERS), "mixtral-8x22b": TinySpec.mixtral_8x22b(num_hidden_layers=LAYERS)}
PROMPT = "The experts of a layer"


def deep_gguf(shared_dir: Path, model: str, file_type: str) -> Path:
    from localmix.convert.pipeline import convert

    ckpt = built_once(shared_dir / "ckpt" / f"tiny-{model}-{LAYERS}l",
                      lambda out: make_tiny_checkpoint(out, spec=SPECS[model]))
    return built_once(shared_dir / "gguf" / f"{model}-{LAYERS}l-{file_type}.gguf",
                      lambda out: convert(ckpt, out, file_type))


class Worker:
    """`localmix worker` on 127.0.0.1 and a free port, until `stop`."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "localmix", "worker", "--port", str(self.port),
                                      "--threads", "1", *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)  # its one line, once it serves
        self.line = self.proc.stdout.readline() if ready else ""
        if self.endpoint not in self.line:
            self.proc.kill()
            raise AssertionError(f"the worker did not start: {self.line}{self.proc.communicate(timeout=20)[1]}")

    def rss(self) -> int:
        return status_bytes(self.proc.pid, "VmRSS")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        return self.proc.returncode, out


def status_bytes(pid: int | str, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    started = [Worker("--cache", str(tmp_path_factory.mktemp("rpc-cache"))), Worker()]
    yield started
    for w in started:
        code, out = w.stop()
        assert code == 0 and "localmix worker stopped" in out, out


def rpc_of(workers) -> str:
    return ",".join(w.endpoint for w in workers)


def test_worker_line(workers):
    line = workers[0].line
    assert line.startswith(f"localmix worker at {workers[0].endpoint}: CPU") and "RAM available now" in line
    assert "tensor cache" in line


def test_plan_splits_across_three_devices(workers, shared_dir):
    path = deep_gguf(shared_dir, "mixtral", "Q8_0")
    r = run_localmix("plan", path, "--rpc", rpc_of(workers), "--ctx", "512", "--json")
    assert r.returncode == 0, r.stderr
    split = json.loads(r.stdout)["split"]
    assert [s["device"] for s in split] == ["CPU", "RPC0", "RPC1"]
    assert [s["where"] for s in split] == ["this machine", workers[0].endpoint, workers[1].endpoint]
    assert all(s["n_layers"] >= 1 for s in split) and sum(s["n_layers"] for s in split) == LAYERS


def logits(path: Path, plan=None, workers=()) -> tuple[np.ndarray, str, int, int, list[int]]:
    """llama.cpp's logits over PROMPT (float32 KV cache) and its greedy continuation, split by
    `plan` or in this process; this process's anonymous memory before and after the load, the
    workers' RSS while loaded."""
    from llama_cpp import GGML_TYPE_F32

    from localmix.runtime.offload import load_llama

    before = status_bytes("self", "RssAnon")
    llm = load_llama(str(path), plan, n_ctx=256, n_batch=256, n_threads=1, logits_all=True, verbose=False,
                     type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, use_mmap=True)
    after = status_bytes("self", "RssAnon")
    try:
        ids = llm.tokenize(PROMPT.encode(), add_bos=True)
        llm.eval(ids)
        scores, rss = np.array(llm.scores[: len(ids)], dtype=np.float64), [w.rss() for w in workers]
        text = llm.create_completion(PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
        return scores, text, before, after, rss
    finally:
        llm.close()
        del llm
        gc.collect()


@pytest.mark.parametrize("model", ["mixtral", "mixtral-8x22b"])
def test_split_gives_the_same_logits_and_text(workers, shared_dir, model):
    from localmix.frontends.load import plan_engine
    from localmix.runtime.devices import devices

    path = deep_gguf(shared_dir, model, "F32" if model == "mixtral" else "Q8_0")
    single, single_text, single_before, single_after, _ = logits(path)
    rss = [w.rss() for w in workers]
    _, plan, _ = plan_engine(path, 256, rpc=rpc_of(workers))
    split, split_text, before, after, loaded = logits(path, plan, workers)
    # the workers' devices stay out of ggml's device list: later loads in this process plan as before
    assert not any(d.name.startswith("RPC") for d in devices())
    assert split_text == single_text and split_text.strip()
    # the same CPU kernels on the same rows: equal up to float32 rounding of the sums
    assert np.abs(split - single).max() < 1e-4
    if model == "mixtral":  # the F32 file: weights big enough to see in /proc
        for share, was, now in zip(plan.shares[1:], rss, loaded):
            grown = now - was
            # a worker keeps the weights, KV cache and compute buffer of its layers (freed
            # buffers may stay resident in its allocator: the plan's compute estimate bounds it)
            assert share.weights_bytes * 0.9 <= grown <= share.need + (64 << 20), (grown, share)
        remote = sum(s.weights_bytes for s in plan.shares[1:])
        # the workers' weights are sent from the memory map, not copied here
        assert (after - before) - (single_after - single_before) < remote / 2, (after - before, remote)
    if model == "mixtral-8x22b":  # and through the command, as a user runs it
        args = ["run", path, "--temp", "0", "-n", "24", "--ctx", "256", "--raw", PROMPT]
        alone, spread = run_localmix(*args), run_localmix(*args, "--rpc", rpc_of(workers))
        assert alone.returncode == 0 and spread.returncode == 0, spread.stderr
        assert spread.stdout == alone.stdout and spread.stdout.strip()


def test_serve_answers_the_openai_client(workers, shared_dir, tmp_path):
    from openai import OpenAI

    path = deep_gguf(shared_dir, "mixtral", "Q8_0")
    messages = [{"role": "user", "content": PROMPT}]
    expected = run_localmix("run", path, "--temp", "0", "-n", "16", "--ctx", "512", PROMPT)
    server = Server(path, "--rpc", rpc_of(workers), "--parallel", "1", "--ctx", "512", log=tmp_path / "serve.log",
                    timeout=60)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=60)
        plain = client.chat.completions.create(model="localmix", messages=messages, temperature=0, max_tokens=16)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="localmix", messages=messages, temperature=0, max_tokens=16, stream=True) if c.choices)
    finally:
        assert server.stop() == 0, server.log_text()
    assert plain.choices[0].message.content == streamed == expected.stdout.strip()


def spread(command: str, path, workers, doomed, *more: str) -> list[str]:
    """`localmix COMMAND` on `path` split over a live worker and `doomed`, greedy and long."""
    return [sys.executable, "-m", "localmix", command, path, "--rpc", f"{workers[0].endpoint},{doomed.endpoint}",
            "--temp", "0", "-n", "4000", "--ctx", "4096", *more]


def test_run_ends_with_one_line_when_a_worker_dies(workers, shared_dir):
    path = deep_gguf(shared_dir, "mixtral", "Q8_0")
    doomed = Worker()
    try:
        run = subprocess.Popen(spread("run", path, workers, doomed, "--raw", PROMPT), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert run.stdout.read(8)  # the reply has begun
        doomed.proc.kill()
        _, err = run.communicate(timeout=30)
    finally:
        doomed.stop()
    lines = err.decode().strip().splitlines()
    assert run.returncode == 1 and lines == [f"localmix: error: lost RPC worker {doomed.endpoint} (it stopped or "
                                             "its machine went away); the model must be loaded again"], err


def test_chat_goes_on_when_a_worker_dies(workers, shared_dir):
    path = deep_gguf(shared_dir, "mixtral", "Q8_0")
    doomed = Worker()
    try:
        chat = subprocess.Popen(spread("chat", path, workers, doomed, "--no-history"), cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        chat.stdin.write(PROMPT.encode() + b"\n")
        chat.stdin.flush()
        assert chat.stdout.read(8)  # the reply has begun
        doomed.proc.kill()
        out, _ = chat.communicate(b"and then?\n", timeout=30)  # the next message, then the end of input
    finally:
        doomed.stop()
    line = f"lost RPC worker {doomed.endpoint} (it stopped or its machine went away); the model must be loaded again"
    assert chat.returncode == 0 and out.decode().count(line) == 2, out[-2000:]  # the reply's end, the next message
    assert b"Traceback" not in out


def test_serve_answers_503_when_a_worker_dies(workers, shared_dir, tmp_path):
    import httpx

    path = deep_gguf(shared_dir, "mixtral", "Q8_0")
    doomed = Worker()
    server = Server(path, "--rpc", f"{workers[0].endpoint},{doomed.endpoint}", "--parallel", "1", "--ctx", "4096",
                    log=tmp_path / "serve.log", timeout=60)
    try:
        body = {"model": "localmix", "prompt": PROMPT, "temperature": 0, "max_tokens": 4000}
        done: list = []
        t = threading.Thread(target=lambda: done.append(server.post("/v1/completions", body, timeout=30)))
        t.start()
        deadline = time.monotonic() + 10
        while server.metrics().get("generated_tokens_total", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        doomed.proc.kill()
        t.join(30)
        assert done and done[0].status_code == 503, done and done[0].text
        assert doomed.endpoint in done[0].json()["error"]["message"]
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["lost_workers"] == [doomed.endpoint]
    finally:
        code = server.stop()
        doomed.stop()
    assert code == 0, server.log_text()
    assert "Traceback" not in server.log_text()


def test_wrong_port_is_one_line_exit_2_quickly(shared_dir):
    path = deep_gguf(shared_dir, "mixtral", "Q8_0")
    start = time.monotonic()
    r = run_localmix("run", path, "--rpc", f"127.0.0.1:{free_port()}", "-n", "4", "hello")
    assert time.monotonic() - start < 10
    assert r.returncode == 2 and r.stderr.startswith("localmix: error: cannot reach RPC worker 127.0.0.1:")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_non_loopback_worker_needs_the_flag():
    r = run_localmix("worker", "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and "--unauthenticated-network" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_split_is_in_proportion_to_memory_and_names_the_short_device():
    from localmix.runtime.planner import GiB, ModelDims, proportional, split_plan

    assert proportional(56, [1.0, 1.0]) == [28, 28]
    assert proportional(4, [21.0, 23.5, 23.5]) in ([1, 2, 1], [1, 1, 2])
    assert proportional(3, [100.0, 1.0, 1.0]) == [1, 1, 1]  # every device gets a layer while there are enough
    dims = ModelDims(n_layer=8, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_vocab=100, n_ff=128, n_expert_used=2)
    tensors = [("token_embd.weight", GiB), ("output.weight", GiB)]
    tensors += [(f"blk.{i}.{t}", GiB // 4) for i in range(8) for t in ("attn_q.weight", "ffn_up_exps.weight",
                                                                       "ffn_gate_exps.weight", "ffn_down_exps.weight")]
    p = split_plan(tensors, dims, 512, 8 * GiB, [("RPC0", "10.0.0.2:50052", 6 * GiB), ("RPC1", "10.0.0.3:50052", 3 * GiB)])
    # CPU: 8 GiB less the 2 GiB of embeddings and output -> 6 : 6 : 3 of the 8 layers
    assert [(s.device, s.first, s.n_layers) for s in p.shares] == [("CPU", 0, 3), ("RPC0", 3, 3), ("RPC1", 6, 2)]
    assert p.fits and p.rpc_devices == ["RPC0", "RPC1"] and p.tensor_split == [3.0, 3.0]  # + the output layer
    assert p.n_gpu_layers == 6 and p.overrides == [(r"^output(_norm)?\.", "CPU")]
    short = split_plan(tensors, dims, 512, 8 * GiB, [("RPC0", "10.0.0.2:50052", 6 * GiB), ("RPC1", "10.0.0.3:50052",
                                                                                             GiB)])
    assert not short.fits and short.advice.startswith("RPC1 (10.0.0.3:50052) is short")


def test_hello_refuses_another_protocol_and_a_stranger():
    """`hello` against a fake worker of protocol 6.0.0, and a port that answers something else."""
    import socket
    import struct

    from localmix.errors import InputError
    from localmix.runtime.rpc import hello

    def serve(answer: bytes) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def once():
            conn, _ = listener.accept()
            with conn, listener:
                conn.recv(1 + 8 + 24)
                conn.sendall(answer)

        threading.Thread(target=once, daemon=True).start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    old = serve(struct.pack("<Q", 28) + bytes([6, 0, 0, 0]) + bytes(24))
    with pytest.raises(InputError, match=rf"RPC worker {old} speaks protocol 6.0.0, this localmix 7.0.0"):
        hello(old)
    stranger = serve(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(InputError, match=rf"RPC worker {stranger} answered the handshake with"):
        hello(stranger)
    assert hello(serve(struct.pack("<Q", 28) + bytes([7, 0, 1, 0]) + bytes(24))) == (7, 0, 1)


def test_endpoints_and_hosts_are_checked_before_anything_connects():
    from localmix.errors import InputError
    from localmix.frontends.worker import check_host
    from localmix.runtime.rpc import parse_endpoints

    assert parse_endpoints("10.0.0.2:50052, 10.0.0.3:50053") == ["10.0.0.2:50052", "10.0.0.3:50053"]
    assert parse_endpoints("50052") == ["127.0.0.1:50052"]
    for bad in ("10.0.0.2", "10.0.0.2:0", "10.0.0.2:x", ",", "[::1]:50052", "a:1,a:1"):
        with pytest.raises(InputError):
            parse_endpoints(bad)
    check_host("127.0.0.1", False)
    check_host("localhost", False)
    check_host("192.168.1.20", True)  # with --unauthenticated-network
    with pytest.raises(InputError, match="--unauthenticated-network"):
        check_host("192.168.1.20", False)
