"""The prompt we build from the GGUF's chat template is, token for token, what Mistral's own
tokenizer (mistral-common, v1 instruct tokenizer for Mixtral-8x7B-Instruct) builds; the
template runs sandboxed and its errors are one clean line."""

import gguf
import pytest
from conftest import load_llama

from localmix.errors import InputError
from localmix.fixtures.tiny import MIXTRAL_CHAT_TEMPLATE
from localmix.runtime.prompt import chat_tokens
from localmix.runtime.template import (
    prompt_tokens,
    render,
    template_from_gguf,
    template_from_metadata,
)

BOS = 1

CONVERSATIONS = {
    "system-two-turns": [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "What is a mixture of experts?"},
        {"role": "assistant", "content": "A model that routes each token to a few expert networks."},
        {"role": "user", "content": "How many experts does Mixtral use per token?"},
    ],
    "one-turn": [{"role": "user", "content": "Hello, who are you?"}],
    "system-one-turn": [
        {"role": "system", "content": "Always answer in French."},
        {"role": "user", "content": "Good morning!"},
    ],
    "non-ascii": [
        {"role": "system", "content": "Antworte auf Deutsch, bitte. Größe, Straße, Übermut."},
        {"role": "user", "content": "Où est la bibliothèque ? C'est à côté du café."},
        {"role": "assistant", "content": "Sie ist gleich um die Ecke 🤖🚀✨ — près de l'hôpital."},
        {"role": "user", "content": "Merci ! 👩‍💻🇫🇷🇩🇪 ☕"},
    ],
}


@pytest.fixture(scope="module")
def gguf_path(converted):
    return converted("mixtral", "Q8_0")


@pytest.fixture(scope="module")
def llm(gguf_path):
    return load_llama(gguf_path, vocab_only=True)


@pytest.fixture(scope="module")
def vocab(gguf_path):
    from localmix.runtime.vocab import open_vocab

    return open_vocab(gguf_path)


def conversation_tokens(messages, vocab):
    return chat_tokens(vocab, {"tokenizer.chat_template": MIXTRAL_CHAT_TEMPLATE}, messages)


def mistral_common_tokens(messages) -> list[int]:
    pytest.importorskip("mistral_common")  # a test extra: skips locally, fails under CI
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return MistralTokenizer.v1().encode_chat_completion(request).tokens


def test_template_read_from_the_gguf(gguf_path, llm):
    assert template_from_gguf(gguf_path) == MIXTRAL_CHAT_TEMPLATE
    assert template_from_metadata(llm.metadata) == MIXTRAL_CHAT_TEMPLATE


def test_no_template_in_the_file(tmp_path):
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert template_from_gguf(path) is None
    assert template_from_metadata({}) is None


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_tokens_match_mistral_common(name, gguf_path, llm):
    messages = CONVERSATIONS[name]
    text = render(messages, template_from_gguf(gguf_path))
    ids = prompt_tokens(llm.tokenize, text, llm.token_bos())
    assert ids == mistral_common_tokens(messages)
    assert ids[0] == BOS and ids.count(BOS) == 1


def test_the_raw_template_would_glue_the_reply_to_inst(llm):
    """Why `render` puts a space before replies for this template: rendered verbatim it gives
    "[/INST]A…", whose first reply token is 'A' where mistral-common has '▁A'."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A reply"},
                {"role": "user", "content": "Again"}]
    raw = ImmutableSandboxedEnvironment().from_string(MIXTRAL_CHAT_TEMPLATE).render(
        messages=messages, bos_token="<s>", eos_token="</s>")
    assert "[/INST]A reply</s>" in raw
    assert prompt_tokens(llm.tokenize, raw, BOS) != mistral_common_tokens(messages)
    assert render(messages, MIXTRAL_CHAT_TEMPLATE) == raw.replace("[/INST]A", "[/INST] A")


def test_special_token_text_in_a_message_stays_text(llm, vocab):
    """A user typing "</s>" must not end the turn: only the template's BOS/EOS are control tokens."""
    messages = [{"role": "user", "content": "what does </s> mean in <s> HTML?"}]
    got = conversation_tokens(messages, vocab)
    assert got == mistral_common_tokens(messages)
    assert got.count(BOS) == 1 and llm.token_eos() not in got


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_conversation_tokens_equal_mistral_common(name, vocab):
    messages = CONVERSATIONS[name]
    assert conversation_tokens(messages, vocab) == mistral_common_tokens(messages)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_built_in_format_equals_the_gguf_template(name, gguf_path):
    messages = CONVERSATIONS[name]
    assert render(messages, None) == render(messages, template_from_gguf(gguf_path))


def test_system_prompt_goes_into_the_first_user_turn():
    text = render(CONVERSATIONS["system-two-turns"], MIXTRAL_CHAT_TEMPLATE)
    assert text == ("<s>[INST] You are a terse assistant. Answer in one sentence.\n\nWhat is a mixture of experts? [/INST]"
                    " A model that routes each token to a few expert networks.</s>"
                    "[INST] How many experts does Mixtral use per token? [/INST]")


def test_only_a_system_prompt_is_not_dropped(llm):
    messages = [{"role": "system", "content": "Be brief."}]
    text = render(messages, MIXTRAL_CHAT_TEMPLATE)
    assert text == "<s>[INST] Be brief.\n\n [/INST]"
    assert prompt_tokens(llm.tokenize, text, BOS) == mistral_common_tokens(messages)


def test_a_template_with_a_system_role_gets_the_system_message():
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert render(CONVERSATIONS["system-one-turn"], template) == "<system>Always answer in French.<user>Good morning!"


def test_a_template_that_drops_the_system_message_gets_it_folded():
    template = "{% for m in messages if m.role != 'system' %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert render(CONVERSATIONS["system-one-turn"], template) == "<user>Always answer in French.\n\nGood morning!"


def test_non_ascii_survives(gguf_path, llm):
    messages = CONVERSATIONS["non-ascii"]
    text = render(messages, template_from_gguf(gguf_path))
    for m in messages:
        assert m["content"] in text
    ids = prompt_tokens(llm.tokenize, text, BOS)
    decoded = llm.detokenize(ids, special=True).decode("utf-8")
    for m in messages:
        assert m["content"] in decoded


def test_one_bos_whatever_the_tokenizer_is_asked(llm):
    text = render(CONVERSATIONS["one-turn"], MIXTRAL_CHAT_TEMPLATE)
    want = prompt_tokens(llm.tokenize, text, BOS)
    assert want.count(BOS) == 1
    assert prompt_tokens(llm.tokenize, "<s>" + text, BOS) == want  # a doubled BOS is collapsed
    assert prompt_tokens(llm.tokenize, text.removeprefix("<s>"), BOS) == want  # a missing one is added
    assert llm.tokenize(text.encode(), add_bos=True, special=True)[:2] == [BOS, BOS]  # the trap avoided


def test_the_callers_messages_are_not_changed():
    messages = [dict(m) for m in CONVERSATIONS["system-two-turns"]]
    before = [dict(m) for m in messages]
    render(messages, MIXTRAL_CHAT_TEMPLATE)
    render(messages, None)
    assert messages == before


@pytest.mark.parametrize("template", [MIXTRAL_CHAT_TEMPLATE, None])
@pytest.mark.parametrize("roles", [("user", "user"), ("assistant", "user"), ("user", "assistant", "assistant")])
def test_roles_must_alternate(template, roles):
    with pytest.raises(InputError, match="roles must alternate"):
        render([{"role": r, "content": "x"} for r in roles], template)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}",
    "{{ lipsum.__globals__['os'].getcwd() }}",
])
def test_a_malicious_template_cannot_reach_python(template):
    with pytest.raises(InputError, match="^chat template") as e:
        render(CONVERSATIONS["one-turn"], template)
    assert "\n" not in str(e.value)


def test_private_attributes_render_as_nothing():
    assert render(CONVERSATIONS["one-turn"], "[{{ ''.__class__ }}]") == "[]"


def test_a_template_that_raises_gives_its_message():
    with pytest.raises(InputError, match="chat template: this model needs a tool list"):
        render(CONVERSATIONS["one-turn"], "{{ raise_exception('this model needs a tool list') }}")


def test_a_template_with_a_syntax_error():
    with pytest.raises(InputError, match="syntax error on line 1"):
        render(CONVERSATIONS["one-turn"], "{% for m in messages %}{{ m.content }}")


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], ["hello"]])
def test_malformed_messages(messages):
    with pytest.raises(InputError):
        render(messages, MIXTRAL_CHAT_TEMPLATE)
