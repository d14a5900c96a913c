"""The optional native node loop (``nodeloop.c``): compiled with the system C compiler on first
use, cached per user, loaded with ctypes. Everything works without it, only node adds are
slower (one ctypes call per node instead of one per run of nodes).

Plain C with no Python or CUDA headers, so one build serves every Python version. Set
``CGSNAP_NATIVE=0`` to never build or use it. The cache key is the source's hash and the
compiler's path, so an upgraded cgsnap builds afresh; the build goes to a temporary name and is
renamed into place, so concurrent first uses never load a half-written library."""
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
import time
from typing import Optional

log = logging.getLogger("cgsnap")

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nodeloop.c")
_lock = threading.Lock()
_loaded: dict = {}


def cache_dir() -> str:
    base = os.environ.get("CGSNAP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cgsnap")
    return os.path.join(base, "native")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def _private(path: str) -> bool:
    """Only a library (and folder) of this user that nobody else can write is loaded: a shared
    or world-writable cache must not hand this process someone else's code."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    ok = st.st_uid == os.getuid() and not st.st_mode & 0o022
    if not ok:
        log.warning("cgsnap: not using %s (owned by another user or writable by others)", path)
    return ok


def _remove_stale_temporaries(directory: str) -> None:
    """Half-written builds of a process that died mid-compile (older than ten minutes)."""
    now = time.time()
    for entry in os.listdir(directory):
        if entry.startswith(".nodeloop-"):
            full = os.path.join(directory, entry)
            try:
                if now - os.stat(full).st_mtime > 600:
                    os.unlink(full)
            except OSError:
                pass


def library_path(build: bool = True) -> Optional[str]:
    """The cached shared library, built now if missing and ``build``; None when it cannot be."""
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
    directory = cache_dir()
    path = os.path.join(directory, f"nodeloop-{key}.so")
    if os.path.exists(path) or not build:
        return path if os.path.exists(path) and _private(path) else None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _private(directory):
            return None
        _remove_stale_temporaries(directory)
        fd, tmp = tempfile.mkstemp(prefix=".nodeloop-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, _SOURCE],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                log.info("cgsnap: native node loop not built (%s): %s", cc, proc.stderr.strip())
                return None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("cgsnap: native node loop not built: %s", exc)
        return None
    return path


def node_loop():
    """``cgsnap_add_kernel_nodes`` (see nodeloop.c for its arguments) as a ctypes function, or None (disabled, no compiler, failed
    build). Looked up once per process."""
    if os.environ.get("CGSNAP_NATIVE", "1") == "0":
        return None
    with _lock:
        if "fn" in _loaded:
            return _loaded["fn"]
        fn = None
        path = library_path()
        if path is not None:
            try:
                fn = ctypes.CDLL(path).cgsnap_add_kernel_nodes
                p = ctypes.c_void_p
                fn.argtypes = [p, p, p, ctypes.c_size_t, p, p, p, p, p, p]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError) as exc:
                log.info("cgsnap: native node loop not loaded from %s: %s", path, exc)
                fn = None
        _loaded["fn"] = fn
        return fn


def prefetch() -> None:
    """Build / load the loop on a background thread (a first use on a machine compiles it, which
    then overlaps the file read); :func:`node_loop` waits for it."""
    if "fn" not in _loaded and os.environ.get("CGSNAP_NATIVE", "1") != "0":
        threading.Thread(target=node_loop, name="cgsnap-native", daemon=True).start()
