"""PTX text: the kernels it defines and the arch it targets (one parser for every caller).

PTX as nvcc and NVRTC write it: ``.visible .entry axpy(``, ``.weak .entry _Z5scaleIfEvPT_(``;
an ``.extern .entry`` only declares another module's kernel and is not one of this image's.
"""
from __future__ import annotations

import re

from ..errors import BinaryFormatError

NAME = rb"[A-Za-z_$%][\w$]*"
_ENTRY = re.compile(rb"^[ \t]*((?:\.(?:visible|weak|extern)[ \t]+)*)\.entry[ \t]+(" + NAME + rb")",
                    re.M)
_TARGET = re.compile(rb"^[ \t]*\.target[ \t]+(?:sm|compute)_(\d+)", re.M)


def _bytes(text) -> bytes:
    return text.encode() if isinstance(text, str) else bytes(text)


def kernels(text) -> list:
    """Names of the kernels (``.entry``) the PTX defines, in order."""
    return [m.group(2).decode() for m in _ENTRY.finditer(_bytes(text))
            if b"extern" not in m.group(1)]


def target(text) -> int:
    """The arch of the ``.target`` directive (``sm_90`` / ``compute_90`` -> 90)."""
    m = _TARGET.search(_bytes(text))
    if m is None:
        raise BinaryFormatError("PTX text without a .target directive")
    return int(m.group(1))
