"""The native engine on GGUFs made elsewhere: tied embeddings (no output.weight), the legacy
types llama.cpp's quantizer writes (Q4_0, Q4_1, Q5_0, Q5_1), each product held to ggml's and the
logits matching llama.cpp's within the bounds of test_native.py (whose comment says why); any
other architecture gets one line pointing to llama.cpp."""

import gguf
import numpy as np
import pytest
from conftest import load_llama, run_localmix
from llama_quantize import llama_model_quantize
from test_native import TEXT, TOLERANCE, ProductCheck, llama_logits, native_logits


def rewrite(src, dst, drop=(), arch=None):
    """A copy of the GGUF `src` without the tensors in `drop`, optionally under another
    architecture name (its `llama.*` keys renamed): a file "from elsewhere"."""
    r = gguf.GGUFReader(src)
    old = r.fields["general.architecture"].contents()
    arch = arch or old
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key.replace(f"{old}.", f"{arch}.", 1), field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(int(n) for n in reversed(t.shape)),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def ids(converted):
    return load_llama(converted("mixtral", "F32"), n_ctx=256).tokenize(TEXT.encode(), add_bos=True)


@pytest.fixture(scope="module")
def tied(converted, tmp_path_factory):
    return rewrite(converted("mixtral", "F32"), tmp_path_factory.mktemp("tied") / "tied-F32.gguf",
                   drop=("output.weight",))


def _compare(path, ids, bounds, spread=None):
    """Each product of the forward against ggml's CPU kernel (test_native.ProductCheck), and
    native logits against llama.cpp's within `bounds` (test_native's (max, mean)); with `spread`,
    the bounds are in units of that logit spread (std) and scaled to this file's: float32
    rounding, and a flipped rounding's reach, grow with the logits."""
    check = ProductCheck()
    want, got = llama_logits(load_llama(path, n_ctx=256), ids), native_logits(path, ids, check)
    err = np.abs(got - want)
    scale = want.std() / spread if spread else 1.0
    print(f"\n{path.name}: max {err.max():.3g}, mean {err.mean():.3g}, logit std {want.std():.3g}; "
          f"{check.products} products at most {check.worst:.3g} of their bound from ggml's")
    assert check.products > 0 and check.worst <= 1.0
    assert err.max() < bounds[0] * scale and err.mean() < bounds[1] * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


@pytest.fixture(scope="module")
def untied_spread(converted, ids):
    return llama_logits(load_llama(converted("mixtral", "F32"), n_ctx=256), ids).std()


def test_tied_embeddings(tied, ids, untied_spread):
    """The head is token_embd (N(0, 1) rows, not the checkpoint's 4/sqrt(d)-scaled lm_head), so
    the logits spread ~6x wider; float32 rounding grows with them, the bounds are scaled alike."""
    names = {t.name for t in gguf.GGUFReader(tied).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    _compare(tied, ids, TOLERANCE["F32"], spread=untied_spread)


def test_tied_embeddings_quantized_by_llama_cpp(tied, ids, untied_spread, tmp_path):
    out = tmp_path / "tied-Q4_K_M.gguf"
    llama_model_quantize(tied, out, "Q4_K_M")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types  # the head's type
    _compare(out, ids, TOLERANCE["Q4_K_M"], spread=untied_spread)


@pytest.mark.parametrize("file_type", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_types_from_llama_cpp(file_type, converted, ids, tmp_path):
    out = tmp_path / f"{file_type}.gguf"
    llama_model_quantize(converted("mixtral", "F32"), out, file_type)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert file_type in kinds
    _compare(out, ids, TOLERANCE["Q4_K_M"])  # the 8-bit activations' bound, as every quantized type


def test_another_architecture_gets_one_line(converted, tmp_path):
    other = rewrite(converted("mixtral", "F32"), tmp_path / "other.gguf", arch="qwen2")
    r = run_localmix("run", other, "hi", "--engine", "native", "--max-tokens", "1", "--ctx", "64")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'qwen2'" in lines[0] and "--engine llama.cpp" in lines[0], r.stderr
