"""Prompt tokens for every Mistral tokenizer and for other templates, through both engines'
tokenizers: mistral-common's v1, v2 and v3 encoders token for token; a ChatML file whose
markers are control tokens; raw continuation; replies that end at any end-of-generation token
and never print a control token."""

import json

import numpy as np
import pytest
from conftest import run_localmix
from gguf import GGUFReader

from localmix.convert.pipeline import convert
from localmix.fixtures.tiny import TinySpec, make_tiny_checkpoint
from localmix.runtime.llama import LlamaCppEngine
from localmix.runtime.prompt import chat_tokens, prompt_format
from localmix.runtime.vocab import open_vocab

CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "Hello, how are you?"}],
    "system-several-turns": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is a mixture of experts?"},
        {"role": "assistant", "content": "A model that routes each token to a few experts."},
        {"role": "user", "content": "How many per token?"},
        {"role": "assistant", "content": "Two, out of eight.  "},
        {"role": "user", "content": "Thanks."},
    ],
    "markers-as-text": [
        {"role": "system", "content": "Explain <s> and </s>."},
        {"role": "user", "content": "Why does [INST] end with [/INST]? And </s>, <s>?"},
        {"role": "assistant", "content": "[INST] opens a turn </s> ends one <s> begins."},
        {"role": "user", "content": "<s>[INST] again [/INST]</s>"},
    ],
    "only-system": [{"role": "system", "content": "Be brief."}],
    "non-ascii": [
        {"role": "system", "content": "Antworte auf Deutsch. Größe, Straße."},
        {"role": "user", "content": "Où est la bibliothèque ? 👩‍💻🇫🇷 ☕"},
    ],
}


def mistral_common_tokens(version: str, messages) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return getattr(MistralTokenizer, version)().encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def mistral_files(tmp_path_factory, converted):
    """A GGUF per mistral-common tokenizer: v1 (Mixtral 8x7B), v2, v3 (the tiny 8x22B)."""
    base = tmp_path_factory.mktemp("v2")
    v2 = make_tiny_checkpoint(base / "tiny-v2", TinySpec(tokenizer="v2", vocab_size=32768, num_hidden_layers=1,
                                                          n_shards=1))
    return {"v1": converted("mixtral", "Q8_0"), "v2": convert(v2, base / "v2.gguf", "Q8_0").path,
            "v3": converted("mixtral-8x22b", "Q8_0")}


@pytest.fixture(scope="module")
def vocabs(mistral_files):
    """(version, engine) -> a vocabulary: the llama.cpp engine's (the loaded model's) and the
    native engine's (vocab_only, as NativeEngine opens it)."""
    out = {}
    for version, path in mistral_files.items():
        engine = LlamaCppEngine(path, n_ctx=256)
        out[version, "llama.cpp"] = (engine.vocab, engine.metadata)
        v = open_vocab(path)
        out[version, "native"] = (v, v.metadata())
    return out


@pytest.mark.parametrize("engine", ["llama.cpp", "native"])
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_tokens_equal_mistral_common(name, version, engine, vocabs):
    vocab, metadata = vocabs[version, engine]
    messages = CONVERSATIONS[name]
    got = chat_tokens(vocab, metadata, messages)
    assert got == mistral_common_tokens(version, messages)
    assert got.count(vocab.token_bos()) == 1


@pytest.mark.parametrize("version,kind", [("v1", "mistral-v1"), ("v2", "mistral-v2"), ("v3", "mistral-v2")])
def test_format_is_read_from_the_file(version, kind, vocabs):
    vocab, metadata = vocabs[version, "native"]
    assert prompt_format(vocab, metadata.get("tokenizer.chat_template")) == kind
    if version != "v1":  # a v2/v3 file needs no template to be recognised
        assert prompt_format(vocab, None) == "mistral-v2"
        assert vocab.special_id("[INST]") == 3 and vocab.special_id("[/INST]") == 4


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_special_id_asks_the_tokenizer_and_agrees_with_the_full_scan(version, mistral_files):
    """special_id looks a control token up by tokenizing its text (a quick start); the scan of
    every token's attributes is the reference: the same id for each control token, None for text."""
    asked, scanned = open_vocab(mistral_files[version]), open_vocab(mistral_files[version])
    assert scanned.specials  # every file has at least <s> and </s>
    for text, token in scanned.specials.items():
        assert asked.special_id(text) == token, text
    for text in ("[INST]", "[/INST]", "hello", "<s>x", ""):
        assert asked.special_id(text) == scanned.specials.get(text), text
    assert "specials" not in asked.__dict__


def test_v3_hello_is_nine_tokens_with_inst_as_control_tokens(vocabs):
    """The issue's report: 14 tokens ("[INST]" as "▁[", "INST", "]") where mistral-common has 9."""
    vocab, metadata = vocabs["v3", "llama.cpp"]
    got = chat_tokens(vocab, metadata, CONVERSATIONS["one-turn"])
    assert len(got) == 9 and got[:2] == [1, 3] and got[-1] == 4


# ---- a ChatML file: markers that are control tokens, a turn that ends with <|im_end|> ----

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
IM_START, IM_END = 32000, 32001
PROMPT = "Say something about <|im_end|> and <|im_start|>."


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """The tiny Mixtral with <|im_start|>/<|im_end|> added as control tokens and a ChatML
    template; EOS stays </s>. Its head is rewired so that greedy decoding soon picks <|im_end|>:
    row <|im_end|> of output.weight becomes 2x the row of a token the reply would otherwise
    produce (so <|im_end|> wins exactly where that token would)."""
    base = tmp_path_factory.mktemp("chatml")
    src = make_tiny_checkpoint(base / "tiny-chatml", vocab_size=32002)
    config = json.loads((src / "tokenizer_config.json").read_text())
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"].update({str(IM_START): {"content": "<|im_start|>", **special},
                                           str(IM_END): {"content": "<|im_end|>", **special}})
    config["chat_template"] = CHATML
    (src / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    path = convert(src, base / "chatml-F32.gguf", "F32").path
    engine = LlamaCppEngine(path, n_ctx=256)
    tokens = chat_tokens(engine.vocab, engine.metadata, [{"role": "user", "content": PROMPT}])
    reply = [e.token for e in engine.generate(tokens, _greedy(8)) if hasattr(e, "token")]
    del engine
    target = reply[3]  # the 4th reply token: <|im_end|> takes its place (or comes earlier)
    head = next(t for t in GGUFReader(path, "r+").tensors if t.name == "output.weight")
    head.data[IM_END] = 2 * head.data[target]
    head.data.flush()
    return path


def _greedy(n):
    from localmix.runtime.stream import Sampling

    return Sampling(temperature=0.0, max_tokens=n, repeat_penalty=1.0)


def test_chatml_markers_are_one_token_each_and_typed_ones_stay_text(chatml):
    vocab = open_vocab(chatml)
    assert prompt_format(vocab, vocab.metadata()["tokenizer.chat_template"]) == "template"
    assert IM_END in vocab.eog and vocab.token_eos() == 2
    tokens = chat_tokens(vocab, vocab.metadata(), [{"role": "system", "content": "Be kind."},
                                                   {"role": "user", "content": PROMPT}])
    assert tokens.count(IM_START) == 3 and tokens.count(IM_END) == 2  # system, user, the assistant's start
    assert tokens[0] == vocab.token_bos() and tokens.count(vocab.token_bos()) == 1
    # the prompt as llama.cpp tokenizes the rendered text, except that the typed markers stay text
    rendered = ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n" + PROMPT
                + "<|im_end|>\n<|im_start|>assistant\n")
    parsed = vocab.tokenize(rendered.encode(), add_bos=True, special=True)
    assert parsed.count(IM_END) == 3 and len(parsed) < len(tokens)
    text = lambda s: vocab.tokenize(s.encode(), special=False)  # noqa: E731
    assert tokens == [1, IM_START, *text("system\nBe kind."), IM_END, *text("\n"), IM_START,
                      *text("user\n" + PROMPT), IM_END, *text("\n"), IM_START, *text("assistant\n")]


@pytest.mark.parametrize("engine", ["llama.cpp", "native"])
def test_run_stops_at_im_end_and_prints_no_marker(engine, chatml):
    # what llama.cpp's greedy decoding gives, up to the first <|im_end|>
    llm = LlamaCppEngine(chatml, n_ctx=256)
    tokens = chat_tokens(llm.vocab, llm.metadata, [{"role": "user", "content": PROMPT}])
    stream = llm.llm.generate(tokens, temp=0.0, repeat_penalty=1.0, top_k=1)
    want = []
    for t in stream:
        if t == IM_END or len(want) > 16:
            break
        want.append(t)
    assert len(want) <= 3, "the rewired head should end the turn within four tokens"
    expected = llm.vocab.detokenize(want).decode().strip()
    for flag in ([], ["--json"]):
        r = run_localmix("run", chatml, PROMPT, "--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "12",
                         "--ctx", "256", "--engine", engine, *flag)
        assert r.returncode == 0, r.stderr
        assert "<|im" not in r.stdout and r.stderr == ""
        if flag:
            out = json.loads(r.stdout)
            assert out["finish_reason"] == "eos" and out["completion_tokens"] == len(want)
            assert out["text"].strip() == expected and out["prompt_tokens"] == len(tokens)
        else:
            assert r.stdout.strip() == expected


def test_a_control_token_is_never_printed(chatml):
    """A control token that is not an end of turn (<|im_start|>) shows as nothing."""
    from localmix.runtime.stream import Piece, Sampling, reply_events

    vocab = open_vocab(chatml)
    text_ids = vocab.tokenize(b"Hello world", special=False)
    stream = iter([*text_ids[:1], IM_START, *text_ids[1:], IM_END, *text_ids])
    events = list(reply_events(stream, vocab.piece, vocab.eog, 5, 5, 256, Sampling(max_tokens=50)))
    assert "".join(e.text for e in events if isinstance(e, Piece)) == "Hello world"
    assert events[-1].reason == "eos" and events[-1].generated_tokens == len(text_ids) + 1


# ---- raw continuation ----

def test_run_raw_sends_bos_and_the_text(converted):
    path = converted("mixtral", "Q8_0")
    vocab = open_vocab(path)
    text = "The quick brown fox [INST] jumps"
    want = [vocab.token_bos()] + vocab.tokenize(text.encode(), special=False)
    assert chat_tokens(vocab, vocab.metadata(), [{"role": "user", "content": text}], raw=True) == want
    r = run_localmix("run", path, text, "--raw", "--json", "--max-tokens", "3", "--ctx", "256", "--temperature", "0")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] == len(want)


def test_a_file_without_template_or_mistral_markers_defaults_to_raw(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "tiny-base", num_hidden_layers=1, n_shards=1)
    config = json.loads((src / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    path = convert(src, tmp_path / "base.gguf", "Q8_0").path
    vocab = open_vocab(path)
    assert "tokenizer.chat_template" not in vocab.metadata()
    assert prompt_format(vocab, None) == "raw"
    text = "Once upon a time"
    assert chat_tokens(vocab, vocab.metadata(), [{"role": "user", "content": text}]) == \
        [1] + vocab.tokenize(text.encode(), special=False)
    r = run_localmix("run", path, text, "--json", "--max-tokens", "2", "--ctx", "128", "--temperature", "0")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] == 1 + len(vocab.tokenize(text.encode(), special=False))


def test_eog_holds_every_end_of_generation_token(chatml, converted):
    import llama_cpp

    vocab = open_vocab(chatml)
    marked = [t for t in range(vocab.n_tokens) if llama_cpp.llama_vocab_is_eog(vocab.model.vocab, t)]
    assert sorted(vocab.eog) == marked and {2, IM_END} <= vocab.eog
    assert open_vocab(converted("mixtral", "Q8_0")).eog == {2}
    assert np.all([vocab.piece(t) == b"" for t in (IM_START, IM_END, 1, 2)])
