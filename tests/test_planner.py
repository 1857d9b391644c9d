"""The memory planner on Mixtral's real tensor tables (from the presets, no file)."""

import pytest

from localmix.convert.presets import preset_tensors
from localmix.runtime.planner import EXPERT, GiB, preset_plan

RTX_3090 = 24 * GiB
MAC_32_WORKING_SET = int(21.3 * GiB)  # Metal's recommendedMaxWorkingSetSize on a 32 GB Mac
MAC_64_WORKING_SET = 48 * GiB


# The published configs (config.json of mistralai/Mixtral-8x7B-v0.1 and Mixtral-8x22B-v0.1):
# hidden, ffn, layers, query heads, KV heads, vocabulary, experts
CONFIGS = {"mixtral-8x7b": (4096, 14336, 32, 32, 8, 32000, 8), "mixtral-8x22b": (6144, 16384, 56, 48, 8, 32768, 8)}
# ggml-common.h: (weights, bytes) per block
BLOCKS = {"F32": (1, 4), "Q8_0": (32, 34), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
          "Q6_K": (256, 210)}
# layers whose ffn_down gets more bits (llama.cpp's use_more_bits: the first and last eighth of
# the layers and every third one between), written out
MORE_BITS = {32: [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31],
             56: [0, 1, 2, 3, 4, 5, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 49, 50, 51, 52, 53, 54, 55]}


def nbytes(qtype: str, *shape: int) -> int:
    weights, block_bytes = BLOCKS[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // weights * block_bytes


def expected_file_bytes(preset: str, file_type: str) -> int:
    """The weights of llama.cpp's Mixtral file, computed from the config and llama.cpp's rules
    for 8 experts (llama_tensor_get_type): attn_k/attn_v Q8_0, attn_output Q5_K, output Q6_K,
    norms and the router F32; ffn_down Q6_K on MORE_BITS layers for Q4_K_M, Q5_K on the first
    sixteenth of the layers and Q4_K elsewhere for Q3_K_M."""
    d, ff, n_layer, n_head, n_kv, vocab, n_exp = CONFIGS[preset]
    base = {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K"}[file_type]
    kv = n_kv * (d // n_head)  # rows of attn_k and attn_v
    total = nbytes(base, vocab, d) + nbytes("Q6_K", vocab, d) + nbytes("F32", d)  # token_embd, output, output_norm
    for i in range(n_layer):
        total += nbytes(base, d, d) + 2 * nbytes("Q8_0", kv, d) + nbytes("Q5_K", d, d)  # attn_q, attn_k + attn_v, attn_output
        total += 2 * nbytes("F32", d) + nbytes("F32", n_exp, d)  # attn_norm, ffn_norm, ffn_gate_inp
        total += 2 * nbytes(base, n_exp, ff, d)  # ffn_gate_exps, ffn_up_exps
        if file_type == "Q4_K_M":
            down = "Q6_K" if i in MORE_BITS[n_layer] else "Q4_K"
        else:
            down = "Q5_K" if i < n_layer // 16 else "Q4_K"
        total += nbytes(down, n_exp, d, ff)  # ffn_down_exps
    return total


@pytest.mark.parametrize("preset", list(CONFIGS))
@pytest.mark.parametrize("file_type", ["Q3_K_M", "Q4_K_M"])
def test_preset_totals_equal_the_sizes_computed_from_the_configs(preset, file_type):
    """Measured: 8x7B Q3_K_M 22,545,711,104 bytes, Q4_K_M 28,447,727,616 (the synthetic files
    llama.cpp loads are these plus ~1 MB of metadata and tokenizer); 8x22B Q3_K_M
    67,800,293,376, Q4_K_M 85,598,035,968."""
    assert sum(t.n_bytes for t in preset_tensors(preset, file_type)) == expected_file_bytes(preset, file_type)


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


# (preset, type, machine): (fits, layers whose experts stay on the CPU), at 8K context, as
# measured; on the GPU machines every plan keeps as few layers' experts on the CPU as it can
PLANS = {
    ("mixtral-8x7b", "Q3_K_M", "3090"): (True, 0), ("mixtral-8x7b", "Q3_K_M", "mac32"): (True, 3),
    ("mixtral-8x7b", "Q3_K_M", "mac64"): (True, 0), ("mixtral-8x7b", "Q3_K_M", "laptop16"): (False, 0),
    ("mixtral-8x7b", "Q4_K_M", "3090"): (True, 6), ("mixtral-8x7b", "Q4_K_M", "mac32"): (True, 10),
    ("mixtral-8x7b", "Q4_K_M", "mac64"): (True, 0), ("mixtral-8x7b", "Q4_K_M", "laptop16"): (False, 0),
    # 8x22B's experts outgrow a 24 or 32 GiB machine's RAM: the plan runs, but says it does not fit
    ("mixtral-8x22b", "Q3_K_M", "3090"): (False, 40), ("mixtral-8x22b", "Q3_K_M", "mac32"): (False, 42),
    ("mixtral-8x22b", "Q3_K_M", "mac64"): (True, 17), ("mixtral-8x22b", "Q3_K_M", "laptop16"): (False, 0),
    ("mixtral-8x22b", "Q4_K_M", "3090"): (False, 44), ("mixtral-8x22b", "Q4_K_M", "mac32"): (False, 46),
    ("mixtral-8x22b", "Q4_K_M", "mac64"): (True, 26), ("mixtral-8x22b", "Q4_K_M", "laptop16"): (False, 0),
}
MACHINES = {"3090": (RTX_3090, 24 * GiB, "gpu"), "mac32": (MAC_32_WORKING_SET, 32 * GiB, "metal"),
            "mac64": (MAC_64_WORKING_SET, 64 * GiB, "metal"), "laptop16": (None, 16 * GiB, "cpu")}


@pytest.mark.parametrize("preset,file_type,machine", list(PLANS), ids=["-".join(k) for k in PLANS])
def test_every_plan_stays_within_its_budget(preset, file_type, machine):
    budget, ram, device = MACHINES[machine]
    p = preset_plan(preset, file_type, 8192, budget, ram, device=device if budget else "gpu")
    fits, n_cpu_layers = PLANS[preset, file_type, machine]
    assert (p.fits, len(p.cpu_expert_layers)) == (fits, n_cpu_layers)
    assert (p.advice is None) == p.fits  # advice exactly when it does not fit
    if budget is None:
        assert p.device == "cpu" and p.gpu_bytes == 0 and p.cpu_bytes == p.weights_bytes
        assert "smaller quant" in p.advice  # none of these fit 16 GiB of RAM
        return
    assert p.gpu_bytes <= budget
    assert p.fits == (p.cpu_bytes <= ram)  # the GPU side always fits here; RAM decides
    if not p.fits:
        assert "RAM" in p.advice and "smaller quant" in p.advice
    if p.cpu_expert_layers:  # one layer fewer on the CPU would overflow the GPU
        layer = p.cpu_expert_layers[-1]
        experts = sum(t.n_bytes for t in preset_tensors(preset, file_type)
                      if EXPERT.match(t.name) and int(t.name.split(".")[1]) == layer)
        assert p.gpu_bytes + experts > budget


def test_mac_64_holds_mixtral_8x7b_q4_k_m_whole():
    p = preset_plan("mixtral-8x7b", "Q4_K_M", 8192, MAC_64_WORKING_SET, 64 * GiB, device="metal")
    assert p.fits and p.cpu_bytes == 0


def test_mac_32_keeps_a_few_layers_experts_of_q3_k_m_on_the_cpu():
    p = preset_plan("mixtral-8x7b", "Q3_K_M", 8192, MAC_32_WORKING_SET, 32 * GiB, device="metal")
    assert p.fits and 0 < len(p.cpu_expert_layers) <= 4 and p.gpu_bytes <= MAC_32_WORKING_SET


def test_nothing_fits_says_what_would():
    p = preset_plan("mixtral-8x22b", "Q4_K_M", 65536, 6 * GiB, 16 * GiB)
    assert not p.fits and "--ctx" in p.advice and "smaller quant" in p.advice


def test_flash_attention_drops_the_attention_scores_where_it_is_sure_to_be_on():
    # Mixtral 8x7B at 32K: without flash attention a micro-batch of 512 tokens holds 32 heads'
    # scores and the mask, 4 * 512 * (33 * 32768 + 8 * 4096) bytes; with it the widest step is
    # the experts' gate, up and product, 4 * 512 * (3 * 14336 * 2 + 9 * 4096)
    off, auto, on = (preset_plan("mixtral-8x7b", "Q4_K_M", 32768, None, 64 * GiB, flash_attn=fa)
                     for fa in ("off", "auto", "on"))
    assert off.compute_bytes == 4 * 512 * (33 * 32768 + 8 * 4096)
    assert auto.compute_bytes == on.compute_bytes == 4 * 512 * (3 * 14336 * 2 + 9 * 4096)
    # on a GPU, auto may resolve to off (a backend without the kernel): the plan keeps the scores
    gpu = {fa: preset_plan("mixtral-8x7b", "Q4_K_M", 32768, RTX_3090, 64 * GiB, flash_attn=fa).compute_bytes
           for fa in ("off", "auto", "on")}
    assert gpu["auto"] == gpu["off"] == off.compute_bytes > gpu["on"] == on.compute_bytes


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
    fa = {setting: json.loads(run_localmix("plan", "mixtral-8x7b:Q4_K_M", "--vram", "24GiB", "--ctx", "32768", "--json",
                                           "--flash-attn", setting).stdout)["bytes"]["compute"] for setting in ("on", "off")}
    assert fa["on"] < fa["off"]
    bad = run_localmix("plan", "mixtral-8x7b:Q4_K_M", "--vram", "lots")
    assert bad.returncode == 2 and "size" in bad.stderr and "Traceback" not in bad.stderr
