"""The plan reaches llama.cpp: expert tensors sent to the CPU buffer type through
tensor_buft_overrides, with the same logits, and the weights left in the memory map."""

import ctypes
import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import THREADS, run_localmix
from gguf import GGMLQuantizationType, GGUFReader

from localmix.runtime import devices
from localmix.runtime.offload import load_llama, override_array
from localmix.runtime.planner import GiB, file_plan, preset_plan

OVERRIDDEN = re.compile(r"tensor (blk\.\d+\.ffn_\w+_exps\.weight) \(.*\) buffer type overridden to (\w+)")
LAYER_0_EXPERTS = re.compile(r"^blk\.0\.ffn_\w+_exps\.weight$")
REPACK_BUFFER = re.compile(r"CPU_REPACK model buffer size = +([\d.]+) MiB")
TOKENS = [1, 733, 16289, 28793, 22557, 28725, 315, 837, 264, 1369, 28723]


def logits(path, plan, **kwargs):
    llm = load_llama(str(path), plan, n_ctx=64, n_threads=THREADS, logits_all=True, **kwargs)
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


@pytest.mark.parametrize("file_type", ["F32", "Q4_K_M"])
def test_experts_on_the_cpu_buffer_type_give_the_same_logits(converted, capsys, file_type):
    """On a build without a GPU, "CPU" is where the tensors would be anyway: equal logits say
    only that the override array does no harm. What shows it is honoured is llama.cpp's load log
    (here) and where the next test sends them."""
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


def test_the_override_array_places_exactly_the_planned_tensors(converted, capsys, monkeypatch):
    """With no GPU, "CPU" changes nothing, so this sends the planner's pattern to the one other
    buffer type a CPU build has: CPU_REPACK, with repacking otherwise off. llama.cpp must then
    repack exactly layer 0's Q4_K expert tensors (its log gives that buffer's size) and run
    those products with the repacked kernel (other logits, close to the mapped ones)."""
    extra = cpu_extra_buffer_types()
    if "CPU_REPACK" not in extra:
        pytest.skip("this llama.cpp build has no CPU_REPACK buffer type for this CPU")
    plain = devices.buffer_type
    monkeypatch.setattr(devices, "buffer_type", lambda name: extra[name] if name in extra else plain(name))
    path = converted("mixtral", "Q4_K_M")
    plan = file_plan(path, 64, gpu_budget=1 * GiB, n_cpu_moe=1)
    to_repack = SimpleNamespace(n_gpu_layers=plan.n_gpu_layers,
                                overrides=[(pattern, "CPU_REPACK") for pattern, _ in plan.overrides])
    mapped = logits(path, None)
    capsys.readouterr()
    layer_0_repacked = logits(path, to_repack, verbose=True)
    log = capsys.readouterr().err
    assert sorted(OVERRIDDEN.findall(log)) == [(f"blk.0.ffn_{w}_exps.weight", "CPU_REPACK") for w in ("down", "gate", "up")]
    layer_0_q4_k = sum(int(t.n_bytes) for t in GGUFReader(path).tensors
                       if LAYER_0_EXPERTS.match(t.name) and t.tensor_type == GGMLQuantizationType.Q4_K)
    sizes = [float(mib) for mib in REPACK_BUFFER.findall(log)]
    assert layer_0_q4_k > 0 and sizes == [pytest.approx(layer_0_q4_k / 2**20, abs=0.005)]  # MiB, 2 decimals
    diff = np.abs(layer_0_repacked - mapped).max()
    assert 0 < diff < 2e-5  # measured 1.9e-6 (10x for other CPUs' SIMD paths)


def cpu_extra_buffer_types() -> dict[str, int]:
    """The CPU backend's extra buffer types (CPU_REPACK, AMX...) by name, as llama.cpp's
    --override-tensor lists them (ggml_backend_dev_get_extra_bufts)."""
    base, ggml = devices.libs()
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if devices.DEV_TYPES.get(base.ggml_backend_dev_type(dev)) != "cpu":
            continue
        address = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(dev),
                                                         b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return {}
        array = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(dev)
        found, i = {}, 0
        while array[i]:
            found[base.ggml_backend_buft_name(array[i]).decode()] = array[i]
            i += 1
        return found
    return {}


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
    # another kernel (other activation blocks, other summation order), nearly the same
    # numbers: measured max |mapped - repacked| 1.9e-6 over the 11 x 32000 logits (the bound
    # leaves 10x for other CPUs' SIMD paths)
    diff = np.abs(mapped - repacked).max()
    assert 0 < diff < 2e-5


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
