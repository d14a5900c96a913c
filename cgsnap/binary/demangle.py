"""C++ symbol demangling through the C++ runtime's ``__cxa_demangle`` (no dependency), falling
back to the mangled name where no C++ runtime is loadable."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re

_demangle_fn = None
_free = None


def _load():
    global _demangle_fn, _free
    if _demangle_fn is not None:
        return _demangle_fn
    for name in (ctypes.util.find_library("stdc++"), "libstdc++.so.6", "libc++.so.1"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            fn = lib.__cxa_demangle
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_void_p
        fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_int)]
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.free.argtypes = [ctypes.c_void_p]
        _demangle_fn, _free = fn, libc.free
        return fn
    _demangle_fn = False
    return False


@functools.lru_cache(maxsize=4096)
def demangle(name: str) -> str:
    """The demangled form of an Itanium-ABI name, or ``name`` unchanged."""
    if not name.startswith("_Z"):
        return name
    fn = _load()
    if not fn:
        return name
    status = ctypes.c_int()
    ptr = fn(name.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not ptr:
        return name
    try:
        return ctypes.string_at(ptr).decode(errors="replace")
    finally:
        _free(ptr)


def short(name: str, width: int = 100) -> str:
    """Demangled and cut to ``width`` characters (templates make names very long)."""
    d = demangle(name)
    return d if len(d) <= width else d[:width - 1] + "…"


# C0 and C1 controls, DEL, line / paragraph separators and the bidirectional overrides: a name
# read from a file that holds them could move the cursor, recolour or rewrite the terminal, or
# reorder what is shown ("Trojan source"), so they are shown escaped.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\u202e``)."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
