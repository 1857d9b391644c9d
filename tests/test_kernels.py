"""The quantization kernels, bit for bit against llama.cpp's `ggml_quantize_chunk`.

Every quantized type, on rows from many families (ordinary, heavy-tailed, all-zero,
constant, one huge outlier, tiny magnitudes, alternating signs, blocks of zeros among others) and row lengths from one
super-block to a Mixtral FFN row, with no importance matrix, a random one and one with
zeros. The plain-Python reference must agree with the compiled kernels, and both with ggml.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_ref import ggml_dequantize, ggml_fp32_to_fp16, ggml_quantize
from numba import njit

from localmix import kernels
from localmix.kernels import QType, common

TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
         QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
         QType.IQ4_NL, QType.IQ4_XS, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_S]
IQUANTS = {QType.IQ4_NL, QType.IQ4_XS, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_S}
# 768: an odd number of super-blocks after a full pair, and of legacy blocks past a full group of 16
# (the fast kernels search 16 sub-blocks at once: two Q4_K/Q5_K super-blocks, 16 legacy blocks)
ROWS_PER_FAMILY = {256: 32, 512: 16, 768: 8, 4096: 2, 14336: 1}
IMATRICES = ["none", "random", "zeros"]


def families(n: int, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of length n, `rows` of each kind, float32."""
    rng = np.random.default_rng(seed)
    at = np.arange(n)
    outlier = rng.standard_normal((rows, n)) * 1e-3
    outlier[np.arange(rows), rng.integers(0, n, rows)] = 1e3 * rng.choice([-1, 1], rows)
    x = {
        "gaussian": rng.standard_normal((rows, n)) * 0.02,
        "uniform": rng.uniform(-1, 1, (rows, n)),
        "positive": rng.uniform(0.1, 1, (rows, n)),
        "student_t2": rng.standard_t(2, (rows, n)),
        "zeros": np.zeros((rows, n)),
        "const_pos": np.full((rows, n), 0.75),
        "const_neg": np.full((rows, n), -3.0),
        "outlier": outlier,
        "tiny": rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-30, -8, (rows, 1)),
        "alternating": np.where(at % 2, 1, -1) * rng.uniform(0.5, 1.5, (rows, n)),
        # every other block of 32 all zero (IQ3_S then stores the next block's quants one place early, as ggml does)
        "zero_blocks": rng.standard_normal((rows, n)) * (at // 32 % 2 == 1),
    }
    return {k: v.astype(np.float32) for k, v in x.items()}


def importance(kind: str, n: int, seed: int = 1) -> np.ndarray | None:
    rng = np.random.default_rng(seed)
    if kind == "none":
        return None
    qw = np.exp(rng.normal(0, 1.5, n)).astype(np.float32)  # positive, spanning decades
    if kind == "zeros":
        qw[:32] = 0  # a whole sub-block without importance
        qw[rng.random(n) < 0.25] = 0
    return qw


@pytest.fixture(scope="session")  # not module: conftest spreads this file's tests over the workers
def data() -> dict[int, tuple[list[str], np.ndarray]]:
    """{n: (family of each row, rows)}."""
    out = {}
    for n, rows in ROWS_PER_FAMILY.items():
        fam = families(n, rows, seed=n)
        out[n] = ([k for k, v in fam.items() for _ in v], np.concatenate(list(fam.values())))
    return out


def assert_same_bytes(ours: np.ndarray, ggml: np.ndarray, labels: list[str], what: str) -> None:
    if not np.array_equal(ours, ggml):
        rows = np.nonzero((ours != ggml).any(axis=-1))[0]
        first = np.nonzero(ours[rows[0]] != ggml[rows[0]])[0]
        raise AssertionError(f"{what}: {len(rows)} rows differ, first row {rows[0]} ({labels[rows[0]]}) "
                             f"at bytes {first[:8].tolist()}")


@pytest.mark.parametrize("n", list(ROWS_PER_FAMILY))
@pytest.mark.parametrize("imatrix", IMATRICES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_fast_matches_ggml(data, qtype, imatrix, n):
    labels, x = data[n]
    qw = importance(imatrix, n)
    assert_same_bytes(kernels.quantize(x, qtype, qw), ggml_quantize(x, qtype, qw), labels,
                      f"{qtype.name} n={n} imatrix={imatrix}")


@pytest.mark.parametrize("imatrix", IMATRICES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_matches_fast(qtype, imatrix):
    """The plain-Python reading of the plain kernels, on a row of 256 from each family and a few of 512
    and 768, against the fast kernels (what `quantize` runs) and ggml."""
    for n, pick in ((256, None), (512, ["uniform", "student_t2", "outlier", "alternating"]),
                    (768, ["gaussian", "zeros", "tiny"])):
        fam = families(n, 1, seed=100 + n)
        pick = pick or list(fam)
        x = np.concatenate([fam[k] for k in pick])
        qw = importance(imatrix, n, seed=n)
        fast = kernels.quantize(x, qtype, qw)
        what = f"{qtype.name} n={n} imatrix={imatrix}"
        assert_same_bytes(kernels.quantize_ref(x, qtype, qw), fast, pick, what)
        assert_same_bytes(fast, ggml_quantize(x, qtype, qw), pick, what)


def test_quantize_runs_the_fast_kernels():
    """Every K-quant and legacy type with a scale search goes through the batched kernels; the
    i-quants (and Q8_0) run their ports compiled; the plain ports are the reference."""
    from localmix.kernels import fast, iq2, iquants, kquants, legacy
    for qtype in TYPES:
        row, driver = kernels.KERNELS[qtype]
        assert row.py_func.__module__ in (kquants.__name__, legacy.__name__, iquants.__name__, iq2.__name__)
        expected = {QType.Q8_0: legacy.__name__, **dict.fromkeys(IQUANTS, iquants.__name__),
                    QType.IQ2_S: iq2.__name__}.get(qtype, fast.__name__)
        assert driver.py_func.__module__ == expected, qtype.name
    assert set(fast.DRIVERS) == set(TYPES) - {QType.Q8_0} - IQUANTS


MAX_ERROR = {  # relative RMS error on Gaussian rows; the measured values are about 2/3 of these
    QType.Q2_K: 0.40, QType.Q3_K: 0.22, QType.Q4_K: 0.11, QType.Q5_K: 0.055, QType.Q6_K: 0.03,
    QType.Q4_0: 0.13, QType.Q4_1: 0.12, QType.Q5_0: 0.065, QType.Q5_1: 0.06, QType.Q8_0: 0.01,
    QType.IQ4_NL: 0.12, QType.IQ4_XS: 0.12, QType.IQ3_XXS: 0.32, QType.IQ3_S: 0.25, QType.IQ2_S: 0.40,
}


@pytest.mark.parametrize("imatrix", ["none", "random"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_is_close(qtype, imatrix):
    x = np.random.default_rng(3).standard_normal((8, 1024)).astype(np.float32) * 0.02
    q = kernels.quantize(x, qtype, importance(imatrix, 1024))
    assert q.dtype == np.uint8 and q.shape == (8, kernels.row_nbytes(qtype, 1024))
    assert kernels.quantization_error(x, q, qtype) < MAX_ERROR[qtype]


@pytest.mark.parametrize("imatrix", ["none", "random"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_byte_is_written(qtype, imatrix):
    """The kernels fill their output completely: what the buffer held before does not show."""
    x = np.concatenate(list(families(512, 1, seed=9).values()))
    qw = importance(imatrix, 512)
    driver = kernels.KERNELS[qtype][1]
    outs = []
    for fill in (0x00, 0xFF):
        out = np.full((x.shape[0], kernels.row_nbytes(qtype, 512)), fill, dtype=np.uint8)
        driver(x, common.NO_WEIGHTS if qw is None else qw, out)
        outs.append(out)
    assert np.array_equal(*outs)


def test_quantize_api():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    qw = rng.uniform(0.5, 2, 512).astype(np.float32)
    assert kernels.QUANTIZABLE >= set(TYPES) | {QType.F32, QType.F16, QType.BF16}
    q = kernels.quantize(x, QType.Q4_K, qw)
    assert q.shape == (2, 3, kernels.row_nbytes(QType.Q4_K, 512))
    assert np.array_equal(q.reshape(6, -1), ggml_quantize(x.reshape(6, 512), QType.Q4_K, qw))
    half = x.astype(np.float16)  # float16 input is read as float32
    assert np.array_equal(kernels.quantize(half, QType.Q5_K), kernels.quantize(half.astype(np.float32), QType.Q5_K))
    assert np.array_equal(kernels.quantize(x, QType.Q8_0, qw), kernels.quantize(x, QType.Q8_0))  # as ggml: ignored
    assert kernels.quantize(x, QType.F32).dtype == np.float32
    assert kernels.dequantize(kernels.quantize(x, QType.F16), QType.F16).shape == x.shape


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_ggml(data, qtype):
    """`dequantize` (gguf's) gives ggml's floats to the bit, on every family's quantized rows."""
    labels, x = data[512]
    q = ggml_quantize(x, qtype, importance("random", 512))
    ours, theirs = kernels.dequantize(q, qtype), ggml_dequantize(q, qtype, 512)
    assert ours.shape == theirs.shape == x.shape
    assert_same_bytes(ours.view(np.uint32), theirs.view(np.uint32), labels, f"{qtype.name} dequantized")


@njit(cache=True)
def _fp16_bits(x):
    out = np.empty(x.shape[0], dtype=np.uint16)
    for i in range(x.shape[0]):
        out[i] = common.fp32_to_fp16(x[i])
    return out


@njit(cache=True)
def _fp16_values(h):
    out = np.empty(h.shape[0], dtype=np.float32)
    for i in range(h.shape[0]):
        out[i] = common.fp16_to_fp32(h[i])
    return out


def test_fp16_conversion():
    """GGML_FP32_TO_FP16 is IEEE's round to nearest even, numpy's astype included; back is exact."""
    rng = np.random.default_rng(5)
    x = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # any bits
        (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-9, 6, 200_000)).astype(np.float32),  # the half range
        np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 2**-24, 2**-25, 3 * 2**-26]),
    ])
    ours = _fp16_bits(x)
    assert np.array_equal(ours, ggml_fp32_to_fp16(x))
    finite = ~np.isnan(x)
    with np.errstate(over="ignore"):
        assert np.array_equal(ours[finite], x[finite].astype(np.float16).view(np.uint16))
    every_half = np.arange(2**16, dtype=np.uint16)
    back = _fp16_values(every_half)
    numpy_back = every_half.view(np.float16).astype(np.float32)
    same = (back.view(np.uint32) == numpy_back.view(np.uint32)) | (np.isnan(back) & np.isnan(numpy_back))
    assert same.all()
    plain = kernels._plain()[common.__name__]["fp32_to_fp16"]  # the plain-Python reading agrees
    with np.errstate(all="ignore"):
        assert [plain(v) for v in x[-3000:]] == ours[-3000:].tolist()


def test_grid_tables_are_kept_as_built(tmp_path, monkeypatch):
    """The IQ grids' tables that runs keep in the cache folder equal the ones built afresh; a
    damaged kept file is built again and replaced."""
    import numba

    from localmix.kernels import iqgrid

    for kept, built in ((iqgrid.iq2s_tables(), iqgrid._build_iq2s()), (iqgrid.iq3_tables(256), iqgrid._build_iq3(256)),
                        (iqgrid.iq3_tables(512), iqgrid._build_iq3(512))):
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(kept, built, strict=True))
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "iq3-256.npz").write_bytes(b"not a zip")
    again = iqgrid._kept("iq3-256", lambda: iqgrid._build_iq3(256))
    assert all(np.array_equal(a, b) for a, b in zip(again, iqgrid.iq3_tables(256), strict=True))
    with np.load(tmp_path / "tables" / "iq3-256.npz") as z:
        assert np.array_equal(z["a2"], again[2])
