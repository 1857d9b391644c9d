"""Whole files: localmix, straight from the Hugging Face checkpoint, writes what llama.cpp's
quantizer makes of the F32 file, tensor for tensor and byte for byte, with and without an
importance matrix; and the quantized files run, with the expected loss of quality."""

import numpy as np
import pytest
from conftest import built_once, llama_logprobs, mean_kl
from gguf import GGUFReader
from llama_quantize import llama_model_quantize

from localmix.convert.mix import allows_quantization
from localmix.convert.pipeline import convert
from localmix.errors import InputError
from localmix.fixtures.tiny import make_tiny_checkpoint

# 32 layers so that every layer-dependent rule of Mixtral's mixes is exercised.
DEEP = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=32, num_attention_heads=8,
            num_key_value_heads=2, seed=1)


@pytest.fixture(scope="session")
def deep(shared_dir):
    base = shared_dir / "deep"
    src = built_once(base / "deep-mixtral", lambda out: make_tiny_checkpoint(out, **DEEP))
    f32 = built_once(base / "deep-F32.gguf", lambda out: convert(src, out, "F32"))
    # an importance matrix for every quantizable tensor, per expert for the stacked ones,
    # one expert with no tokens (llama.cpp then uses 1s)
    rng = np.random.default_rng(7)
    sums, counts = {}, {}
    for t in GGUFReader(f32).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        if allows_quantization(t.name, shape) and t.name != "token_embd.weight":
            n_expert = shape[0] if len(shape) == 3 else 1
            counts[t.name] = rng.integers(0, 500, n_expert).astype(np.float32)
            sums[t.name] = (rng.gamma(1.0, 1.0, (n_expert, shape[-1])) * counts[t.name][:, None]).astype(np.float32)
    counts["blk.3.ffn_down_exps.weight"][5] = 0
    imatrix = built_once(base / "imatrix.gguf", lambda out: write_llama_imatrix(out, sums, counts))
    return src, f32, imatrix, llama_values(sums, counts)


@pytest.fixture(scope="session")
def deep_ours(deep, shared_dir):
    """deep_ours(type, with_imatrix) -> localmix's conversion of the deep checkpoint, made once."""
    src, _, imatrix, _ = deep

    def get(file_type: str, with_imatrix: bool):
        name = f"ours-{file_type}-{'imatrix' if with_imatrix else 'plain'}.gguf"
        return built_once(shared_dir / "deep" / name,
                          lambda out: convert(src, out, file_type, imatrix=imatrix if with_imatrix else None))

    return get


def write_llama_imatrix(path, sums, counts):
    """The GGUF imatrix as llama.cpp's tools/imatrix writes it (save_imatrix), through gguf-py:
    general.type "imatrix", the datasets, chunk count and size; per weight, NAME.in_sum2 (ggml
    shape [n_per_row, n_mat]: sums of squared activations) and NAME.counts ([1, n_mat])."""
    import gguf

    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["random"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in sorted(sums):
        w.add_tensor(f"{name}.in_sum2", sums[name])                   # numpy (n_mat, n_per_row)
        w.add_tensor(f"{name}.counts", counts[name].reshape(-1, 1))  # numpy (n_mat, 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_values(sums, counts):
    """What llama.cpp's quantizer makes of those arrays (tools/quantize/quantize.cpp,
    load_imatrix): per expert, in_sum2 / count, or 1s for an expert that saw no token."""
    values = {}
    for name, s in sums.items():
        per_expert = [s[e] / np.float32(c) if c > 0 else np.ones_like(s[e]) for e, c in enumerate(counts[name])]
        values[name] = np.concatenate(per_expert).astype(np.float32)
    return values


def read(path):
    """Tensors {name: (type, shape, bytes)} and metadata {key: value}, from one reading by gguf-py's
    stock reader (the independent one; each reading parses the 32,000-token vocabulary again)."""
    r = GGUFReader(path)
    return ({t.name: (t.tensor_type.name, tuple(t.shape), np.asarray(t.data).tobytes()) for t in r.tensors},
            {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")})


def assert_same_file(ours, theirs) -> set[str]:
    """Same tensors (names, types, shapes, bytes) and metadata; returns the tensor types used."""
    (a, a_kv), (b, b_kv) = read(ours), read(theirs)
    assert a.keys() == b.keys()
    for name in b:
        assert a[name][:2] == b[name][:2], name
        assert a[name][2] == b[name][2], f"{name} ({b[name][0]}) differs"
    assert a_kv == b_kv  # file type, quantization version, hyper-parameters, tokenizer
    return {t for t, _, _ in a.values()}


# Mixes with and without an importance matrix; IQ3_S and IQ3_M with one only, as they are used:
# no rule of theirs depends on it (IQ4_XS/IQ4_NL's first ffn_down layers do) and their kernels
# are checked without one, row family by row family, in test_kernels.py
MIXES = [(t, m) for t in ("Q4_K_M", "Q3_K_M", "Q3_K_S", "Q4_K_S", "Q2_K", "IQ4_XS", "IQ4_NL") for m in (False, True)] + \
        [(t, True) for t in ("IQ3_S", "IQ3_M")]


@pytest.mark.parametrize("file_type,with_imatrix", MIXES, ids=[f"{t}-{'imatrix' if m else 'plain'}" for t, m in MIXES])
def test_same_file_as_llama_model_quantize(file_type, with_imatrix, deep, deep_ours, tmp_path):
    _, f32, _, values = deep
    ours = deep_ours(file_type, with_imatrix)
    theirs = tmp_path / "theirs.gguf"
    llama_model_quantize(f32, theirs, file_type, values if with_imatrix else None)
    assert len(assert_same_file(ours, theirs)) >= 3  # a real mix, not one type everywhere


@pytest.mark.parametrize("file_type,types", [
    ("IQ3_XS", {"IQ3_XXS", "IQ3_S", "Q5_K", "Q8_0", "Q6_K"}),
    ("IQ3_XXS", {"IQ2_S", "IQ3_XXS", "IQ3_S", "Q5_K", "Q8_0"}),
])
def test_iq3_xs_and_xxs_with_imatrix_match_llama_model_quantize(file_type, types, deep, tmp_path):
    """Mixes that need the imatrix: IQ3_XS puts attn_q and the middle layers' ffn_gate/ffn_up in
    IQ3_XXS; IQ3_XXS puts the experts in IQ3_XXS and attn_q in IQ2_S, token_embd in IQ3_S."""
    src, f32, imatrix, values = deep
    ours = convert(src, tmp_path / "ours.gguf", file_type, imatrix=imatrix).path
    theirs = tmp_path / "theirs.gguf"
    llama_model_quantize(f32, theirs, file_type, values)
    assert assert_same_file(ours, theirs) >= types


@pytest.mark.parametrize("file_type", ["IQ3_XS", "IQ3_XXS"])
def test_iq3_xxs_files_need_an_imatrix(file_type, deep, tmp_path):
    """Without an importance matrix llama.cpp refuses these mixes; so does localmix, before writing anything."""
    src, f32, _, _ = deep
    with pytest.raises(InputError, match="needs an importance matrix"):
        convert(src, tmp_path / "ours.gguf", file_type)
    assert not (tmp_path / "ours.gguf").exists()
    with pytest.raises(AssertionError, match="llama_model_quantize failed"):
        llama_model_quantize(f32, tmp_path / "theirs.gguf", file_type)


def test_gguf_source_gives_the_same_file(deep, deep_ours, tmp_path):
    """`localmix quantize model-F32.gguf` equals the one-pass conversion from the checkpoint
    (the one test_same_file_as_llama_model_quantize[Q3_K_M-plain] compares with llama.cpp's)."""
    _, f32, _, _ = deep
    direct = deep_ours("Q3_K_M", False)
    via = convert(f32, tmp_path / "via.gguf", "Q3_K_M").path
    assert read(direct) == read(via)


def test_quality_is_ordered_by_bits(converted, tiny_mixtral):
    """Mean KL divergence against the F32 file over 600 positions, per type."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tiny_mixtral / "tokenizer.model"))
    text = " ".join(f"Satz {i}: Die Experten {i} et les routeurs {i}, the tokens {i}." for i in range(60))
    ids = [1] + sp.encode(text)[:599]
    assert len(ids) >= 512

    ref = llama_logprobs(converted("mixtral", "F32"), ids)
    kl = {}
    for file_type in ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q6_K", "Q8_0"]:
        q = llama_logprobs(converted("mixtral", file_type), ids)
        kl[file_type] = mean_kl(ref, q)
    print("\nmean KL vs F32 over", len(ids), "positions:", {k: f"{v:.4g}" for k, v in kl.items()})
    values = list(kl.values())
    assert values == sorted(values, reverse=True), kl


@pytest.fixture(scope="session")
def odd_and_dense(shared_dir):
    """Widths that fit no K-quant block (fallbacks), and dense Mistral (counters, no experts)."""
    base = shared_dir / "odd"
    odd = built_once(base / "odd-mixtral", lambda out: make_tiny_checkpoint(
        out, hidden_size=384, intermediate_size=480, num_attention_heads=12, num_key_value_heads=4, seed=2))
    dense = built_once(base / "dense-mistral", lambda out: make_tiny_checkpoint(
        out, dense=True, num_hidden_layers=8, seed=3))
    return {name: (src, built_once(base / f"{name}-F32.gguf", lambda out: convert(src, out, "F32")))
            for name, src in (("odd", odd), ("dense", dense))}


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q5_K_M", "Q3_K_L", "Q2_K", "Q6_K", "IQ4_XS", "IQ3_M", "IQ3_S"])
@pytest.mark.parametrize("model", ["odd", "dense"])
def test_fallbacks_and_dense_mixes_match_llama_model_quantize(model, file_type, odd_and_dense, tmp_path):
    src, f32 = odd_and_dense[model]
    ours = convert(src, tmp_path / "ours.gguf", file_type).path
    theirs = tmp_path / "theirs.gguf"
    llama_model_quantize(f32, theirs, file_type)
    types = assert_same_file(ours, theirs)
    if model == "odd":  # rows of 384 and 480 fit no 256-block: the 32-block fallbacks were used
        assert types & {"Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}


@pytest.mark.parametrize("file_type", ["Q3_K_M", "Q4_K_M"])
def test_requantizing_q8_0_equals_llama_model_quantize(file_type, converted, tmp_path):
    """`localmix quantize model-Q8_0.gguf out.gguf --type Q3_K_M` (a downloaded quantized file):
    one warning, and what llama_model_quantize writes with allow_requantize, byte for byte."""
    from conftest import run_localmix

    src = converted("mixtral", "Q8_0")
    ours = tmp_path / "ours.gguf"
    r = run_localmix("quantize", src, ours, "--type", file_type)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "requantizing loses more" in warnings[0], r.stderr
    theirs = tmp_path / "theirs.gguf"
    llama_model_quantize(src, theirs, file_type, allow_requantize=True)
    assert assert_same_file(ours, theirs) >= {"Q8_0", file_type[:2] + "_K"}  # attn_v stays Q8_0: copied
