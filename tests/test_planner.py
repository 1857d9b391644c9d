"""The memory planner on Mixtral's real tensor tables (from the presets, no file)."""

import pytest

from localmix.convert.presets import preset_tensors
from localmix.runtime.planner import EXPERT, GiB, preset_plan

RTX_3090 = 24 * GiB
MAC_32_WORKING_SET = int(21.3 * GiB)  # Metal's recommendedMaxWorkingSetSize on a 32 GB Mac
MAC_64_WORKING_SET = 48 * GiB


def test_preset_sizes_match_llama_cpp_files():
    sizes = {t: sum(x.n_bytes for x in preset_tensors("mixtral-8x7b", t)) / 1e9 for t in ("Q3_K_M", "Q4_K_M")}
    assert sizes["Q3_K_M"] == pytest.approx(22.5, abs=0.1) and sizes["Q4_K_M"] == pytest.approx(28.4, abs=0.1)


@pytest.mark.parametrize("ctx", [4096, 8192])
def test_3090_holds_all_of_q3_k_m(ctx):
    p = preset_plan("mixtral-8x7b", "Q3_K_M", ctx, RTX_3090, 24 * GiB)
    assert p.fits and p.cpu_bytes == 0 and not p.cpu_expert_layers and not p.overrides
    assert p.n_gpu_layers == 33 and p.gpu_bytes <= RTX_3090


def test_3090_puts_only_some_layers_experts_of_q4_k_m_on_the_cpu():
    p = preset_plan("mixtral-8x7b", "Q4_K_M", 8192, RTX_3090, 24 * GiB)
    assert p.fits and p.gpu_bytes <= RTX_3090
    assert 0 < len(p.cpu_expert_layers) < 32
    assert p.cpu_expert_layers == list(range(len(p.cpu_expert_layers)))  # llama.cpp's --n-cpu-moe N
    on_cpu = [t for t in preset_tensors("mixtral-8x7b", "Q4_K_M")
              if EXPERT.match(t.name) and int(t.name.split(".")[1]) in p.cpu_expert_layers]
    assert p.cpu_bytes == sum(t.n_bytes for t in on_cpu)  # experts and nothing else
    pattern = p.overrides[0][0]
    import re
    assert re.search(pattern, "blk.0.ffn_down_exps.weight") and not re.search(pattern, "blk.0.attn_q.weight")
    assert not re.search(pattern, "blk.31.ffn_up_exps.weight")


@pytest.mark.parametrize("preset,file_type", [("mixtral-8x7b", "Q3_K_M"), ("mixtral-8x7b", "Q4_K_M"),
                                              ("mixtral-8x22b", "Q3_K_M"), ("mixtral-8x22b", "Q4_K_M")])
@pytest.mark.parametrize("machine", ["3090", "mac32", "mac64", "laptop16"])
def test_every_plan_stays_within_its_budget(preset, file_type, machine):
    budget, ram, device = {"3090": (RTX_3090, 24 * GiB, "gpu"), "mac32": (MAC_32_WORKING_SET, 32 * GiB, "metal"),
                           "mac64": (MAC_64_WORKING_SET, 64 * GiB, "metal"), "laptop16": (None, 16 * GiB, "cpu")}[machine]
    p = preset_plan(preset, file_type, 8192, budget, ram, device=device if budget else "gpu")
    if budget is None:
        assert p.device == "cpu" and p.gpu_bytes == 0 and p.cpu_bytes == p.weights_bytes
        assert not p.fits and "smaller quant" in p.advice  # none of these fit 16 GiB of RAM
    else:
        assert p.gpu_bytes <= budget
        assert p.fits == (p.cpu_bytes <= ram) or p.advice


def test_mac_64_holds_mixtral_8x7b_q4_k_m_whole():
    p = preset_plan("mixtral-8x7b", "Q4_K_M", 8192, MAC_64_WORKING_SET, 64 * GiB, device="metal")
    assert p.fits and p.cpu_bytes == 0


def test_mac_32_keeps_a_few_layers_experts_of_q3_k_m_on_the_cpu():
    p = preset_plan("mixtral-8x7b", "Q3_K_M", 8192, MAC_32_WORKING_SET, 32 * GiB, device="metal")
    assert p.fits and 0 < len(p.cpu_expert_layers) <= 4 and p.gpu_bytes <= MAC_32_WORKING_SET


def test_nothing_fits_says_what_would():
    p = preset_plan("mixtral-8x22b", "Q4_K_M", 65536, 6 * GiB, 16 * GiB)
    assert not p.fits and "--ctx" in p.advice and "smaller quant" in p.advice


def test_plan_command(converted):
    import json

    from conftest import run_localmix

    r = run_localmix("plan", "mixtral-8x7b:Q4_K_M", "--vram", "24GiB", "--ram", "64GiB", "--ctx", "8192", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and 0 < len(out["cpu_expert_layers"]) < 32
    assert out["bytes"]["gpu_total"] <= 24 * GiB and out["tensor_overrides"][0]["buffer_type"] == "CPU"
    text = run_localmix("plan", converted("mixtral", "Q8_0"), "--ram", "16GiB")
    assert text.returncode == 0 and "fits" in text.stdout
    bad = run_localmix("plan", "mixtral-8x7b:Q4_K_M", "--vram", "lots")
    assert bad.returncode == 2 and "size" in bad.stderr and "Traceback" not in bad.stderr
