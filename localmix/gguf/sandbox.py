"""The Jinja2 sandbox chat templates run in, set up as Hugging Face's transformers sets up its own.

`environment()` is the one environment: no attribute starting with `_`, no mutation of the
messages, blocks trimmed, the loop controls (`break`, `continue`), `raise_exception(message)`
(raises `TemplateRaised`) and a non-escaping `tojson`. It lives with the GGUF reader so that
the checker (`gguf.meaning`) compiles a file's template exactly as the runtime
(`runtime.template`) will run it.
"""

from __future__ import annotations

import json
from functools import lru_cache

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateRaised(Exception):
    """What the template's `raise_exception(message)` raises."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env
