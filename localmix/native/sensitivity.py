"""How much each tensor's quantization costs: the measured curves `quantize --fit` solves over.

For one tensor (a group: all experts of a stacked tensor share one type) and a candidate type,
the cost is the KL divergence of the model's next-token distributions on calibration text,
when that tensor alone is quantized to the type and every other weight stays as in the float
source. The native forward measures it without writing a file: the tensor's view is swapped
in memory for its quantized bytes, and the forward restarts at the tensor's layer from the
reference pass's saved residual stream (layers before it are unchanged).

Measuring every (tensor, type) pair costs a forward each; by default (`measure="probe"`) one
type per tensor is run (the candidate with the fewest bits) and the other types' costs
are scaled from it by their activation-weighted squared error (sum over columns of the
input's mean square times the squared rounding error, per expert weighted by its share of
the routed tokens), which the KL divergence follows to second order. `measure="all"` runs
the forward for every pair. The activation statistics come from the reference pass itself.
A swapped tensor that is small enough is held as its rounded weights in float32, so the
forward runs on BLAS; the products' own rounding of activations to Q8 is left out of the
measure (it does not depend on the weight's type).

The pass reads the whole float file more than once; each part's pages are handed back to the
kernel as soon as it is done with (weights.release), so a file larger than memory should hold
(a full-width Mixtral layer is 6.8 GB of F32) is read through the page cache instead of
accumulating in the process's resident set. The reference pass runs layer by layer over all
windows for that reason, and the forwards see each stacked expert tensor through
`_OneExpertAtATime` (a full-width Mixtral layer's experts are 5.6 GB of F32). The weights
may be a float GGUF's (weights.load_weights) or a checkpoint folder's own safetensors
(weights.checkpoint_weights): nothing is converted to disk first.

The calibration windows are llama-imatrix's chunks: n_ctx tokens each, from an empty cache,
the first replaced by BOS. So the reference pass's activation statistics are the importance
matrix `localmix imatrix --ctx n_ctx` computes over those windows (native/stats.py), and
`fit_sensitivity` hands them back: the candidates are quantized with them (unless an
importance matrix is given), as the fitted file is then written with them, so every candidate
type, the i-quants that need an importance matrix included, is measured as it will be written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from localmix import kernels
from localmix.convert.fit import Curve, candidate_types, fit_tensors
from localmix.kernels import QType
from localmix.kernels.matmul import dequantize_rows
from localmix.native.model import KVCache, block, linear, rms_norm
from localmix.native.stats import Collector, importance, statistics
from localmix.native.weights import Tensor, Weights, load_weights, release
from localmix.runtime.vocab import open_vocab

# weights per tensor (all its experts together) whose rounding error is computed for each
# candidate type: the slow i-quant kernels (about 1 M weights/s) on the 14 candidates make this
# most of the pass at full width, where a stack of 8 experts of 14336 x 4096 held 1024 rows each
# (34 M weights a type) before; 1 M is every row of the tiny models' experts and SmolLM2's
SAMPLE_WEIGHTS = 1 << 20
FLOAT_COPY_LIMIT = 256 << 20   # a swapped tensor is held as float32 rounded weights up to this size
# seconds per weight quantized and dequantized again, about, averaged over the candidate types
# (2 cores: 0.8 M weights/s for IQ3_XXS to 30 M/s for Q8_0): for the estimate of the pass's time
QUANTIZE_SECONDS = 3e-7


@dataclass
class Calibration:
    """The reference pass over the calibration windows."""
    windows: list[list[int]]
    residuals: list[list[np.ndarray]]    # per window, the input (T, D) of every layer, then the final one
    log_probs: list[np.ndarray]          # per window (T, V) float32
    probs: list[np.ndarray]              # their exp, (T, V)
    activations: Collector              # sums of squared inputs per product (per expert), token counts


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _run_from(w: Weights, start: int, x: np.ndarray, cache: KVCache) -> np.ndarray:
    """The forward from layer `start` (its input x) to the logits (T, V)."""
    for il in range(start, w.hp.n_layer):
        x = block(x, w.layers[il], il, cache, 0, w.hp)
    return linear(rms_norm(x, w.output_norm, w.hp.norm_eps), w.output)


class _OneExpertAtATime:
    """A stacked expert tensor's mapped data as the forward sees it: it only slices experts out
    (data[e], native/model.py's `linear`), and each new slice gives the previous expert's pages
    back first, so one expert of the stack is resident at a time (235 MB in F32 at Mixtral's widths)."""

    def __init__(self, w: Weights, array: np.ndarray):
        self.w, self.array, self._last = w, array, None

    def __getitem__(self, e):
        if self._last is not None:
            release(self.w, self._last)
        self._last = self.array[e]
        return self._last


EXPERT_STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def _paged(w: Weights) -> Weights:
    """The weights with every stacked expert tensor seen through `_OneExpertAtATime`."""
    layers = [replace(layer, **{k: replace(getattr(layer, k), data=_OneExpertAtATime(w, getattr(layer, k).data))
                                for k in EXPERT_STACKS if getattr(layer, k) is not None}) for layer in w.layers]
    return replace(w, layers=layers)


def _mapped(data) -> np.ndarray:
    return data.array if isinstance(data, _OneExpertAtATime) else data


def _layer_views(w: Weights, start: int = 0) -> list[np.ndarray]:
    """The mapped data of layers start.. and of the output head: what a forward from `start` reads."""
    return [_mapped(t.data) for layer in w.layers[start:] for t in vars(layer).values() if t is not None] + \
        [w.output.data]


def calibrate(w: Weights, windows: list[list[int]]) -> Calibration:
    """The reference pass, layer by layer over all windows (each window's statistics are
    accumulated in window order, as a window-by-window pass would), each layer's pages given
    back once all windows are through it."""
    collector = Collector()
    caches = [KVCache.empty(w.hp, len(tokens)) for tokens in windows]
    xs = [dequantize_rows(w.token_embd.data[np.asarray(tokens)], w.token_embd.qtype) for tokens in windows]
    residuals: list[list[np.ndarray]] = [[] for _ in windows]
    for il, layer in enumerate(w.layers):
        for i in range(len(windows)):
            residuals[i].append(xs[i])
            xs[i] = block(xs[i], layer, il, caches[i], 0, w.hp, collector)
        release(w, *(_mapped(t.data) for t in vars(layer).values() if t is not None))
    log_probs = []
    for i, x in enumerate(xs):
        residuals[i].append(x)
        log_probs.append(_log_softmax(linear(rms_norm(x, w.output_norm, w.hp.norm_eps), w.output, collector)))
    release(w, w.token_embd.data, w.output.data)
    log_probs = [p.astype(np.float32) for p in log_probs]
    return Calibration(windows, residuals, log_probs, [np.exp(p) for p in log_probs], collector)


def _kl(ref: np.ndarray, p: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || model) over positions, in float32 (the reference's rows float32 too)."""
    logits = np.asarray(logits, np.float32)
    top = logits.max(-1, keepdims=True)
    log_q = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return float((p * (ref - log_q)).sum(-1, dtype=np.float64).mean())


def _with(w: Weights, name: str, t: Tensor) -> Weights:
    """The weights with tensor `name` replaced (both ends of tied embeddings)."""
    if name == "token_embd.weight":
        return replace(w, token_embd=t, output=t if w.output.name == name else w.output)
    if name == "output.weight":
        return replace(w, output=t)
    layers = list(w.layers)
    il, kind = int(name.split(".")[1]), name.split(".")[2]
    layers[il] = replace(layers[il], **{kind: t})
    return replace(w, layers=layers)


def _float_rows(t: Tensor, e: int | None) -> np.ndarray:
    data = t.data if e is None else t.data[e]
    return dequantize_rows(data, t.qtype) if t.qtype != QType.F32 else np.asarray(data, np.float32)


def _experts(t: Tensor) -> list[int | None]:
    return list(range(t.shape[0])) if len(t.shape) == 3 else [None]


def quantized(w: Weights, t: Tensor, qtype: QType, importance: np.ndarray | None = None) -> Tensor:
    """The tensor quantized to `qtype` (expert by expert), as a Tensor the forward reads: its
    rounded weights in float32 where that copy is small (BLAS products, fast), else its bytes."""
    small = 4 * np.prod(t.shape) <= FLOAT_COPY_LIMIT
    parts = []
    for e in _experts(t):
        data = kernels.quantize(_float_rows(t, e), qtype, None if importance is None else importance[e or 0])
        parts.append(kernels.dequantize(data, qtype).reshape(t.shape[-2:]) if small else data)
        release(w, t.data if e is None else t.data[e])
    data = np.stack(parts) if len(t.shape) == 3 else parts[0]
    return Tensor(t.name, data, QType.F32 if small else qtype, t.shape)


def weighted_errors(w: Weights, t: Tensor, types: list[QType], cal: Calibration,
                    importance: np.ndarray | None = None) -> list[float]:
    """Each type's activation-weighted squared rounding error of `t`, over a sample of rows
    (evenly spaced, about SAMPLE_WEIGHTS weights in all)."""
    sums, counts = cal.activations.sums.get(t.name), cal.activations.counts.get(t.name)
    errors = np.zeros(len(types))
    for e in _experts(t):
        k = e or 0
        if sums is not None and counts[k] > 0:
            scale, share = sums[k] / counts[k], counts[k] / counts.sum()
        else:  # a lookup (token_embd) or an expert no calibration token reached
            scale, share = np.ones(t.shape[-1]), 1.0 / len(_experts(t))
        full = _float_rows(t, e)
        n_rows = max(1, SAMPLE_WEIGHTS // (len(_experts(t)) * t.shape[-1]))  # this expert's share
        rows = np.ascontiguousarray(full[:: max(1, len(full) // n_rows)])  # a copy: the view's pages go back
        release(w, t.data if e is None else t.data[e])
        for i, qtype in enumerate(types):
            back = kernels.dequantize(kernels.quantize(rows, qtype, None if importance is None else importance[k]),
                                      qtype).reshape(rows.shape)
            errors[i] += share * float((((back - rows) ** 2) * scale).sum())
    return errors.tolist()


def measure(w: Weights, cal: Calibration, name: str, t: Tensor) -> float:
    """Mean KL divergence of the model with tensor `name` replaced by `t`, over the windows."""
    w2 = _with(w, name, t)
    start = _start(w, name)
    total = 0.0
    for tokens, saved, ref, p in zip(cal.windows, cal.residuals, cal.log_probs, cal.probs):
        cache = KVCache.empty(w.hp, len(tokens))
        x = dequantize_rows(w2.token_embd.data[np.asarray(tokens)], w2.token_embd.qtype) if start == 0 else saved[start]
        total += _kl(ref, p, _run_from(w2, start, x, cache))
    release(w, *_layer_views(w, min(start, w.hp.n_layer)), w.token_embd.data)
    return total / len(cal.windows)


@dataclass
class Sensitivity:
    """What the pass measured: the curves, and the reference pass's activation statistics in
    stats.compute_imatrix's form (an importance matrix over the calibration windows)."""
    curves: list[Curve]
    imatrix: dict


def calibration_windows(tokens: list[int], n_ctx: int, n_windows: int, bos: int | None) -> list[list[int]]:
    """Up to `n_windows` windows of `n_ctx` tokens, each with its first token replaced by `bos`
    (None: kept), as llama-imatrix's chunks."""
    from localmix.errors import InputError

    if len(tokens) < n_ctx:
        raise InputError(f"the calibration text has {len(tokens)} tokens, fewer than one window of {n_ctx}")
    windows = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(min(n_windows, len(tokens) // n_ctx))]
    if bos is not None:
        for window in windows:
            window[0] = bos
    return windows


def _start(w: Weights, name: str) -> int:
    """The layer a forward restarts at when `name` is swapped."""
    return 0 if name == "token_embd.weight" else (w.hp.n_layer if name == "output.weight" else int(name.split(".")[1]))


def estimate_seconds(w: Weights, names: list[str], shapes: dict, reference_s: float, measure_all: bool,
                     allowed: tuple[str, ...] | None = None) -> float:
    """The rest of the pass's time, from the reference pass's: each forward from a tensor's layer
    costs its share of the layers (the head counted as one), each quantization QUANTIZE_SECONDS a weight."""
    total = 0.0
    for name in names:
        shape = shapes[name]
        n_types = len(candidate_types(shape[-1], allowed))
        share = (w.hp.n_layer - min(_start(w, name), w.hp.n_layer) + 1) / (w.hp.n_layer + 1)
        n_weights = int(np.prod(shape))
        if measure_all:
            total += n_types * (share * reference_s + n_weights * QUANTIZE_SECONDS)
        else:
            total += share * reference_s + (n_weights + n_types * min(n_weights, SAMPLE_WEIGHTS)) * QUANTIZE_SECONDS
    return total


def fit_sensitivity(w: Weights, tokens: list[int], bos: int | None, n_ctx: int = 128, n_windows: int = 2,
                    measure_all: bool = False, imatrix: dict[str, np.ndarray] | None = None, collect: bool = True,
                    allowed: tuple[str, ...] | None = None, progress: Callable[[int, int, str], None] | None = None,
                    ready: Callable[[float], None] | None = None) -> Sensitivity:
    """The measured curve of every tensor the fitter chooses a type for, on up to `n_windows`
    windows of `n_ctx` of `tokens` (the text's, BOS first). The candidates are quantized with
    `imatrix` ({name: importance}) if given, else with the reference pass's statistics when
    `collect`, else without one. `ready(seconds)` is called once the reference pass is done,
    with an estimate of the rest; `progress(i, n, name)` after each tensor."""
    from localmix.convert.imatrix import tensor_importance
    from localmix.errors import InputError

    windows = calibration_windows(tokens, n_ctx, n_windows, bos)
    by_name = {t.name: t for t in w.tensors()}  # the mapped tensors themselves, for quantizing
    paged = _paged(w)  # what the forwards run on
    started = time.perf_counter()
    cal = calibrate(paged, windows)
    reference_s = time.perf_counter() - started
    stats = statistics(cal.activations, len(windows), n_ctx)
    if imatrix is None and collect:
        imatrix = importance(stats)
    names = [n for n, _ in fit_tensors([(t.name, t.shape) for t in by_name.values()])]
    if ready:
        ready(estimate_seconds(w, names, {n: by_name[n].shape for n in names}, reference_s, measure_all, allowed))
    curves = []
    for i, name in enumerate(names):
        t = by_name[name]
        types = candidate_types(t.shape[-1], allowed)
        if not types:
            raise InputError(f"no candidate type fits {name}'s rows of {t.shape[-1]}")
        weights = tensor_importance(imatrix, name, t.shape)
        nbytes = [kernels.tensor_nbytes(q, t.shape) for q in types]
        if measure_all:
            loss = [measure(paged, cal, name, quantized(paged, t, q, weights)) for q in types]
        else:
            errors = weighted_errors(paged, t, types, cal, weights)
            probe = measure(paged, cal, name, quantized(paged, t, types[0], weights))
            alpha = probe / errors[0] if errors[0] > 0 else 0.0
            loss = [alpha * e for e in errors]
        curves.append(Curve(name, types, nbytes, loss))
        if progress:
            progress(i + 1, len(names), name)
    return Sensitivity(curves, stats)


def sensitivity_curves(path: str | Path, text: str, n_ctx: int = 128, n_windows: int = 2, measure_all: bool = False,
                       imatrix: dict[str, np.ndarray] | None = None, allowed: tuple[str, ...] | None = None,
                       progress: Callable[[int, int, str], None] | None = None) -> list[Curve]:
    """`fit_sensitivity`'s curves of the float GGUF at `path` on `text`, its candidates quantized
    with `imatrix` if given, else without one."""
    vocab = open_vocab(path)
    tokens = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = vocab.token_bos() if tokens and tokens[0] == vocab.token_bos() else None
    return fit_sensitivity(load_weights(path), tokens, bos, n_ctx, n_windows, measure_all, imatrix, collect=False,
                           allowed=allowed, progress=progress).curves
