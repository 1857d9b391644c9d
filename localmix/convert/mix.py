"""Which GGML type each tensor gets, for each file type: llama.cpp's quantizer's rules.

A file type such as Q4_K_M is a *mix*: most weights take the base type (Q4_K) but some get
more bits where it pays (for an 8-expert model: attn_k and attn_v Q8_0, attn_output Q5_K;
ffn_down Q6_K in the layers `use_more_bits` picks; output Q6_K). `choose_types` is a port of
`llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp (llama-cpp-python 0.3.36) for the
llama architecture that Mixtral and Mistral use, including its counters (which attn_v this
is) and its fallbacks for rows that do not fit a type's block. The F32/F16/BF16/Q8_0 types
follow llama.cpp's converter instead (pipeline.py), which agrees with the quantizer on them.
The i-quant mixes depend on whether an importance matrix is given (IQ3_XXS, IQ4_NL, IQ4_XS),
and the tensors llama.cpp quantizes to IQ3_XXS or IQ2_S need one: `require_imatrix` refuses
those files without it, as llama.cpp does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, LlamaFileType

from localmix.convert.filetypes import NAMES
from localmix.errors import InputError
from localmix.kernels import QUANTIZABLE, QType

FT = LlamaFileType

# --type name -> (general.file_type, base type). Float and Q8_0 files are the converter's.
FILE_TYPES: dict[str, tuple[LlamaFileType, QType]] = {
    "F32": (FT.ALL_F32, QType.F32),
    "F16": (FT.MOSTLY_F16, QType.F16),
    "BF16": (FT.MOSTLY_BF16, QType.BF16),
    "Q8_0": (FT.MOSTLY_Q8_0, QType.Q8_0),
    "Q6_K": (FT.MOSTLY_Q6_K, QType.Q6_K),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, QType.Q5_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, QType.Q5_K),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, QType.Q4_K),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, QType.Q4_K),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, QType.Q3_K),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, QType.Q3_K),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, QType.Q3_K),
    "Q2_K": (FT.MOSTLY_Q2_K, QType.Q2_K),
    "IQ4_XS": (FT.MOSTLY_IQ4_XS, QType.IQ4_XS),
    "IQ4_NL": (FT.MOSTLY_IQ4_NL, QType.IQ4_NL),
    "IQ3_M": (FT.MOSTLY_IQ3_M, QType.IQ3_S),
    "IQ3_S": (FT.MOSTLY_IQ3_S, QType.IQ3_S),
    "IQ3_XS": (FT.MOSTLY_IQ3_XS, QType.IQ3_S),
    "IQ3_XXS": (FT.MOSTLY_IQ3_XXS, QType.IQ3_XXS),
}
assert tuple(FILE_TYPES) == NAMES, "filetypes.NAMES lists the types --help shows, in this order"
CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")

# A K-quant or i-quant whose 256-wide block does not fit a row falls back to a 32-wide type.
FALLBACK = {QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0, QType.Q4_K: QType.Q5_0,
            QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0,
            QType.IQ3_XXS: QType.IQ4_NL, QType.IQ3_S: QType.IQ4_NL, QType.IQ4_XS: QType.IQ4_NL,
            QType.IQ2_S: QType.IQ4_NL}
# Types llama.cpp will not write without an importance matrix ("the result will be garbage").
NEEDS_IMATRIX = frozenset({QType.IQ3_XXS, QType.IQ2_S, QType.IQ2_XS, QType.IQ2_XXS, QType.IQ1_S, QType.IQ1_M})


@dataclass(frozen=True)
class ModelShape:
    """What the rules look at besides the tensor itself."""
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B for the llama architecture
        return self.n_expert <= 1 and self.n_layer == 80 and self.n_head != self.n_head_kv


def _c_mod(a: int, b: int) -> int:
    """C's %, which keeps the sign of a."""
    return a - b * int(a / b)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or _c_mod(i_layer - n_layers // 8, 3) == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
                     ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes 2D and 3D weights, but never norms or the expert router."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def _layer_sort_key(name: str):
    """llama.cpp visits tensors in this order (its weight_name_comparer); the counters follow it."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _mix_type(name: str, base: QType, ft: LlamaFileType, m: ModelShape, ncols: int, state: dict) -> QType:
    """llama_tensor_get_type_impl for the file types localmix writes."""
    cat, new = _category(name), base
    if cat == "output" or (state["tied"] and cat == "token_embd"):
        if ncols % GGML_QUANT_SIZES[base][0]:
            return QType.Q8_0
        if ft == FT.MOSTLY_IQ3_XXS:
            return QType.Q5_K
        return new if new == QType.Q8_0 else QType.Q6_K
    if cat == "token_embd":
        return QType.IQ3_S if ft == FT.MOSTLY_IQ3_XXS else new
    if cat in ("attn_v", "attn_qkv"):
        i, n = state["i_attention_wv"], state["n_attention_wv"]
        if ft == FT.MOSTLY_Q2_K:
            new = QType.Q4_K if m.n_gqa >= 4 else QType.Q3_K
        elif ft == FT.MOSTLY_IQ3_XXS:
            new = QType.Q4_K if m.n_gqa >= 4 else QType.IQ3_XXS if state["has_imatrix"] else QType.IQ3_S
        elif ft in (FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_S) and m.n_gqa >= 4:
            new = QType.Q4_K
        elif ft == FT.MOSTLY_IQ3_M:
            new = QType.Q4_K
        elif ft == FT.MOSTLY_Q3_K_M:
            new = QType.Q5_K if i < 2 else QType.Q4_K
        elif ft == FT.MOSTLY_Q3_K_L:
            new = QType.Q5_K
        elif ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and m.n_gqa >= 4:
            new = QType.Q5_K
        elif ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and use_more_bits(i, n):
            new = QType.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and i < 4:
            new = QType.Q5_K
        if m.is_70b and new in (QType.Q3_K, QType.Q4_K):
            new = QType.Q5_K
        if m.n_expert == 8:  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            new = QType.Q8_0
        state["i_attention_wv"] += 1
    elif cat == "attn_k":
        if m.n_expert == 8:
            new = QType.Q8_0
        elif ft == FT.MOSTLY_IQ3_XS:
            new = QType.IQ3_XXS
        elif ft == FT.MOSTLY_IQ3_XXS:
            new = QType.IQ2_S
    elif cat == "attn_q":
        if ft == FT.MOSTLY_IQ3_XS:
            new = QType.IQ3_XXS
        elif ft == FT.MOSTLY_IQ3_XXS:
            new = QType.IQ2_S
    elif cat == "ffn_down":
        # with experts, the layer comes from the name; without, from the running counter
        i_layer = int(name.split(".")[1]) if m.n_expert > 1 else state["i_ffn_down"]
        n_layer = m.n_layer
        if ft == FT.MOSTLY_Q2_K:
            new = QType.Q3_K
        elif ft == FT.MOSTLY_IQ3_XXS and not state["has_imatrix"]:
            new = QType.Q4_K if i_layer < n_layer // 8 else QType.Q3_K
        elif ft == FT.MOSTLY_Q3_K_M:
            new = QType.Q5_K if i_layer < n_layer // 16 else QType.Q4_K
        elif ft == FT.MOSTLY_IQ3_M and (i_layer < n_layer // 8 or (m.n_expert == 8 and use_more_bits(i_layer, n_layer))):
            new = QType.Q4_K
        elif ft == FT.MOSTLY_Q3_K_L:
            new = QType.Q5_K
        elif ft == FT.MOSTLY_Q4_K_M:
            if use_more_bits(i_layer, n_layer):
                new = QType.Q6_K
        elif (i_layer < n_layer // 8 and ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS)
              and not state["has_imatrix"]):
            new = QType.Q5_K
        elif ft == FT.MOSTLY_Q5_K_M and use_more_bits(i_layer, n_layer):
            new = QType.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and i_layer < n_layer // 8:
            new = QType.Q5_K
        state["i_ffn_down"] += 1
    elif cat == "attn_output":
        if m.n_expert == 8:
            if ft in (FT.MOSTLY_Q2_K, FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M,
                      FT.MOSTLY_IQ4_NL, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M, FT.MOSTLY_IQ3_S, FT.MOSTLY_IQ3_M,
                      FT.MOSTLY_IQ4_XS):
                new = QType.Q5_K
        elif ft == FT.MOSTLY_Q2_K:
            new = QType.Q3_K
        elif ft == FT.MOSTLY_IQ3_XXS:
            new = QType.IQ3_S
        elif ft == FT.MOSTLY_Q3_K_M:
            new = QType.Q4_K
        elif ft == FT.MOSTLY_Q3_K_L:
            new = QType.Q5_K
        elif ft == FT.MOSTLY_IQ3_M:
            new = QType.Q4_K
    elif cat in ("ffn_gate", "ffn_up"):
        # as ffn_down: the layer from the name with experts, from the tensor's own counter without
        counter = "i_" + cat
        i_layer = int(name.split(".")[1]) if m.n_expert > 1 else state[counter]
        if ft == FT.MOSTLY_IQ3_XS and m.n_layer // 8 <= i_layer < 7 * m.n_layer // 8:
            new = QType.IQ3_XXS
        state[counter] += 1
    return new


def _fallback(qtype: QType, ncols: int) -> QType:
    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    new = FALLBACK.get(qtype, qtype)
    return new if ncols % GGML_QUANT_SIZES[new][0] == 0 else QType.F16


def choose_types(tensors: list[tuple[str, tuple[int, ...], QType]], file_type: str, model: ModelShape,
                 has_imatrix: bool = False) -> dict[str, QType]:
    """{name: GGML type} for tensors given as (name, numpy-order shape, current type)."""
    ft, base = FILE_TYPES[file_type]
    names = {name for name, _, _ in tensors}
    state = {"tied": "output.weight" not in names, "i_attention_wv": 0, "i_ffn_down": 0, "i_ffn_gate": 0,
             "i_ffn_up": 0, "n_attention_wv": sum(_category(n) in ("attn_v", "attn_qkv") for n in names),
             "has_imatrix": has_imatrix}
    chosen = {}
    for name, shape, current in sorted(tensors, key=lambda t: _layer_sort_key(t[0])):
        if not allows_quantization(name, shape):
            chosen[name] = current
            continue
        ncols = shape[-1]
        chosen[name] = _fallback(_mix_type(name, base, ft, model, ncols, state), ncols)
    return chosen


def require_imatrix(types: dict[str, QType], file_type: str, imatrix_names: set[str] | None) -> None:
    """Refuse, as llama.cpp does, a file whose tensors of a very low-bit type would be
    quantized without importance (no imatrix, or none for that tensor); the embeddings and the
    output are exempt. `imatrix_names`: the tensors the imatrix covers, None for no imatrix."""
    for name, qtype in types.items():
        if qtype not in NEEDS_IMATRIX or _category(name) in ("token_embd", "output"):
            continue
        if imatrix_names is None:
            raise InputError(f"{file_type} needs an importance matrix (--imatrix FILE; `localmix imatrix` makes one): "
                             f"llama.cpp quantizes {name} to {qtype.name}, which it refuses to do without one")
        if name not in imatrix_names:
            raise InputError(f"the importance matrix has no entry for {name}, which {file_type} quantizes to "
                             f"{qtype.name}: llama.cpp refuses to quantize it without one")
        if qtype not in QUANTIZABLE:
            raise InputError(f"{file_type} quantizes {name} to {qtype.name}, which localmix cannot write yet")
