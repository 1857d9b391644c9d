"""Streamed JSON lines survive the clients' line readers: the ollama client (and mistralai's)
read a stream with httpx's iter_lines, which splits at every line break str.splitlines knows,
NEL and the Unicode line and paragraph separators included; JSON leaves those raw, and a token
holding one cut a reply's line in two (the soak found it: a JSONDecodeError in an ollama stream)."""

from __future__ import annotations

import json

import pytest
from httpx._decoders import LineDecoder

from localmix.frontends.server.common import LINE_BREAKS, json_line, sse

TEXTS = ["a\x85b", "x\u2028y", "p\u2029q", "é\n\t\x0b\x0c\x1c\x1d\x1e end", "plain"]


def _lines(chunks: list[bytes]) -> list[str]:
    """What httpx's iter_lines yields for these bytes, read in the pieces given."""
    decoder, out = LineDecoder(), []
    for chunk in chunks:
        out += decoder.decode(chunk.decode())
    return out + decoder.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_an_ndjson_line_reads_back_whole(text):
    obj = {"message": {"role": "assistant", "content": text}, "done": False}
    wire = json_line(obj).encode() + b"\n"
    assert [json.loads(line) for line in _lines([wire[:9], wire[9:]]) if line] == [obj]


@pytest.mark.parametrize("text", TEXTS)
def test_an_sse_event_reads_back_whole(text):
    obj = {"choices": [{"delta": {"content": text}}]}
    lines = [line for line in _lines([sse(obj)]) if line]
    assert len(lines) == 1 and json.loads(lines[0].removeprefix("data: ")) == obj


def test_only_the_line_breaks_are_escaped():
    assert json_line({"t": "é€😀"}) == '{"t": "é€😀"}'
    assert all(c not in json_line({"t": c}) for c in LINE_BREAKS)
