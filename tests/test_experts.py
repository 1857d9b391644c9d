"""experts.route records the router's choices: the same as transformers' router picks."""

import json

import numpy as np
import pytest

from localmix.errors import InputError
from localmix.native.experts import render, route

PROMPT = "[INST] Le routeur choisit deux experts pour chaque jeton, puis combine leurs sorties. [/INST]"


@pytest.fixture(scope="module")
def ids(tiny_mixtral):
    from sentencepiece import SentencePieceProcessor
    return [1] + SentencePieceProcessor(model_file=str(tiny_mixtral / "tokenizer.model")).encode(PROMPT)


@pytest.fixture(scope="module")
def routing(converted, ids):
    return route(converted("mixtral", "F32"), ids)


def test_choices_are_transformers_top2(routing, ids, tiny_mixtral):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    assert routing.experts.shape == (len(ids), 2, 2)
    for il, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits.reshape(len(ids), -1).float(), -1)
        top = torch.topk(probs, 2, dim=-1)
        assert routing.experts[:, il].tolist() == top.indices.tolist()
        want = (top.values / top.values.sum(-1, keepdim=True)).numpy()
        assert np.abs(routing.weights[:, il] - want).max() < 1e-5


def test_counts_json_and_render(routing, ids):
    counts = routing.counts()
    assert counts.shape == (2, 8) and (counts.sum(1) == 2 * len(ids)).all()
    assert abs(routing.token_share().sum() - 2.0) < 1e-9  # each token picks two experts
    data = json.loads(json.dumps(routing.to_json()))
    assert data["counts"] == counts.tolist() and len(data["tokens"]) == len(ids)
    assert data["tokens"][3]["experts"] == routing.experts[3].tolist()
    from rich.console import Console
    console = Console(record=True, width=100, color_system="truecolor")
    console.print(render(routing))
    text = console.export_text()
    assert "E7" in text and "tokens" in text and "%" in text


def test_dense_model_and_empty_prompt_are_clear_errors(converted):
    with pytest.raises(InputError, match="dense"):
        route(converted("mistral", "F32"), [1, 2, 3])
    with pytest.raises(InputError, match="empty"):
        route(converted("mixtral", "F32"), [])
