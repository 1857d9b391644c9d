"""`localmix demo`, the README's first command, in a pipe: checkpoint, GGUF, summary, a reply."""

from conftest import run_localmix


def test_demo_runs_end_to_end(tmp_path):
    r = run_localmix("demo", "--dir", tmp_path, "--tokens", "8", input="")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "tiny-mixtral" / "config.json").exists()
    assert (tmp_path / "tiny-mixtral-Q4_K_M.gguf").read_bytes()[:4] == b"GGUF"
    out = r.stdout
    assert "Q4_K_M" in out and "random" in out
    assert out.rstrip().splitlines()[-1].strip()  # the model's reply closes the demo
