"""`localmix run` in shell pipes: only the reply on stdout, JSON that parses, clean failures."""

import json
import re
import subprocess
import sys

from conftest import REPO, load_llama, run_localmix

from localmix.runtime.template import prompt_tokens, render

ANSI = re.compile(r"\x1b\[")


def test_pipe_prints_only_the_reply(converted):
    model = converted("mixtral", "Q8_0")
    r = run_localmix("run", model, "Summarise this", "--max-tokens", "8", "--seed", "1", input="Some notes to read.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n")
    assert not ANSI.search(r.stdout) and r.stderr == ""
    again = run_localmix("run", model, "Summarise this", "--max-tokens", "8", "--seed", "1", input="Some notes to read.")
    assert again.stdout == r.stdout  # same seed, same reply


def test_json_counts(converted):
    model = converted("mixtral", "Q8_0")
    r = run_localmix("run", model, "Summarise this", "--max-tokens", "6", "--temperature", "0", "--json",
                     input="Some notes to read.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    llm = load_llama(model, vocab_only=True)
    text = render([{"role": "user", "content": "Some notes to read.\n\nSummarise this"}], llm.metadata["tokenizer.chat_template"])
    assert out["prompt_tokens"] == len(prompt_tokens(llm.tokenize, text, llm.token_bos()))
    assert out["completion_tokens"] <= 6 and out["finish_reason"] in ("length", "eos")
    assert out["finish_reason"] != "length" or out["completion_tokens"] == 6
    assert isinstance(out["text"], str) and out["tokens_per_second"] >= 0


def test_prompt_longer_than_the_context(converted):
    r = run_localmix("run", converted("mixtral", "Q8_0"), "--ctx", "256", input="word " * 400)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert re.search(r"\b40\d tokens\b", r.stderr) and "256" in r.stderr


def test_closed_pipe_is_quiet(converted):
    cmd = f"{sys.executable} -m localmix run {converted('mixtral', 'Q8_0')} 'Tell me a long story' --max-tokens 300 | head -c 5"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, cwd=REPO, timeout=300)
    assert len(r.stdout) <= 5  # bytes: head may cut a character in two
    stderr = r.stderr.decode(errors="replace")
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_no_prompt_is_a_usage_error(converted):
    r = run_localmix("run", converted("mixtral", "Q8_0"), input="")
    assert r.returncode == 2 and "no prompt" in r.stderr and "Traceback" not in r.stderr


def test_truncated_model_gets_a_clean_message(converted, tmp_path):
    data = converted("mixtral", "Q8_0").read_bytes()
    for cut in (3, 100, 5000, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut-{cut}.gguf"
        bad.write_bytes(data[:cut])
        r = run_localmix("run", bad, "hello")
        assert r.returncode == 2, (cut, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "re-download" in r.stderr or "not a GGUF" in r.stderr
