"""scripts/gpu-check, the GPU machine's one-call check, tested here through its CPU dry run.

`--cpu` runs every step the GPU run takes after the build (synthetic Mixtral 8x7B files, here
of 2 layers, `localmix plan --vram 24GiB`, a localmix run and a plain llama-cpp-python run, each
in a fresh process, llama.cpp's buffer log parsed) on this machine's CPU build of llama.cpp,
and writes the same JSON and Markdown table. The offload arithmetic that picks plain
llama-cpp-python's n_gpu_layers is checked on a tiny file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localmix.convert.config import ModelConfig
from localmix.fixtures.synth import synth

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_decode import device_bytes, layers_that_fit, log_buffers, offload_estimates

MiB = 1 << 20


def gpu_check(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu-check"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_measures_both_files_and_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "out"
    r = gpu_check("--cpu", "--out", out, "--work", tmp_path, "--prompt-tokens", 16, "--tokens", 4)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["complete"] and report["mode"] == "cpu dry run" and not report["skipped"]
    assert [m["type"] for m in report["models"]] == ["Q3_K_M", "Q4_K_M"]
    for m in report["models"]:
        plan = m["plan"]
        assert plan["fits"] and plan["bytes"]["gpu_budget"] == 24 << 30 and plan["n_ctx"] == 8192
        assert [run["engine"] for run in m["runs"]] == ["localmix", "llama-cpp-python"]
        for run in m["runs"]:
            assert (run["prompt_tokens"], run["generated"]) == (16, 4) and run["decode_tps"] > 0
            # llama.cpp's own log, parsed: the 2 layers' KV cache is what the planner computed, and the
            # mapped model buffer is the file's tensors
            assert run["buffers"]["CPU"]["KV"] == pytest.approx(plan["bytes"]["kv_cache"], abs=0.01 * MiB)
            assert run["buffers"]["CPU_Mapped"]["model"] == pytest.approx(plan["bytes"]["weights"], abs=0.01 * MiB)
            assert run["gpu_used_bytes"] is None and run["fits"] is None   # no GPU here
        lm, plain = m["runs"]
        assert lm["estimate_gpu_bytes"] == plan["bytes"]["gpu_total"]
        assert plain["n_gpu_layers"] == 3   # 2 layers and the output fit 24 GiB
        # localmix keeps CPU weights in the map; llama-cpp-python's defaults repack the Q4_K tensors
        assert "CPU_REPACK" not in lm["buffers"] and "CPU_REPACK" in plain["buffers"]
    table = (out / "gpu-check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| Q")]
    assert len(rows) == 4 and rows[0].startswith("| Q3_K_M") and "| llama-cpp-python | n_gpu_layers=3 |" in rows[1]
    assert r.stdout == table
    assert not list(tmp_path.glob("localmix-gpu-*")), "the scratch folder (and its GGUF files) is removed"


def test_something_missing_is_one_line(tmp_path):
    r = gpu_check("--gpu-dir", tmp_path / "nothing", "--out", tmp_path / "out", timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "gpu-prepare" in r.stderr and "Traceback" not in r.stderr


def test_offload_estimate_picks_the_largest_n_gpu_layers_that_fits(tiny_mixtral, tmp_path):
    path = str(synth(ModelConfig.load(tiny_mixtral), "Q4_K_M", tmp_path / "s.gguf", seed=1).path)
    n_layer = ModelConfig.load(tiny_mixtral).num_hidden_layers
    sizes = offload_estimates(path, 512)
    assert len(sizes) == n_layer + 2
    assert sizes[0] == 0 and all(a < b for a, b in zip(sizes, sizes[1:]))   # each layer, then the output, adds bytes
    for n in (1, n_layer // 2, n_layer + 1):
        assert layers_that_fit(path, 512, sizes[n]) == n
        assert layers_that_fit(path, 512, sizes[n] - 1) == n - 1


def test_log_buffers_reads_llama_cpp_lines():
    log = ("load_tensors:        CUDA0 model buffer size = 20000.50 MiB\n"
           "load_tensors:   CPU_Mapped model buffer size =   102.54 MiB\n"
           "llama_kv_cache:      CUDA0 KV buffer size =  1024.00 MiB\n"
           "sched_reserve:      CUDA0 compute buffer size =   397.00 MiB\n"
           "sched_reserve:  CUDA_Host compute buffer size =    24.01 MiB\n"
           "~llama_context:      CUDA0 compute buffer size is 397.0000 MiB, matches expectation of 397.0000 MiB\n")
    b = log_buffers(log)
    assert b["CUDA0"] == {"model": round(20000.5 * MiB), "KV": 1024 * MiB, "compute": 397 * MiB}
    assert set(b) == {"CUDA0", "CPU_Mapped", "CUDA_Host"}
    assert device_bytes(b) == sum(b["CUDA0"].values())   # pinned host memory (CUDA_Host) is not the GPU's


def test_the_trimmed_sdist_keeps_what_a_cuda_build_reads():
    import importlib.util
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader("gpu_prepare", str(ROOT / "scripts" / "gpu-prepare"))
    prepare = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_prepare", loader))
    loader.exec_module(prepare)
    llama = "vendor/llama.cpp/"
    for needed in ("CMakeLists.txt", "llama_cpp/llama_cpp.py", f"{llama}CMakeLists.txt", f"{llama}src/llama.cpp",
                   f"{llama}common/common.cpp", f"{llama}vendor/nlohmann/json.hpp", f"{llama}ggml/src/ggml.c",
                   f"{llama}ggml/src/ggml-cuda/mmq.cu", f"{llama}ggml/src/ggml-cpu/ggml-cpu.c",
                   f"{llama}ggml/include/ggml-cuda.h", f"{llama}cmake/build-info.cmake", f"{llama}LICENSE"):
        assert prepare.keep(needed), needed
    for dropped in (".git/HEAD", "docs/index.md", "tests/test_llama.py", f"{llama}models/ggml-vocab-llama-spm.gguf",
                    f"{llama}docs/build.md", f"{llama}tools/mtmd/clip.cpp", f"{llama}ggml/src/ggml-vulkan/ggml-vulkan.cpp",
                    f"{llama}ggml/src/ggml-metal/ggml-metal.m", f"{llama}convert_hf_to_gguf.py", f"{llama}gguf-py/gguf/gguf.py"):
        assert not prepare.keep(dropped), dropped
