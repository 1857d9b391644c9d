"""grammar.py alone, no server: for each keyword it enforces, llama.cpp's grammar (its own
parser and sampler, on the tiny Mixtral's vocabulary) accepts JSON texts that validate and
rejects ones that do not; each keyword it refuses is named with its JSON pointer.

A text is fed to llama.cpp's grammar sampler one byte token (`<0xHH>`) at a time: it is
accepted when every byte is allowed and then the end of the text (EOS) is."""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import json
import math
import re
import uuid

import jsonschema
import llama_cpp as L
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localmix.frontends.server.grammar import Grammar, Refused, to_gbnf
from localmix.runtime.vocab import open_vocab


class Checker:
    """Whether llama.cpp's grammar sampler lets a text through, byte by byte."""

    def __init__(self, path):
        self.vocab = open_vocab(path)
        self.ptr = self.vocab.model.vocab
        self.byte = {}
        for t in range(self.vocab.n_tokens):
            m = re.fullmatch(r"<0x([0-9A-F]{2})>", self.vocab.model.token_get_text(t))
            if m:
                self.byte[int(m[1], 16)] = t
        assert len(self.byte) == 256
        self.eos = self.vocab.token_eos()

    def accepts(self, grammar: str, text: str) -> bool:
        g = L.llama_sampler_init_grammar(self.ptr, grammar.encode(), b"root")
        assert g, f"llama.cpp could not parse the grammar:\n{grammar}"
        try:
            for b in text.encode():
                if not self._allowed(g, self.byte[b]):
                    return False
                L.llama_sampler_accept(g, self.byte[b])
            return self._allowed(g, self.eos)
        finally:
            L.llama_sampler_free(g)

    def parses(self, grammar: str) -> bool:
        g = L.llama_sampler_init_grammar(self.ptr, grammar.encode(), b"root")
        if g:
            L.llama_sampler_free(g)
        return bool(g)

    def _allowed(self, g, token: int) -> bool:
        data = (L.llama_token_data * 1)(L.llama_token_data(token, 0.0, 0.0))
        arr = L.llama_token_data_array(data, 1, -1, False)
        L.llama_sampler_apply(g, ctypes.byref(arr))
        return math.isfinite(data[0].logit)


@pytest.fixture(scope="module")
def check(converted):
    return Checker(converted("mixtral", "Q8_0"))


def both(check, schema, good: list, bad: list) -> None:
    """Every text in `good` validates and the grammar accepts it; every one in `bad` neither."""
    g = to_gbnf(schema)
    for text in good:
        jsonschema.validate(json.loads(text), schema)
        assert check.accepts(g, text), (text, g)
    for text in bad:
        assert check.accepts(g, text) is False, (text, g)


def test_types_and_literals(check):
    both(check, {"type": "string"}, ['"a b"', '"\\"é\\u00e9\\n"', '""'], ['"a', "1", '"\x01"', '"\\ud800"'])
    both(check, {"type": "integer"}, ["0", "-12", "9999999999999999"], ["1.5", "01", "-0", '"1"', "1e3"])
    both(check, {"type": "number"}, ["0", "-1.25", "3e10", "1.5E-3"], ["01", ".5", "1.", "NaN"])
    both(check, {"type": "boolean"}, ["true", "false"], ["1", '"true"'])
    both(check, {"type": "null"}, ["null"], ["0", '""'])
    both(check, {"type": ["string", "null"], "maxLength": 2}, ['"ab"', "null"], ['"abc"', "1"])
    both(check, {}, ['{"a": [1, "x", null]}', "3"], ["{", "nul"])


def test_enum_const_anyof(check):
    both(check, {"enum": ["red", 1, None, {"a": [True]}]}, ['"red"', "1", "null", '{"a": [true]}'], ['"blue"', "2"])
    both(check, {"type": "string", "enum": ["a", 1]}, ['"a"'], ["1"])
    both(check, {"const": "x\"y"}, ['"x\\"y"'], ['"x"'])
    both(check, {"const": "a", "enum": ["a", "b"], "type": "string"}, ['"a"'], ['"b"'])
    both(check, {"anyOf": [{"type": "integer", "maximum": 0}, {"type": "string", "maxLength": 1}]},
         ['-3', '"a"'], ["3", '"ab"'])


def test_objects(check):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"},
                                               "c/d": {"type": "null"}, "ünï": {"type": "integer"}},
              "required": ["b"], "additionalProperties": False}
    both(check, schema, ['{"b": true}', '{"a": 1, "b": false}', '{"b": true, "c/d": null}',
                         '{"a": 1, "b": true, "c/d": null, "ünï": 3}'],
         ["{}", '{"a": 1}', '{"b": true, "x": 1}', '{"b": true,}', '{"b": 1}', '{, "b": true}'])
    both(check, {"type": "object", "properties": {"a": {"type": "integer"}}}, ["{}", '{"a": 2}'], ['{"a": "x"}'])
    both(check, {"type": "object", "additionalProperties": {"type": "integer"}}, ['{"x": 1, "y": 2}', "{}"],
         ['{"x": "1"}'])
    both(check, {"type": "object", "additionalProperties": False}, ["{}"], ['{"x": 1}'])
    both(check, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "z"],
                 "additionalProperties": {"type": "boolean"}}, ['{"a": 1, "z": true}'], ['{"a": 1, "z": 1}'])


def test_arrays(check):
    both(check, {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
         ["[1, 2]", "[1,2,3]"], ["[]", "[1]", "[1, 2, 3, 4]", '[1, "a"]'])
    both(check, {"type": "array", "items": {"type": "boolean"}, "maxItems": 1}, ["[]", "[true]"], ["[true, false]"])
    both(check, {"type": "array", "minItems": 1}, ['[1, "a", {}]'], ["[]"])
    both(check, {"type": "array", "maxItems": 0}, ["[]"], ["[1]"])


def test_string_lengths(check):
    both(check, {"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"abc"', '"\\u00e9\\n"', '"éé"'],
         ['"a"', '"abcd"', '""'])
    both(check, {"type": "string", "minLength": 1}, ['"a"', '"' + "x" * 40 + '"'], ['""'])


def test_patterns(check):
    both(check, {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, ['"AB-123"'], ['"ab-123"', '"AB-12"', '"AB-1234"'])
    both(check, {"type": "string", "pattern": "^(cat|dog)s?$"}, ['"cat"', '"dogs"'], ['"cow"', '"cats!"'])
    both(check, {"type": "string", "pattern": "b+c"}, ['"bbc"', '"abc d"'], ['"ac"'])   # unanchored: re.search
    both(check, {"type": "string", "pattern": '^a"\\\\[^x\\d]\\.$'}, ['"a\\"\\\\y."'], ['"a\\"\\\\x."', '"a\\"\\\\1."'])
    both(check, {"type": "string", "pattern": "^\\w+@\\S+$|^none$"}, ['"a_1@b.c"', '"none"'], ['"a b@c"', '"nonex"'])


FORMAT_CHECKS = {
    "date-time": lambda s: datetime.datetime.fromisoformat(s),
    "time": lambda s: datetime.time.fromisoformat(s),
    "date": lambda s: datetime.date.fromisoformat(s),
    "duration": lambda s: re.fullmatch(r"P(\d+W|(\d+Y)?(\d+M)?(\d+D)?(T(\d+H)?(\d+M)?(\d+S)?)?)", s) and s[-1] != "P"
    and s[-1] != "T",
    "email": lambda s: re.fullmatch(r"[^@\s]+@[A-Za-z0-9.-]+", s),
    "hostname": lambda s: re.fullmatch(r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]"
                                       r"([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", s),
    "ipv4": lambda s: ipaddress.IPv4Address(s),
    "ipv6": lambda s: ipaddress.IPv6Address(s),
    "uuid": lambda s: uuid.UUID(s),
}


@pytest.mark.parametrize("fmt, good, bad", [
    ("date-time", ["2024-02-28T23:59:59Z", "1999-12-31T00:00:00.123+05:30"], ["2024-02-30T00:00:00Z", "2024-01-01"]),
    ("time", ["12:30:00Z", "23:59:59.5-01:00"], ["24:00:00Z", "12:30"]),
    ("date", ["2024-04-30", "1000-01-01"], ["2024-04-31", "2024-02-29", "0999-01-01", "2024-13-01"]),
    ("duration", ["P3Y6M4DT12H30M5S", "P4W", "PT5M", "P1D"], ["P", "PT", "P1H", "3Y"]),
    ("email", ["a.b+c@example.com"], ["a@b", "@example.com", "a b@example.com"]),
    ("hostname", ["example.com", "a-1.b2.example", "localhost"], ["-a.com", "a..com", "a.1"]),
    ("ipv4", ["192.168.0.1", "0.0.0.0", "255.255.255.255"], ["256.1.1.1", "01.1.1.1", "1.1.1"]),
    ("ipv6", ["2001:db8:0:0:0:0:2:1"], ["2001:db8::1:2:3:4:5:6:7", "1:2:3"]),
    ("uuid", ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456"]),
])
def test_formats(check, fmt, good, bad):
    for s in good:
        assert FORMAT_CHECKS[fmt](s), s
    both(check, {"type": "string", "format": fmt}, [json.dumps(s) for s in good], [json.dumps(s) for s in bad])


bounds = st.one_of(st.none(), st.integers(-130, 130))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(lo=bounds, hi=bounds, lo_open=st.booleans(), hi_open=st.booleans(), integer=st.booleans(),
       tries=st.lists(st.one_of(st.integers(-200, 200), st.decimals(-200, 200, places=3).map(str).map(float)),
                      min_size=8, max_size=8))
def test_ranges_accept_exactly_the_numbers_in_range(check, lo, hi, lo_open, hi_open, integer, tries):
    """minimum/maximum/exclusive*: on integers and numbers, a number is accepted iff it is in range."""
    schema = {"type": "integer" if integer else "number"}
    if lo is not None:
        schema["exclusiveMinimum" if lo_open else "minimum"] = lo
    if hi is not None:
        schema["exclusiveMaximum" if hi_open else "maximum"] = hi
    try:
        g = to_gbnf(schema)
    except Refused:
        assert not jsonschema.Draft202012Validator(schema).is_valid(0) and lo is not None and hi is not None
        return
    for x in tries + [lo, hi, (lo or 0) + 0.5, (hi or 0) - 0.5]:
        if x is None:
            continue
        text = json.dumps(int(x) if x == int(x) else x)
        valid = jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
        assert check.accepts(g, text) == valid, (schema, text)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(k=st.integers(1, 40), tries=st.lists(st.integers(-2000, 2000), min_size=8, max_size=8))
def test_multiple_of_accepts_exactly_the_multiples(check, k, tries):
    for schema in ({"type": "integer", "multipleOf": k}, {"type": "number", "multipleOf": float(k)}):
        g = to_gbnf(schema)
        for x in tries + [0, k, -k, 7 * k, k + 1]:
            assert check.accepts(g, str(x)) == (x % k == 0), (schema, x)
        assert not check.accepts(g, "-0") and not check.accepts(g, f"0{k}")


def test_references_and_recursion(check):
    tree = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0},
                                                               "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                        "maxItems": 2}},
                               "required": ["v"], "additionalProperties": False}},
            "$ref": "#/$defs/node"}
    both(check, tree, ['{"v": 1}', '{"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}, {"v": 4}]}'],
         ['{"v": -1}', '{"v": 1, "kids": [{"v": -2}]}', '{"v": 1, "kids": [{}]}'])
    linked = {"type": "object", "properties": {"x": {"type": "boolean"}, "next": {"anyOf": [{"$ref": "#"},
                                                                                          {"type": "null"}]}},
              "required": ["x", "next"], "additionalProperties": False}
    both(check, linked, ['{"x": true, "next": {"x": false, "next": null}}'], ['{"x": true, "next": {"x": 1, "next": null}}'])
    both(check, {"definitions": {"a~b": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/definitions/a~0b"}},
         ["[1, 2]"], ['["x"]'])


def test_tool_arguments_are_documents_of_their_own(check):
    """A tool's `#/$defs/...` points into its own parameters, inside the call grammar around them."""
    params = {"$defs": {"c": {"enum": ["Paris", "Lyon"]}}, "type": "object",
              "properties": {"city": {"$ref": "#/$defs/c"}}, "required": ["city"], "additionalProperties": False}
    g = Grammar()
    arguments = g.document(params, where="tools[0].function.parameters")
    text = g.text(g.document({"type": "object", "properties": {"name": {"const": "weather"}, "arguments": arguments},
                              "required": ["name", "arguments"], "additionalProperties": False}))
    assert check.accepts(text, '{"name": "weather", "arguments": {"city": "Lyon"}}')
    assert not check.accepts(text, '{"name": "weather", "arguments": {"city": "Rome"}}')


@pytest.mark.parametrize("schema, keyword, pointer", [
    ({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 5, "minimum": 0}}}, "multipleOf",
     "/properties/age/multipleOf"),
    ({"type": "number", "multipleOf": 0.01}, "multipleOf", "/multipleOf"),
    ({"type": "number", "minimum": 0.5}, "minimum", "/minimum"),
    ({"type": "number", "exclusiveMaximum": 1e12}, "exclusiveMaximum", "/exclusiveMaximum"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf", "/oneOf"),
    ({"allOf": [{"type": "string"}]}, "allOf", "/allOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems", "/uniqueItems"),
    ({"type": "array", "prefixItems": [{"type": "string"}]}, "prefixItems", "/prefixItems"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", "/patternProperties"),
    ({"type": "object", "minProperties": 1}, "minProperties", "/minProperties"),
    ({"type": "string", "format": "uri"}, "format", "/format"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "pattern", "/pattern"),
    ({"type": "string", "pattern": "^a", "maxLength": 3}, "maxLength", "/maxLength"),
    ({"type": "string", "enum": ["a"], "maxLength": 3}, "maxLength", "/maxLength"),
    ({"$ref": "https://example.com/s.json"}, "$ref", "/$ref"),
    ({"$defs": {"x": {"not": {}}}, "$ref": "#/$defs/x"}, "not", "/$defs/x/not"),
    ({"anyOf": [{"type": "string"}, {"type": "integer", "if": {}}]}, "if", "/anyOf/1/if"),
    ({"$ref": "#"}, "$ref", "/$ref"),
    ({"const": 1, "enum": [True, "1"]}, "const", "/const"),
    ({"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#"}}}, "$ref", "/anyOf/1/$ref"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum", "/minimum"),
])
def test_refused_keywords_name_themselves_and_their_place(schema, keyword, pointer):
    with pytest.raises(Refused) as e:
        to_gbnf(schema, where="response_format")
    assert (e.value.keyword, e.value.pointer) == (keyword, pointer)
    assert f"'{keyword}' at {pointer}" in str(e.value) and str(e.value).startswith("response_format: ")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(-3, 3, allow_nan=False), st.text(max_size=6),
              st.sampled_from(["string", "integer", "number", "object", "array", "null", "#", "#/$defs/a", "^a+$",
                               "date", "uri"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["type", "properties", "items", "required", "enum", "const", "anyOf", "$ref",
                                         "$defs", "a", "minimum", "exclusiveMaximum", "maxLength", "minItems",
                                         "pattern", "format", "additionalProperties", "multipleOf", "title"]),
                        inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(schema=json_values)
def test_any_json_is_a_grammar_llama_cpp_reads_or_a_refusal(check, schema):
    """Whatever a client sends as a schema: a grammar llama.cpp parses, or `Refused`, nothing else."""
    try:
        g = to_gbnf(schema)
    except Refused as e:
        assert e.pointer.startswith("/") and e.keyword
        return
    assert check.parses(g), (schema, g)


def test_deep_nesting_is_refused():
    deep = {"type": "string"}
    for _ in range(2000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(Refused, match="nested too deeply"):
        to_gbnf(deep)


PATTERNS = ["^[A-Z]{2}-\\d{3}$", "^(cat|dog)s?$", "b+c", "^a[^b-d\\d]{2,3}(x|y)*?\\.$", "^\\w+@\\S+$|^none$",
            "^(ab){0,2}c{2,}$", "^[\\s\\W]x\\D$", "^(?:a|b(c|d))+$", "\\Aq\\Z", "^$", "x$", "^.?.$", '^["\\\\]+$']
ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(index=st.integers(0, len(PATTERNS) - 1), data=st.data())
def test_pattern_grammar_against_python_re(check, index, data):
    """Strings the pattern matches (printable ASCII) are accepted, and any string accepted matches."""
    regex = PATTERNS[index]
    g = to_gbnf({"type": "string", "pattern": regex})
    good = data.draw(st.from_regex(regex, fullmatch=regex.startswith(("^", "\\A")) and regex.endswith(("$", "\\Z")),
                                   alphabet=ASCII if '"' in regex else st.characters(
                                       min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\')))
    if regex.startswith("^") or regex.startswith("\\A"):
        assert check.accepts(g, json.dumps(good)), (regex, good)
    for s in data.draw(st.lists(st.text(ASCII, max_size=6), min_size=5, max_size=5)) + [good + "!", "x" + good]:
        if check.accepts(g, json.dumps(s)):
            assert re.search(regex, s), (regex, s)
