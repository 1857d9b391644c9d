"""Models by name: download, find, list and remove them in Hugging Face's own cache.

A model is named `ORG/NAME[:QUANT_OR_FILE]`:
  TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M      the .gguf file whose name holds the quant
  TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf   that file
  mistralai/Mixtral-8x7B-Instruct-v0.1                 a safetensors checkpoint (the snapshot folder)

Files live where `huggingface_hub` keeps them (HF_HUB_CACHE, else HF_HOME/hub), so a model
downloaded by any Hugging Face tool is found here, and the reverse. The cache folder is read
from the environment at each call, not at import. `pull` is the only function that may use
the network, and not when HF_HUB_OFFLINE is set; `resolve`, `list_models` and `remove` read
the disk only. A GGUF split in parts (`-00001-of-00003.gguf`) is one model: all parts are
pulled and removed together, and its path is the first part's (as llama.cpp expects).

Cache layout relied on (huggingface_hub `file_download.py`, `utils/_cache_manager.py`):
  <cache>/models--ORG--NAME/blobs/<etag>                 the bytes
  <cache>/models--ORG--NAME/snapshots/<commit>/<path>    relative symlinks to the blobs
  <cache>/models--ORG--NAME/refs/main                    the commit `main` pointed to
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import disable_progress_bars

from localmix.errors import InputError, OutputError

try:  # the HTTP client huggingface_hub uses; its transport errors are not OSErrors
    from httpx2 import HTTPError as _HTTPError
except ImportError:  # pragma: no cover
    _HTTPError = OSError

SPEC = re.compile(r"^(?:https?://)?(?:hf\.co/|huggingface\.co/)?([\w.-]+/[\w.-]+?)(?::(.+))?$")
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})(\.gguf)$", re.IGNORECASE)
QUANT = re.compile(r"(?<![a-z0-9])(i?q\d+(?:_[a-z0-9]+)*|tq\d_\d|bf16|f16|f32|mxfp4(?:_moe)?)(?![a-z0-9])",
                   re.IGNORECASE)
CHECKPOINT_FILES = ["*.safetensors", "*.json", "tokenizer.model"]  # no .bin/.pt twins of the weights


@dataclass
class ModelEntry:
    name: str             # "repo:file" for a GGUF, "repo" for a checkpoint
    kind: str             # "gguf" | "checkpoint"
    size: int             # bytes on disk (all parts of a split GGUF)
    path: Path            # the file (first part) or the checkpoint's snapshot folder
    last_modified: float  # seconds since the epoch, newest blob


# ---- where the cache is, and whether we may go online ----------------------------------------

def cache_dir() -> Path:
    """The hub cache folder, from the environment as it is now (as huggingface_hub/constants.py)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in {"1", "ON", "YES", "TRUE"} or constants.is_offline_mode()


# ---- names -----------------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str | None]:
    """'ORG/NAME[:QUANT_OR_FILE]' -> (repo, selector or None)."""
    m = SPEC.match(spec.strip())
    if m is None or spec.startswith(("/", "./", "../", "~")) or (":" not in spec and spec.lower().endswith(".gguf")):
        raise InputError(f"{spec}: no such file, and not a model name (ORG/NAME or ORG/NAME:QUANT)")
    return m.group(1), m.group(2) or None


def _quant(path: str) -> str | None:
    found = QUANT.findall(SPLIT.sub(r"\3", path.rsplit("/", 1)[-1]))
    return found[-1].upper() if found else None


def _gguf_models(files: list[str]) -> dict[str, list[str]]:
    """Group .gguf paths into models: {first part's path: every part's path, in order}."""
    models: dict[str, list[str]] = {}
    for f in sorted(files):
        if not f.lower().endswith(".gguf"):
            continue
        m = SPLIT.search(f)
        if m is None:
            models[f] = [f]
            continue
        n = int(m.group(2))
        parts = [f"{f[:m.start()]}-{i:05d}-of-{n:05d}{m.group(3)}" for i in range(1, n + 1)]
        models.setdefault(parts[0], parts)
    return models


def _options(models: list[str]) -> str:
    quants = [_quant(m) for m in models]
    if None not in quants and len(set(quants)) == len(quants):
        return ", ".join(quants)
    return ", ".join(models)


def choose(repo: str, sel: str | None, files: list[str], where: str, hint: str = "") -> tuple[str, list[str]]:
    """Which of `files` (repo-relative paths) the name means: ("gguf", parts) or ("checkpoint", files).

    `where` says where `files` came from, `hint` is added to a "no such model" error.
    """
    models = _gguf_models(files)
    name = f"{repo}:{sel}" if sel else repo
    if sel is None:
        weights = checkpoint_files(files)
        if weights:
            return "checkpoint", weights
        if len(models) == 1:
            return "gguf", next(iter(models.values()))
        if not models:
            raise InputError(f"{repo} holds no .gguf file and no safetensors checkpoint {where}{hint}")
        raise InputError(f"{repo} holds several GGUF files {where}; name one as {repo}:QUANT, "
                         f"QUANT one of: {_options(list(models))}")

    # an exact file: a path in the repo, or a file name
    for f in files:
        if sel in (f, f.rsplit("/", 1)[-1]):
            return "gguf", next((parts for parts in models.values() if f in parts), [f])

    # a quant: the one GGUF model whose name holds it; a whole-token match wins over a substring
    found = [m for m in models if sel.lower() in m.lower()]
    if len(found) > 1:
        token = re.compile(rf"(?<![a-z0-9]){re.escape(sel)}(?![a-z0-9])", re.IGNORECASE)
        found = [m for m in found if token.search(m)] or found
    if len(found) == 1:
        return "gguf", models[found[0]]
    if found:
        raise InputError(f"{name} is ambiguous: it matches {', '.join(found)}; name one of these files instead")
    available = f"; available: {_options(list(models))}" if models else " (it holds no .gguf files)"
    raise InputError(f"{repo} has no GGUF file matching {sel!r} {where}{available}{hint}")


def checkpoint_files(files: list[str]) -> list[str]:
    """The files of a safetensors checkpoint at the top of the repo: weights, JSON configs, tokenizer."""
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if f.endswith(".safetensors")]
    if any(f.startswith("model") for f in weights):  # Mistral repos also hold consolidated.safetensors
        weights = [f for f in weights if not f.startswith("consolidated")]
    if not weights:
        return []
    configs = [f for f in top if f.endswith(".json") and not f.endswith(".bin.index.json")]
    return sorted(weights + configs + (["tokenizer.model"] if "tokenizer.model" in top else []))


# ---- the local cache -------------------------------------------------------------------------

def _scan():
    try:
        return scan_cache_dir(cache_dir())
    except CacheNotFound:
        return None
    except ValueError:  # the path is a file
        raise InputError(f"the Hugging Face cache {cache_dir()} is not a folder (see HF_HUB_CACHE)") from None


def _find_repo(info, repo: str):
    repos = [r for r in (info.repos if info else ()) if r.repo_type == "model"]
    return next((r for r in repos if r.repo_id == repo), None) or \
        next((r for r in repos if r.repo_id.lower() == repo.lower()), None)


def _rel(revision, file) -> str:
    return file.file_path.relative_to(revision.snapshot_path).as_posix()


def _cached(repo_info) -> dict[str, tuple]:
    """{repo-relative path: (revision, CachedFileInfo)} over all cached revisions; `main` wins,
    then the newest (quants pulled at different commits still all count)."""
    out: dict[str, tuple] = {}
    for rev in sorted(repo_info.revisions, key=lambda r: ("main" in r.refs, r.last_modified)):
        for f in rev.files:
            out[_rel(rev, f)] = (rev, f)
    return out


def _checkpoint_revision(repo_info):
    revs = [r for r in repo_info.revisions if checkpoint_files([_rel(r, f) for f in r.files])]
    return max(revs, key=lambda r: ("main" in r.refs, r.last_modified), default=None)


def resolve(name_or_path: str) -> Path:
    """A path that exists, as is; otherwise a model name found in the local cache (never online)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    repo, sel = parse_spec(name_or_path)
    hint = f"; run `localmix pull {name_or_path}`"
    repo_info = _find_repo(_scan(), repo)
    cached = _cached(repo_info) if repo_info else {}
    if not cached:
        raise InputError(f"{name_or_path} is not downloaded{hint}")
    kind, parts = choose(repo, sel, list(cached), "in the local cache", hint)
    if kind == "checkpoint":
        return _checkpoint_revision(repo_info).snapshot_path
    missing = [p for p in parts if p not in cached]
    if missing:
        raise InputError(f"{name_or_path} is only partly downloaded ({len(missing)} of {len(parts)} parts "
                         f"missing){hint}")
    return cached[parts[0]][1].file_path


def list_models() -> list[ModelEntry]:
    """Every GGUF model and safetensors checkpoint in the cache, by name."""
    info = _scan()
    entries = []
    for repo_info in sorted(info.repos if info else (), key=lambda r: r.repo_id.lower()):
        if repo_info.repo_type != "model":
            continue
        cached = _cached(repo_info)
        for first, parts in _gguf_models(list(cached)).items():
            found = [cached[p][1] for p in parts if p in cached]
            entries.append(ModelEntry(f"{repo_info.repo_id}:{first}", "gguf", sum(f.size_on_disk for f in found),
                                      found[0].file_path, max(f.blob_last_modified for f in found)))
        rev = _checkpoint_revision(repo_info)
        if rev is not None:
            wanted = set(checkpoint_files([_rel(rev, f) for f in rev.files]))
            blobs = {f.blob_path: f for f in rev.files if _rel(rev, f) in wanted}
            entries.append(ModelEntry(repo_info.repo_id, "checkpoint", sum(f.size_on_disk for f in blobs.values()),
                                      rev.snapshot_path, max(f.blob_last_modified for f in blobs.values())))
    return entries


def remove(spec: str) -> int:
    """Delete a cached model (`repo:quant`, `repo:file`) or a whole repo (`repo`); the bytes freed."""
    repo, sel = parse_spec(spec)
    info = _scan()
    repo_info = _find_repo(info, repo)
    if repo_info is None:
        raise InputError(f"{spec} is not in the local cache; `localmix list` shows what is")
    everything = [f for rev in repo_info.revisions for f in rev.files]
    if sel is None:
        strategy = info.delete_revisions(*(rev.commit_hash for rev in repo_info.revisions))
    else:
        _, parts = choose(repo, sel, list(_cached(repo_info)), "in the local cache")
        files = [f for rev in repo_info.revisions for f in rev.files if _rel(rev, f) in parts]
        if len(files) == len(everything):  # the last model of the repo: remove the repo folder too
            strategy = info.delete_revisions(*(rev.commit_hash for rev in repo_info.revisions))
        else:
            strategy = info.delete_files(*files)
    try:
        strategy.execute()
    except OSError as e:
        raise OutputError(f"cannot remove {spec}: {e}") from None
    return strategy.expected_freed_size


# ---- downloads -------------------------------------------------------------------------------

PROBE_SECONDS = 3.0  # for the hub's name to resolve, and again for its port to answer


def unreachable(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why the hub at `endpoint` cannot be reached, in a few words, or None when its port
    answers: a name that does not resolve and a refused connection are not worth the client's
    five retries (25 s). Behind a proxy (HTTPS_PROXY, ...) the proxy decides: None."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                        "all_proxy")):
        return None
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    found: dict = {}

    def lookup():  # getaddrinfo has no timeout of its own
        try:
            found["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            found["error"] = e

    resolver = threading.Thread(target=lookup, daemon=True)
    resolver.start()
    resolver.join(timeout)
    if "addresses" not in found:
        return f"{host} does not resolve" if "error" in found else f"{host} did not resolve in {timeout:.0f} s"
    error: OSError | None = None
    for family, kind, proto, _, address in found["addresses"][:3]:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout)
                s.connect(address)
                return None
        except OSError as e:
            error = e
    if isinstance(error, ConnectionRefusedError):
        return f"{host}:{port} refused the connection"
    return f"{host}:{port} does not answer ({getattr(error, 'strerror', None) or error})"


class _RetryLine(logging.Filter):
    """huggingface_hub's retry warnings ("'...' thrown while requesting GET URL", "Retrying in
    8s [Retry 4/5].") as one status line on stderr, rewritten in place on a terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "thrown while requesting" in text:
            return False
        if text.startswith(("Retrying in", "Rate limited")):
            end = "\r" if sys.stderr.isatty() else "\n"
            sys.stderr.write(f"localmix: the download stalled; {text[0].lower()}{text[1:].rstrip('.')}{end}")
            sys.stderr.flush()
            return False
        return True


@contextlib.contextmanager
def _retries_as_one_line():
    hub_log, quiet = logging.getLogger("huggingface_hub"), _RetryLine()
    hub_log.addFilter(quiet)
    for handler in hub_log.handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        hub_log.removeFilter(quiet)
        for handler in hub_log.handlers:
            handler.removeFilter(quiet)


def pull(spec: str, progress: bool = True) -> Path:
    """Download a model into the cache (resumably) and return its path; a cached one is returned as is.

    With HF_HUB_OFFLINE set, only what is already cached is found, without touching the network.
    """
    repo, sel = parse_spec(spec)
    is_offline = offline()
    where = "in the local cache (HF_HUB_OFFLINE is set)" if is_offline else "on Hugging Face"
    if not is_offline:
        why = unreachable(constants.ENDPOINT)
        if why:
            raise OutputError(f"cannot reach Hugging Face to pull {spec}: {why}. Offline, `localmix ls` lists the "
                              "models already downloaded, and they run by name")
    try:
        with contextlib.nullcontext() if progress else disable_progress_bars(), _retries_as_one_line():
            if is_offline:
                repo_info = _find_repo(_scan(), repo)
                cached = _cached(repo_info) if repo_info else {}
                if not cached:
                    raise InputError(f"{spec} is not downloaded and HF_HUB_OFFLINE is set; unset it to download")
                files = list(cached)
            else:
                files = HfApi().list_repo_files(repo)
            kind, parts = choose(repo, sel, files, where)
            if kind == "checkpoint":
                return Path(snapshot_download(repo, cache_dir=cache_dir(), local_files_only=is_offline,
                                              allow_patterns=CHECKPOINT_FILES if is_offline else parts))
            paths = []
            for part in parts:
                revision = cached[part][0].commit_hash if is_offline and part in cached else None
                paths.append(hf_hub_download(repo, part, revision=revision, cache_dir=cache_dir(),
                                             local_files_only=is_offline))
            return Path(paths[0])
    except GatedRepoError:
        raise InputError(f"{repo} is gated: accept its terms at https://huggingface.co/{repo} and log in "
                         "with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo}: no such model on Hugging Face (or it is private: log in with "
                         "`hf auth login`)") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo}: no such revision on Hugging Face") from None
    except RemoteEntryNotFoundError:
        raise InputError(f"{spec}: no such file on Hugging Face") from None
    except LocalEntryNotFoundError:
        if is_offline:
            raise InputError(f"{spec} is not (fully) downloaded and HF_HUB_OFFLINE is set; unset it to download") \
                from None
        raise OutputError(f"cannot download {spec}: Hugging Face cannot be reached; check the connection") from None
    except HFValidationError as e:
        raise InputError(f"{spec}: {str(e).splitlines()[0]}") from None
    except (OSError, _HTTPError) as e:  # the hub's HTTP errors, a full disk, an unwritable cache
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OutputError(f"cannot download {spec}: {first}") from None
