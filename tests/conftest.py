"""Shared fixtures: tiny checkpoints and their GGUF conversions, built once per session.

Locally a test whose tool or extra is missing (tmux, torch, transformers, mistral-common)
skips, and `-rs` lists why. Under CI=true (.ci/run) nothing may be missing: a skip, at
collection or in a test, is reported as a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localmix.convert.pipeline import convert
from localmix.fixtures.tiny import TinySpec, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
THREADS = min(2, os.cpu_count() or 1)


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_skip(report) -> None:
    if _under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every tool and extra must be present: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mistral", dense=True)


@pytest.fixture(scope="session")
def tiny_8x22b(tmp_path_factory) -> Path:
    """Mixtral 8x22B-Instruct's design: the v3 tokenizer (32768 pieces), 64K context, its template."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-8x22b", TinySpec.mixtral_8x22b())


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_mixtral, tiny_mistral, tiny_8x22b):
    """converted(model, type) -> path of the GGUF, converting on first use (model: mixtral,
    mistral, or mixtral-8x22b)."""
    out_dir = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}
    sources = {"mixtral": tiny_mixtral, "mistral": tiny_mistral, "mixtral-8x22b": tiny_8x22b}

    def get(model: str, file_type: str) -> Path:
        if (model, file_type) not in cache:
            cache[model, file_type] = convert(sources[model], out_dir / f"{model}-{file_type}.gguf", file_type).path
        return cache[model, file_type]

    return get


def run_localmix(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m localmix ARGS` as a user would, capturing text output."""
    return subprocess.run([sys.executable, "-m", "localmix", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600, **kwargs)


def load_llama(path: Path, n_ctx: int = 1024, **kwargs):
    """llama.cpp (through llama-cpp-python) as the independent reader of our files.

    The KV cache is float32 (llama.cpp's default is float16, which alone moves logits by
    ~1e-2): what is measured is the file, not the cache.
    """
    from llama_cpp import GGML_TYPE_F32, Llama

    kwargs.setdefault("type_k", GGML_TYPE_F32)
    kwargs.setdefault("type_v", GGML_TYPE_F32)
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=THREADS, verbose=False,
                 logits_all=True, seed=0, **kwargs)


def llama_logprobs(path: Path, ids: list[int]):
    """llama.cpp's log-probabilities (float64) at every position of `ids`."""
    import numpy as np

    llm = load_llama(path, n_ctx=1024)
    llm.eval(ids)
    x = np.array(llm.scores[: len(ids)], dtype=np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref, q) -> float:
    """Mean KL divergence KL(ref || q) over positions, from log-probabilities."""
    import numpy as np

    return float((np.exp(ref) * (ref - q)).sum(-1).mean())


@pytest.fixture(scope="session")
def server(converted, tmp_path_factory):
    """`localmix serve` on the tiny Mixtral (127.0.0.1, a free port, --parallel 4, an API key),
    shared by the server tests; stopped with SIGTERM, which must exit cleanly."""
    from server_util import Server

    s = Server(converted("mixtral", "Q8_0"), "--parallel", "4", "--queue", "8", "--ctx", "2048",
               "--max-body", "65536", log=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    assert s.stop() == 0, s.log_text()
    assert "Traceback" not in s.log_text()
