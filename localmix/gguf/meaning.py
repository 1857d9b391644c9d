"""Check what a well-formed GGUF header says: is it something llama.cpp can load?

A file can parse and still be wrong in meaning, and llama.cpp's loader meets much of that with
an assertion that kills the process (SIGABRT, nothing on stderr). `check_meaning(reader)`
checks, before llama.cpp sees the file, what its loader reads (llama-model.cpp's
`load_hparams`, llama-vocab.cpp's `load`, models/llama.cpp's tensors):

- every key it reads has the type it expects, and the hyper-parameters are in sane ranges,
  including the ones it asserts on (1-512 layers, at most 1024 experts, experts per token
  between 1 and the experts, a known RoPE scaling type);
- the strings that must be exact (token texts, the chat template) are UTF-8 without NUL bytes;
- the vocabulary: unique token texts as llama.cpp sees them (C strings, up to the first NUL;
  an empty text becomes "[EMPTY_i]"), scores and token types as long as the token list, the
  BOS and EOS ids inside it;
- the chat template compiles in the sandbox the runtime renders it in (gguf.sandbox);
- the data section at an offset llama.cpp can map (tensor data 32-byte aligned);
- for the llama architecture, every tensor's shape against the hyper-parameters, and the norms
  in F32 (llama.cpp's CPU multiply aborts on any other type).

Each failure is a `BadValue` whose text names the key or tensor, in one line. The arrays are
checked with numpy and the compiled scans of gguf.scan, never item by item in Python.
"""

from __future__ import annotations

import math
from functools import lru_cache

import jinja2
import numpy as np
from gguf import GGUFValueType

from localmix.gguf.read import Reader, StringArray, array_length
from localmix.gguf.sandbox import environment
from localmix.gguf.scan import c_string_hashes, first_invalid_utf8

T = GGUFValueType
MAX_LAYERS, MAX_EXPERTS = 512, 1024   # llama.cpp's LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS
TENSOR_ALIGNMENT = 32                 # ggml's CPU buffers assert that tensor data is this aligned
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
TOKEN_TYPES = range(0, 7)             # undefined, normal, unknown, control, user-defined, unused, byte
SPECIAL_TOKENS = ("bos", "eos", "unknown", "seperator", "padding", "mask", "eot", "eom")  # llama.cpp's spelling
USED_TOKENS = ("bos", "eos")          # what localmix itself reads: out of range, they would index past the vocabulary
EXACT_STRINGS = ("tokenizer.chat_template", "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre")


class BadValue(Exception):
    """What is wrong, naming the key or tensor; `check_gguf` adds the path."""


# --- types ---------------------------------------------------------------------------------

def _type_name(field) -> str:
    names = [t.name.lower() for t in field.types]
    return f"an array of {names[1]}" if len(names) == 2 else names[0]


def _scalar(r: Reader, key: str, vtype: T, required: bool = False, per_layer: bool = False):
    """The value of a scalar key (or, where llama.cpp reads `get_key_or_arr`, a per-layer
    array of that type: returned as a numpy array), checked for its type; None if absent."""
    f = r.fields.get(key)
    if f is None:
        if required:
            raise BadValue(f"it has no {key}, which llama.cpp needs")
        return None
    if per_layer and f.types == [T.ARRAY, vtype]:
        return np.asarray(f.parts[f.data[0]])
    if f.types != [vtype]:
        raise BadValue(f"{key} is {_type_name(f)}, but llama.cpp reads it as {vtype.name.lower()}")
    if vtype == T.STRING:
        return bytes(f.parts[-1])
    return f.parts[-1][0].item()


def _exact_string(key: str, raw: bytes) -> str:
    if b"\0" in raw:
        raise BadValue(f"{key} holds a NUL byte at {raw.index(0)}, which cuts it short in llama.cpp")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadValue(f"{key} is not valid UTF-8 (byte {e.start})") from None


def _in_range(key: str, v, lo, hi):
    """`v` (an int, or a per-layer array) inside [lo, hi]."""
    values = np.atleast_1d(v)
    bad = values[(values < lo) | (values > hi)]
    if bad.size:
        raise BadValue(f"{key} is {bad[0]}, outside the sane range {lo}..{hi:,}")


# --- hyper-parameters ----------------------------------------------------------------------

def _hparams(r: Reader, arch: str) -> dict:
    """The `{arch}.*` keys llama.cpp's load_hparams reads, typed and in range."""
    k = lambda name: f"{arch}.{name}"  # noqa: E731
    hp = {}
    hp["n_layer"] = n_layer = _scalar(r, k("block_count"), T.UINT32, required=True)
    _in_range(k("block_count"), n_layer, 1, MAX_LAYERS)
    hp["n_ctx_train"] = _scalar(r, k("context_length"), T.UINT32, required=True)
    _in_range(k("context_length"), hp["n_ctx_train"], 1, 2**24)
    hp["n_embd"] = n_embd = _scalar(r, k("embedding_length"), T.UINT32, required=True)
    _in_range(k("embedding_length"), n_embd, 1, 2**17)
    for name, lo in (("feed_forward_length", 0), ("attention.head_count", 0), ("attention.head_count_kv", 0),
                     ("expert_used_count", 0)):
        # llama.cpp reads the first three per layer (get_key_or_arr); expert_used_count is a plain
        # get_key, and an array there aborts its loader (found by benchmarks/fuzz_gguf.py)
        v = _scalar(r, k(name), T.UINT32, per_layer=name != "expert_used_count")
        if isinstance(v, np.ndarray) and v.size != n_layer:
            raise BadValue(f"{k(name)} has {v.size} per-layer values for {n_layer} layers")
        if v is not None:
            _in_range(k(name), v, lo, 2**20)
        hp[name] = v

    n_expert = _scalar(r, k("expert_count"), T.UINT32) or 0
    _in_range(k("expert_count"), n_expert, 0, MAX_EXPERTS)
    used = int(np.max(hp["expert_used_count"])) if hp["expert_used_count"] is not None else 0
    if used > n_expert:
        raise BadValue(f"{k('expert_used_count')} is {used}, more than the {n_expert} experts ({k('expert_count')})")
    if n_expert and not used:
        raise BadValue(f"{k('expert_used_count')} is missing or 0, but the model has {n_expert} experts")
    groups = _scalar(r, k("expert_group_count"), T.UINT32) or 0
    group_used = _scalar(r, k("expert_group_used_count"), T.UINT32) or 0
    if (groups >= n_expert if n_expert else groups) or (groups > 1 and (n_expert % groups or not 0 < group_used < groups)):
        raise BadValue(f"{k('expert_group_count')} is {groups} ({group_used} used) for {n_expert} experts")
    nextn = _scalar(r, k("nextn_predict_layers"), T.UINT32) or 0
    if nextn > n_layer:
        raise BadValue(f"{k('nextn_predict_layers')} is {nextn}, more than the {n_layer} layers")
    hp["n_expert"], hp["n_expert_used"] = n_expert, used

    for name in ("attention.key_length", "attention.value_length", "rope.dimension_count", "vocab_size",
                 "expert_feed_forward_length"):
        hp[name] = _scalar(r, k(name), T.UINT32)
        if hp[name] is not None:
            _in_range(k(name), hp[name], 1, {"vocab_size": 2**24, "expert_feed_forward_length": 2**20}.get(name, 2**16))
    for name, lo, hi in (("rope.freq_base", 1e-3, 1e12), ("rope.scaling.factor", 0.0, 1e6),
                         ("attention.layer_norm_rms_epsilon", 0.0, 1.0), ("rope.scaling.attn_factor", 0.0, 1e6)):
        v = _scalar(r, k(name), T.FLOAT32, required=(arch == "llama" and name == "attention.layer_norm_rms_epsilon"))
        if v is not None and not (math.isfinite(v) and lo <= v <= hi and (v > 0 or name == "rope.scaling.factor")):
            raise BadValue(f"{k(name)} is {v}, outside the sane range {lo:g}..{hi:g}")
    scaling = _scalar(r, k("rope.scaling.type"), T.STRING)
    if scaling is not None and scaling not in [s.encode() for s in ROPE_SCALING_TYPES]:
        raise BadValue(f"{k('rope.scaling.type')} is {scaling[:40]!r}; llama.cpp knows {', '.join(ROPE_SCALING_TYPES)}")

    n_head = hp["attention.head_count"]
    if n_head is not None and np.any(np.atleast_1d(n_head) > 0):
        heads = np.atleast_1d(n_head)
        kv = np.atleast_1d(hp["attention.head_count_kv"] if hp["attention.head_count_kv"] is not None else heads)
        if np.any(heads == 0) or np.any(kv == 0) or np.any(kv > heads) or np.any(heads % np.maximum(kv, 1)):
            raise BadValue(f"{k('attention.head_count_kv')} ({kv.max()}) must divide {k('attention.head_count')} "
                           f"({heads.max()}) in every layer")
        if hp["attention.key_length"] is None and n_embd % int(heads.max()):
            raise BadValue(f"{k('embedding_length')} {n_embd} is not a whole number of "
                           f"{k('attention.head_count')} {heads.max()} heads")
    return hp


# --- tokenizer -----------------------------------------------------------------------------

def _vocabulary(r: Reader) -> int:
    """The tokenizer.* keys llama-vocab.cpp reads; returns the number of tokens (0 without any)."""
    model = _scalar(r, "tokenizer.ggml.model", T.STRING)
    tokens = r.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        if model not in (None, b"no_vocab", b"none"):
            raise BadValue("it has no tokenizer.ggml.tokens, which llama.cpp needs for its vocabulary")
        return 0
    if model is None:
        raise BadValue("it has tokenizer.ggml.tokens but no tokenizer.ggml.model, which llama.cpp needs")
    if not isinstance(tokens, StringArray):
        raise BadValue(f"tokenizer.ggml.tokens is {_type_name(tokens)}, but llama.cpp reads an array of strings")
    n = array_length(tokens)
    if n == 0:
        raise BadValue("tokenizer.ggml.tokens is empty")

    buf, starts, lengths = tokens.parts[7], tokens.parts[5], tokens.parts[6]
    bad = first_invalid_utf8(buf, starts, lengths)
    if bad >= 0:
        raise BadValue(f"tokenizer.ggml.tokens: token {bad} ({tokens.raw(bad)[:24]!r}) is not valid UTF-8")
    _unique_texts(tokens, buf, starts, lengths)
    if model == b"llama":  # SentencePiece: llama.cpp's byte fallback looks up <0xXX>, then the byte
        # itself, with unordered_map::at, whose out_of_range kills the process (fuzz_gguf found it)
        have = {tokens.raw(int(i)) for i in np.flatnonzero((np.asarray(lengths) == 6) | (np.asarray(lengths) == 1))}
        missing = [b for b in range(256) if b"<0x%02X>" % b not in have and bytes([b]) not in have]
        if missing:
            raise BadValue(f"tokenizer.ggml.tokens has no byte token <0x{missing[0]:02X}>, which llama.cpp's "
                           "SentencePiece tokenizer needs")

    for key, item, what in (("tokenizer.ggml.scores", (T.FLOAT32, T.INT32), "scores"),
                            ("tokenizer.ggml.token_type", (T.INT32,), "token types")):
        f = r.fields.get(key)
        if f is None:
            continue
        if f.types[0] != T.ARRAY or f.types[-1] not in item:
            raise BadValue(f"{key} is {_type_name(f)}, but llama.cpp reads an array of {item[0].name.lower()}")
        if array_length(f) != n:
            raise BadValue(f"{key} has {array_length(f):,} {what} for {n:,} tokens")
        values = np.asarray(f.parts[f.data[0]]) if f.data else np.zeros(0)
        if key.endswith("scores") and np.isnan(values).any():
            raise BadValue(f"{key}: the score of token {int(np.flatnonzero(np.isnan(values))[0])} is NaN")
        if key.endswith("token_type"):
            out = np.flatnonzero((values < TOKEN_TYPES.start) | (values >= TOKEN_TYPES.stop))
            if out.size:
                raise BadValue(f"{key}: token {int(out[0])} has type {int(values[out[0]])}, not one of 0..6")
    merges = r.fields.get("tokenizer.ggml.merges")
    if merges is not None and not isinstance(merges, StringArray):
        raise BadValue(f"tokenizer.ggml.merges is {_type_name(merges)}, but llama.cpp reads an array of strings")
    if model == b"gpt2" and merges is None:
        raise BadValue("tokenizer.ggml.model is gpt2 (BPE) but it has no tokenizer.ggml.merges")

    for name in SPECIAL_TOKENS:  # llama.cpp ignores an id past the vocabulary, with a warning; localmix cannot
        key = f"tokenizer.ggml.{name}_token_id"
        v = _scalar(r, key, T.UINT32)
        if v is not None and v >= n and name in USED_TOKENS:
            raise BadValue(f"{key} is {v}, but the vocabulary has {n:,} tokens")
    for name in ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix", "remove_extra_whitespaces"):
        _scalar(r, f"tokenizer.ggml.{name}", T.BOOL)
    return n


def _unique_texts(tokens: StringArray, buf, starts, lengths) -> None:
    """No two tokens with one text, as llama.cpp sees the texts (it asserts on a duplicate)."""
    hashes, c_lengths = c_string_hashes(buf, starts, lengths)
    empty = np.flatnonzero(c_lengths == 0)
    texts = {}  # only for the few tokens whose hash is not unique
    sorted_hashes = np.sort(hashes)
    repeated = sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]]
    if repeated.size:
        for i in np.flatnonzero(np.isin(hashes, repeated)):
            texts.setdefault(int(i), tokens.raw(int(i)).split(b"\0", 1)[0])
    for i in empty:  # llama.cpp renames an empty text (or one starting with NUL) "[EMPTY_i]"
        texts[int(i)] = f"[EMPTY_{int(i)}]".encode()
    if empty.size:   # which other token could hold that name? compare by hash, then by text
        names = [texts[int(i)] for i in empty]
        probe = np.frombuffer(b"".join(names), np.uint8)
        starts_ = np.cumsum([0] + [len(s) for s in names[:-1]]).astype(np.int64)
        name_hashes, _ = c_string_hashes(probe, starts_, np.array([len(s) for s in names], np.int64))
        for i in np.flatnonzero(np.isin(hashes, name_hashes)):
            texts.setdefault(int(i), tokens.raw(int(i)).split(b"\0", 1)[0])
    seen: dict[bytes, int] = {}
    for i in sorted(texts):
        text = texts[i]
        if text in seen:
            raise BadValue(f"tokenizer.ggml.tokens: tokens {seen[text]} and {i} have the same text "
                           f"{text[:24]!r} (llama.cpp aborts on a vocabulary with duplicates)")
        seen[text] = i


# --- the rest ------------------------------------------------------------------------------

def _general(r: Reader) -> str | None:
    arch = _scalar(r, "general.architecture", T.STRING)
    for key in EXACT_STRINGS:
        raw = _scalar(r, key, T.STRING)
        if raw is not None:
            _exact_string(key, raw)
    for key in ("general.name", "general.description", "general.basename", "general.author"):
        _scalar(r, key, T.STRING)   # shown with replacement characters where not UTF-8
    for key in ("general.file_type", "general.quantization_version"):
        _scalar(r, key, T.UINT32)
    alignment = _scalar(r, "general.alignment", T.UINT32)
    if alignment is not None and (alignment < TENSOR_ALIGNMENT or alignment & (alignment - 1)):
        raise BadValue(f"general.alignment is {alignment}; llama.cpp maps tensor data at multiples of "
                       f"{TENSOR_ALIGNMENT} bytes, so it must be a power of two of at least {TENSOR_ALIGNMENT}")
    if int(r.data_offset) % TENSOR_ALIGNMENT:
        raise BadValue(f"the tensor data starts at offset {int(r.data_offset):,}, not a multiple of {TENSOR_ALIGNMENT}")
    return None if arch is None else arch.decode()


def _template(r: Reader) -> None:
    raw = _scalar(r, "tokenizer.chat_template", T.STRING)
    if raw is not None:
        _compiles(raw)


@lru_cache(maxsize=64)
def _compiles(raw: bytes) -> None:
    try:
        environment().from_string(_exact_string("tokenizer.chat_template", raw))
    except jinja2.TemplateSyntaxError as e:
        raise BadValue(f"tokenizer.chat_template does not compile: line {e.lineno}: {e.message}") from None
    except (jinja2.TemplateError, RecursionError) as e:
        raise BadValue(f"tokenizer.chat_template does not compile: {type(e).__name__}") from None


def _llama_tensors(r: Reader, hp: dict, n_vocab: int) -> None:
    """Every tensor llama.cpp's llama architecture creates, with the shape it expects."""
    n_embd, n_layer, n_expert = hp["n_embd"], hp["n_layer"], hp["n_expert"]
    heads = np.atleast_1d(hp["attention.head_count"] if hp["attention.head_count"] is not None else 0)
    kv = np.atleast_1d(hp["attention.head_count_kv"] if hp["attention.head_count_kv"] is not None else heads)
    ff = np.atleast_1d(hp["feed_forward_length"] if hp["feed_forward_length"] is not None else 0)
    head_k = hp["attention.key_length"] or (n_embd // int(heads.max()) if heads.max() else 0)
    head_v = hp["attention.value_length"] or head_k
    rot = hp["rope.dimension_count"]
    if rot is not None and rot != head_k:
        raise BadValue(f"llama.rope.dimension_count is {rot}, but llama.cpp needs the head size {head_k}")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    want = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    if "output.weight" in shapes:
        want["output.weight"] = (n_embd, n_vocab)
    for i in range(n_layer):
        h, g = int(heads[min(i, heads.size - 1)]), int(kv[min(i, kv.size - 1)])
        f = int(ff[min(i, ff.size - 1)])
        b = f"blk.{i}."
        want |= {b + "attn_norm.weight": (n_embd,), b + "ffn_norm.weight": (n_embd,),
                 b + "attn_output.weight": (head_k * h, n_embd)}
        if b + "attn_qkv.weight" in shapes:  # q, k and v fused in one tensor
            want[b + "attn_qkv.weight"] = (n_embd, head_k * h + head_k * g + head_v * g)
        else:
            want |= {b + "attn_q.weight": (n_embd, head_k * h), b + "attn_k.weight": (n_embd, head_k * g),
                     b + "attn_v.weight": (n_embd, head_v * g)}
        if n_expert:
            want |= {b + "ffn_gate_inp.weight": (n_embd, n_expert), b + "ffn_gate_exps.weight": (n_embd, f, n_expert),
                     b + "ffn_up_exps.weight": (n_embd, f, n_expert), b + "ffn_down_exps.weight": (f, n_embd, n_expert)}
        else:
            want |= {b + "ffn_gate.weight": (n_embd, f), b + "ffn_up.weight": (n_embd, f), b + "ffn_down.weight": (f, n_embd)}
    for t in r.tensors:  # norms (and any bias): llama.cpp multiplies by them elementwise, in float32 only
        if len(t.shape) == 1 and t.tensor_type.name != "F32":
            raise BadValue(f"tensor {t.name} is {t.tensor_type.name}, but llama.cpp aborts on a norm or bias "
                           "that is not F32")
    for name, shape in want.items():
        if name not in shapes:
            raise BadValue(f"tensor {name} is missing (llama.cpp's llama architecture needs it)")
        if shapes[name] != shape:
            raise BadValue(f"tensor {name} has shape {list(shapes[name])}, but the hyper-parameters give {list(shape)}")


def check_meaning(r: Reader) -> dict:
    """Raise BadValue, naming the key or tensor, for what llama.cpp would refuse or abort on.
    Returns the architecture, the hyper-parameters that were read and the vocabulary size."""
    arch = _general(r)
    n_vocab = _vocabulary(r)
    _template(r)
    hp = _hparams(r, arch) if arch is not None and f"{arch}.block_count" in r.fields else {}
    if hp and hp["vocab_size"] is not None and n_vocab and hp["vocab_size"] != n_vocab:
        raise BadValue(f"{arch}.vocab_size is {hp['vocab_size']:,}, but tokenizer.ggml.tokens has {n_vocab:,} tokens")
    if arch == "llama":
        if not hp:
            raise BadValue("it has no llama.block_count, which llama.cpp needs")
        if not n_vocab:
            raise BadValue("it has no tokenizer.ggml.tokens, which llama.cpp needs for a llama model")
        _llama_tensors(r, hp, n_vocab)
    return {"architecture": arch, "n_vocab": n_vocab, **hp}
