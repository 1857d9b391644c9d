"""The math: llama.cpp running our GGUF computes what transformers computes on the checkpoint.

transformers' MixtralForCausalLM / MistralForCausalLM in float32 on CPU is the independent
oracle; llama.cpp (through llama-cpp-python) is the independent reader of our files.
"""

import numpy as np
import pytest
from conftest import load_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "[INST] Erkläre mir bitte, wie ein Mischmodell aus Experten funktioniert. [/INST]",
    "Le routeur choisit deux experts pour chaque jeton, puis combine leurs sorties.",
    "¿Cuántos expertos elige el enrutador para cada token? Dos de ocho.",
    "Il modello linguistico genera il testo una parola alla volta, come un fiume.",
    "The quick brown fox jumps over the lazy dog while the router picks two experts.",
]

# About 600 tokens of varied text for the divergence measurements.
LONG_TEXT = "\n".join(PROMPTS * 2) + "\n" + """
def route(x, gate, k=2):
    logits = x @ gate.T
    top = np.argsort(-logits)[:k]
    return top, softmax(logits[top])
""" + " ".join(f"Satz {i}: phrase {i}, frase {i}, sentence {i}." for i in range(40))


@pytest.fixture(scope="module")
def sp(tiny_mixtral):
    from sentencepiece import SentencePieceProcessor
    return SentencePieceProcessor(model_file=str(tiny_mixtral / "tokenizer.model"))


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("model", ["mixtral", "mistral"])
def test_f32_logits_and_greedy_tokens_match_transformers(model, request, converted, sp):
    src = request.getfixturevalue(f"tiny_{model}")
    hf = hf_model(src)
    llm = load_llama(converted(model, "F32"))
    for prompt in PROMPTS:
        ids = [1] + sp.encode(prompt)
        want, got = hf_logits(hf, ids), llama_logits(llm, ids)
        assert got.shape == want.shape == (len(ids), 32000)
        err = np.abs(got - want).max()
        assert err < 1e-3, f"{prompt!r}: max |llama.cpp - transformers| = {err}"
        assert want.std() > 1.0  # the logits are far from flat: a wrong layout cannot hide

    ids = [1] + sp.encode(PROMPTS[0])
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert llama_greedy(llm, ids, 32) == gen
    assert len(set(gen)) > 4  # a real continuation, not one token repeated


# What each format loses against float32, averaged over 1024 positions: the weights' rounding,
# which the file fixes, and the activations' (llama.cpp rounds them to F16/BF16/Q8_0 too),
# which the CPU moves only by the roundings float noise decides otherwise (see test_native).
# Measured on an AVX-512 EPYC: F16 1.4e-6, BF16 1.5e-3, Q8_0 5.6e-3; with llama.cpp built for
# AVX2 and torch on its AVX2 kernels: 1.3e-6, 1.65e-3 (no vdpbf16ps), 5.6e-3. Random weights and
# peaked logits magnify rounding; real models sit ~10x lower.
@pytest.mark.parametrize("file_type,bound", [("F16", 1e-5), ("BF16", 5e-3), ("Q8_0", 1.5e-2)])
def test_kl_divergence_of_lower_precision_files(file_type, bound, tiny_mixtral, converted, sp):
    hf = hf_model(tiny_mixtral)
    llm = load_llama(converted("mixtral", file_type), n_ctx=1024)
    ids = [1] + sp.encode(LONG_TEXT)
    assert len(ids) >= 512
    ids = ids[:1024]
    p_log, q_log = log_softmax(hf_logits(hf, ids)), log_softmax(llama_logits(llm, ids))
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    top1 = (p_log.argmax(-1) == q_log.argmax(-1)).mean()
    print(f"\n{file_type}: mean KL(transformers f32 || llama.cpp {file_type}) over {len(ids)} positions = "
          f"{kl.mean():.3g} (max {kl.max():.3g}), top-1 agreement {top1:.1%}")
    assert kl.mean() < bound
    assert top1 > 0.9
