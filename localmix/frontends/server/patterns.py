"""The inside of a JSON string as GBNF: a regular expression (`pattern`) or a `format`
(grammar.py puts the quotes around it).

A pattern is read by Python's own regex parser, so the grammar means what `re.search`, and
with it the `jsonschema` validator, means: a pattern without `^` (or `$`) may have any text
before (or after) what it matches. What the grammar writes is always the JSON-escaped form of
the characters: a literal `"` becomes `\\"`. Classes, `.` and `\\d \\w \\s` and their negations
draw from printable ASCII (and the non-ASCII characters a class names): a subset of what they
match, so every string the grammar allows matches. Refused, as `PatternError`: backreferences,
lookaround, `\\b`, anchors inside the pattern, atomic groups and possessive repeats, inline flags.

Formats (date-time, time, date, duration, email, hostname, ipv4, ipv6, uuid) are written as
the valid strings of a common shape: dates only of days every year has (no 29 February),
years 1000-9999, IPv6 in its full eight-group form, hostnames of short labels.
"""

from __future__ import annotations

import re
from re import _constants as C  # Python's own regex parser: what the validator (re.search) means
from re import _parser

CHAR = r'[^"\\\x00-\x1F]'                                   # one unescaped character of a JSON string
ESCAPE = r'"\\" (["\\/bfnrt] | "u" ([0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}))'  # no surrogates
ANY_CHAR = f"({CHAR} | {ESCAPE})"                           # one character (one code point), either way
PRINTABLE = (0x20, 0x7E)
JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}

_TIME = ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
         '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])')
_DATE = ('[1-9] [0-9]{3} "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01]) '
         '| ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") | "02" "-" ("0" [1-9] | "1" [0-9] | "2" [0-8]))')
_LABEL = "[a-zA-Z0-9] ([a-zA-Z0-9-]{0,20} [a-zA-Z0-9])?"
_TOP_LABEL = "[a-zA-Z] ([a-zA-Z0-9-]{0,20} [a-zA-Z0-9])?"   # the last label starts with a letter: never all digits
_HOSTNAME = f'({_LABEL} ".")' + "{0,3} " + _TOP_LABEL
_OCTET = '("25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9])'
_D = "[0-9]{1,4}"
_DURATION_DATE = f'({_D} "Y" ({_D} "M")? ({_D} "D")? | {_D} "M" ({_D} "D")? | {_D} "D")'
_DURATION_TIME = f'"T" ({_D} "H" ({_D} "M")? ({_D} "S")? | {_D} "M" ({_D} "S")? | {_D} "S")'
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f'{_DATE} "T" {_TIME}',
    "duration": f'"P" ({_D} "W" | {_DURATION_DATE} ({_DURATION_TIME})? | {_DURATION_TIME})',
    "email": f'[a-zA-Z0-9_+-]{{1,20}} ("." [a-zA-Z0-9_+-]{{1,20}}){{0,2}} "@" ({_LABEL} "."){{1,2}} {_TOP_LABEL}',
    "hostname": _HOSTNAME,
    "ipv4": f'{_OCTET} ("." {_OCTET}){{3}}',
    "ipv6": '[0-9a-f]{1,4} (":" [0-9a-f]{1,4}){7}',
    "uuid": '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
}


class PatternError(ValueError):
    """A pattern the grammar cannot follow exactly; the message says what in it."""


def literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def json_char(c: str) -> str:
    """The GBNF literal of one character as it is written inside a JSON string."""
    if c in JSON_ESCAPES:
        return literal(JSON_ESCAPES[c])
    return literal(f"\\u{ord(c):04x}" if ord(c) < 0x20 else c)


def pattern(regex: str) -> str:
    """GBNF for the inside of a JSON string that `re.search(regex, s)` finds a match in."""
    try:
        parsed = _parser.parse(regex)
    except re.error as e:
        raise PatternError(f"not a regular expression: {e}") from None
    if parsed.state.flags & ~(re.UNICODE | re.ASCII):
        raise PatternError("inline flags such as (?i) are not supported")
    alts = _alternatives(list(parsed))
    return _anchored(alts[0]) if len(alts) == 1 else "(" + " | ".join(_anchored(a) for a in alts) + ")"


def _alternatives(items: list) -> list[list]:
    """The pattern as alternatives, split where a top-level `|` has anchors of its own (`^a$|^b$`,
    which Python's parser reads as `^` then `(a$|b$)`), so that each is anchored alone."""
    for k, (op, arg) in enumerate(items):
        if op is C.BRANCH and any(o is C.AT for alt in arg[1] for o, _ in alt):
            return [a for alt in arg[1] for a in _alternatives(items[:k] + list(alt) + items[k + 1:])]
    return [items]


def _anchored(items: list) -> str:
    start = bool(items) and items[0] == (C.AT, C.AT_BEGINNING) or items[:1] == [(C.AT, C.AT_BEGINNING_STRING)]
    items = items[1:] if start else items
    end = bool(items) and items[-1] in ((C.AT, C.AT_END), (C.AT, C.AT_END_STRING))
    items = items[:-1] if end else items
    body = _sequence(items)
    return " ".join(part for part in ("" if start else f"{ANY_CHAR}*", body, "" if end else f"{ANY_CHAR}*") if part)


def _sequence(items) -> str:
    parts = [_item(op, arg) for op, arg in items]
    return " ".join(p for p in parts if p) or '""'


def _item(op, arg) -> str:
    if op is C.LITERAL:
        return json_char(chr(arg))
    if op is C.NOT_LITERAL:
        return _class([(C.NEGATE, None), (C.LITERAL, arg)])
    if op is C.ANY:
        return CHAR
    if op is C.IN:
        return _class(arg)
    if op is C.SUBPATTERN:
        _group, add_flags, del_flags, sub = arg
        if add_flags or del_flags:
            raise PatternError("inline flags such as (?i:...) are not supported")
        return "(" + _sequence(sub) + ")"
    if op is C.BRANCH:
        return "(" + " | ".join(_sequence(alt) for alt in arg[1]) + ")"
    if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # lazy or greedy: the same strings match
        low, high, sub = arg
        inner = "(" + _sequence(sub) + ")"
        if high is C.MAXREPEAT:
            return f"{inner}*" if low == 0 else f"{inner}+" if low == 1 else f"{inner}{{{low},}}"
        return f"{inner}{{{low},{high}}}" if low != high else f"{inner}{{{low}}}"
    if op is C.AT:
        raise PatternError(f"the anchor or boundary {_name(arg)} is supported only at the start (^) or end ($)")
    raise PatternError(f"{_name(op)} (backreferences, lookaround, atomic groups, possessive repeats) "
                       "are not supported")


def _name(x) -> str:
    return str(x).lower().replace("_", " ")


_CATEGORIES = {C.CATEGORY_DIGIT: [(0x30, 0x39)], C.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
               C.CATEGORY_SPACE: [(0x20, 0x20)]}
_NOT = {C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_WORD: C.CATEGORY_WORD,
        C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE}


def _class(items) -> str:
    """A character class as GBNF: the chosen code points, each written as JSON writes it."""
    negate = bool(items) and items[0][0] is C.NEGATE
    ranges: list[tuple[int, int]] = []
    for op, arg in items[1:] if negate else items:
        if op is C.LITERAL:
            ranges.append((arg, arg))
        elif op is C.RANGE:
            ranges.append(arg)
        elif op is C.CATEGORY and arg in _CATEGORIES:
            ranges += _CATEGORIES[arg]
        elif op is C.CATEGORY and arg in _NOT:  # a negated category: printable ASCII outside it
            ranges += _complement(_CATEGORIES[_NOT[arg]])
        else:
            raise PatternError(f"{_name(arg)} inside a character class is not supported")
    if negate:
        ranges = _complement(ranges)
    plain = [(lo, hi) for lo, hi in _minus(ranges, [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)])]
    escaped = sorted({c for lo, hi in ranges for c in range(lo, min(hi, 0x5C) + 1)
                      if c < 0x20 or c in (0x22, 0x5C)}) if not negate else []
    alts = (["[" + "".join(_class_char(lo) + ("" if lo == hi else "-" + _class_char(hi)) for lo, hi in plain) + "]"]
            if plain else []) + [json_char(chr(c)) for c in escaped]
    if not alts:
        raise PatternError("a character class that matches no character a grammar can write")
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


def _complement(ranges):
    """Printable ASCII outside `ranges`."""
    return _minus([PRINTABLE], ranges)


def _minus(ranges, remove):
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for rlo, rhi in remove:
            pieces = [p for a, b in pieces for p in ((a, min(b, rlo - 1)), (max(a, rhi + 1), b)) if p[0] <= p[1]]
        out += pieces
    return sorted(set(out))


def _class_char(c: int) -> str:
    """One character inside a GBNF class: letters and digits as they are, other ASCII as \\xHH."""
    ch = chr(c)
    return ch if ch.isalnum() or c > 0x7F else f"\\x{c:02X}"
