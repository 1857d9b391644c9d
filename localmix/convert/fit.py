"""`quantize --fit`: the per-tensor types that lose least for a byte budget.

Each quantizable tensor is one group (a layer's attn_q, attn_k, attn_v, attn_output, ffn_gate,
ffn_up, ffn_down, with all eight experts of a stacked tensor sharing one type; token_embd;
output), with a measured curve: for each candidate type, its size in bytes and the expected
KL divergence when it alone takes that type (localmix.native.sensitivity measures them).
Taking the losses as additive over groups, `solve` minimises their sum under the budget: a
Lagrangian pass (each group takes the type minimising loss + λ·bytes, λ bisected to the
largest mix within the budget) and then greedy upgrades by loss saved per byte while any
fits, so the file ends within one tensor's step of the budget.

A mix is a plain {tensor name: GGML type name} table, saved and read as JSON (`--save-mix`,
`--mix`), with the importance matrix it was fitted with named beside it ("imatrix");
pipeline.convert writes any such table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES

from localmix import kernels
from localmix.convert.mix import allows_quantization
from localmix.errors import InputError
from localmix.kernels import QType

# The ladder of candidate types, fewest bits first; only those localmix has kernels for take
# part (the i-quants join when their kernels do).
LADDER = ("Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1",
          "Q5_K", "Q6_K", "Q8_0")


def candidate_types(ncols: int, allowed: tuple[str, ...] | None = None) -> list[QType]:
    """The candidate types whose block fits rows of `ncols`, fewest bits per weight first."""
    out = []
    for name in allowed or LADDER:
        qtype = getattr(QType, name, None)
        if qtype is not None and qtype in kernels.KERNELS and ncols % GGML_QUANT_SIZES[qtype][0] == 0:
            out.append(qtype)
    return sorted(out, key=lambda t: GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0])


def fit_tensors(tensors: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors the fitter chooses types for: what llama.cpp would quantize."""
    return [(name, shape) for name, shape in tensors if allows_quantization(name, shape)]


@dataclass
class Curve:
    """One group's options: bytes and expected loss (KL divergence) per candidate type."""
    name: str                       # the tensor's name
    types: list[QType]
    nbytes: list[int]
    loss: list[float]


def solve(curves: list[Curve], budget: int) -> dict[str, QType]:
    """The type per group minimising the summed loss with the summed bytes within `budget`."""
    floor = sum(min(c.nbytes) for c in curves)
    if floor > budget:
        raise InputError(f"the budget leaves {budget / 2**20:.1f} MiB for the quantized tensors; even the smallest "
                         f"types need {floor / 2**20:.1f} MiB")

    def pick(lam: float) -> list[int]:
        return [min(range(len(c.types)), key=lambda i: (c.loss[i] + lam * c.nbytes[i], c.nbytes[i])) for c in curves]

    def size(choice) -> int:
        return sum(c.nbytes[i] for c, i in zip(curves, choice))

    lo, hi = 0.0, 1.0
    while size(pick(hi)) > budget:
        hi *= 4
    if size(pick(lo)) <= budget:
        hi = lo
    for _ in range(60):  # bisect λ: the smallest price of a byte whose mix fits
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(pick(mid)) <= budget else (mid, hi)
    choice = pick(hi)
    spare = budget - size(choice)
    while True:  # greedy: the upgrade that saves most loss per byte, while one fits
        best, best_rate = None, 0.0
        for g, (c, i) in enumerate(zip(curves, choice)):
            for j in range(len(c.types)):
                extra = c.nbytes[j] - c.nbytes[i]
                gain = c.loss[i] - c.loss[j]
                if 0 < extra <= spare and gain > 0 and gain / extra > best_rate:
                    best, best_rate = (g, j), gain / extra
        if best is None:
            break
        g, j = best
        spare -= curves[g].nbytes[j] - curves[g].nbytes[choice[g]]
        choice[g] = j
    return {c.name: c.types[i] for c, i in zip(curves, choice)}


def save_mix(path: str | Path, mix: dict[str, QType], info: dict | None = None) -> None:
    data = {**(info or {}), "types": {name: t.name for name, t in sorted(mix.items())}}
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def load_mix(path: str | Path) -> dict[str, QType]:
    """A mix saved by `save_mix` (or any {"types": {tensor: type name}} JSON)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        types = data["types"]
        return {name: QType[t] for name, t in types.items()}
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a mix file ({{\"types\": {{tensor: type}}}}): {e}") from None


def mix_imatrix(path: str | Path) -> Path | None:
    """The importance matrix a saved mix was fitted and written with (its "imatrix", relative to
    the mix's folder), or None when it names none."""
    try:
        name = json.loads(Path(path).read_text(encoding="utf-8")).get("imatrix")
    except (OSError, ValueError, AttributeError):
        return None  # load_mix says what is wrong with the file
    return None if not isinstance(name, str) else Path(path).parent / name


def check_mix(mix: dict[str, QType], tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    """A mix names every quantizable tensor once, with a type localmix writes that fits its rows."""
    shapes = dict(fit_tensors(tensors))
    missing = sorted(set(shapes) - set(mix))
    unknown = sorted(set(mix) - set(shapes))
    if missing or unknown:
        raise InputError(f"the mix does not match the model: {len(missing)} tensors missing (e.g. "
                         f"{(missing or ['-'])[0]}), {len(unknown)} unknown (e.g. {(unknown or ['-'])[0]})")
    for name, t in mix.items():
        if t not in kernels.QUANTIZABLE or shapes[name][-1] % GGML_QUANT_SIZES[t][0]:
            raise InputError(f"the mix gives {name} type {t.name}, which localmix cannot write for rows of "
                             f"{shapes[name][-1]}")


def mix_table(mix: dict[str, QType]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(tensor kinds, [(layer or tensor, type per kind)]) for printing a mix as a table."""
    kinds: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for name, t in mix.items():
        parts = name.split(".")
        if parts[0] == "blk":
            row, kind = parts[1], parts[2]
        else:
            row, kind = parts[0], "type"
        if kind not in kinds:
            kinds.append(kind)
        rows.setdefault(row, {})[kind] = t.name
    order = sorted(rows, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else r))
    return kinds, [(r, [rows[r].get(k, "") for k in kinds]) for r in order]
