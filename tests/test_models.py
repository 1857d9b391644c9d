"""Models by name (localmix/hub.py) against a fake Hugging Face cache, never the network.

The fake cache has huggingface_hub's on-disk layout: models--ORG--NAME/blobs/<sha256>,
snapshots/<commit>/<path> as relative symlinks to the blobs, refs/main holding the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from localmix.errors import InputError, OutputError
from localmix.frontends import hub as models
from localmix.gguf.info import describe

GGUF_REPO = "TheBloke/Tiny-Mixtral-GGUF"
CKPT_REPO = "mistralai/Tiny-Mixtral"
SPLIT = ["split/tiny-mixtral.Q4_0-00001-of-00002.gguf", "split/tiny-mixtral.Q4_0-00002-of-00002.gguf"]


def add_to_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str) -> Path:
    """Lay `files` out as huggingface_hub's download would, at `commit` = refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return root


def _no_network(*args, **kwargs):
    raise AssertionError("a test tried to use the network")


@pytest.fixture
def hub(tmp_path, monkeypatch, converted, tiny_mixtral):
    """A fake cache holding a GGUF repo (two quants, one split model) and a checkpoint repo, offline."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read these at import; point them here too, so nothing can slip past
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)

    gguf = {
        "tiny-mixtral.Q8_0.gguf": converted("mixtral", "Q8_0").read_bytes(),
        "tiny-mixtral.F32.gguf": converted("mixtral", "F32").read_bytes(),
        SPLIT[0]: b"first part " * 100,
        SPLIT[1]: b"second part " * 50,
        "README.md": b"# tiny\n",
    }
    ckpt = {p.name: p.read_bytes() for p in sorted(tiny_mixtral.iterdir()) if p.is_file()}
    assert any(name.endswith(".safetensors") for name in ckpt)
    add_to_cache(cache, GGUF_REPO, gguf, "1" * 40)
    add_to_cache(cache, CKPT_REPO, ckpt, "2" * 40)
    return {"cache": cache, "gguf": gguf, "ckpt": ckpt}


def gguf_path(hub, rel: str) -> Path:
    return hub["cache"] / f"models--{GGUF_REPO.replace('/', '--')}" / "snapshots" / ("1" * 40) / rel


def ckpt_dir(hub) -> Path:
    return hub["cache"] / f"models--{CKPT_REPO.replace('/', '--')}" / "snapshots" / ("2" * 40)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ---- resolve ---------------------------------------------------------------------------------

def test_resolve_by_quant(hub):
    path = models.resolve(f"{GGUF_REPO}:Q8_0")
    assert path == gguf_path(hub, "tiny-mixtral.Q8_0.gguf")
    assert path.is_symlink() and path.read_bytes() == hub["gguf"]["tiny-mixtral.Q8_0.gguf"]
    assert describe(path)["file_type"] == "Q8_0"  # a real GGUF, read through the cache's symlink
    assert models.resolve(f"{GGUF_REPO}:q8_0") == path  # quants are case-insensitive
    assert models.resolve(f"hf.co/{GGUF_REPO}:Q8_0") == path


def test_resolve_by_file_name_and_by_path(hub, converted):
    path = models.resolve(f"{GGUF_REPO}:tiny-mixtral.F32.gguf")
    assert path == gguf_path(hub, "tiny-mixtral.F32.gguf")
    assert models.resolve(str(converted("mixtral", "F32"))) == converted("mixtral", "F32")  # as is
    assert models.resolve(str(path)) == path


def test_resolve_split_gguf_gives_first_part(hub):
    first = gguf_path(hub, SPLIT[0])
    assert models.resolve(f"{GGUF_REPO}:Q4_0") == first
    assert models.resolve(f"{GGUF_REPO}:{SPLIT[1]}") == first
    assert models.resolve(f"{GGUF_REPO}:tiny-mixtral.Q4_0-00002-of-00002.gguf") == first


def test_resolve_checkpoint_gives_snapshot_folder(hub):
    path = models.resolve(CKPT_REPO)
    assert path == ckpt_dir(hub)
    assert (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file()


def test_ambiguous_quant_lists_the_options(hub):
    with pytest.raises(InputError) as e:
        models.resolve(f"{GGUF_REPO}:tiny")
    msg = one_line(e)
    assert "ambiguous" in msg and "tiny-mixtral.Q8_0.gguf" in msg and "tiny-mixtral.F32.gguf" in msg
    with pytest.raises(InputError) as e:  # a GGUF repo named without a quant
        models.resolve(GGUF_REPO)
    assert f"{GGUF_REPO}:QUANT" in one_line(e) and "F32, Q8_0" in str(e.value) and "Q4_0" in str(e.value)


def test_unknown_names_suggest_pull(hub):
    with pytest.raises(InputError) as e:
        models.resolve("nobody/nothing-GGUF:Q4_K_M")
    assert "`localmix pull nobody/nothing-GGUF:Q4_K_M`" in one_line(e)
    with pytest.raises(InputError) as e:  # a known repo, a quant not downloaded
        models.resolve(f"{GGUF_REPO}:Q2_K")
    msg = one_line(e)
    assert f"`localmix pull {GGUF_REPO}:Q2_K`" in msg and "available: Q4_0, F32, Q8_0" in msg
    with pytest.raises(InputError) as e:
        models.resolve("no/such/file.gguf")
    assert "no such file" in one_line(e)


def test_resolve_partly_downloaded_split(hub):
    gguf_path(hub, SPLIT[1]).unlink()
    with pytest.raises(InputError) as e:
        models.resolve(f"{GGUF_REPO}:Q4_0")
    assert "partly downloaded" in one_line(e) and "localmix pull" in str(e.value)


def test_cache_dir_follows_the_environment(hub, monkeypatch, tmp_path):
    assert models.cache_dir() == hub["cache"]
    monkeypatch.delenv("HF_HUB_CACHE")
    assert models.cache_dir() == tmp_path / "hf" / "hub"  # HF_HOME/hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(InputError):  # an empty cache: nothing found, no crash
        models.resolve(f"{GGUF_REPO}:Q8_0")
    assert models.list_models() == []


# ---- list and remove -------------------------------------------------------------------------

def test_list_models(hub):
    entries = {e.name: e for e in models.list_models()}
    g = hub["gguf"]
    assert set(entries) == {f"{GGUF_REPO}:tiny-mixtral.Q8_0.gguf", f"{GGUF_REPO}:tiny-mixtral.F32.gguf",
                            f"{GGUF_REPO}:{SPLIT[0]}", CKPT_REPO}
    q8 = entries[f"{GGUF_REPO}:tiny-mixtral.Q8_0.gguf"]
    assert (q8.kind, q8.size, q8.path) == ("gguf", len(g["tiny-mixtral.Q8_0.gguf"]),
                                           gguf_path(hub, "tiny-mixtral.Q8_0.gguf"))
    assert q8.last_modified > 0
    assert entries[f"{GGUF_REPO}:{SPLIT[0]}"].size == len(g[SPLIT[0]]) + len(g[SPLIT[1]])
    ck = entries[CKPT_REPO]
    assert (ck.kind, ck.size, ck.path) == ("checkpoint", sum(map(len, hub["ckpt"].values())), ckpt_dir(hub))


def test_remove_a_quant(hub):
    q8 = hub["gguf"]["tiny-mixtral.Q8_0.gguf"]
    blob = hub["cache"] / f"models--{GGUF_REPO.replace('/', '--')}" / "blobs" / hashlib.sha256(q8).hexdigest()
    assert blob.exists()
    assert models.remove(f"{GGUF_REPO}:Q8_0") == len(q8)
    assert not blob.exists() and not gguf_path(hub, "tiny-mixtral.Q8_0.gguf").exists()
    with pytest.raises(InputError) as e:
        models.resolve(f"{GGUF_REPO}:Q8_0")
    assert "localmix pull" in one_line(e)
    assert models.resolve(f"{GGUF_REPO}:F32").is_file()  # the other quant stays
    assert f"{GGUF_REPO}:tiny-mixtral.Q8_0.gguf" not in {e.name for e in models.list_models()}


def test_remove_split_and_whole_repo(hub):
    g = hub["gguf"]
    assert models.remove(f"{GGUF_REPO}:Q4_0") == len(g[SPLIT[0]]) + len(g[SPLIT[1]])
    assert not gguf_path(hub, SPLIT[0]).exists() and not gguf_path(hub, SPLIT[1]).exists()

    repo_dir = hub["cache"] / f"models--{CKPT_REPO.replace('/', '--')}"
    assert models.remove(CKPT_REPO) == sum(map(len, hub["ckpt"].values()))
    assert not repo_dir.exists()
    with pytest.raises(InputError) as e:
        models.resolve(CKPT_REPO)
    assert "localmix pull" in one_line(e)
    assert [e.kind for e in models.list_models()] == ["gguf", "gguf"]


def test_remove_unknown(hub):
    with pytest.raises(InputError) as e:
        models.remove("nobody/nothing")
    assert "not in the local cache" in one_line(e)
    with pytest.raises(InputError):
        models.remove(f"{GGUF_REPO}:Q2_K")


# ---- pull, offline ---------------------------------------------------------------------------

def test_pull_offline_returns_what_is_cached(hub):
    assert models.pull(f"{GGUF_REPO}:Q8_0", progress=False) == gguf_path(hub, "tiny-mixtral.Q8_0.gguf")
    assert models.pull(f"{GGUF_REPO}:tiny-mixtral.F32.gguf") == gguf_path(hub, "tiny-mixtral.F32.gguf")
    assert models.pull(f"{GGUF_REPO}:Q4_0") == gguf_path(hub, SPLIT[0])
    assert models.pull(CKPT_REPO) == ckpt_dir(hub)


def test_pull_offline_of_what_is_not_cached(hub):
    with pytest.raises(InputError) as e:
        models.pull("nobody/nothing-GGUF:Q4_K_M")
    assert "HF_HUB_OFFLINE" in one_line(e)
    with pytest.raises(InputError) as e:
        models.pull(f"{GGUF_REPO}:Q2_K")
    assert "no GGUF file matching 'Q2_K'" in one_line(e)
    gguf_path(hub, SPLIT[1]).unlink()  # a part missing: hf_hub_download(local_files_only) says so
    with pytest.raises(InputError) as e:
        models.pull(f"{GGUF_REPO}:Q4_0")
    assert "HF_HUB_OFFLINE" in one_line(e)


# ---- pull, online, with the hub faked --------------------------------------------------------

@pytest.fixture
def online(hub, monkeypatch):
    """Offline mode off, but the hub's API and downloads replaced by fakes; sockets stay blocked."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_download(repo, filename, **kwargs):
        calls.append(("file", repo, filename, kwargs))
        return str(models.cache_dir() / "fake" / filename)

    def fake_snapshot(repo, **kwargs):
        calls.append(("snapshot", repo, kwargs))
        return str(models.cache_dir() / "fake-snapshot")

    monkeypatch.setattr(models, "hf_hub_download", fake_download)
    monkeypatch.setattr(models, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(models, "unreachable", lambda endpoint: None)  # the hub's port "answers"
    return calls


def fake_listing(monkeypatch, files=None, error=None):
    def list_repo_files(self, repo_id, **kwargs):
        if error is not None:
            raise error
        return files
    monkeypatch.setattr(models.HfApi, "list_repo_files", list_repo_files)


BLOKE = [".gitattributes", "README.md", "config.json"] + [
    f"mixtral-8x7b-instruct-v0.1.{q}.gguf" for q in ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0")]


def test_pull_online_picks_files(online, monkeypatch):
    fake_listing(monkeypatch, BLOKE)
    path = models.pull("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M")
    assert path.name == "mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf"
    assert online[-1][2] == "mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf"
    assert online[-1][3]["local_files_only"] is False and online[-1][3]["cache_dir"] == models.cache_dir()
    with pytest.raises(InputError) as e:
        models.pull("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K")
    assert "Q4_K_M.gguf" in one_line(e) and "Q4_K_S.gguf" in str(e.value)
    with pytest.raises(InputError) as e:
        models.pull("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q6_K")
    assert "available: Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q4_K_S, Q5_K_M, Q8_0" in one_line(e)

    fake_listing(monkeypatch, ["README.md"] + [f"Q4_K_M/Mixtral-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)])
    del online[:]
    assert models.pull("unsloth/Mixtral-GGUF:q4_k_m").name == "Mixtral-Q4_K_M-00001-of-00003.gguf"
    assert [c[2] for c in online] == [f"Q4_K_M/Mixtral-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_pull_online_checkpoint_skips_duplicates(online, monkeypatch):
    fake_listing(monkeypatch, [
        ".gitattributes", "README.md", "config.json", "generation_config.json", "consolidated.00.pt",
        "consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "original/params.safetensors"])
    assert models.pull("mistralai/Mixtral-8x7B-Instruct-v0.1") == models.cache_dir() / "fake-snapshot"
    assert online[-1][:2] == ("snapshot", "mistralai/Mixtral-8x7B-Instruct-v0.1")
    kwargs = online[-1][2]
    assert kwargs["allow_patterns"] == [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]


@pytest.mark.parametrize("error, kind, words", [
    ("missing", InputError, "no such model"),
    ("gated", InputError, "is gated"),
    ("connect", OutputError, "cannot download"),
])
def test_pull_online_errors_are_one_line(online, monkeypatch, error, kind, words):
    response = httpx2.Response(404 if error == "missing" else 401,
                               request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))
    exc = {"missing": RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found", response=response),
           "gated": GatedRepoError("401 Client Error.\n\nCannot access gated repo", response=response),
           "connect": httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")}[error]
    fake_listing(monkeypatch, error=exc)
    with pytest.raises(kind) as e:
        models.pull("x/y:Q4_K_M")
    assert words in one_line(e)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_bad_names():
    for spec in ["justaname", "/abs/missing.gguf", "./rel.gguf", "model.gguf", "a/b/c"]:
        with pytest.raises(InputError) as e:
            models.parse_spec(spec)
        one_line(e)
    assert models.parse_spec("a/b") == ("a/b", None)
    assert models.parse_spec("a/b:c.gguf") == ("a/b", "c.gguf")
    assert models.parse_spec("https://huggingface.co/a/b:Q4_K_M") == ("a/b", "Q4_K_M")


def test_run_by_name_offline_from_the_cache(hub):
    """`localmix run REPO:QUANT` works with no network from a pre-filled cache (a real
    subprocess: the environment, not monkeypatching, points it at the cache)."""
    from conftest import run_localmix

    env = dict(os.environ, HF_HOME=os.environ["HF_HOME"], HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1")
    r = run_localmix("run", f"{GGUF_REPO}:Q8_0", "hello", "--max-tokens", "4", "--seed", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    listed = run_localmix("ls", "--json", env=env)
    assert f"{GGUF_REPO}:tiny-mixtral.Q8_0.gguf" in {m["name"] for m in json.loads(listed.stdout)}
