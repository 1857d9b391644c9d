"""JSON schema -> llama.cpp GBNF grammar, or a refusal that names the keyword and where it is.

Every JSON text the grammar allows validates against the schema: each keyword is either
enforced by the grammar or refused (`Refused`: the keyword, its JSON pointer, why), never
dropped. Enforced:

- `type` (string, number, integer, boolean, object, array, null, or a list of them), `enum`,
  `const`, `anyOf`, `$ref` into the same document (`#`, `#/$defs/...`, any local pointer;
  recursion included), `$defs`/`definitions`;
- objects: `properties` (in the order given), `required`, `additionalProperties` (`false`;
  a schema for the values of an object without `properties`; otherwise only the declared
  properties are written, which every value of `additionalProperties` allows);
- arrays: `items`, `minItems`, `maxItems`;
- strings: `minLength`, `maxLength`, `pattern` (patterns.py), `format` date-time, time, date,
  duration, email, hostname, ipv4, ipv6, uuid;
- integers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (any bound), and
  `multipleOf` a whole number up to 1000 with no range beside it (numbers.py);
- numbers: the same four with whole-number bounds (a fraction of at most 6 digits; exclusive
  bounds up to 1e9 in size, where such a fraction stays apart from the bound as a double), and
  `multipleOf` as for integers (the multiples written are whole).
- annotations, which constrain nothing: title, description, default, examples, $schema, $id,
  $comment, deprecated, readOnly, writeOnly.

Refused: `multipleOf` a fraction (the validator divides doubles: 0.07/0.01 is not 7) or
beside a range (its digit automaton would multiply with the range's), number bounds with a fraction
(a decimal such as 0.1 has no exact double: at the bound a grammar on digits and a validator
on doubles disagree), `oneOf` (a union can match two alternatives), `allOf`, `not`,
`if`/`then`/`else`, `prefixItems`, `uniqueItems`, `contains`, `patternProperties`,
`propertyNames`, `minProperties`, `maxProperties`, `dependent*`, `unevaluated*`, formats
other than those above, `pattern` with `format` or a length, `enum`/`const` with a
constraint other than `type` (or a `const` its `enum` lacks), remote `$ref`s, a `$ref` that
comes back to itself before any character is written, and any keyword not named here.

Unbounded numbers are written with at most 16 integer digits (integers: below 10^16;
multiples: any length).
"""

from __future__ import annotations

import json
import math
import re
from urllib.parse import unquote

from localmix.frontends.server import numbers, patterns

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions"})
BY_TYPE = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
}
BY_TYPE["integer"] = BY_TYPE["number"]
KNOWN = ANNOTATIONS | {"type", "enum", "const", "anyOf", "$ref"} | frozenset().union(*BY_TYPE.values())
WHY = {
    "oneOf": "a union can match two alternatives; use anyOf",
    "allOf": "intersections of schemas are not supported",
}
MAX_MULTIPLE = 1000  # multipleOf k: k rules
TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")

BASICS = {
    "space": '" "?',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "char": f"{patterns.CHAR} | {patterns.ESCAPE}",
    "string": '"\\"" char* "\\"" space',
    "number": '"-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})? space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space (string ":" space value ("," space string ":" space value)*)? "}" space',
    "array": '"[" space (value ("," space value)*)? "]" space',
}


class Refused(ValueError):
    """A schema keyword the grammar cannot enforce: `keyword`, its JSON `pointer` in the
    schema (the keyword itself last), and `reason`; `where` names the schema in the request."""

    def __init__(self, keyword: str, pointer: str, reason: str, where: str = ""):
        super().__init__(f"{where + ': ' if where else ''}the JSON schema keyword {keyword!r} at {pointer} "
                         f"is not supported: {reason}")
        self.keyword, self.pointer, self.reason, self.where = keyword, pointer, reason, where


class Rule(str):
    """The name of a rule already in a `Grammar`; as a schema inside a schema, it stands for itself
    (a tool call's `arguments`, converted from its own document)."""


def to_gbnf(schema, where: str = "") -> str:
    """The GBNF grammar (root rule `root`) of the JSON values that validate against `schema`."""
    g = Grammar()
    return g.text(g.document(schema, where))


class Grammar:
    """Rules named after where they come from, each body written once."""

    def __init__(self):
        self.rules: dict[str, str] = {"space": BASICS["space"]}
        self.names: dict[str, str] = {}       # body -> name
        self.refs: dict[tuple[int, str], str] = {}
        self.pending: dict[tuple[int, str], int] = {}  # refs whose body is being written -> self.depth then
        self.depth = 0                                 # objects and arrays around the schema being written
        self.doc, self.where = None, ""

    def document(self, schema, where: str = "") -> Rule:
        """A rule for the values of `schema`, a document of its own: its `$ref`s point into it."""
        outer = self.doc, self.where
        self.doc, self.where = schema, where
        try:
            return self.value(schema, "")
        except RecursionError:
            raise Refused("(schema)", "/", "the schema is nested too deeply", where) from None
        finally:
            self.doc, self.where = outer

    def text(self, root: str) -> str:
        lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    def add(self, hint: str, body: str) -> Rule:
        if body in self.names:
            return Rule(self.names[body])
        name = self._name(hint)
        self.rules[name] = body
        self.names[body] = name
        return Rule(name)

    def basic(self, name: str) -> Rule:
        """One of BASICS, with the rules it uses."""
        if name not in self.rules:
            self.rules[name] = BASICS[name]
            for dep in set(re.findall(r"[a-z]+", BASICS[name])) & BASICS.keys() - {name}:
                self.basic(dep)
        return Rule(name)

    def _name(self, hint: str) -> str:
        base = "".join(c if c.isascii() and c.isalnum() else "-" for c in hint).strip("-").lower()[:40] or "value"
        base = f"s-{base}"  # never one of BASICS' names
        name, i = base, 1
        while name in self.rules:
            i += 1
            name = f"{base}-{i}"
        return name

    def refuse(self, ptr: str, keyword: str, reason: str):
        raise Refused(keyword, f"{ptr}/{_escape(keyword)}", reason, self.where)

    # schemas

    def value(self, node, ptr: str) -> Rule:
        if isinstance(node, Rule):
            return node
        if node is True or node == {}:
            return self.basic("value")
        if not isinstance(node, dict):
            raise Refused("(schema)", ptr or "/", "a schema is an object (or true)", self.where)
        for key in node:
            if key not in KNOWN:
                self.refuse(ptr, key, WHY.get(key, "this keyword is not in the supported subset"))
        constraints = [k for k in node if k not in ANNOTATIONS]
        if "$ref" in node:
            for k in constraints:
                if k != "$ref":
                    self.refuse(ptr, k, "a $ref's siblings are not supported; put them in the referenced schema")
            return self._ref(node["$ref"], ptr)
        if "anyOf" in node:
            alts = node["anyOf"]
            if not isinstance(alts, list) or not alts:
                self.refuse(ptr, "anyOf", "anyOf is a non-empty list of schemas")
            for k in constraints:
                if k != "anyOf":
                    self.refuse(ptr, k, "keywords beside anyOf are not supported; put them in each alternative")
            rules = [self.value(alt, f"{ptr}/anyOf/{i}") for i, alt in enumerate(alts)]
            return self.add(ptr + "-any", " | ".join(rules))
        types = self._types(node, ptr)
        if "const" in node or "enum" in node:
            return self._constants(node, ptr, types)
        if types is None:
            return self.basic("value")
        rules = [self._typed(t, node, ptr) for t in types]
        return rules[0] if len(rules) == 1 else self.add(ptr + "-types", " | ".join(rules))

    def _types(self, node: dict, ptr: str) -> list[str] | None:
        """The types a value may take: `type`, or those whose keywords the schema uses (a schema
        with none of them, no `type`: any value)."""
        if "type" not in node:
            used = [t for t, keys in BY_TYPE.items() if t != "integer" and keys & set(node)]
            return used or None
        t = node["type"]
        types = t if isinstance(t, list) else [t]
        for name in types:
            if name not in TYPES:
                self.refuse(ptr, "type", f"{name!r} is not a JSON schema type")
        return list(dict.fromkeys(types))

    def _constants(self, node: dict, ptr: str, types) -> Rule:
        for k in node:
            if k not in ANNOTATIONS and k not in ("type", "enum", "const"):
                self.refuse(ptr, k, "constraints beside enum/const are not supported")
        key = "const" if "const" in node else "enum"
        if "enum" in node and not isinstance(node["enum"], list):
            self.refuse(ptr, "enum", "enum is a list")
        values = [node["const"]] if key == "const" else node["enum"]
        if key == "const" and "enum" in node and not any(_same(node["const"], v) for v in node["enum"]):
            self.refuse(ptr, "const", "the const is not among the enum's values")
        kept = [v for v in values if types is None or _json_type(v) in types
                or (_json_type(v) == "integer" and "number" in types)]
        if not kept:
            self.refuse(ptr, key, "no value is allowed (none has the schema's type)")
        body = " | ".join(patterns.literal(json.dumps(v, ensure_ascii=False)) for v in kept)
        return self.add(ptr + "-const", f"({body}) {self.basic('space')}")

    def _ref(self, ref, ptr: str) -> Rule:
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.refuse(ptr, "$ref", "only references into the same schema (#...) are supported")
        target_ptr = unquote(ref[1:])
        key = (id(self.doc), target_ptr)
        if self.pending.get(key) == self.depth:
            self.refuse(ptr, "$ref", f"{ref!r} refers back to itself before any character is written")
        if key not in self.refs:
            node = self.doc
            for part in target_ptr.split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                elif isinstance(node, dict) and part in node:
                    node = node[part]
                else:
                    self.refuse(ptr, "$ref", f"{ref!r} points to nothing in the schema")
            name = self._name(target_ptr or "root-ref")
            self.refs[key] = name
            self.rules[name] = ""  # taken before the body is written: the body may refer to it
            self.pending[key] = self.depth
            self.rules[name] = self.value(node, target_ptr)
            del self.pending[key]
        return Rule(self.refs[key])

    def _typed(self, t: str, node: dict, ptr: str) -> Rule:
        if t in ("boolean", "null"):
            return self.basic(t)
        if t in ("object", "array"):
            self.depth += 1  # what they hold comes after a "{" or "["
            rule = self._object(node, ptr) if t == "object" else self._array(node, ptr)
            self.depth -= 1
            return rule
        if t == "string":
            return self._string(node, ptr)
        return self._number(node, ptr, t == "integer")

    def _object(self, node: dict, ptr: str) -> Rule:
        props = node.get("properties", {})
        required = node.get("required", [])
        extra = node.get("additionalProperties", True)
        if not isinstance(props, dict):
            self.refuse(ptr, "properties", "properties is an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            self.refuse(ptr, "required", "required is a list of names")
        if not props and not required:
            if extra is True and "additionalProperties" not in node:
                return self.basic("object")
            if extra is False:
                return self.add("empty-object", f'"{{" {self.basic("space")} "}}" space')
            values = self.value(extra, f"{ptr}/additionalProperties")
            pair = f'{self.basic("string")} ":" space {values}'
            return self.add(ptr + "-map", f'"{{" space ({pair} ("," space {pair})*)? "}}" space')
        names = list(props) + [r for r in required if r not in props]
        if extra is False and set(required) - set(props):
            self.refuse(ptr, "required", "a required property is not among the properties, "
                                         "and additionalProperties is false")
        pairs = []
        for name in names:  # a required name without a schema is an additional property
            v = (self.value(props[name], f"{ptr}/properties/{_escape(name)}") if name in props
                 else self.value(extra, f"{ptr}/additionalProperties"))
            key = patterns.literal(json.dumps(name, ensure_ascii=False))
            pairs.append(self.add(f"{ptr}-{name}-kv", f'{key} {self.basic("space")} ":" space {v}'))
        # first[i]: properties i.. with none written yet; after[i]: the same after one was
        after, first = [""], [""]
        for i in reversed(range(len(names))):
            rest_after, rest_first = after[0], first[0] or '""'
            if names[i] in required:
                after.insert(0, self.add(f"{ptr}-after-{i}", f'"," space {pairs[i]} {rest_after}'.strip()))
                first.insert(0, self.add(f"{ptr}-from-{i}", f"{pairs[i]} {rest_after}".strip()))
            else:
                after.insert(0, self.add(f"{ptr}-after-{i}", f'("," space {pairs[i]})? {rest_after}'.strip()))
                first.insert(0, self.add(f"{ptr}-from-{i}", f"{pairs[i]} {rest_after} | {rest_first}".replace("  ", " ")))
        return self.add(ptr + "-object", f'"{{" space {first[0]} "}}" space')

    def _array(self, node: dict, ptr: str) -> Rule:
        items = node.get("items", True)
        if isinstance(items, list) or items is False:
            self.refuse(ptr, "items", "items is one schema (tuples, prefixItems, are not supported)")
        low, high = _count(self, node, ptr, "minItems", "maxItems")
        item = self.value(items, f"{ptr}/items")
        sep = f'"," {self.basic("space")} {item}'
        if high == 0:
            body = '"[" space "]" space'
        elif low == 0:
            more = f"({sep})*" if high is None else f"({sep}){{0,{high - 1}}}"
            body = f'"[" space ({item} {more})? "]" space'
        else:
            more = f"({sep}){{{low - 1},}}" if high is None else f"({sep}){{{low - 1},{high - 1}}}"
            body = f'"[" space {item} {more} "]" space'
        return self.add(ptr + "-array", body)

    def _string(self, node: dict, ptr: str) -> Rule:
        low, high = _count(self, node, ptr, "minLength", "maxLength")
        if "format" in node or "pattern" in node:
            key = "format" if "format" in node else "pattern"
            for other in ("pattern", "minLength", "maxLength"):
                if other != key and other in node:
                    self.refuse(ptr, other, f"{other} together with {key} is not supported")
            if key == "format":
                if not isinstance(node["format"], str) or node["format"] not in patterns.FORMATS:
                    self.refuse(ptr, "format", f"the format {node['format']!r} is not supported "
                                               f"(supported: {', '.join(patterns.FORMATS)})")
                inner = patterns.FORMATS[node["format"]]
            else:
                try:
                    inner = patterns.pattern(node["pattern"]) if isinstance(node["pattern"], str) else None
                except patterns.PatternError as e:
                    self.refuse(ptr, "pattern", str(e))
                if inner is None:
                    self.refuse(ptr, "pattern", "a pattern is a string")
            return self.add(f"{ptr}-{key}", f'"\\"" {inner} "\\"" {self.basic("space")}')
        if low == 0 and high is None:
            return self.basic("string")
        self.basic("char")
        count = f"{{{low},}}" if high is None else f"{{{low},{high}}}"
        return self.add(ptr + "-string", f'"\\"" char{count} "\\"" {self.basic("space")}')

    def _number(self, node: dict, ptr: str, integer: bool) -> Rule:
        bounds = [k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in node]
        for k in bounds:
            v = node[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self.refuse(ptr, k, f"{k} is a finite number")
            if not integer and v != int(v):
                self.refuse(ptr, k, "a number's bound must be a whole number (a decimal fraction has no "
                                    "exact double, so a grammar on digits and a validator on doubles disagree)")
            if k.startswith("exclusive") and not integer and abs(v) > numbers.EXACT_EXCLUSIVE:
                self.refuse(ptr, k, f"an exclusive bound on a number is supported up to {numbers.EXACT_EXCLUSIVE:g}")
        if "multipleOf" in node:
            return self._multiple(node, ptr, bounds)
        lo, lo_open = _bound(node, "minimum", "exclusiveMinimum", max)
        hi, hi_open = _bound(node, "maximum", "exclusiveMaximum", min)
        low_key = "minimum" if "minimum" in node else "exclusiveMinimum"
        if integer:
            lo = -numbers.LIMIT if lo is None else max(-numbers.LIMIT, math.floor(lo) + 1 if lo_open else math.ceil(lo))
            hi = numbers.LIMIT if hi is None else min(numbers.LIMIT, math.ceil(hi) - 1 if hi_open else math.floor(hi))
            if lo > hi:
                self.refuse(ptr, low_key, "no integer is in the range")
            return self.add(ptr + "-integer", f"({' | '.join(numbers.integers(lo, hi))}) {self.basic('space')}")
        if not bounds:
            return self.basic("number")
        top = numbers.NUMBER_LIMIT
        lo, lo_open = (-top, False) if lo is None or lo < -top else (int(lo), lo_open)
        hi, hi_open = (top, False) if hi is None or hi > top else (int(hi), hi_open)
        alts = numbers.decimals(lo, lo_open, hi, hi_open)
        if not alts:
            self.refuse(ptr, low_key, f"no number is in the range (numbers are written within ±{top})")
        return self.add(ptr + "-number", f"({' | '.join(alts)}) {self.basic('space')}")

    def _multiple(self, node: dict, ptr: str, bounds: list[str]) -> Rule:
        """Integer multiples of a whole number up to MAX_MULTIPLE, with no range beside it."""
        k = node["multipleOf"]
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0 or not math.isfinite(k):
            self.refuse(ptr, "multipleOf", "multipleOf is a number above 0")
        if k != int(k):
            self.refuse(ptr, "multipleOf", "a multiple of a fraction cannot be followed exactly "
                                           "(the validator divides doubles: 0.07 / 0.01 is not 7)")
        if k > MAX_MULTIPLE:
            self.refuse(ptr, "multipleOf", f"multipleOf is supported up to {MAX_MULTIPLE}")
        if bounds:
            self.refuse(ptr, "multipleOf", f"multipleOf together with {bounds[0]} is not supported")
        if k == 1:
            return self._number({}, ptr, integer=True)
        hint = f"{ptr}-multiple-of-{int(k)}"
        rules = numbers.multiples(int(k), name := self._name(hint))
        while rules.keys() & self.rules.keys():  # its state rules' names are taken
            hint += "-x"
            rules = numbers.multiples(int(k), name := self._name(hint))
        self.rules.update(rules)
        return self.add(ptr + "-multiple", f'("0" | "-"? {name}) {self.basic("space")}')


def _count(g: Grammar, node: dict, ptr: str, low_key: str, high_key: str) -> tuple[int, int | None]:
    for k in (low_key, high_key):
        if k in node and (isinstance(node[k], bool) or not isinstance(node[k], int) or node[k] < 0):
            g.refuse(ptr, k, f"{k} is a non-negative integer")
    low, high = node.get(low_key, 0), node.get(high_key)
    if high is not None and low > high:
        g.refuse(ptr, high_key, f"{high_key} is below {low_key}: nothing is allowed")
    return low, high


def _bound(node: dict, inclusive: str, exclusive: str, tighter) -> tuple[float | None, bool]:
    """The tighter of a bound and its exclusive form: (value, exclusive), or (None, False)."""
    found = [(node[inclusive], False)] if inclusive in node else []
    found += [(node[exclusive], True)] if exclusive in node else []
    if not found:
        return None, False
    value = tighter(v for v, _ in found)
    return value, any(open_ for v, open_ in found if v == value)


def _same(a, b) -> bool:
    """Equal as JSON values (1 and 1.0 are; 1 and true are not)."""
    return a == b and (_json_type(a) == _json_type(b) or {_json_type(a), _json_type(b)} <= {"integer", "number"})


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    if isinstance(v, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), "unknown")


def _escape(part: str) -> str:
    """A JSON pointer's reference token."""
    return str(part).replace("~", "~0").replace("/", "~1")
