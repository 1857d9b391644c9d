"""The batched scheduler: N sequences decode together through llama.cpp's low-level API.

One thread owns a llama.cpp context with `n_seq_max = parallel` (KV cache split per sequence,
llama.cpp's `kv_unified = false`). Each step builds ONE `llama_batch` from every active slot:
a chunk of a new prompt (at most `chunk` tokens per slot, so a long prompt never holds the
others back and a cancelled one stops within a step) and each generating slot's last token,
calls `llama_decode` once, and samples every slot whose logits came out with its own
`llama_sampler` chain (the chain llama-cpp-python's `Llama.generate` builds, so greedy picks
equal `localmix run`'s; its logit bias and repeat penalty are applied by `_Edits`, which gives
the same bits touching only the logits that change). Sampled tokens become `Piece`/`Done`
events through the same `reply_events` as every engine, and are handed to the request's
callback.

A slot keeps the tokens of its last request in its part of the KV cache; a new request goes to
the free slot sharing the longest prefix with it (chat clients resend the conversation), and
only the rest is evaluated. When another slot, busy or free, holds a longer prefix (a system
prompt every conversation starts with), that slot's cells are copied into the new one
(`_borrow`) rather than evaluated again. A slot's cells that a new request is about to drop
are kept in RAM first (`_save`, up to `cache_bytes`, least recently used out first), and a
later prompt that starts with them gets them back the same way: a conversation whose slot was
taken by others, a regenerated reply. That is llama-server's prompt cache (`--cache-ram`).
Requests beyond the slots wait in a bounded queue; `submit` on a full queue raises `Busy`.
Nothing here knows of HTTP.

Several choices of one prompt (OpenAI's `n`) are one group, `submit(job, *forks)`, admitted
when it has a slot each: the first job's slot evaluates the prompt; the forks' slots wait, and
when the prompt's logits come out its KV cache is copied to them (`llama_memory_seq_cp`, a copy
of the sequence's own buffer) and each fork samples that same row with its own sampler.
With `Job.logprobs` set, each generated token is announced by a `Scored` event before its
`Piece`: its log-probability and the `logprobs` most likely tokens', a log-softmax of the raw
logits over the whole vocabulary (before bias, penalties, grammar and truncation, as OpenAI
reports them).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import llama_cpp as L
import numpy as np

from localmix.runtime.llama import Handles
from localmix.runtime.stream import Done, Piece, Sampling, common_prefix, reply_events

log = logging.getLogger("localmix.server")
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class _Edits:
    """A job's logit bias and repeat penalty, written into its row of llama.cpp's logits before
    the sampler chain reads them and undone after, with the arithmetic of llama.cpp's samplers:
    the logit-bias sampler's `logit += bias`, then the penalties sampler's (repeat penalty only:
    a logit of a token among the last `last_n` sampled divided by the penalty when positive,
    multiplied when not). float32 both ways, so the same bits as those samplers give; the
    chain keeps its order (bias, penalties, the rest). llama.cpp's penalties sampler looks each
    of the vocabulary's tokens up in a hash map, about 0.1 ms a token at 32000 (most of the
    sampling time); this touches the at most `last_n` + len(bias) logits that change.
    `_sampler_chain(job, in_chain=True)` is the plain reference: both as llama.cpp samplers."""

    def __init__(self, bias: dict[int, float], repeat: float, last_n: int = 64):
        self.bias_ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
        self.bias = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        self.repeat = np.float32(repeat)
        self.recent = np.zeros(last_n if repeat != 1.0 else 0, dtype=np.int64)  # a ring of the last tokens
        self.accepted = 0

    def accept(self, token: int) -> None:
        """The penalties sampler's window: the last `last_n` accepted tokens."""
        if len(self.recent):
            self.recent[self.accepted % len(self.recent)] = token
            self.accepted += 1

    def apply(self, logits: np.ndarray):
        """Edit `logits` in place; returns what `undo` needs."""
        saved_bias = None
        if len(self.bias_ids):
            saved_bias = logits[self.bias_ids]
            logits[self.bias_ids] += self.bias
        # a token twice in the window is read twice and written twice with the same value
        recent = self.recent[: self.accepted]
        x = logits[recent]
        logits[recent] = np.where(x <= 0, x * self.repeat, x / self.repeat)
        return recent, x, saved_bias

    def undo(self, logits: np.ndarray, edit) -> None:
        recent, x, saved_bias = edit
        logits[recent] = x
        if saved_bias is not None:  # after: a token both biased and penalised gets its first value back
            logits[self.bias_ids] = saved_bias


def _prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens two arrays share from the start."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class Busy(Exception):
    """Every slot is busy and the queue is full."""


@dataclass
class Scored:
    """A generated token's log-probability and the `top` most likely tokens' (id, log-probability),
    most likely first; emitted just before the token's `Piece`."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Job:
    """One generation: prompt tokens, sampling, and where its events go.

    `emit(event)` is called from the scheduler thread with each `Piece`, then one `Done` (or an
    Exception); the scheduler's `handover` hook says when to pass them on.
    `cancel()` may be called from any thread; the sequence stops at the next step."""
    tokens: list[int]
    sampling: Sampling
    emit: Callable[[object], None]
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    grammar: str | None = None                     # GBNF, root rule "root"
    logit_bias: dict[int, float] = field(default_factory=dict)
    strip_space: bool = True                       # drop the reply's SentencePiece word-start (chat)
    logprobs: int | None = None                    # emit Scored events with this many alternatives
    shown: frozenset[int] = frozenset()            # control tokens whose text the reply shows ([TOOL_CALLS])
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_step: int | None = None                 # the scheduler's step when cancel() was called
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self, step: int | None = None) -> None:
        if not self.cancelled.is_set():
            self.cancel_step = step
            self.cancelled.set()


@dataclass
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)   # its tokens: the first n_kv are in the KV cache
    n_kv: int = 0
    job: Job | None = None
    todo: list[int] = field(default_factory=list)     # prompt tokens not yet evaluated
    sampler: object = None
    edits: _Edits | None = None                        # its logit bias and repeat penalty, when not in the chain
    grammar: object = None                             # its own sampler, applied as _sample says
    events: object = None                              # the job's reply_events generator
    token: int | None = None                           # the sampled token reply_events takes next
    generated: int = 0
    t_first: float | None = None
    leader: _Slot | None = None                        # a fork: the slot whose prompt it waits for
    forks: list[_Slot] = field(default_factory=list)   # a leader: the forks waiting for its prompt


@dataclass
class Metrics:
    requests: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0        # evaluated (not from the cache)
    cached_tokens: int = 0        # prompt tokens reused from a slot's cache (its own or copied in)
    borrowed_tokens: int = 0      # of which copied from another slot's or from RAM (`_borrow`)
    saved_bytes: int = 0          # cells of earlier requests kept in RAM (`_save`)
    generated_tokens: int = 0
    steps: int = 0
    max_batch_sequences: int = 0  # the most sequences one llama_decode has served
    max_cancel_lag: int = 0       # steps between cancel() and the slot being freed
    busy_rejections: int = 0
    decode_seconds: float = 0.0


class Scheduler:
    """Its loop (`run`) runs on a thread of its own, or with `thread=False` on the caller's.

    llama.cpp's CPU backend computes with OpenMP, which keeps a team of threads for each thread
    that computes, and spins only briefly at its barriers once the process has more OpenMP threads
    than CPUs: two threads that have computed (one loaded the model, another decodes) make every
    decode wait on sleeping threads. Measured on 2 cores, one token of the tiny Mixtral: 0.5 ms on
    the thread that loaded the model, 2 ms on another. So a server loads the model, makes the
    Scheduler and calls `run` on one thread (frontends/server/run.py)."""

    def __init__(self, llm, parallel: int = 1, n_ctx: int = 2048, queue_size: int = 16, chunk: int = 128,
                 n_threads: int | None = None, release_engine_context: bool = False, thread: bool = True,
                 cache_bytes: int = 0):
        """`llm` is a loaded llama_cpp.Llama; its model (weights) is shared, a context of our own
        holds `parallel` sequences of `n_ctx` tokens each. `release_engine_context` frees the
        Llama's own context (its KV cache) once ours exists, so the memory holds one, not two:
        for a server, whose engine then only tokenizes; `llm` can no longer generate.
        `thread=False`: no thread is started; the caller runs the loop with `run()`.
        `cache_bytes`: RAM for the cells of earlier requests no slot holds any more (0: none)."""
        self.llm, self.parallel, self.n_ctx, self.chunk, self.queue_size = llm, parallel, n_ctx, chunk, queue_size
        # The Llama's own context is not used here, but until it has decoded once its CPU
        # thread pool keeps polling for work and starves ours (measured: 40 s instead of 0.06 s
        # for 32 tokens on 2 cores). One decode of one token lets those threads go to sleep.
        llm.eval([llm.token_bos()])
        llm.reset()
        handles = Handles(llm)
        self.vocab = handles.vocab_pointer
        self.n_vocab = llm.n_vocab()
        self.words = handles.vocab()  # end-of-generation tokens; pieces, control tokens shown as nothing
        own = llm.context_params  # the engine's own settings (threads, KV types, flash attention, ...)
        params = type(own).from_buffer_copy(own)
        params.n_ctx = n_ctx * parallel
        params.n_seq_max = parallel
        params.kv_unified = False
        params.n_batch = params.n_ubatch = max(chunk * parallel, 64)
        params.n_threads = params.n_threads_batch = n_threads or own.n_threads
        self.ctx = L.llama_init_from_model(handles.model, params)
        if not self.ctx:
            raise MemoryError("llama.cpp could not make a context for the server's sequences")
        self.mem = L.llama_get_memory(self.ctx)
        if release_engine_context:
            handles.free_context()
        self.n_batch = params.n_batch
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._cur = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        self.slots = [_Slot(i) for i in range(parallel)]
        self.waiting: collections.deque[tuple[Job, ...]] = collections.deque()  # groups: a job and its forks
        self.metrics = Metrics()
        self.step = 0
        self._wake = threading.Condition()
        self._stop = False
        self.abandoned = False  # `abandon` was called: the thread is stuck in llama.cpp
        # called when the events emitted so far should be passed on: just before each decode
        # (which leaves the GIL to other threads for its duration) and before the loop sleeps. A
        # caller that hands events to another thread does it then, once a step, not once a token
        # (server/common.py's Inbox)
        self.handover: Callable[[], None] | None = None
        self._running = False
        self._done = threading.Event()  # the loop has returned
        # a fork's copy of its leader's cache (llama_memory_seq_cp across streams) is made at the
        # next llama_decode; until then the fork's cells hold other data, which _borrow must not
        # read, nor write into a slot that copy would then overwrite
        self._copies_pending = False
        self.cache_bytes = cache_bytes
        # cells kept in RAM (`_save`): their tokens' bytes -> (the tokens, llama.cpp's sequence
        # state), least recently used first; at most SAVED entries, each looked at per admission
        self.saved: collections.OrderedDict[bytes, tuple[np.ndarray, ctypes.Array]] = collections.OrderedDict()
        if thread:
            self._running = True
            threading.Thread(target=self.run, name="localmix-scheduler", daemon=True).start()

    def run(self) -> None:
        """The loop (admit waiting jobs, decode a step) until `close`, on the calling thread."""
        self._running = True
        try:
            self._loop()
        finally:
            self._done.set()

    # ---- called from other threads ----

    def submit(self, job: Job, *forks: Job) -> None:
        """Queue `job`; `forks` are more choices of the same prompt, which share its evaluation."""
        if len(forks) >= self.parallel:
            raise ValueError(f"{1 + len(forks)} choices need as many slots, and the server has {self.parallel}")
        if any(f.tokens != job.tokens for f in forks):
            raise ValueError("the forks of a job must have its prompt")
        with self._wake:
            if len(self.waiting) >= self.queue_size:
                self.metrics.busy_rejections += 1
                raise Busy()
            self.waiting.append((job, *forks))
            self.metrics.requests += 1 + len(forks)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        job.cancel(self.step)
        with self._wake:
            self._wake.notify()

    def abandon(self, error: Exception) -> None:
        """End every running and waiting job with `error`, from another thread, when the
        scheduler thread cannot go on (an RPC worker lost in the middle of a decode): the slots
        stay taken, and no job is admitted again."""
        with self._wake:
            self._stop = self.abandoned = True
            jobs = [j for group in self.waiting for j in group] + [s.job for s in self.slots if s.job]
            self.waiting.clear()
        for job in jobs:
            job.emit(error)
        self._handover()

    @property
    def active(self) -> int:
        return sum(s.job is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what runs and waits, stop the thread, free llama.cpp's context."""
        if self.abandoned:  # its thread will not come back (`abandon`)
            return
        with self._wake:
            self._stop = True
            for job in [j for group in self.waiting for j in group] + [s.job for s in self.slots if s.job]:
                job.cancel(self.step)
            self._wake.notify()
        if self._running and not self._done.wait(timeout):
            return  # still in a step: the context stays
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            self.ctx = None

    # ---- the scheduler thread ----

    def _idle(self) -> bool:
        return not self._stop and not self.waiting and all(s.job is None for s in self.slots)

    def _loop(self) -> None:
        while True:
            with self._wake:
                idle = self._idle()
            if idle:
                self._handover()  # the last step's events, before sleeping
            with self._wake:
                while self._idle():
                    self._wake.wait()
                if self._stop and all(s.job is None for s in self.slots):
                    for job in (j for group in self.waiting for j in group):
                        job.emit(Done("cancelled", len(job.tokens), 0, 0, 0.0, 0.0))
                    self.waiting.clear()
                    self._handover()
                    return
                self._admit()
            try:
                self._step()
            except Exception as e:  # a bug or llama.cpp failure: fail the running jobs, keep serving
                log.exception("scheduler step failed")
                for s in self.slots:
                    if s.job is not None:
                        s.job.emit(e)
                        self._free(s, forget=True)

    def _handover(self) -> None:
        if self.handover is not None:
            try:
                self.handover()
            except Exception:  # the receiver's failure must not stop the scheduler
                log.exception("handing the events over failed")

    def _admit(self) -> None:
        """Move waiting groups into free slots, first come first served: a group's first job to
        the slot whose cache shares most of its prompt, its forks to other free slots."""
        while self.waiting:
            free = [s for s in self.slots if s.job is None]
            group = self.waiting[0]
            live = [j for j in group if not j.cancelled.is_set()]
            if len(free) < len(live):
                return
            self.waiting.popleft()
            for job in group:
                if job.cancelled.is_set():
                    job.emit(Done("cancelled", len(job.tokens), 0, 0, 0.0, 0.0))
                    self.metrics.cancelled += 1
            if not live:
                continue
            samplers = []
            try:
                for job in live:
                    samplers.append((*self._sampler(job), None))
                    samplers[-1] = (*samplers[-1][:2], self._grammar(job))
            except ValueError as e:
                for smpl in samplers:
                    L.llama_sampler_free(smpl[0])
                for job in live:
                    job.emit(e)
                continue
            lead = max(free, key=lambda s: common_prefix(s.cached, live[0].tokens))
            self._start(lead, live[0], samplers[0], None)
            for slot, job, smpl in zip([s for s in free if s is not lead], live[1:], samplers[1:]):
                self._start(slot, job, smpl, lead)

    def _start(self, slot: _Slot, job: Job, samplers: tuple, leader: _Slot | None) -> None:
        if leader is None:
            keep = min(common_prefix(slot.cached, job.tokens), len(job.tokens) - 1)  # evaluate >= 1 token for logits
            if keep < slot.n_kv:
                self._save(slot)  # the cells past `keep` are about to go
            keep = self._borrow(slot, job.tokens, keep)
            slot.cached, slot.n_kv, slot.todo = job.tokens[:keep], keep, job.tokens[keep:]
        else:  # its cache is dropped now and becomes a copy of the leader's when its prompt is done
            self._save(slot)
            keep = len(job.tokens)
            slot.cached, slot.n_kv, slot.todo, slot.leader = [], 0, [], leader
            leader.forks.append(slot)
        L.llama_memory_seq_rm(self.mem, slot.seq, slot.n_kv, -1)
        slot.job, slot.generated, slot.token, slot.t_first = job, 0, None, None
        slot.sampler, slot.edits, slot.grammar = samplers
        piece = self.words.piece if not job.shown else lambda t: self.words.piece(t, t in job.shown)
        slot.events = reply_events(self._tokens(slot), piece, self.words.eog, len(job.tokens),
                                   len(job.tokens) - keep, self.n_ctx, job.sampling, job.cancelled, job.strip_space)
        self.metrics.prompt_tokens += len(job.tokens) - keep
        self.metrics.cached_tokens += keep

    def _borrow(self, slot: _Slot, tokens: list[int], keep: int) -> int:
        """How much of `tokens` `slot` holds once a longer prefix held by another slot, or kept
        in RAM by `_save`, is copied in (`keep`, what it holds of its own, when none is). The
        copy goes through llama.cpp's sequence state (`llama_state_seq_get_data`/`set_data`:
        every cell of the other sequence, trimmed after): bit for bit the keys and values that evaluating the prefix here would
        give, since a token's row does not depend on what else its batch held (the scheduler's
        greedy replies equal `run`'s on that ground already). Only when it saves at least a
        quarter of the cells it copies: on a GPU, evaluating a few tokens is cheaper than moving
        a long sequence through host memory. Not while a fork's copy waits for the next decode
        (`_copies_pending`)."""
        if self._copies_pending:
            return keep
        donor, shared, length = None, keep, 0
        for s in self.slots:
            if s is not slot and s.n_kv > shared:
                n = min(common_prefix(s.cached, tokens), s.n_kv, len(tokens) - 1)  # its cells: the first n_kv
                if n > shared:
                    donor, shared, length = s, n, s.n_kv
        if self.saved:
            wanted = np.asarray(tokens, dtype=np.int32)
            for key, (held, _) in self.saved.items():
                if len(held) > shared:
                    n = min(_prefix(held, wanted), len(tokens) - 1)
                    if n > shared:
                        donor, shared, length = key, n, len(held)
        if donor is None or (shared - keep) * 4 < length:
            return keep
        if isinstance(donor, bytes):  # kept in RAM
            self.saved.move_to_end(donor)
            state = self.saved[donor][1]
            size = len(state)
        else:
            size = L.llama_state_seq_get_size(self.ctx, donor.seq)
            state = (ctypes.c_uint8 * size)()
            if L.llama_state_seq_get_data(self.ctx, state, size, donor.seq) != size:
                return keep
        if L.llama_state_seq_set_data(self.ctx, state, size, slot.seq) != size:  # its own cells are gone too
            L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            return 0
        L.llama_memory_seq_rm(self.mem, slot.seq, shared, -1)
        self.metrics.borrowed_tokens += shared - keep
        return shared

    def _save(self, slot: _Slot) -> None:
        """Keep the slot's cells in RAM (`saved`, by their tokens) before they are dropped, unless
        a kept entry already starts with them; the least recently used go first past
        `cache_bytes` or `SAVED` entries. Not while a fork's copy is pending (the slot's cells
        may not hold its tokens yet), nor for fewer than 16 cells (evaluating them again is
        cheap)."""
        if self.cache_bytes <= 0 or self._copies_pending or slot.n_kv < 16:
            return
        tokens = np.asarray(slot.cached[: slot.n_kv], dtype=np.int32)
        for key, (held, _) in list(self.saved.items()):
            n = _prefix(held, tokens)
            if n == len(tokens):    # held already, or a longer one is
                self.saved.move_to_end(key)
                return
            if n == len(held):      # this one holds all of that one
                del self.saved[key]
        size = L.llama_state_seq_get_size(self.ctx, slot.seq)
        if size > self.cache_bytes:
            return
        state = (ctypes.c_uint8 * size)()
        if L.llama_state_seq_get_data(self.ctx, state, size, slot.seq) != size:
            return
        self.saved[tokens.tobytes()] = (tokens, state)
        while len(self.saved) > self.SAVED or sum(len(s) for _, s in self.saved.values()) > self.cache_bytes:
            self.saved.popitem(last=False)
        self.metrics.saved_bytes = sum(len(s) for _, s in self.saved.values())

    SAVED = 64  # entries in RAM at most: each admission compares its prompt with every one

    def _tokens(self, slot: _Slot):
        """The token stream reply_events reads: the slot's freshly sampled token."""
        while True:
            if slot.token is None:
                raise RuntimeError("reply_events asked for a token the scheduler had not sampled")
            token, slot.token = slot.token, None
            yield token

    def _sampler(self, job: Job):
        """(chain, edits): the job's sampler chain, and its logit bias and repeat penalty as
        `_Edits` when they can leave the chain (no frequency or presence penalty, whose
        arithmetic stays llama.cpp's), else None."""
        if job.frequency_penalty or job.presence_penalty or not self.EDIT_LOGITS:
            return self._sampler_chain(job, in_chain=True), None
        edits = _Edits(job.logit_bias, job.sampling.repeat_penalty) if job.logit_bias or job.sampling.repeat_penalty != 1.0 else None
        return self._sampler_chain(job, in_chain=False), edits

    EDIT_LOGITS = True  # False: bias and penalties always in the chain (the reference `_Edits` is checked against)

    def _sampler_chain(self, job: Job, in_chain: bool):
        """The chain llama-cpp-python's Llama._init_sampler builds (penalties over the last 64
        generated tokens, then greedy or top-k/typical/top-p/min-p/temperature/dist), with
        logit bias first and a grammar after the penalties when asked for. Without `in_chain`,
        the bias and penalties are left out (`_Edits` applies them)."""
        s = job.sampling
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if in_chain and job.logit_bias:
            arr = (L.llama_logit_bias * len(job.logit_bias))(*[L.llama_logit_bias(t, b) for t, b in job.logit_bias.items()])
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self.n_vocab, len(arr), arr))
        if in_chain:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                self.n_vocab, 64, s.repeat_penalty, job.frequency_penalty, job.presence_penalty))
        if s.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            for smpl in (L.llama_sampler_init_top_k(s.top_k), L.llama_sampler_init_typical(1.0, 1),
                         L.llama_sampler_init_top_p(s.top_p, 1), L.llama_sampler_init_min_p(s.min_p, 1),
                         L.llama_sampler_init_temp(s.temperature),
                         L.llama_sampler_init_dist(s.seed if s.seed is not None else 0xFFFFFFFF)):
                L.llama_sampler_chain_add(chain, smpl)
        return chain

    def _grammar(self, job: Job):
        if not job.grammar:
            return None
        g = L.llama_sampler_init_grammar(self.vocab, job.grammar.encode(), b"root")
        if not g:
            raise ValueError("llama.cpp could not parse the grammar made for this request")
        return g

    def _sample(self, s: _Slot, row: int) -> int:
        """The slot's next token: its `_Edits` written into the row, the chain run, the row restored."""
        if s.edits is None:
            return self._sample_chain(s, row, None)
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        edit = s.edits.apply(logits)
        try:
            token = self._sample_chain(s, row, logits)
        finally:
            s.edits.undo(logits, edit)
        s.edits.accept(token)
        return token

    def _sample_chain(self, s: _Slot, row: int, logits: np.ndarray | None) -> int:
        """With a grammar, as llama.cpp's common sampler does: sample unconstrained, keep the
        token when the grammar allows it, else constrain all the candidates and sample again
        (checking one token is far cheaper than the whole vocabulary)."""
        if s.grammar is None:
            return L.llama_sampler_sample(s.sampler, self.ctx, row)
        if logits is None:
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        token = self._apply(s.sampler, logits)
        one = np.array([(token, logits[token], 0.0)], dtype=_TOKEN_DATA)
        self._run(s.grammar, one)
        if not np.isfinite(one["logit"][0]):
            token = self._apply(s.sampler, logits, first=s.grammar)
        L.llama_sampler_accept(s.grammar, token)
        L.llama_sampler_accept(s.sampler, token)
        return token

    def _apply(self, chain, logits: np.ndarray, first=None) -> int:
        cur = self._cur
        cur["id"], cur["logit"], cur["p"] = self._ids, logits, 0.0
        view = self._run(first, cur) if first is not None else None
        view = self._run(chain, cur, view)
        return int(cur["id"][view.selected])

    def _run(self, smpl, arr: np.ndarray, view=None):
        if view is None:
            view = L.llama_token_data_array(arr.ctypes.data_as(L.llama_token_data_p), len(arr), -1, False)
        L.llama_sampler_apply(smpl, ctypes.byref(view))
        return view

    def _step(self) -> None:
        self.step += 1
        for s in self.slots:  # cancelled jobs leave before the batch is built
            if s.job is not None and s.job.cancelled.is_set():
                self._finish(s, self._next_event(s))
        b, n, rows, budget, served = self.batch, 0, [], self.n_batch, 0
        for s in self.slots:
            if s.job is None or budget == 0 or s.leader is not None:
                continue
            if s.todo:  # the next chunk of its prompt
                take, s.todo = s.todo[: min(self.chunk, budget)], s.todo[min(self.chunk, budget):]
                s.cached.extend(take)
            else:       # its last sampled token
                take = s.cached[s.n_kv:]
            if not take:  # a fork whose leader left this step: it is cancelled
                continue
            for i, tok in enumerate(take):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, s.n_kv + i, 1, 0
                b.seq_id[n][0] = s.seq
                n += 1
            s.n_kv += len(take)
            budget -= len(take)
            served += bool(take)
            if not s.todo:
                b.logits[n - 1] = 1
                rows.append((s, n - 1))
        if n == 0:
            return
        b.n_tokens = n
        self.metrics.steps += 1
        self.metrics.max_batch_sequences = max(self.metrics.max_batch_sequences, served)
        self._handover()  # the last step's events go while this thread waits in llama.cpp
        t0 = time.perf_counter()
        rc = L.llama_decode(self.ctx, b)
        self.metrics.decode_seconds += time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self._copies_pending = False  # llama_decode has made the forks' copies (memory_update, first thing)
        for s, row in list(rows):
            for f in s.forks:  # the prompt is in: copy its cache to the forks, which sample the same row
                L.llama_memory_seq_cp(self.mem, s.seq, f.seq, -1, -1)
                self._copies_pending = True
                f.cached, f.n_kv, f.leader = list(s.cached), s.n_kv, None
                rows.append((f, row))
            s.forks = []
        for s, row in rows:
            token = self._sample(s, row)
            if s.t_first is None:
                s.t_first = time.perf_counter()
            s.token = token
            event = self._next_event(s)
            if isinstance(event, Piece):
                s.generated += 1
                s.cached.append(token)
                self.metrics.generated_tokens += 1
                if s.job.logprobs is not None:
                    s.job.emit(self._scored(row, token, s.job.logprobs))
                s.job.emit(event)
                if self._wants_done(s):
                    self._finish(s, self._next_event(s))
            else:
                self._finish(s, event)

    def _scored(self, row: int, token: int, top: int) -> Scored:
        """The log-softmax of the row's raw logits: the token's value and the `top` largest."""
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        x = logits.astype(np.float64)
        m = x.max()
        lse = m + np.log(np.exp(x - m).sum())
        top = min(top, self.n_vocab)
        best = np.argpartition(-x, top - 1)[:top] if top else np.zeros(0, dtype=np.int64)
        best = best[np.lexsort((best, -x[best]))]  # most likely first, ties by id
        return Scored(token, float(x[token] - lse), [(int(t), float(x[t] - lse)) for t in best])

    def _wants_done(self, s: _Slot) -> bool:
        """reply_events' own end conditions, checked before it would ask for another token."""
        job = s.job
        return (s.generated >= job.sampling.max_tokens or len(job.tokens) + s.generated >= self.n_ctx
                or job.cancelled.is_set())

    def _next_event(self, s: _Slot):
        try:
            return next(s.events)
        except StopIteration:
            return None

    def _finish(self, s: _Slot, done) -> None:
        job = s.job
        if not isinstance(done, Done):  # reply_events ended without a Done: a bug, but never hang the client
            done = Done("cancelled", len(job.tokens), 0, s.generated, 0.0, 0.0)
        done = dataclasses.replace(done, prompt_seconds=(s.t_first or time.perf_counter()) - job.submitted)
        if done.reason == "cancelled":
            self.metrics.cancelled += 1
            lag = self.step - (job.cancel_step if job.cancel_step is not None else self.step)
            self.metrics.max_cancel_lag = max(self.metrics.max_cancel_lag, lag)
            log.info("sequence %d cancelled after %d of %d prompt tokens evaluated and %d generated, %d step(s) "
                     "after the cancel", s.seq, min(s.n_kv, len(job.tokens)), len(job.tokens), s.generated, lag)
        job.emit(done)
        self._free(s, forget=False)

    def _free(self, s: _Slot, forget: bool) -> None:
        """Free the slot; its cache keeps what the KV holds (the last sampled token was never decoded)."""
        for smpl in (s.sampler, s.grammar):
            if smpl is not None:
                L.llama_sampler_free(smpl)
        if s.leader is not None:  # a fork that leaves before the prompt was in
            s.leader.forks.remove(s)
        for f in s.forks:         # a leader that leaves before its prompt was in: its forks cannot go on
            f.job.cancel(self.step)
            f.leader = None
        s.leader, s.forks = None, []
        s.cached = [] if forget else s.cached[: s.n_kv]
        s.n_kv = len(s.cached)
        L.llama_memory_seq_rm(self.mem, s.seq, s.n_kv, -1)
        s.job, s.sampler, s.edits, s.grammar, s.events, s.token, s.todo = None, None, None, None, None, None, []
