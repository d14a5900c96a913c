"""PTX text: the kernels it defines and the arch it targets (one parser for every caller).

PTX as nvcc and NVRTC write it: ``.visible .entry axpy(``, ``.weak .entry _Z5scaleIfEvPT_(``;
an ``.extern .entry`` only declares another module's kernel and is not one of this image's.

Matched on the bytes, from the keyword (a literal the regex engine finds quickly), with every
repetition bounded, and the qualifiers before the keyword checked on its line: a PTX entry can
be hundreds of MB, and a regex anchored at line starts with unbounded whitespace took 20 s over
200 MB of spaces.
"""
from __future__ import annotations

import re
from typing import Optional

from ..errors import BinaryFormatError

NAME = rb"[A-Za-z_$%][\w$]{0,4095}"
WS = rb"[ \t]{1,64}"
_ENTRY = re.compile(rb"\.entry" + WS + rb"(" + NAME + rb")")
_TARGET = re.compile(rb"\.target" + WS + rb"(?:sm|compute)_(\d{1,5})")
ENTRY_QUALIFIERS = frozenset((b".visible", b".weak", b".extern"))


def _bytes(text) -> bytes:
    return text.encode() if isinstance(text, str) else bytes(text)


def qualifiers(text: bytes, pos: int, allowed: frozenset) -> Optional[list]:
    """The qualifiers between the line start and ``pos``, or None when anything else is there
    (or the line start is more than 256 bytes back: no declaration is written so)."""
    start = text.rfind(b"\n", max(0, pos - 256), pos) + 1
    if start == 0 and pos > 256:
        return None
    words = text[start:pos].split()
    return words if all(w in allowed for w in words) else None


def kernels(text, budget: Optional[int] = None) -> list:
    """Names of the kernels (``.entry``) the PTX defines, in order. More than ``budget``
    entry keywords raise BinaryFormatError (a crafted image cannot make this unbounded)."""
    text = _bytes(text)
    if b".entry" not in text:
        return []
    out, found = [], 0
    for m in _ENTRY.finditer(text):
        found += 1
        if budget is not None and found > budget:
            raise BinaryFormatError(f"PTX with more than {budget} entry declarations")
        words = qualifiers(text, m.start(), ENTRY_QUALIFIERS)
        if words is not None and b".extern" not in words:
            out.append(m.group(1).decode())
    return out


def target(text) -> int:
    """The arch of the ``.target`` directive (``sm_90`` / ``compute_90`` -> 90)."""
    m = _TARGET.search(_bytes(text))
    if m is None:
        raise BinaryFormatError("PTX text without a .target directive")
    return int(m.group(1))
