"""The optional native node loop (``nodeloop.c``): compiled with the system C compiler on first
use, cached per user, loaded with ctypes. Everything works without it, only node adds are
slower (one ctypes call per node instead of one per run of nodes).

Plain C with no Python or CUDA headers, so one build serves every Python version. Set
``CGSNAP_NATIVE=0`` to never build or use it. The cache key is the source's hash and the
compiler's path, so an upgraded cgsnap builds afresh.

The library runs inside this process, so it must be ours: the cache directory is private
(:func:`cgsnap._fs.private_dir`: 0700, owned by us, not a symlink, checked on its descriptor),
the library is opened in it with ``O_NOFOLLOW`` and checked on that descriptor (a regular file
of ours that no one else can write), and what ``dlopen`` loads is that descriptor
(``/proc/self/fd/N``), not the path again: a file swapped in after the check is never loaded.
The build happens in a private temporary directory and is moved into the cache by
:func:`cgsnap._fs.atomic_write`, so concurrent first uses never load a half-written library."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

from .. import _fs

log = logging.getLogger("cgsnap")

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nodeloop.c")
_lock = threading.Lock()
_loaded: dict = {}


def cache_dir() -> str:
    return os.path.join(_fs.cache_root(), "native")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def _library_name() -> Optional[tuple]:
    """``(file name, compiler)`` of this source's build, or None (no source, no compiler)."""
    try:
        with open(_SOURCE, "rb") as f:
            source = f.read()
    except OSError:
        return None
    cc = _compiler()
    if cc is None:
        return None
    # The machine is part of the key: a home directory shared by x86-64 and aarch64 hosts.
    key = hashlib.blake2b(b"|".join([source, cc.encode(), sys.platform.encode(),
                                     platform.machine().encode()]), digest_size=10).hexdigest()
    return f"nodeloop-{key}.so", cc


def _build(cc: str, dir_fd: int, name: str) -> bool:
    with tempfile.TemporaryDirectory(prefix="cgsnap-build-") as tmp:    # 0700, ours
        out = os.path.join(tmp, "nodeloop.so")
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", out, _SOURCE],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            log.info("cgsnap: native node loop not built (%s): %s", cc, proc.stderr.strip())
            return False
        with open(out, "rb") as f:
            data = f.read()
    with _fs.atomic_write(name, dir_fd=dir_fd, mode=0o700) as f:
        f.write(data)
    return True


def open_library(build: bool = True) -> Optional[int]:
    """A descriptor of the cached library after the checks above (built now if missing and
    ``build``), or None when there is none that may be used."""
    found = _library_name()
    if found is None:
        return None
    name, cc = found
    try:
        dir_fd = _fs.cache_dir("native", create=build)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cgsnap: not using the native cache %s: %s", cache_dir(),
                    getattr(exc, "why", exc))
        return None
    try:
        try:
            return _fs.open_private(name, dir_fd)
        except FileNotFoundError:
            if not build:
                return None
        except OSError as exc:      # no rebuild over a file we did not make
            log.warning("cgsnap: not using %s: %s", os.path.join(cache_dir(), name),
                        getattr(exc, "why", exc))
            return None
        try:
            if not _build(cc, dir_fd, name):
                return None
            return _fs.open_private(name, dir_fd)
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("cgsnap: native node loop not built: %s", exc)
            return None
    finally:
        os.close(dir_fd)


def library_path(build: bool = True) -> Optional[str]:
    """The cached shared library's path when it passes the checks (built now if missing and
    ``build``); None when it cannot be. Loading goes through :func:`open_library`, not this."""
    fd = open_library(build)
    if fd is None:
        return None
    os.close(fd)
    return os.path.join(cache_dir(), _library_name()[0])


def node_loop():
    """``cgsnap_add_kernel_nodes`` (see nodeloop.c for its arguments) as a ctypes function, or None (disabled, no compiler, failed
    build). Looked up once per process."""
    if os.environ.get("CGSNAP_NATIVE", "1") == "0":
        return None
    with _lock:
        if "fn" in _loaded:
            return _loaded["fn"]
        fn = None
        fd = open_library()
        if fd is not None:
            path = _fs.fd_path(fd)      # the checked file itself, whatever the path holds now
            try:
                fn = ctypes.CDLL(path).cgsnap_add_kernel_nodes
                p = ctypes.c_void_p
                fn.argtypes = [p, p, p, ctypes.c_size_t, p, p, p, p, p, p]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError) as exc:
                log.info("cgsnap: native node loop not loaded from %s: %s", path, exc)
                fn = None
            finally:
                os.close(fd)
        _loaded["fn"] = fn
        return fn


def prefetch() -> None:
    """Build / load the loop on a background thread (a first use on a machine compiles it, which
    then overlaps the file read); :func:`node_loop` waits for it."""
    if "fn" not in _loaded and os.environ.get("CGSNAP_NATIVE", "1") != "0":
        threading.Thread(target=node_loop, name="cgsnap-native", daemon=True).start()
