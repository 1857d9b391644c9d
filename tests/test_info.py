"""`localmix info` reads any GGUF and tells a user what is in it."""

import json

from conftest import run_localmix


def test_info_text(converted):
    r = run_localmix("info", converted("mixtral", "Q8_0"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for expected in ("llama", "Q8_0", "experts per token", "23.01M total", "18.29M active", "[INST] format",
                     "Q8_0 ×16", "F32 ×7", "32000 tokens"):
        assert expected in out, expected


def test_info_json(converted):
    r = run_localmix("info", converted("mistral", "F16"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["file_type"] == "F16"
    assert info["hyperparameters"]["block_count"] == 2
    assert "expert_count" not in info["hyperparameters"]
    assert info["parameters"]["experts"] == 0
    assert info["parameters"]["total"] == info["parameters"]["active_per_token"] == 17499392
    assert info["tokenizer"]["bos_token_id"] == 1 and info["tokenizer"]["eos_token_id"] == 2
    assert info["chat_template"]["text"].startswith("{{ bos_token }}")


def test_info_sizes_split_experts_from_the_rest(converted):
    info = json.loads(run_localmix("info", converted("mixtral", "F32"), "--json").stdout)
    # 2 layers x 3 stacked tensors x 8 experts x 256 x 512 weights, 4 bytes each
    assert info["bytes"]["experts"] == 2 * 3 * 8 * 256 * 512 * 4
    assert info["parameters"]["active_per_token"] == info["parameters"]["other"] + info["parameters"]["experts"] // 4


def test_info_on_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    r = run_localmix("info", bad)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "is not a GGUF file" in r.stderr
