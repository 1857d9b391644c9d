"""The plan reaches llama.cpp: expert tensors sent to the CPU buffer type through
tensor_buft_overrides, with the same logits, and the weights left in the memory map."""

import re

import numpy as np
import pytest
from conftest import THREADS, run_localmix

from localmix.runtime.offload import load_llama, override_array
from localmix.runtime.planner import GiB, file_plan, preset_plan

OVERRIDDEN = re.compile(r"tensor (blk\.\d+\.ffn_\w+_exps\.weight) \(.*\) buffer type overridden to (\w+)")
TOKENS = [1, 733, 16289, 28793, 22557, 28725, 315, 837, 264, 1369, 28723]


def logits(path, plan, **kwargs):
    llm = load_llama(str(path), plan, n_ctx=64, n_threads=THREADS, logits_all=True, **kwargs)
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


@pytest.mark.parametrize("file_type", ["F32", "Q4_K_M"])
def test_experts_on_the_cpu_buffer_type_give_the_same_logits(converted, capsys, file_type):
    path = converted("mixtral", file_type)
    plan = file_plan(path, 64, gpu_budget=1 * GiB, n_cpu_moe=1)  # a 1 GiB "GPU" whose plan keeps layer 0's experts out
    assert plan.cpu_expert_layers == [0] and plan.overrides
    capsys.readouterr()
    with_overrides = logits(path, plan, verbose=True)
    log = capsys.readouterr().err
    without = logits(path, None)
    assert np.array_equal(with_overrides, without)
    # llama.cpp names each tensor the array sent elsewhere: layer 0's three expert tensors, no others
    assert sorted(OVERRIDDEN.findall(log)) == [(f"blk.0.ffn_{w}_exps.weight", "CPU") for w in ("down", "gate", "up")]


def test_override_array_is_null_terminated():
    array = override_array([(r"^blk\.0\.ffn_up_exps", "CPU"), (r"^blk\.1\.", "CPU")])
    assert len(array) == 3 and array[0].pattern == rb"^blk\.0\.ffn_up_exps" and array[0].buft
    assert array[2].pattern is None and not array[2].buft
    assert override_array([]) is None


def test_unknown_buffer_type_is_a_clear_error():
    from localmix.errors import InputError

    with pytest.raises(InputError, match="no buffer type 'CUDA7'"):
        override_array([("x", "CUDA7")])


def test_weights_stay_mapped_unless_repack_is_asked(converted, capsys):
    """llama.cpp's default copies Q4_K weights into CPU_REPACK buffers (anonymous memory,
    read in full at load); localmix keeps them in the mapping unless --repack."""
    path = converted("mixtral", "Q4_K_M")
    capsys.readouterr()
    mapped = logits(path, None, verbose=True)
    assert "CPU_REPACK" not in capsys.readouterr().err
    repacked = logits(path, None, verbose=True, repack=True)
    assert "CPU_REPACK model buffer size" in capsys.readouterr().err
    assert np.allclose(mapped, repacked, atol=0.05)  # another kernel, nearly the same numbers


def test_run_passes_n_cpu_moe_to_llama_cpp(converted):
    r = run_localmix("run", converted("mixtral", "Q8_0"), "hello", "-n", "2", "--temperature", "0", "--vram", "1GiB",
                     "--n-cpu-moe", "2", "--verbose")
    assert r.returncode == 0, r.stderr
    layers = {name.split(".")[1] for name, _ in OVERRIDDEN.findall(r.stderr)}
    assert layers == {"0", "1"}
    assert "experts of layers 0-1" in " ".join(r.stderr.split())


def test_n_cpu_moe_fixes_the_layers_the_planner_would_choose():
    auto = preset_plan("mixtral-8x7b", "Q4_K_M", 8192, 24 * GiB, 64 * GiB)
    fixed = preset_plan("mixtral-8x7b", "Q4_K_M", 8192, 24 * GiB, 64 * GiB, n_cpu_moe=len(auto.cpu_expert_layers) + 3)
    assert fixed.cpu_expert_layers == list(range(len(auto.cpu_expert_layers) + 3))
    assert fixed.gpu_bytes < auto.gpu_bytes and fixed.cpu_bytes > auto.cpu_bytes and fixed.fits
    too_few = preset_plan("mixtral-8x7b", "Q4_K_M", 8192, 24 * GiB, 64 * GiB, n_cpu_moe=0)
    assert not too_few.fits and "--n-cpu-moe" in too_few.advice
