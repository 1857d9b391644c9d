"""`localmix eval`: llama-perplexity's KL-divergence statistics, checked against a direct numpy
computation over the same logits, and the command end to end on the tiny Mixtral."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_localmix

from localmix.runtime.kld import Scores, compress, expand, score, summarize


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def logits():
    """A reference's and a model's logits over 300 positions of a 1000-token vocabulary (one
    position with an extreme spread, one flat), and the next tokens."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (300, 1000)).astype(np.float32)
    ref[7] *= 20          # most of the vocabulary more than 16 nats below the top
    ref[8] = 1.5          # all equal: a zero scale
    model = (ref + rng.normal(0, 0.5, ref.shape)).astype(np.float32)
    model[8] = 1.5
    return ref, model, rng.integers(0, 1000, 300)


def test_compressed_rows_hold_the_log_probs_to_half_a_step(logits):
    ref = logits[0]
    rows = compress(ref)
    assert rows.shape == (300, 1004) and rows.dtype == np.uint16
    exact, back = _log_softmax(ref), expand(rows, 1000)
    top = exact.max(-1, keepdims=True)
    step = 16 / 65535
    kept = exact > top - 16
    assert np.all(np.abs(back - exact)[kept] <= step / 2 + 2e-5)
    assert np.all(back[~kept] <= top.repeat(1000, 1)[~kept] - 16 + 1e-4)  # what is below the range sits at its floor


def test_statistics_equal_a_direct_numpy_computation(logits):
    ref, model, tokens = logits
    rows = compress(ref)
    stats = summarize(score(rows, model, tokens))

    # directly: the reference's log-probs as the file holds them, the model's in float64
    log_p = expand(rows, 1000).astype(np.float64)
    log_q = _log_softmax(model)
    kld = np.where(log_p > -16, np.exp(log_p) * (log_p - log_q), 0).sum(-1)
    nll, nll_base = -log_q[np.arange(300), tokens], -log_p[np.arange(300), tokens]
    dp = np.exp(-nll) - np.exp(-nll_base)
    n = 300
    sem = lambda x: np.std(x) / np.sqrt(n - 1)  # noqa: E731
    assert stats.n_positions == n
    assert stats.kld_mean == pytest.approx(kld.mean(), rel=1e-5)
    assert stats.kld_err == pytest.approx(sem(kld), rel=1e-4)
    assert stats.ppl == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert stats.ppl_err == pytest.approx(np.exp(nll.mean()) * sem(nll), rel=1e-4)
    assert stats.ppl_base == pytest.approx(np.exp(nll_base.mean()), rel=1e-5)
    assert stats.ln_ppl_ratio == pytest.approx(nll.mean() - nll_base.mean(), rel=1e-4)
    cov = np.cov(nll, nll_base, ddof=0)[0, 1] / (n - 1)
    assert stats.ln_ppl_ratio_err == pytest.approx(np.sqrt(sem(nll) ** 2 + sem(nll_base) ** 2 - 2 * cov), rel=1e-3)
    for key, q in (("median", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p99.9", 99.9), ("max", 100)):
        assert stats.kld[key] == pytest.approx(np.percentile(kld, q), rel=1e-4, abs=1e-7), key
    same = (model.argmax(-1) == log_p.argmax(-1)).mean()
    assert stats.same_top == pytest.approx(same)
    assert stats.same_top_err == pytest.approx(np.sqrt(same * (1 - same) / (n - 1)))
    assert stats.p_diff_mean == pytest.approx(dp.mean(), rel=1e-4, abs=1e-8)
    assert stats.p_diff_rms == pytest.approx(np.sqrt((dp ** 2).mean()), rel=1e-4)
    assert stats.p_diff_max == pytest.approx(np.abs(dp).max(), rel=1e-4)
    assert kld[8] == pytest.approx(0, abs=1e-6) and stats.kld["min"] == pytest.approx(0, abs=1e-5)  # the flat row


def test_compression_barely_moves_the_kl_divergence(logits):
    """Against the reference's exact float64 log-probs, the uint16 rows cost little."""
    ref, model, tokens = logits
    stats = summarize(score(compress(ref), model, tokens))
    log_p, log_q = _log_softmax(ref), _log_softmax(model)
    exact = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert stats.kld_mean == pytest.approx(exact.mean(), rel=2e-3)


def test_identical_logits_score_zero(logits):
    ref, _, tokens = logits
    s = score(compress(ref), ref, tokens)
    stats = summarize(Scores.concat([s, s]))
    assert stats.kld_mean < 1e-5 and stats.same_top == 1.0 and stats.p_diff_rms < 1e-3


# ---- the command ----

TEXT = " ".join(["the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches"] * 16)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval") / "text.txt"
    p.write_text(TEXT)
    return p


def _eval(*args):
    r = run_localmix("eval", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_eval_orders_quantizations_and_reuses_a_saved_reference(converted, text_file, tmp_path):
    ref = converted("mixtral", "F32")
    saved = tmp_path / "ref.kld"
    q8 = _eval(converted("mixtral", "Q8_0"), "--reference", ref, "--text", text_file, "--ctx", "64",
               "--save-reference", saved)
    q2 = _eval(converted("mixtral", "Q2_K"), "--reference", saved)
    same = _eval(ref, "--reference", saved)
    assert q8["n_positions"] == q2["n_positions"] == same["n_positions"] > 2 * 31
    assert same["kld_mean"] < 1e-5 and same["same_top"] == 1.0
    # (PPL(reference) comes from the compressed rows, so it is not compared with PPL here: in a
    # random model the next token often lies more than 16 nats below the top, where the rows stop)
    assert 0 < q8["kld_mean"] < q2["kld_mean"]
    assert q8["ppl_base"] == pytest.approx(q2["ppl_base"], rel=1e-9)  # one reference, read twice
    # the reference file is llama-perplexity's layout: header, tokens, rows of uint16
    n_chunk = q8["n_positions"] // 31
    assert saved.read_bytes()[:8] == b"_logits_"
    assert saved.stat().st_size == 20 + 4 * 64 * n_chunk + 2 * 31 * n_chunk * (32000 + 4)


def test_eval_native_engine_agrees_with_llama_cpp(converted, text_file, tmp_path):
    args = (converted("mixtral", "Q4_K_M"), "--reference", converted("mixtral", "F32"), "--text", text_file,
            "--ctx", "32")
    llama, native = _eval(*args), _eval(*args, "--engine", "native")
    assert native["n_positions"] == llama["n_positions"]
    assert native["kld_mean"] == pytest.approx(llama["kld_mean"], rel=0.02)
    assert native["ppl"] == pytest.approx(llama["ppl"], rel=0.02)


@pytest.mark.parametrize("case", ["short text", "no text", "bad reference", "truncated reference", "no model"])
def test_eval_errors_are_one_line(case, converted, tmp_path, text_file):
    ref = converted("mixtral", "F32")
    model = converted("mixtral", "Q8_0")
    if case == "short text":
        (tmp_path / "t.txt").write_text("too short")
        args = (model, "--reference", ref, "--text", tmp_path / "t.txt")
    elif case == "no text":
        args = (model, "--reference", ref)
    elif case == "bad reference":
        (tmp_path / "r.kld").write_bytes(b"not a reference at all")
        args = (model, "--reference", tmp_path / "r.kld")
    elif case == "truncated reference":
        saved = tmp_path / "r.kld"
        assert run_localmix("eval", "--reference", ref, "--text", text_file, "--ctx", "64",
                            "--save-reference", saved).returncode == 0
        saved.write_bytes(saved.read_bytes()[:-1000])
        args = (model, "--reference", saved)
    else:
        args = ("--reference", ref, "--text", text_file)
    r = run_localmix("eval", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("localmix: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
