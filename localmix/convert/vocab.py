"""The SentencePiece vocabulary, special tokens and chat template, as GGUF metadata.

This follows llama.cpp's `convert_hf_to_gguf.py` (`_create_vocab_sentencepiece`) token for
token, so that our files and its files carry the same vocabulary: pieces, scores and types
from `tokenizer.model`, overrides from `added_tokens.json` and from `tokenizer_config.json`'s
`added_tokens_decoder`, padding up to the model's vocab size. Special token ids, the
`add_bos_token`/`add_eos_token` flags and the chat template come from `gguf.SpecialVocab`, the
same code llama.cpp's converter uses.
"""

from __future__ import annotations

import json
from enum import IntEnum
from pathlib import Path

import gguf

from localmix.errors import InputError


class TokenType(IntEnum):  # llama.cpp's llama_token_type
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


def _looks_special(text: str) -> bool:
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def sentencepiece_vocab(model_dir: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, token types) for the GGUF, `vocab_size` entries long."""
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise InputError(f"no tokenizer.model in {model_dir}: localmix needs the SentencePiece tokenizer")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise InputError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
    n = vocab_size or sp.vocab_size()

    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [TokenType.UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        kind = TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind

    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for text, i in _read_json(added_file).items():
            if i < n:
                tokens[i], scores[i], types[i] = text.encode(), -1000.0, TokenType.USER_DEFINED

    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        for key, data in _read_json(config_file).get("added_tokens_decoder", {}).items():
            i, text = int(key), data["content"]
            if i >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[i] = TokenType.CONTROL
            else:
                text = text.replace("\u2581", " ")  # user-defined tokens hold real spaces
                types[i] = TokenType.USER_DEFINED
            tokens[i], scores[i] = text.encode(), -1000.0

    return tokens, scores, [int(t) for t in types]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int | None) -> None:
    """Write the `tokenizer.*` keys for a SentencePiece (Llama/Mistral) tokenizer."""
    tokens, scores, types = sentencepiece_vocab(model_dir, vocab_size)
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        if (add_prefix_space := _read_json(config_file).get("add_prefix_space")) is not None:
            writer.add_add_space_prefix(add_prefix_space)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)
