"""A GGUF's vocabulary as llama.cpp reads it, for both engines: tokenizing, the pieces a reply
shows, which tokens end a turn, which are control tokens.

`Vocab` wraps llama-cpp-python's `LlamaModel` (a loaded model's, or one opened with
`vocab_only`, no weights): SentencePiece, byte-level BPE or any other tokenizer llama.cpp
knows, tokenized by llama.cpp's own code. What it adds:
- `eog`: every end-of-generation token (`llama_vocab_is_eog`: EOS, EOT, ChatML's `<|im_end|>`,
  ...), where a reply stops;
- `specials`: the text of every control token, longest first, so that a chat template's own
  markers can be found in its output (`prompt.py`);
- `piece(token)`: the bytes a token shows, empty for control tokens, which are never printed.
"""

from __future__ import annotations

import ctypes
import re
from functools import cached_property
from pathlib import Path

from localmix.errors import InputError


class Vocab:
    def __init__(self, model, owner=None):
        import llama_cpp

        self.model = model  # llama_cpp._internals.LlamaModel
        self._owner = owner  # the `Llama` that frees `model` when collected: kept alive with us
        self._cpp = llama_cpp

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        """llama.cpp's tokenization of `text` (bytes; `special` parses control tokens' text)."""
        return self.model.tokenize(text, add_bos, special) if text or add_bos else []

    def detokenize(self, tokens: list[int]) -> bytes:
        """The text of `tokens`, control tokens left out."""
        return self.model.detokenize(tokens, special=False)

    def piece(self, token: int, special: bool = False) -> bytes:
        """What one generated token shows: nothing for a control token, unless `special`
        (then its text, as log-probabilities name the tokens)."""
        if not special and self.is_control(token):
            return b""
        size = 64
        while True:
            buf = (ctypes.c_char * size)()
            n = self._cpp.llama_token_to_piece(self.model.vocab, token, buf, size, 0, special)
            if n >= 0:
                return bytes(buf[:n])
            size = -n  # llama.cpp says how much room the piece needs

    def token_bos(self) -> int:
        return self.model.token_bos()

    def token_eos(self) -> int:
        return self.model.token_eos()

    @property
    def add_bos(self) -> bool:
        """Whether the model wants a BOS in front of its input (`tokenizer.ggml.add_bos_token`,
        or llama.cpp's default for the tokenizer type)."""
        return bool(self.model.add_bos_token()) and self.token_bos() >= 0

    @property
    def n_tokens(self) -> int:
        return self.model.n_vocab()

    def is_control(self, token: int) -> bool:
        return bool(self.model.token_get_attr(token) & self._cpp.LLAMA_TOKEN_ATTR_CONTROL)

    @cached_property
    def eog(self) -> frozenset[int]:
        """Every token that ends a turn, as llama.cpp marks them."""
        v = self.model.vocab
        return frozenset(t for t in range(self.n_tokens) if self._cpp.llama_vocab_is_eog(v, t))

    @cached_property
    def specials(self) -> dict[str, int]:
        """{text: id} of the control tokens, longest text first."""
        found = {}
        for t in range(self.n_tokens):
            if self.is_control(t):
                text = self.model.token_get_text(t)
                if text:
                    found.setdefault(text, t)
        return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))

    @cached_property
    def specials_pattern(self) -> re.Pattern | None:
        """A regex for the control tokens' texts, longest first, as llama.cpp matches them."""
        return re.compile("|".join(map(re.escape, self.specials))) if self.specials else None

    def special_id(self, text: str) -> int | None:
        """The id of the control token whose text is `text`, or None. Asked as llama.cpp's
        tokenizer would match it (one token, parsing specials), not by scanning every token's
        attributes, which a one-shot `run` would pay for on each start."""
        if "specials" in self.__dict__:
            return self.specials.get(text)
        ids = self.model.tokenize(text.encode(), False, True)
        if len(ids) == 1 and self.is_control(ids[0]) and self.model.token_get_text(ids[0]) == text:
            return ids[0]
        return None

    def metadata(self) -> dict[str, str]:
        return self.model.metadata()


def open_vocab(path: str | Path) -> Vocab:
    """The vocabulary of the GGUF at `path`, without its weights."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from localmix.runtime.log import set_llama_log

    set_llama_log(None)  # quiet unless an engine was opened with verbose
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        return Vocab(LlamaModel(path_model=str(path), params=params, verbose=False))
    except ValueError as e:
        raise InputError(f"llama.cpp could not read the vocabulary of {path}: {e}") from None
