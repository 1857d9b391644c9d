"""How far a model's next-token distributions are from a reference's: llama-perplexity's
`--kl-divergence` statistics, in plain numpy.

The reference is kept as llama.cpp keeps it (tools/perplexity/perplexity.cpp): per scored
position, its log-probabilities compressed to uint16 over the 16 nats below the top one,
`nv = 2*ceil(V/2) + 4` uint16 per row, the first four holding two float32s (scale, min log
prob). `compress` writes such rows from logits, `expand` reads them back.

`score` compares a model's logits with those rows position by position (KL divergence of
the model from the reference, each one's negative log-likelihood of the actual next token,
whether both rank the same token first, and the change in that token's probability);
`summarize` turns the per-position values into llama-perplexity's report: means with their
standard errors, KLD percentiles, same-top-p, mean and RMS Δp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LOG_PROB_RANGE = 16.0   # nats below the top log-prob that the compressed rows resolve


def row_width(n_vocab: int) -> int:
    """uint16 per compressed row: two float32s, then the vocabulary padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _log_sum_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, log of the sum of exp(logit - max)) per row, summed in float64 as llama.cpp does."""
    top = logits.max(-1)
    sums = np.exp(logits - top[:, None], dtype=np.float32).sum(-1, dtype=np.float64)
    return top, np.log(sums).astype(np.float32)


def compress(logits: np.ndarray) -> np.ndarray:
    """Rows of logits (T, V) as llama.cpp's compressed log-probabilities (T, row_width(V)) uint16."""
    logits = np.asarray(logits, np.float32)
    t, v = logits.shape
    top, lse = _log_sum_exp(logits)
    low = np.maximum(logits.min(-1), top - np.float32(LOG_PROB_RANGE))
    min_log_prob = low - top - lse
    scale = (top - low) / np.float32(65535)
    rows = np.zeros((t, row_width(v)), np.uint16)
    head = rows[:, :4].view(np.float32)                                  # (T, 2): scale, min log prob
    head[:, 0], head[:, 1] = scale, min_log_prob
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    q = np.rint(inv[:, None] * (logits - low[:, None]))                 # round half to even, as the C trick
    rows[:, 4:4 + v] = np.where(logits > low[:, None], q, 0).astype(np.uint16)
    return rows


def expand(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Compressed rows back to log-probabilities (T, V) float32, as llama.cpp reads them."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    return head[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]


@dataclass
class Scores:
    """Per scored position: KL(reference || model), the model's and the reference's negative
    log-likelihood of the next token, whether both put the same token first, and the change
    in that token's probability (model minus reference)."""
    kld: np.ndarray
    nll: np.ndarray
    nll_base: np.ndarray
    same_top: np.ndarray
    p_diff: np.ndarray

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


def score(base_rows: np.ndarray, logits: np.ndarray, next_tokens: np.ndarray) -> Scores:
    """Compare a model's logits (T, V) with the reference's compressed rows (T, nv) at the same
    positions; `next_tokens` (T,) are the tokens that actually follow each position."""
    logits = np.asarray(logits, np.float32)
    t, v = logits.shape
    idx = np.arange(t)
    top, lse = _log_sum_exp(logits)
    log_q = logits - (top + lse)[:, None]                                  # (T, V) the model's log-probs
    log_p = expand(base_rows, v)                                          # (T, V) the reference's
    nll = -log_q[idx, next_tokens]
    nll_base = -log_p[idx, next_tokens]
    kept = log_p > -LOG_PROB_RANGE                                        # llama.cpp skips the rest
    terms = np.where(kept, np.exp(log_p) * (log_p - log_q), np.float32(0))
    kld = terms.sum(-1, dtype=np.float64)
    same_top = logits.argmax(-1) == log_p.argmax(-1)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    return Scores(kld, nll.astype(np.float64), nll_base.astype(np.float64), same_top, p_diff.astype(np.float64))


def mean_and_error(x: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error, as llama-perplexity's `mean_and_uncertainty` (0 for
    ten values or fewer)."""
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    mean = float(x.sum() / n)
    var = float((x * x).sum() / n - mean * mean)
    return mean, (float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation between the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


KLD_PERCENTILES = {"max": 1.0, "p99.9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "median": 0.5,
                   "p10": 0.10, "p5": 0.05, "p1": 0.01, "p0.1": 0.001, "min": 0.0}


@dataclass
class KLDStats:
    """llama-perplexity's final report (perplexities, KL divergence, token probabilities)."""
    n_positions: int
    ppl: float
    ppl_err: float
    ppl_base: float
    ppl_base_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_correlation: float
    kld_mean: float
    kld_err: float
    kld: dict[str, float]          # the KLD_PERCENTILES
    same_top: float                # fraction of positions where both put the same token first
    same_top_err: float
    p_diff_mean: float
    p_diff_err: float
    p_diff_rms: float
    p_diff_rms_err: float
    p_diff_max: float              # the largest |Δp|

    def to_json(self) -> dict:
        return asdict(self)


def summarize(s: Scores) -> KLDStats:
    """The report over all scored positions."""
    n = len(s.kld)
    if n < 2:
        raise ValueError("at least two scored positions are needed")
    ln_ppl, ln_ppl_err = mean_and_error(s.nll)
    ln_base, ln_base_err = mean_and_error(s.nll_base)
    cov = (float((s.nll * s.nll_base).sum() / n - (s.nll.sum() / n) * (s.nll_base.sum() / n)) / (n - 1)
           if n >= 10 else 0.0)
    ratio_err = float(np.sqrt(max(ln_ppl_err ** 2 + ln_base_err ** 2 - 2 * cov, 0.0)))
    corr = cov / (ln_ppl_err * ln_base_err) if ln_ppl_err and ln_base_err else 0.0
    kld_mean, kld_err = mean_and_error(s.kld)
    ordered = np.sort(s.kld.astype(np.float32))  # llama.cpp sorts float values
    mid = n // 2
    median = float(0.5 * (ordered[mid] + ordered[mid - 1]) if n % 2 == 0 else ordered[mid])
    kld = {k: (median if k == "median" else percentile(ordered, f)) for k, f in KLD_PERCENTILES.items()}
    same = float(s.same_top.sum() / n)
    dp, dp_err = mean_and_error(s.p_diff)
    mse, mse_err = mean_and_error(s.p_diff ** 2)
    rms = float(np.sqrt(mse))
    return KLDStats(
        n_positions=n, ppl=float(np.exp(ln_ppl)), ppl_err=float(np.exp(ln_ppl) * ln_ppl_err),
        ppl_base=float(np.exp(ln_base)), ppl_base_err=float(np.exp(ln_base) * ln_base_err),
        ln_ppl_ratio=ln_ppl - ln_base, ln_ppl_ratio_err=ratio_err, ppl_correlation=corr,
        kld_mean=kld_mean, kld_err=kld_err, kld=kld,
        same_top=same, same_top_err=float(np.sqrt(same * (1 - same) / (n - 1))),
        p_diff_mean=dp, p_diff_err=dp_err, p_diff_rms=rms, p_diff_rms_err=(0.5 / rms * mse_err if rms else 0.0),
        p_diff_max=float(np.abs(s.p_diff).max()))
