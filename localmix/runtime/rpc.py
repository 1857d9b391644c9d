"""llama.cpp's RPC backend (ggml-rpc): serve this machine's device to another, and use other
machines' devices from here.

A worker is `ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, n_devices, devices)`,
found through the backend registry (`ggml_backend_reg_by_name("RPC")` and its proc address);
it never returns and serves one client at a time. A client adds a worker with
`ggml_backend_rpc_add_server(endpoint)`, which returns a registry whose devices are the
worker's (named RPC0, RPC1, ... in the order they are added); llama.cpp then places layers on
them as on GPUs (`llama_model_params.devices` and `tensor_split`, see offload.py).

Two things of llama.cpp's client are handled here:
- It aborts the process (GGML_ABORT) when it cannot connect, when the handshake fails, and when
  a connection drops mid-use ("Remote RPC server crashed or returned malformed response"). So
  each worker is first greeted here, over a socket of our own with a timeout, speaking the
  protocol's HELLO (`hello`), and only a worker that answers with our protocol version is
  handed to llama.cpp. A connection lost later reaches `ggml_abort`, which calls the abort
  callback set by `watch` before it aborts: the callback finds which worker is gone and calls
  the front end's handler, which either ends the process with one line or keeps it alive
  (a server) by never returning to llama.cpp.
- The protocol has no authentication: whoever reaches a worker's port can read and write its
  memory. Workers bind loopback unless told otherwise (frontends/worker.py).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from localmix.errors import InputError, LocalmixError
from localmix.runtime.devices import Device

PROTOCOL = (7, 0, 0)     # RPC_PROTO_*_VERSION of the ggml-rpc.h that llama-cpp-python 0.3.36 vendors
HELLO = 14               # RPC_CMD_HELLO, fixed across versions
CAPS = 24                # RPC_CONN_CAPS_SIZE: the hello request's capability bytes
DEFAULT_PORT = 50052
CONNECT_TIMEOUT = 3.0    # seconds to reach a worker and hear its hello


class WorkerLost(LocalmixError):
    """A worker stopped answering while the model was loaded on it."""

    exit_code = 1


@dataclass(frozen=True)
class RemoteDevice:
    """A device of a worker, as this process sees it."""
    name: str          # llama.cpp's name here: RPC0, RPC1, ...
    endpoint: str      # the worker, host:port
    free: int
    total: int
    handle: int        # ggml_backend_dev_t


def parse_endpoints(text: str) -> list[str]:
    """'host:port,host:port' -> ['host:port', ...]; a port alone means 127.0.0.1."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", part
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--rpc {part!r}: write HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
        if ":" in host:  # llama.cpp splits an endpoint at its first colon
            raise InputError(f"--rpc {part!r}: llama.cpp's RPC backend takes an IPv4 address or a host name, "
                             "not an IPv6 address")
        found.append(f"{host}:{int(port)}")
    if not found:
        raise InputError(f"--rpc names no worker; write HOST:PORT[,HOST:PORT...], e.g. 127.0.0.1:{DEFAULT_PORT}")
    if len(set(found)) != len(found):
        raise InputError(f"--rpc names a worker twice: {text}")
    return found


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection closed during the handshake")
        data += chunk
    return data


def hello(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> tuple[int, int, int]:
    """Greet a worker as llama.cpp's client does and return its protocol version; an
    InputError naming the worker when it cannot be reached in `timeout` seconds, does not
    answer as a worker, or speaks a protocol this build cannot."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(bytes([HELLO]) + struct.pack("<Q", CAPS) + bytes(CAPS))
            (size,) = struct.unpack("<Q", _recv(s, 8))
            if size != 4 + CAPS:
                raise InputError(f"RPC worker {endpoint} answered the handshake with {size} bytes, not a "
                                 f"protocol {'.'.join(map(str, PROTOCOL))} worker; run the same localmix there")
            version = tuple(_recv(s, size)[:3])
    except socket.timeout:
        raise InputError(f"RPC worker {endpoint} did not answer within {timeout:g} s (busy with another client, "
                         "or a firewall drops the port)") from None
    except OSError as e:
        raise InputError(f"cannot reach RPC worker {endpoint}: {e.strerror or e}; is `localmix worker` "
                         "running there?") from None
    if version[0] != PROTOCOL[0] or version[1] > PROTOCOL[1]:
        raise InputError(f"RPC worker {endpoint} speaks protocol {'.'.join(map(str, version))}, this localmix "
                         f"{'.'.join(map(str, PROTOCOL))}; install the same llama-cpp-python on both machines")
    return version


def refuses(endpoint: str, timeout: float = 0.5) -> bool:
    """Whether `endpoint` refuses connections: nothing listens there (a worker busy with another
    client does not refuse; the kernel queues the connection). A timeout is not a refusal: a
    live worker's short queue may be full."""
    try:
        with socket.create_connection(split_endpoint(endpoint), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def gone_workers(endpoints: list[str], seconds: float = 1.0) -> list[str]:
    """The workers that refuse connections within `seconds`: a worker that just died may still
    accept for a moment (its process closes the connection before its listening socket)."""
    import time

    gone: list[str] = []
    deadline = time.monotonic() + seconds
    while True:
        gone += [e for e in endpoints if e not in gone and refuses(e, timeout=min(seconds, 0.5))]
        if gone or time.monotonic() > deadline:
            return [e for e in endpoints if e in gone]
        time.sleep(0.1)


_BOUND = False


def _rpc() -> tuple[ctypes.CDLL, ctypes.CDLL, int]:
    """(libggml-base, libggml, the RPC backend's registry), the functions typed."""
    import llama_cpp

    from localmix.runtime.devices import libs

    global _BOUND
    llama_cpp.llama_backend_init()
    base, ggml = libs()
    if not _BOUND:
        ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_dev_by_name.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
        base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
        base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
        base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
        base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        base.ggml_set_abort_callback.restype = ctypes.c_void_p
        base.ggml_set_abort_callback.argtypes = [ctypes.c_void_p]
        _BOUND = True
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise InputError("this llama-cpp-python was built without llama.cpp's RPC backend (libggml-rpc); "
                         "run scripts/setup, which builds it with -DGGML_RPC=on")
    return base, ggml, reg


def _proc(name: str, restype, *argtypes):
    base, _, reg = _rpc()
    address = base.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise InputError(f"llama.cpp's RPC backend has no {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def local_devices() -> list[tuple[int, Device]]:
    """What a worker serves: (handle, Device) of every GPU-like device of this build, or of
    the CPU when there is none."""
    from localmix.runtime.devices import devices, libs

    _rpc()
    _, ggml = libs()
    found = [(ggml.ggml_backend_dev_get(i), d) for i, d in enumerate(devices())]
    return [f for f in found if f[1].kind in ("gpu", "igpu", "accel")] or [f for f in found if f[1].kind == "cpu"][:1]


def start_server(endpoint: str, cache_dir: str | None, n_threads: int, devices: list[int]) -> None:
    """Serve `devices` at `endpoint`; returns only when llama.cpp could not listen there."""
    start = _proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    array = (ctypes.c_void_p * len(devices))(*devices)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(devices), array)


_ADDED: dict[str, list[RemoteDevice]] = {}


def add_workers(endpoints: list[str], timeout: float = CONNECT_TIMEOUT) -> list[RemoteDevice]:
    """Greet each worker (`hello`), then add it to llama.cpp; its devices, in the order of
    `endpoints`. A worker already added in this process is reused. Its devices are not
    registered with ggml's device list: a GPU-type device there would be taken for a local GPU
    (`devices.gpu_budget`) and offloaded to by every later load of the process; llama.cpp gets
    them through llama_model_params.devices only."""
    for endpoint in endpoints:
        if endpoint not in _ADDED:
            hello(endpoint, timeout)
    if not _WATCH["endpoints"]:  # a worker gone between the greeting and llama.cpp's connection: one line
        watch(endpoints)
    base, _, _ = _rpc()
    add = _proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    found = []
    for endpoint in endpoints:
        if endpoint not in _ADDED:
            reg = add(endpoint.encode())
            if not reg:
                raise InputError(f"RPC worker {endpoint} serves no device")
            added = []
            for i in range(base.ggml_backend_reg_dev_count(reg)):
                dev = base.ggml_backend_reg_dev_get(reg, i)
                free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
                base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
                added.append(RemoteDevice(base.ggml_backend_dev_name(dev).decode(), endpoint, free.value,
                                          total.value, dev))
            _ADDED[endpoint] = added
        found += _ADDED[endpoint]
    return found


def split_devices(rpc: str, timeout: float = CONNECT_TIMEOUT) -> list[tuple[str, str, int]]:
    """The devices a split across machines uses besides this machine's CPU, in layer order:
    this machine's GPUs, then each worker's devices: (llama.cpp's name, "this machine" or
    host:port, free bytes)."""
    from localmix.runtime.devices import devices

    remote = add_workers(parse_endpoints(rpc), timeout)
    gpus = [(d.name, "this machine", d.free) for d in devices() if d.kind in ("gpu", "igpu", "accel")]
    return gpus + [(d.name, d.endpoint, d.free) for d in remote]


def device_array(names: list[str]) -> ctypes.Array:
    """The NULL-terminated `ggml_backend_dev_t *` of llama_model_params.devices, of the
    devices called `names` here: the workers' added (RPC0, ...), this machine's (CUDA0, ...)."""
    _, ggml, _ = _rpc()
    added = {d.name: d.handle for devices in _ADDED.values() for d in devices}  # not in ggml's list
    handles = [added.get(n) or ggml.ggml_backend_dev_by_name(n.encode()) for n in names]
    missing = [n for n, h in zip(names, handles) if not h]
    if missing:
        raise InputError(f"llama.cpp has no device {', '.join(missing)} here (an RPC worker not added?)")
    return (ctypes.c_void_p * (len(names) + 1))(*handles, None)


# ---- a worker lost while in use ----

Handler = Callable[[list[str], str], None]   # (endpoints gone, llama.cpp's message)
_WATCH: dict = {"endpoints": [], "handler": None, "callback": None}


def lost_line(gone: list[str], endpoints: list[str]) -> str:
    """One line for a lost worker, naming it when a connection to it is refused now."""
    if gone:
        return (f"lost RPC worker {', '.join(gone)} (it stopped or its machine went away); the model must be "
                "loaded again")
    return f"lost the connection to an RPC worker ({', '.join(endpoints)}); the model must be loaded again"


def exit_on_loss(gone: list[str], message: str) -> None:
    """The handler of `run` and `chat`: one line on stderr, exit 1 (the reply cannot go on)."""
    import os

    try:
        sys.stdout.flush()
    except Exception:  # the reply's pipe may be gone too
        pass
    sys.stderr.write(f"\nlocalmix: error: {lost_line(gone, _WATCH['endpoints'])}\n")
    sys.stderr.flush()
    os._exit(WorkerLost.exit_code)


def watch(endpoints: list[str], handler: Handler | None = None) -> None:
    """Call `handler(gone, message)` when llama.cpp aborts while workers are in use (a lost
    connection), instead of aborting: `gone` are the workers that refuse connections now.
    A handler that returns keeps the thread that aborted (llama.cpp's connection thread, or a
    decode) waiting forever, so the process lives on; the model cannot be used again."""
    base, _, _ = _rpc()
    _WATCH["endpoints"] = list(endpoints)
    _WATCH["handler"] = handler or exit_on_loss
    if _WATCH["callback"] is None:
        @ctypes.CFUNCTYPE(None, ctypes.c_char_p)
        def on_abort(message: bytes) -> None:
            text = (message or b"").decode(errors="replace")
            gone = gone_workers(_WATCH["endpoints"])
            if not gone and "RPC" not in text:  # another of llama.cpp's aborts: end as it would, in one line
                import os

                sys.stderr.write(f"localmix: error: llama.cpp aborted: {text.strip()}\n")
                sys.stderr.flush()
                os._exit(134)
            try:
                _WATCH["handler"](gone, text)
            finally:
                threading.Event().wait()  # never back into llama.cpp, which would abort()

        _WATCH["callback"] = on_abort
        base.ggml_set_abort_callback(ctypes.cast(on_abort, ctypes.c_void_p))
