"""`localmix serve` without `--parallel`: it chooses the number of sequences from memory (up to
llama-server's automatic 4), says so when it starts, and a second client is decoded together
with the first instead of waiting for it."""

from __future__ import annotations

import threading

import httpx
import pytest
from server_util import Server

NO_EOS = {"2": -100}  # the tiny model's </s> banned, so the first reply runs its full length


@pytest.fixture(scope="module")
def default_server(converted, tmp_path_factory):
    path = converted("mixtral", "Q8_0")
    s = Server(path, "--ctx", "1024", log=tmp_path_factory.mktemp("serve") / "server.log")
    s.model = path.stem  # the model's name in the API
    yield s
    assert s.stop() == 0, s.log_text()


def test_the_chosen_number_is_printed_and_served(default_server):
    first = default_server.log_text().splitlines()[0]
    assert "4 slot(s) (memory allows them; --parallel sets it)" in first, first
    assert default_server.metrics()["slots"] == 4


def test_two_clients_are_decoded_together(default_server):
    body = {"model": default_server.model, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 200,
            "temperature": 0, "logit_bias": NO_EOS, "stream": True}
    started, finished = threading.Event(), []

    def long_reply():
        with httpx.stream("POST", default_server.url + "/v1/chat/completions", json=body,
                          headers=default_server.headers, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
        finished.append(r.status_code)

    first = threading.Thread(target=long_reply)
    first.start()
    assert started.wait(60), "no token from the first request"
    second = default_server.post("/v1/chat/completions", {**body, "stream": False, "max_tokens": 8}, timeout=120)
    first.join(120)
    assert second.status_code == 200 and finished == [200]
    assert default_server.metrics()["batch_sequences_max"] >= 2  # one llama_decode served both
