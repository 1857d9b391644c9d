"""llama.cpp, reading the vocabulary from our GGUF, tokenizes exactly as SentencePiece does
with tokenizer.model, and detokenizes back to the text."""

import ctypes

import pytest
from conftest import load_llama

CORPUS = [
    "Hello world",
    "Wie geht es dir? Ich hoffe, gut. Größe, Straße, Übermut.",
    "Où est la bibliothèque ? C'est à côté de l'hôpital, près du café.",
    "¿Dónde está la estación? Mañana, señor, a las once y media.",
    "Perché la città è così bella? Perché è antica, e più viva.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot",
    "Emoji: 🤖🚀✨ and 👩‍💻, flags 🇫🇷🇩🇪, a ☕ break.",
    "runs   of    spaces     and\ttabs\t\there",
    "newlines\n\n\nand\r\nwindows\n  indented\n",
    "[INST] What is a mixture of experts? [/INST] A sparse model.</s>[INST] More? [/INST]",
    "漢字とひらがな、中文字符，한국어도.",
    "Numbers 1234567890 3.14159 1e-6 0x1F",
    "  leading spaces and trailing spaces  ",
    "x",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_mixtral, converted):
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor(model_file=str(tiny_mixtral / "tokenizer.model"))
    llm = load_llama(converted("mixtral", "Q8_0"), vocab_only=True)
    return sp, llm


@pytest.mark.parametrize("text", CORPUS)
def test_llama_cpp_tokenizes_like_sentencepiece(text, tokenizers):
    sp, llm = tokenizers
    want = sp.encode(text)
    got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert got == want


def llama_detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's own llama_detokenize (llama-cpp-python's wrapper keeps the SentencePiece
    word-start space of the first piece, which llama.cpp itself strips)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(16 * len(ids) + 16)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, len(buf), False, False)
    assert n >= 0
    return buf.raw[:n].decode("utf-8")


@pytest.mark.parametrize("text", CORPUS)
def test_detokenization_round_trips(text, tokenizers):
    sp, llm = tokenizers
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert llama_detokenize(llm, ids) == sp.decode(ids) == text


def test_bos_and_vocab(tokenizers):
    sp, llm = tokenizers
    assert llm.n_vocab() == sp.vocab_size() == 32000
    assert llm.token_bos() == sp.bos_id() == 1 and llm.token_eos() == sp.eos_id() == 2
    assert llm.tokenize(b"Hello", add_bos=True)[0] == 1
