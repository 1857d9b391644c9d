"""Choose the next token from the logits, exactly as llama-cpp-python's `Llama.generate` does.

`Llama._init_sampler` builds llama.cpp's sampler chain (src/llama-sampler.cpp); with our
`Sampling` settings it is, in order:
    repeat penalty   over the last 64 *generated* tokens (the chain is new for every call and
                     only sampled tokens are accepted into it; llama-cpp-python's last_n = 64):
                     a seen token's logit is divided by the penalty, or multiplied if <= 0
    temperature 0    greedy: the first largest logit; nothing else runs
    temperature < 0  a draw from the softmax of all logits
    otherwise        top-k, (typical, off), top-p, min-p, temperature, then a draw
The draw is llama.cpp's `dist` sampler: std::mt19937 seeded with the seed, one
std::uniform_real_distribution<double> number (two 32-bit outputs, as libstdc++'s
generate_canonical), and the first candidate whose running sum of probabilities reaches it.
With the same logits and seed this picks the token llama.cpp picks; a test checks it against
llama.cpp's own chain.
"""

from __future__ import annotations

import os
import random
from collections import Counter, deque

import numpy as np

from localmix.runtime.stream import Sampling

PENALTY_LAST_N = 64  # llama-cpp-python's Llama(last_n_tokens_size=64)


def mt19937(seed: int) -> random.Random:
    """A Mersenne Twister in the state std::mt19937(seed) starts in (`getrandbits(32)` is one
    output): Python's own MT19937, seeded with C++'s init_genrand instead of init_by_array."""
    mt = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
    r = random.Random()
    r.setstate((3, (*mt, 624), None))
    return r


def uniform01(rng: random.Random) -> float:
    """libstdc++'s generate_canonical<double, 53> over a 32-bit engine."""
    lo = float(rng.getrandbits(32))
    u = (lo + float(rng.getrandbits(32)) * 2.0**32) / 2.0**64
    return u if u < 1.0 else np.nextafter(1.0, 0.0)


class Sampler:
    """One generation's sampler: `sample(logits)` returns the token and remembers it."""

    def __init__(self, s: Sampling, last_n: int = PENALTY_LAST_N):
        self.s = s
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little")  # llama.cpp: random
        self.rng = mt19937(seed)
        self.recent: deque[int] = deque(maxlen=last_n)

    def sample(self, logits: np.ndarray) -> int:
        token = self.choose(np.array(logits, dtype=np.float32))
        self.recent.append(token)
        return token

    def choose(self, logits: np.ndarray) -> int:
        s = self.s
        ids = np.arange(len(logits))
        logits = penalize(logits, Counter(self.recent), s.repeat_penalty)
        if s.temperature == 0:
            return int(np.argmax(logits))
        if s.temperature < 0:
            return int(ids[dist(logits, self.rng)])
        is_sorted = False
        if s.top_k > 0:   # the k largest, sorted (llama.cpp's partial sort)
            order = np.argsort(-logits, kind="stable")[:min(s.top_k, len(logits))]
            ids, logits, is_sorted = ids[order], logits[order], True
        if s.top_p < 1.0:
            if not is_sorted:
                order = np.argsort(-logits, kind="stable")
                ids, logits, is_sorted = ids[order], logits[order], True
            cum = np.cumsum(softmax32(logits), dtype=np.float32)   # llama.cpp sums in float
            keep = int(np.argmax(cum >= np.float32(s.top_p))) + 1 if (cum >= np.float32(s.top_p)).any() else len(ids)
            ids, logits = ids[:keep], logits[:keep]
        if s.min_p > 0.0:  # keep p_i >= min_p * p_max, i.e. logit_i >= max + log(min_p)
            keep = logits >= logits.max() + np.float32(np.log(np.float32(s.min_p)))
            if is_sorted:
                keep[0] = True
            ids, logits = ids[keep], logits[keep]
        logits = logits / np.float32(s.temperature)
        return int(ids[dist(logits, self.rng)])


def penalize(logits: np.ndarray, counts: Counter, penalty: float) -> np.ndarray:
    if penalty == 1.0 or not counts:
        return logits
    seen = np.fromiter(counts, dtype=np.int64)
    x = logits[seen]
    logits[seen] = np.where(x <= 0, x * np.float32(penalty), x / np.float32(penalty))
    return logits


def softmax32(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(), dtype=np.float32)
    return p / np.cumsum(p, dtype=np.float32)[-1]


def dist(logits: np.ndarray, rng: random.Random) -> int:
    """llama.cpp's `dist` sampler: the index of the candidate a uniform draw lands on."""
    if len(logits) == 1:
        uniform01(rng)  # llama.cpp draws even then
        return 0
    p = np.exp(logits - logits.max(), dtype=np.float32)
    running = np.cumsum(p, dtype=np.float64)                 # llama.cpp accumulates in double
    target = running[-1] * uniform01(rng)
    hit = np.nonzero(running >= target)[0]
    return int(hit[0]) if len(hit) else len(p) - 1
