"""Numbers as GBNF, for grammar.py: integers in a range, decimals between whole-number bounds,
multiples of a whole number; each as JSON writes it (no leading zeros, no "-0").

A range is split by the count of digits and then digit by digit, as a range of numerals
becomes a regular expression: 3..120 is `[3-9] | [1-9] [0-9] | "1" ([01] [0-9] | "20")`.
Decimals have no exponent and a fraction of at most 6 digits. Multiples of k are the numerals
a k-state automaton accepts: after each digit, the number read so far modulo k.
"""

from __future__ import annotations

LIMIT = 10**16 - 1          # the largest magnitude an unbounded integer is written with
NUMBER_LIMIT = 10**15 - 1   # and a number's integer part
EXACT_EXCLUSIVE = 10**9     # exclusive number bounds up to this size stay apart from a 6-digit fraction
FRACTION = '"." [0-9]{1,6}'


def integers(lo: int, hi: int) -> list[str]:
    """GBNF alternatives for the integers lo..hi written as JSON writes them."""
    alts = []
    if hi >= 0:
        alts += digits(max(lo, 0), hi)
    if lo < 0:
        alts += [f'"-" {a}' for a in digits(max(1, -hi), -lo)]
    return alts


def digits(lo: int, hi: int) -> list[str]:
    """GBNF alternatives for the numerals lo..hi (0 <= lo <= hi), no leading zeros."""
    alts, full = [], []  # full: lengths whose every numeral is in range, written as one repeat
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(hi, 10**n - 1)
        if n > 1 and a == 10 ** (n - 1) and b == 10**n - 1:
            full.append(n)
        else:
            alts += _same_length(str(a), str(b))
    if full:
        alts.append(f"[1-9] [0-9]{{{full[0] - 1},{full[-1] - 1}}}")
    return alts


def _same_length(a: str, b: str) -> list[str]:
    """Digit strings of one length from a to b."""
    if a == b:
        return [f'"{a}"']
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [f'"{a[0]}" ({" | ".join(_same_length(a[1:], b[1:]))})']
    rest = len(a) - 1
    low_all, high_all = a[1:] == "0" * rest, b[1:] == "9" * rest
    alts = [] if low_all else [f'"{a[0]}" ({" | ".join(_same_length(a[1:], "9" * rest))})']
    first, last = int(a[0]) + (0 if low_all else 1), int(b[0]) - (0 if high_all else 1)
    if first <= last:
        alts.append(f"[{first}-{last}] [0-9]{{{rest}}}")
    if not high_all:
        alts.append(f'"{b[0]}" ({" | ".join(_same_length("0" * rest, b[1:]))})')
    return alts


def decimals(lo: int, lo_open: bool, hi: int, hi_open: bool) -> list[str]:
    """GBNF alternatives for the decimals between whole-number bounds, with no exponent and a
    fraction of at most 6 digits."""
    alts = []
    if hi > 0 or (hi == 0 and not hi_open):
        alts += _magnitudes(*((lo, lo_open) if lo >= 0 else (0, False)), hi, hi_open)
    if lo < 0:  # -m for m in the mirrored range, m > 0
        alts += [f'"-" {a}' for a in _magnitudes(*((-hi, hi_open) if hi < 0 else (0, True)), -lo, lo_open)]
    return alts


def _magnitudes(a: int, a_open: bool, b: int, b_open: bool) -> list[str]:
    """I.F for values between 0 <= a and b."""
    if a > b:
        return []
    if a == b:
        return [] if a_open or b_open else digits(a, a)
    alts = []
    any_lo = a + 1 if a_open else a
    if any_lo <= b - 1:  # a whole part whose every fraction is in range
        alts += [f"({d}) ({FRACTION})?" for d in digits(any_lo, b - 1)]
    if a_open:  # a itself only with a fraction that is not zero
        alts.append(f'{digits(a, a)[0]} "." [0-9]{{0,5}} [1-9]')
    if not b_open:
        alts.append(digits(b, b)[0])
    return alts


def multiples(k: int, name: str) -> dict[str, str]:
    """Rules for the positive multiples of k (> 1) as numerals: `name` is the whole numeral;
    `{name}-{r}` the rest of it after digits that are r modulo k."""
    def steps(r: int, first: bool) -> list[str]:
        to: dict[int, list[int]] = {}
        for d in range(1 if first else 0, 10):
            to.setdefault((10 * r + d) % k, []).append(d)
        return [f"{_digit_class(ds)} {name}-{s}" for s, ds in to.items()]

    rules = {name: " | ".join(steps(0, first=True))}
    for r in range(k):
        rules[f"{name}-{r}"] = " | ".join((['""'] if r == 0 else []) + steps(r, first=False))
    return rules


def _digit_class(ds: list[int]) -> str:
    return f'"{ds[0]}"' if len(ds) == 1 else "[" + "".join(map(str, ds)) + "]"
