"""Build llama.cpp's own `llama-server` once, as the strongest peer for `bench_serve.py`.

The sources are those vendored in the sdist of the installed llama-cpp-python (its
`vendor/llama.cpp`), so the peer runs the same llama.cpp commit as the engine localmix runs.
The build is CPU only, Release, statically linked, without the web UI's assets, and lands in
`~/.cache/localmix/llama-server/<llama-cpp-python version>/llama-server`; a later call finds it
there and builds nothing. Not part of the install or of CI: it needs cmake and a C++ compiler,
and takes minutes (the time is printed).

    python benchmarks/build_llama_server.py            # build when missing, print the path
    python benchmarks/build_llama_server.py --jobs 2 --nice 19
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "localmix" / "llama-server"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one binary, no LD_LIBRARY_PATH to get right
    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",  # CPU only
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no web UI assets (nor their download)
    "-DLLAMA_OPENSSL=OFF",  # loopback HTTP only
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
]


def installed_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def binary_path(version: str | None = None) -> Path:
    """Where the built server lives for `version` (the installed llama-cpp-python's by default)."""
    return CACHE / (version or installed_version()) / "llama-server"


def find_sdist(version: str, into: Path) -> Path:
    """The sdist from pip's cache or the index (pip download), saved under `into`."""
    name = f"llama_cpp_python-{version}.tar.gz"
    if (into / name).exists():
        return into / name
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={version}", "-d", str(into)], check=True)
    return into / name


def extract_llama_cpp(sdist: Path, work: Path) -> Path:
    """Unpack only `vendor/llama.cpp` out of the sdist; returns its folder."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(work, members=members, filter="data")
    (src,) = work.glob("*/vendor/llama.cpp")
    return src


def build(version: str, jobs: int, nice: int, keep: bool = False) -> Path:
    """Build `llama-server` for `version` into the cache; returns the binary's path."""
    out = binary_path(version)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            sys.exit(f"error: {tool} not found; building llama-server needs cmake and a C++ compiler")
    sdist = find_sdist(version, CACHE / "sdist")
    work = Path(tempfile.mkdtemp(prefix="llama-server-build-"))
    try:
        src = extract_llama_cpp(sdist, work)
        build_dir = work / "build"
        niced = ["nice", "-n", str(nice)] if nice else []
        subprocess.run([*niced, "cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_OPTIONS,
                        *(["-G", "Ninja"] if shutil.which("ninja") else [])], check=True)
        subprocess.run([*niced, "cmake", "--build", str(build_dir), "--target", "llama-server",
                        "-j", str(jobs)], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        shutil.copy2(build_dir / "bin" / "llama-server", partial)
        os.replace(partial, out)  # whole or absent: a later run never finds half a binary
    finally:
        if keep:
            print(f"build folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return out


def ensure(version: str | None = None, jobs: int | None = None, nice: int = 0, keep: bool = False) -> Path:
    """The cached binary, built first when missing (what bench_serve calls)."""
    version = version or installed_version()
    out = binary_path(version)
    if out.exists():
        return out
    start = time.monotonic()
    load = os.getloadavg()[0]
    out = build(version, jobs or os.cpu_count() or 1, nice, keep)
    print(f"built llama-server (llama-cpp-python {version}) in {time.monotonic() - start:.0f} s "
          f"(load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end): {out}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", help="llama-cpp-python version whose vendored llama.cpp to build "
                                      "(default: the installed one)")
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count(), help="parallel compile jobs")
    ap.add_argument("--nice", type=int, default=0, help="run the compiler at this niceness")
    ap.add_argument("--force", action="store_true", help="rebuild even when the binary is cached")
    ap.add_argument("--keep", action="store_true", help="keep the build folder (its path is printed)")
    args = ap.parse_args()
    version = args.version or installed_version()
    if args.force and binary_path(version).exists():
        binary_path(version).unlink()
    if binary_path(version).exists():
        print(f"cached: {binary_path(version)}", file=sys.stderr)
    ensure(version, args.jobs, args.nice, args.keep)
    print(binary_path(version))


if __name__ == "__main__":
    main()
