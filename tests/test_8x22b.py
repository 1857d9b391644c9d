"""Mixtral 8x22B end to end, on a tiny checkpoint of its design (TinySpec.mixtral_8x22b: the v3
tokenizer with [INST]/[/INST] as control tokens, 32768 pieces, 64K context, the Instruct kind
of template). The F32 file equals llama.cpp's converter's (test_convert_golden.py's
"mixtral8x22b-f32" case); here: llama.cpp's logits on it equal transformers', its K-quant mixes
equal llama_model_quantize's bytes, `info` names it, and `run` chats with mistral-common's v3 prompt."""

import json

import numpy as np
import pytest
from conftest import load_llama, run_localmix
from gguf import GGUFReader
from test_prompt import mistral_common_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is a mixture of experts?"},
        {"role": "assistant", "content": "Several feed-forward networks, two chosen per token."},
        {"role": "user", "content": "Why [INST] and </s> here?"}]


def test_metadata_is_8x22b_design(converted):
    r = GGUFReader(converted("mixtral-8x22b", "F32"))
    value = lambda key: r.fields[key].contents()  # noqa: E731
    assert value("llama.context_length") == 65536 and value("llama.vocab_size") == 32768
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 32768
    assert value("llama.expert_count") == 8 and value("llama.expert_used_count") == 2
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert [tokens[i] for i in range(3, 10)] == ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
    assert all(types[i] == 3 for i in range(1, 10))  # control tokens


def test_llama_cpp_logits_match_transformers(tiny_8x22b, converted):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_8x22b, dtype=torch.float32).eval()
    llm = load_llama(converted("mixtral-8x22b", "F32"))
    ids = mistral_common_tokens("v3", CHAT)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    assert got.shape == want.shape == (len(ids), 32768)
    err = np.abs(got - want).max()
    assert err < 1e-3, f"max |llama.cpp - transformers| = {err}"
    assert want.std() > 1.0


def _tensors(path):
    return {t.name: (t.tensor_type.name, tuple(t.shape), np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def _kv(path):
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("file_type", ["Q3_K_M", "Q4_K_M"])
def test_mixes_equal_llama_model_quantize(file_type, converted, quantized_by_llama):
    ours, theirs = converted("mixtral-8x22b", file_type), quantized_by_llama("mixtral-8x22b", file_type)
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    for name in b:
        assert a[name] == b[name], name
    assert _kv(ours) == _kv(theirs)


def test_info_names_the_v3_format(converted):
    r = run_localmix("info", converted("mixtral-8x22b", "Q8_0"))
    assert r.returncode == 0, r.stderr
    for expected in ("32768 tokens", "65536", "Mistral v2/v3: [INST] as control tokens", "experts per token"):
        assert expected in r.stdout, expected
    info = json.loads(run_localmix("info", converted("mixtral", "Q8_0"), "--json").stdout)
    assert info["chat_template"]["mistral_version"] == "v1"


@pytest.mark.parametrize("engine", ["llama.cpp", "native"])
def test_run_sends_mistral_commons_v3_prompt(engine, converted):
    path = converted("mixtral-8x22b", "Q4_K_M")
    r = run_localmix("run", path, "Hello, how are you?", "--json", "--max-tokens", "4", "--temperature", "0",
                     "--ctx", "256", "--engine", engine)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == len(mistral_common_tokens("v3", [{"role": "user", "content": "Hello, how are you?"}])) == 9
    assert out["completion_tokens"] >= 1
