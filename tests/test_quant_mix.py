"""The per-tensor rules of llama.cpp's mixes, on Mixtral 8x7B's real tensor table."""


from localmix.convert.config import ModelConfig
from localmix.convert.mix import ModelShape, choose_types, use_more_bits
from localmix.convert.names import expected_shapes
from localmix.convert.presets import config_tensors
from localmix.kernels import QType, tensor_nbytes

MIXTRAL_8X7B = ModelConfig.from_dict({
    "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
})


def mix(file_type, cfg=MIXTRAL_8X7B):
    shapes = expected_shapes(cfg)
    model = ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.num_local_experts if cfg.is_moe else 0)
    types = choose_types([(n, s, QType.F32) for n, s in shapes.items()], file_type, model)
    return types, sum(tensor_nbytes(types[n], s) for n, s in shapes.items())


def test_use_more_bits_picks_the_first_and_last_eighth_and_every_third():
    picked = [i for i in range(32) if use_more_bits(i, 32)]
    assert picked == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_for_mixtral():
    types, size = mix("Q4_K_M")
    assert types["token_embd.weight"] == QType.Q4_K
    assert types["output.weight"] == QType.Q6_K
    for i in range(32):
        assert types[f"blk.{i}.attn_k.weight"] == types[f"blk.{i}.attn_v.weight"] == QType.Q8_0  # 8 experts
        assert types[f"blk.{i}.attn_output.weight"] == QType.Q5_K
        assert types[f"blk.{i}.attn_q.weight"] == QType.Q4_K
        assert types[f"blk.{i}.ffn_gate_exps.weight"] == types[f"blk.{i}.ffn_up_exps.weight"] == QType.Q4_K
        assert types[f"blk.{i}.ffn_down_exps.weight"] == (QType.Q6_K if use_more_bits(i, 32) else QType.Q4_K)
        assert types[f"blk.{i}.ffn_gate_inp.weight"] == types[f"blk.{i}.attn_norm.weight"] == QType.F32
    assert 26.0 < size / 2**30 < 27.0  # llama.cpp's Mixtral 8x7B Q4_K_M is about 26.5 GiB


def test_q3_k_m_for_mixtral():
    types, size = mix("Q3_K_M")
    assert types["blk.0.ffn_down_exps.weight"] == QType.Q5_K   # i_layer < n_layer / 16
    assert types["blk.2.ffn_down_exps.weight"] == QType.Q4_K
    assert types["blk.2.ffn_gate_exps.weight"] == QType.Q3_K
    assert types["blk.5.attn_v.weight"] == QType.Q8_0
    assert 20.5 < size / 2**30 < 21.5  # about 21.0 GiB: fits a 24 GB card


# from the fewest bits to the most; measured GiB for Mixtral 8x7B: 16.12, 19.03, 21.00, 22.51,
# 24.91, 26.49, 30.02, 30.95, 35.74, 46.22, 86.99, 173.98
LADDER = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32"]


def test_sizes_shrink_with_bits():
    """Fewer bits, a strictly smaller file, over the whole ladder."""
    sizes = [sum(t.n_bytes for t in config_tensors(MIXTRAL_8X7B, file_type)) for file_type in LADDER]
    assert sizes[LADDER.index("Q4_K_M")] == mix("Q4_K_M")[1]
    shrinking = [(a, b) for a, b, sa, sb in zip(LADDER, LADDER[1:], sizes, sizes[1:]) if not sa < sb]
    assert not shrinking, f"not smaller with fewer bits: {shrinking}"


def test_dense_mistral_q4_k_m_uses_the_attn_v_counter():
    cfg = ModelConfig.from_dict({
        "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000})
    types, _ = mix("Q4_K_M", cfg)
    for i in range(32):
        want = QType.Q6_K if use_more_bits(i, 32) else QType.Q4_K
        assert types[f"blk.{i}.attn_v.weight"] == want
        assert types[f"blk.{i}.ffn_down.weight"] == want
        assert types[f"blk.{i}.attn_k.weight"] == QType.Q4_K


def test_rows_that_do_not_fit_a_k_quant_fall_back():
    model = ModelShape(2, 8, 2, 8)
    tensors = [("blk.0.attn_q.weight", (320, 320), QType.F32), ("blk.0.ffn_up_exps.weight", (8, 64, 320), QType.F32),
               ("blk.0.ffn_down_exps.weight", (8, 320, 48), QType.F32), ("output.weight", (1000, 320), QType.F32)]
    types = choose_types(tensors, "Q4_K_M", model)
    assert types["blk.0.attn_q.weight"] == QType.Q5_0      # Q4_K -> Q5_0
    assert types["blk.0.ffn_up_exps.weight"] == QType.Q5_0
    assert types["blk.0.ffn_down_exps.weight"] == QType.F16  # 48 fits no block: F16
    assert types["output.weight"] == QType.Q8_0
    types = choose_types(tensors, "Q3_K_S", model)
    assert types["blk.0.attn_q.weight"] == QType.Q4_0      # Q3_K -> Q4_0
