"""Which external device functions a kernel of an image can call.

A kernel that sets a graph conditional calls ``cudaGraphSetConditional``, a device-runtime
builtin that stays an undefined symbol of the cubin (the driver binds it at load), named in the
calling function's ``EIATTR_EXTERNS`` (``.nv.info.<function>``) and in the call graph
(``.nv.callgraph``). The capture uses this as evidence about kernel arguments: only a kernel
that reaches that symbol can use a conditional handle (see docs/RELIABILITY.md).
"""
from __future__ import annotations

from typing import Optional

from ..errors import BinaryFormatError
from . import elf

SET_CONDITIONAL = "cudaGraphSetConditional"
SHT_CUDA_INFO = 0x70000000
SHT_CUDA_CALLGRAPH = 0x70000001
EIATTR_EXTERNS = 0x0F
_EIFMT_SVAL = 4
_CALLGRAPH_MARKER = 0xFFFFFFFC
MAX_DEPTH = 4096           # functions visited per kernel


def kernel_externals(data, kernel: str) -> frozenset:
    """The undefined symbols that ``kernel`` of cubin ``data`` reaches: its own and its callees'
    ``EIATTR_EXTERNS``, and callees without a definition. BinaryFormatError for a malformed
    image or a kernel it does not define."""
    f = elf.ElfFile(data)
    if f.machine != elf.EM_CUDA:
        raise BinaryFormatError(f"not a CUDA cubin (e_machine {f.machine})")
    symbols = f.symbols()
    index = {s.name: i for i, s in enumerate(symbols) if s.type == elf.STT_FUNC}
    start = index.get(kernel)
    if start is None:
        raise BinaryFormatError(f"the image defines no function {kernel}")
    info = {s.name[len(".nv.info."):]: s for s in f.sections
            if s.type == SHT_CUDA_INFO and s.name.startswith(".nv.info.")}
    calls: dict = {}
    graph = next((s for s in f.sections if s.type == SHT_CUDA_CALLGRAPH), None)
    if graph is not None:
        raw = bytes(f.section_data(graph))
        if len(raw) % 8:
            raise BinaryFormatError(f"call graph of {len(raw)} bytes")
        block = None
        for k in range(0, len(raw), 8):
            a = int.from_bytes(raw[k:k + 4], "little")
            b = int.from_bytes(raw[k + 4:k + 8], "little")
            if a == 0 and b >= _CALLGRAPH_MARKER:
                block = b - (1 << 32)
            elif block in (-1, -4):          # direct calls; possible targets of indirect ones
                calls.setdefault(a, set()).add(b)

    def undefined(i: int) -> bool:
        return 0 <= i < len(symbols) and symbols[i].shndx == elf.SHN_UNDEF and \
            bool(symbols[i].name)
    out, seen, todo = set(), {start}, [start]
    while todo:
        if len(seen) > MAX_DEPTH:
            raise BinaryFormatError(f"{kernel}: the call graph reaches over {MAX_DEPTH} functions")
        i = todo.pop()
        sec = info.get(symbols[i].name)
        if sec is not None:
            for fmt, attr, value, _, _ in elf.nv_info_records(f.section_data(sec), sec.name):
                if fmt == _EIFMT_SVAL and attr == EIATTR_EXTERNS:
                    v = bytes(value)
                    for k in range(0, len(v) - 3, 4):
                        j = int.from_bytes(v[k:k + 4], "little")
                        if undefined(j):
                            out.add(symbols[j].name)
        for j in calls.get(i, ()):
            if undefined(j):
                out.add(symbols[j].name)
            elif 0 <= j < len(symbols) and j not in seen:
                seen.add(j)
                todo.append(j)
    return frozenset(out)


def sets_conditionals(kind: str, data, kernel: str) -> Optional[bool]:
    """Whether ``kernel`` can call ``cudaGraphSetConditional``: True / False from a cubin, from
    a PTX module whether any of its code names it (module-wide, so True may be too wide), None
    when the image cannot tell (a fatbin, or an image that does not parse)."""
    try:
        if kind == "cubin":
            return SET_CONDITIONAL in kernel_externals(data, kernel)
        if kind == "ptx":
            return SET_CONDITIONAL.encode() in bytes(data)
    except BinaryFormatError:
        return None
    return None
