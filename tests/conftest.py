"""Shared fixtures: tiny checkpoints, their GGUF conversions and llama.cpp's quantizations of
them, built once per run.

Locally a test whose tool or extra is missing (tmux, chromium, torch, transformers, mistral-common)
skips, and `-rs` lists why. Under CI=true (.ci/run) nothing may be missing: a skip, at
collection or in a test, is reported as a failure.

The suite runs on pytest-xdist's workers (pyproject's addopts; `-n 0` runs it in one process),
each pinned to its share of the cores. A file that takes seconds to build is built by whichever
worker first asks for it, under a lock, in a folder all workers share (`built_once`). A test
file runs whole on one worker, so that its module-scoped fixtures are built once, except the
files in SPREAD, whose tests go to the workers one by one (`work_unit`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from localmix.fixtures.tiny import TinySpec, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _pin_worker() -> None:
    """Each pytest-xdist worker on its own share of the cores, and all it starts with it: numba
    and llama.cpp (localmix's default and THREADS) size their thread pools by the affinity, so
    two workers on two cores run one thread each. Unpinned, llama.cpp's threads spin at their
    barriers while the other worker holds the core they wait for (measured on 2 cores: 82 tests
    of runs, prompts and conversions 73-83 s pinned, 90-95 s not, 148 s in one process)."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus, i = _cpus(), int(worker.removeprefix("gw"))
    mine = cpus[i::workers] or [cpus[i % len(cpus)]]
    os.sched_setaffinity(0, mine)
    if "numba" in sys.modules:  # imported already, its pool sized for all the cores
        import numba

        numba.set_num_threads(min(len(mine), numba.config.NUMBA_NUM_THREADS))


_pin_worker()  # before numba is imported: it reads the affinity once
THREADS = min(2, len(_cpus()))  # llama.cpp's threads in the tests' own calls


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


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per usable core, at most 4 (each holds its own models and libraries)."""
    return min(len(_cpus()), 4)


# Under pytest-xdist a test file runs whole on one worker, so that its module-scoped fixtures are
# built once, and the server tests (test_server*.py) all run on one worker, which starts the
# shared `server` once. The files named here are the exception: their tests are independent and
# long, use no module-scoped fixture, and go to the workers one by one.
SPREAD = {"test_quantize_files.py", "test_kernels.py", "test_fit.py", "test_8x22b.py", "test_synth.py",
          "test_matmul.py", "test_gpu_check.py", "test_offload.py", "test_run.py", "test_cli_errors.py"}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: itself (a SPREAD file's), "server", or its file."""
    file = nodeid.split("::", 1)[0]
    name = file.rsplit("/", 1)[-1]
    return nodeid if name in SPREAD else "server" if name.startswith("test_server") else file


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        """xdist's scheduler by scope (the largest units first), with `work_unit` as the scope."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        if defs is not None and work_unit(item.nodeid) == item.nodeid:
            shared = [name for name, d in defs.name2fixturedefs.items() if d[-1].scope in ("module", "class")]
            if shared:
                raise pytest.UsageError(f"{item.nodeid} is in conftest's SPREAD, but its fixtures {shared} are "
                                        "module-scoped: a worker would build them again")


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder of this run that every pytest-xdist worker sees (the base temporary folder
    without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """`path`, made by `build(somewhere)` once in the run: the first worker to ask builds it
    (beside it, then renamed, so that it appears whole) while the others wait on the lock."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            scratch = path.with_name(f".building-{path.name}")
            if scratch.is_dir():  # left by a build that failed
                shutil.rmtree(scratch)
            scratch.unlink(missing_ok=True)
            build(scratch)
            os.replace(scratch, path)
    return path


CHECKPOINTS = {  # model: (folder, make_tiny_checkpoint's arguments)
    "mixtral": ("tiny-mixtral", {}),
    "mistral": ("tiny-mistral", {"dense": True}),
    # Mixtral 8x22B-Instruct's design: the v3 tokenizer (32768 pieces), 64K context, its template
    "mixtral-8x22b": ("tiny-8x22b", {"spec": TinySpec.mixtral_8x22b()}),
}


def checkpoint(shared_dir: Path, model: str) -> Path:
    folder, kwargs = CHECKPOINTS[model]
    return built_once(shared_dir / "ckpt" / folder, lambda out: make_tiny_checkpoint(out, **kwargs))


@pytest.fixture(scope="session")
def tiny_mixtral(shared_dir) -> Path:
    return checkpoint(shared_dir, "mixtral")


@pytest.fixture(scope="session")
def tiny_mistral(shared_dir) -> Path:
    return checkpoint(shared_dir, "mistral")


@pytest.fixture(scope="session")
def tiny_8x22b(shared_dir) -> Path:
    return checkpoint(shared_dir, "mixtral-8x22b")


@pytest.fixture(scope="session")
def converted(shared_dir):
    """converted(model, type) -> path of the GGUF, converting on first use (model: mixtral,
    mistral, or mixtral-8x22b)."""
    from localmix.convert.pipeline import convert

    def get(model: str, file_type: str) -> Path:
        src = checkpoint(shared_dir, model)
        return built_once(shared_dir / "gguf" / f"{model}-{file_type}.gguf",
                          lambda out: convert(src, out, file_type))

    return get


@pytest.fixture(scope="session")
def quantized_by_llama(shared_dir, converted):
    """quantized_by_llama(model, type) -> path of llama.cpp's own quantization
    (llama_model_quantize) of converted(model, "F32"), made on first use."""
    from llama_quantize import llama_model_quantize

    def get(model: str, file_type: str) -> Path:
        f32 = converted(model, "F32")
        return built_once(shared_dir / "llama" / f"{model}-{file_type}.gguf",
                          lambda out: llama_model_quantize(f32, out, file_type, nthread=THREADS))

    return get


def run_localmix(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m localmix ARGS` as a user would, capturing text output."""
    return subprocess.run([sys.executable, "-m", "localmix", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600, **kwargs)


# localmix's engine runs with --flash-attn off by default (llama.cpp's own default is auto, which
# the CPU backend resolves to on; localmix keeps a reply's numbers independent of the batch).
# A reference that stands for localmix's engine (the same file, KV cache type and settings: its
# logits and greedy tokens must be the engine's) passes flash_attn=ENGINE_FLASH_ATTN.
ENGINE_FLASH_ATTN = False


def load_llama(path: Path, n_ctx: int = 1024, **kwargs):
    """llama.cpp (through llama-cpp-python) as the independent reader of our files.

    The KV cache is float32 (llama.cpp's default is float16, which alone moves logits by
    ~1e-2): what is measured is the file, not the cache. Flash attention is off (`Llama`'s
    default): attention as transformers computes it, the whole score matrix then softmax;
    `flash_attn=ENGINE_FLASH_ATTN` where the reference must be localmix's engine.
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
