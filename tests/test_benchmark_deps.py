"""Every script in benchmarks/ starts after the documented install (`scripts/setup --test`):
each module a script imports, at the top or inside a function, and each module it runs as
`python -m MODULE` (llama-cpp-python's server, say), imports here. A script whose peer needs a
package the install does not bring fails this test, not the user's first benchmark run."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
BESIDE = {p.stem for p in SCRIPTS} | {"llama_quantize", "conftest", "server_util", "ggml_ref"}  # benchmarks/, tests/


def _imports(path: Path) -> set[str]:
    """The modules the script imports anywhere, and those it runs with `-m`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            found |= {m for flag, m in zip(items, items[1:]) if flag == "-m" and isinstance(m, str)}
    return {m for m in found if m.split(".")[0] not in BESIDE}


def test_the_scan_finds_a_peer_run_with_dash_m():
    assert "llama_cpp.server" in _imports(BENCHMARKS / "bench_serve.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_module_a_benchmark_needs_imports(script):
    for module in sorted(_imports(script)):
        target = f"{module}.__main__" if module == "llama_cpp.server" else module  # what `-m` runs
        importlib.import_module(target)


def test_every_benchmark_answers_help():
    """One process per script would take half a minute; their `--help` (argparse, before any
    work) is checked by importing each as a module and parsing `--help` in a child."""
    code = ("import runpy, sys\n"
            "for path in sys.argv[1:]:\n"
            "    sys.argv = [path, '--help']\n"
            "    try:\n"
            "        runpy.run_path(path, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (path, e.code)\n")
    scripts = [str(p) for p in SCRIPTS if p.stem not in ("report", "child_memory")]
    r = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, timeout=300,
                       cwd=BENCHMARKS)
    assert r.returncode == 0, r.stderr[-2000:]
