"""Cut a cubin down to the kernels a snapshot launches.

Why: library modules hold thousands of kernels. torch's largest sm_90 module is 18.8 MB; the
driver spent ~45 ms parsing it on every restore, to launch two of its kernels. Loading the
modules was the largest part of a restore (docs/PERFORMANCE.md, section 1).

How, without renumbering anything: the section header table and the symbol table keep their
length and order, so every section index and symbol index written anywhere in the image
(relocations, ``.nv.info`` attributes, the call graph, ``sh_link`` / ``sh_info``) stays valid
without cgsnap having to understand where it is written. Then:

- every section that belongs to a dropped kernel becomes a null section header (SHT_NULL, no
  name, no bytes). A section belongs to a kernel when it is the kernel's ``.text``, when its
  ``sh_info`` links to one that does (``.nv.info.K``, ``.nv.constant0.K``, ``.nv.shared.K``,
  relocations), or, without such a link, when its name is a per-function prefix + the name;
- each symbol defined in a dropped section becomes a null symbol;
- global ``.nv.info`` entries (register count, frame and stack sizes), call-graph entries and
  ``.nv.prototype`` entries about dropped functions are removed;
- debug sections (``.debug_*``, ``.nv_debug_*``) and their relocations go: they describe every
  function of the module;
- the string tables are rebuilt with only the strings still used: names, and the prototype
  strings that ``.nv.prototype`` and the call graph point to in ``.strtab``;
- the program headers are recomputed by rules that must first reproduce the original headers
  exactly; an image whose layout they do not reproduce is left whole.

What is kept beyond the requested kernels (the closure): every function that a kept section
refers to (relocations, calls and indirect-call targets in the call graph, a kept function's
``EIATTR_EXTERNS``), every ``.text`` that is not a kernel entry, and every section that belongs
to no function (module variables, constant banks, ``.nv.rel.action``...). Images holding any
section type outside :data:`CUT_TYPES` (sm_100's "mercury" sections), relocatable cubins, and
anything else these rules do not model are left whole, with the reason.

:func:`prune_cubin` only rewrites bytes; whether the driver gives the kept kernels exactly the
same attributes is checked on the GPU before a pruned image is stored
(:func:`cgsnap.format.snapfile.prune_images`).
"""
from __future__ import annotations

from functools import cached_property
from typing import Iterable, NamedTuple, Optional

import numpy as np

from ..errors import BinaryFormatError
from . import elf

ET_EXEC = 2

SHT_NULL = 0
SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_NOBITS = 8
SHT_REL = 9
SHT_SYMTAB_SHNDX = 18
SHT_NOTE = 7
SHT_CUDA_INFO = 0x70000000
SHT_CUDA_CALLGRAPH = 0x70000001
SHT_CUDA_PROTOTYPE = 0x70000002
SHT_CUDA_RELOCINFO = 0x7000000B      # .nv.rel.action
SHT_CUDA_COMPAT = 0x70000086
# Section types an executable cubin of sm_75-sm_90 holds, each handled above or plain data.
# Anything else (sm_100's "mercury" sections keep a second symbol table over .strtab) is
# left whole rather than cut by rules that do not know it.
CUT_TYPES = {SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOTE, SHT_NOBITS,
             SHT_REL, SHT_SYMTAB_SHNDX, SHT_CUDA_INFO, SHT_CUDA_CALLGRAPH, SHT_CUDA_PROTOTYPE,
             SHT_CUDA_RELOCINFO, SHT_CUDA_COMPAT}
SHF_CUDA_MERCURY = 0x10000000

SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_INFO_LINK = 0x40

PT_LOAD = 1
PT_PHDR = 6

STT_FUNC = 2

EIFMT_NVAL, EIFMT_BVAL, EIFMT_HVAL, EIFMT_SVAL = 1, 2, 3, 4
# Attributes of the global .nv.info whose value starts with a function's symbol index.
FUNCTION_ATTRIBUTES = {0x11: "EIATTR_FRAME_SIZE", 0x12: "EIATTR_MIN_STACK_SIZE",
                       0x23: "EIATTR_MAX_STACK_SIZE", 0x2F: "EIATTR_REGCOUNT"}
EIATTR_EXTERNS = 0x0F      # per-function: the symbols a function uses from elsewhere
# The call graph is a list of u32 pairs in blocks, each opened by a marker pair (0, -k):
# -1 calls (caller, callee), -2 functions whose address is taken (symbol, prototype string),
# -3 indirect call sites (symbol, prototype string), -4 possible targets of those calls
# (caller, callee). The prototype strings are offsets into .strtab.
CALLGRAPH_MARKER = 0xFFFFFFFC
CALLGRAPH_EDGES = (-1, -4)
CALLGRAPH_STRINGS = (-2, -3)
# Sections named <prefix><function> belong to that function.
PER_FUNCTION_PREFIXES = (".text.", ".nv.info.", ".nv.constant0.", ".nv.shared.", ".nv.local.",
                         ".rel.text.", ".rela.text.", ".rel.nv.constant0.", ".rela.nv.constant0.")
DEBUG_PREFIXES = (".debug", ".nv_debug")

# Largest section alignment accepted (cubins use up to 128).
MAX_ALIGNMENT = 1 << 16

# Reasons for keeping an image whole that are not a problem.
ALL_NEEDED = "every kernel of the image is needed"
TOO_LITTLE = "too little to cut"
NOTHING_TO_CUT = (ALL_NEEDED, TOO_LITTLE)

_SHDR = elf._SHDR_NUMPY
_SYM = np.dtype([("st_name", "<u4"), ("st_info", "u1"), ("st_other", "u1"), ("st_shndx", "<u2"),
                 ("st_value", "<u8"), ("st_size", "<u8")])
_PHDR = np.dtype([("p_type", "<u4"), ("p_flags", "<u4"), ("p_offset", "<u8"), ("p_vaddr", "<u8"),
                  ("p_paddr", "<u8"), ("p_filesz", "<u8"), ("p_memsz", "<u8"), ("p_align", "<u8")])
assert _SYM.itemsize == 24 and _PHDR.itemsize == 56


class Pruned(NamedTuple):
    data: Optional[bytes]      # the pruned image; None when it was left whole (see ``reason``)
    kernels_before: int
    kernels_after: int
    reason: str                # why it was left whole; "" when pruned


class _Refused(Exception):
    """The image is valid but not one this module knows how to cut safely: keep it whole."""


def prune_cubin(data, keep: Iterable[str]) -> Pruned:
    """The cubin ``data`` with only the kernels named in ``keep`` (and what they need).

    Malformed input raises :class:`BinaryFormatError`; a well-formed image that cannot be cut
    safely, or has nothing to cut, comes back with ``data=None`` and the reason."""
    keep, total = set(keep), 0
    try:
        cutter = _Cutter(data)
        total = len(cutter.kernel_text)
        out, kept = cutter.cut(keep)
    except _Refused as why:
        return Pruned(None, total, total, str(why))
    return Pruned(out, total, kept, "")


def _align(value: int, alignment: int) -> int:
    return value if alignment <= 1 else -(-value // alignment) * alignment


class _Cutter:
    def __init__(self, data):
        self.view = elf.as_view(data)
        f = elf.ElfFile(self.view)
        if f.machine != elf.EM_CUDA:
            raise BinaryFormatError(f"not a CUDA cubin (e_machine {f.machine})")
        if f.header.e_type != ET_EXEC:
            raise _Refused(f"ELF type {f.header.e_type}: only linked (executable) cubins are cut")
        self.header = f.header
        self.sections = f.sections           # names, bounds-checked
        n = len(self.sections)
        h = f.header
        elf.check_range(self.view, h.e_shoff, _SHDR.itemsize * n, "section header table")
        self.sh = np.frombuffer(self.view, _SHDR, n, h.e_shoff).copy()
        for s in self.sections:
            if s.type not in (SHT_NULL, SHT_NOBITS):
                elf.check_range(self.view, s.offset, s.size, f"section {s.name!r}")
        align = self.sh["sh_addralign"]
        if ((align & (align - np.uint64(1))) != 0).any() or (align > MAX_ALIGNMENT).any():
            raise BinaryFormatError("a section alignment is not a power of two up to "
                                    f"{MAX_ALIGNMENT}")
        tables = [s for s in self.sections if s.type == SHT_SYMTAB]
        if len(tables) != 1:
            raise _Refused(f"{len(tables)} symbol tables")
        self.symtab = tables[0]
        for sec in self.sections:
            if sec.type not in CUT_TYPES or sec.flags & SHF_CUDA_MERCURY:
                raise _Refused(f"section {sec.name!r} of type {sec.type:#x} is not one this "
                               "module knows how to cut")
            if sec.link == self.symtab.link and sec.index != self.symtab.index:
                raise _Refused(f"section {sec.name!r} also names strings of the symbol table's")
        if self.symtab.entsize not in (0, _SYM.itemsize) or self.symtab.size % _SYM.itemsize:
            raise BinaryFormatError(f"symbol table entry size {self.symtab.entsize}, "
                                    f"size {self.symtab.size}")
        self.sym = np.frombuffer(self.view, _SYM, self.symtab.size // _SYM.itemsize,
                                 self.symtab.offset).copy()
        self.symbols = f.symbols()           # names and resolved section indices
        self.sym_section = np.array([s.shndx if s.section_name is not None else -1
                                     for s in self.symbols], dtype=np.int64)
        self.xindex = next((s for s in self.sections if s.type == SHT_SYMTAB_SHNDX
                            and s.link == self.symtab.index), None)
        self.is_text = (self.sh["sh_type"] == SHT_PROGBITS) & \
            ((self.sh["sh_flags"] & SHF_EXECINSTR) != 0)
        self.kernel_text = {}
        for i, s in enumerate(self.symbols):
            sec = int(self.sym_section[i])
            # The same definition of a kernel as elf.cubin_info's.
            if s.type == STT_FUNC and s.other & elf.STO_CUDA_ENTRY and sec >= 0 and \
                    self.is_text[sec] and s.section_name == f".text.{s.name}":
                self.kernel_text[s.name] = sec
        self.owner = self._owners()
        self._relocations: dict = {}

    # ---- who owns what ----------------------------------------------------------------------
    def _owners(self) -> np.ndarray:
        """For each section, the .text section of the function it belongs to, or -1."""
        n = len(self.sections)
        text_by_name = {self.sections[i].name[len(".text."):]: i for i in np.flatnonzero(self.is_text)
                        if self.sections[i].name.startswith(".text.")}
        owner = np.full(n, -2, dtype=np.int64)

        def find(i: int, depth: int) -> int:
            if owner[i] != -2:
                return int(owner[i])
            s = self.sections[i]
            result = -1
            if self.is_text[i]:
                result = i
            elif depth < 8 and (s.type in (SHT_REL, SHT_RELA) or s.flags & SHF_INFO_LINK) \
                    and 0 < s.info < n and s.info != i:
                result = find(s.info, depth + 1)
            if result == -1 and s.type != SHT_NULL:
                for prefix in PER_FUNCTION_PREFIXES:
                    if s.name.startswith(prefix) and s.name[len(prefix):] in text_by_name:
                        result = text_by_name[s.name[len(prefix):]]
                        break
            owner[i] = result
            return result

        for i in range(n):
            find(i, 0)
        return owner

    def _debug_sections(self) -> np.ndarray:
        debug = np.array([not (s.flags & SHF_ALLOC) and s.name.startswith(DEBUG_PREFIXES)
                          for s in self.sections], dtype=bool)
        for s in self.sections:
            if s.type in (SHT_REL, SHT_RELA) and 0 < s.info < len(debug) and debug[s.info]:
                debug[s.index] = True
        return debug

    def _relocation_symbols(self, s) -> np.ndarray:
        """The symbol index of each relocation of ``s`` (read once: the closure and the link
        check both need them)."""
        cached = self._relocations.get(s.index)
        if cached is None:
            cached = self._relocations[s.index] = self._read_relocation_symbols(s)
        return cached

    def _read_relocation_symbols(self, s) -> np.ndarray:
        width = 3 if s.type == SHT_RELA else 2
        if s.size % (8 * width):
            raise BinaryFormatError(f"relocation section {s.name!r} has a ragged size {s.size}")
        words = np.frombuffer(self.view, "<u8", s.size // 8, s.offset)
        return (words[1::width] >> np.uint64(32)).astype(np.int64)

    @cached_property
    def _callgraph(self):
        """(section, pairs, block of each pair) of the call graph, or None. Marker pairs get
        block 0."""
        graph = next((s for s in self.sections if s.type == SHT_CUDA_CALLGRAPH), None)
        if graph is None:
            return None
        if graph.size % 8:
            raise _Refused(f"call graph of {graph.size} bytes")
        pairs = np.frombuffer(self.view, "<u4", graph.size // 4, graph.offset).reshape(-1, 2)
        blocks = np.zeros(len(pairs), dtype=np.int64)
        block = None
        for i, (a, b) in enumerate(pairs.tolist()):
            if a == 0 and b >= CALLGRAPH_MARKER:
                block = b - (1 << 32)
                continue
            if block is None:
                raise _Refused("call graph entries before any block marker")
            blocks[i] = block
        return graph, pairs, blocks

    @cached_property
    def _prototypes(self):
        """(section, pairs (symbol, .strtab offset)) of .nv.prototype, or None."""
        proto = next((s for s in self.sections if s.type == SHT_CUDA_PROTOTYPE), None)
        if proto is None:
            return None
        if proto.size % 8:
            raise _Refused(f"prototype table of {proto.size} bytes")
        return proto, np.frombuffer(self.view, "<u4", proto.size // 4, proto.offset).reshape(-1, 2)

    def _attributes(self, s):
        """``(format, attribute, record bytes, value)`` of each entry of an .nv.info section
        (:func:`cgsnap.binary.elf.nv_info_records`); a format other than the four known is refused."""
        data = bytes(self.view[s.offset:s.offset + s.size])
        for fmt, attr, value, start, end in elf.nv_info_records(memoryview(data), s.name):
            if fmt not in (EIFMT_NVAL, EIFMT_BVAL, EIFMT_HVAL, EIFMT_SVAL):
                raise _Refused(f"{s.name}: attribute format {fmt} at {start}")
            yield fmt, attr, data[start:end], (bytes(value) if fmt == EIFMT_SVAL else value)

    def _symbol_owner(self, symbols: np.ndarray) -> np.ndarray:
        """The owning .text of each symbol index (-1: no function's, or not a symbol)."""
        out = np.full(len(symbols), -1, dtype=np.int64)
        valid = (symbols >= 0) & (symbols < len(self.sym_section))
        sections = self.sym_section[symbols[valid]]
        out[valid] = np.where(sections >= 0, self.owner[np.maximum(sections, 0)], -1)
        return out

    # ---- the cut ----------------------------------------------------------------------------
    def cut(self, keep: set) -> tuple:
        missing = sorted(keep - self.kernel_text.keys())
        if missing:
            raise _Refused(f"kernels not in the image: {missing[:3]}")
        droppable = set(self.kernel_text.values())
        kept_text = {self.kernel_text[k] for k in keep}
        debug = self._debug_sections()
        # Edges "owner of a referring section -> function referred to" (-1: a global section).
        edges: dict = {}
        for s in self.sections:
            if s.type in (SHT_REL, SHT_RELA) and not debug[s.index]:
                targets = self._symbol_owner(self._relocation_symbols(s))
                edges.setdefault(int(self.owner[s.index]), set()).update(targets[targets >= 0].tolist())
        graph = self._callgraph
        if graph is not None:
            _, pairs, blocks = graph
            calls = pairs[np.isin(blocks, CALLGRAPH_EDGES)].astype(np.int64)
            callers, callees = self._symbol_owner(calls[:, 0]), self._symbol_owner(calls[:, 1])
            for a, b in zip(callers.tolist(), callees.tolist()):
                if b >= 0:
                    edges.setdefault(a, set()).add(b)
        # A function's EIATTR_EXTERNS lists the symbols it uses from elsewhere.
        for s in self.sections:
            owner = int(self.owner[s.index])
            if s.type == SHT_CUDA_INFO and owner >= 0:
                for fmt, attr, _, value in self._attributes(s):
                    if fmt == EIFMT_SVAL and attr == EIATTR_EXTERNS:
                        used = np.frombuffer(value[:len(value) // 4 * 4], "<u4").astype(np.int64)
                        targets = self._symbol_owner(used)
                        edges.setdefault(owner, set()).update(targets[targets >= 0].tolist())
        live = {-1} | kept_text | {int(i) for i in np.flatnonzero(self.is_text)
                                   if int(i) not in droppable}
        todo = list(live)
        while todo:
            for b in edges.get(todo.pop(), ()):
                if b not in live:
                    live.add(b)
                    todo.append(b)
        dropped_text = droppable - live
        if not dropped_text:
            raise _Refused(ALL_NEEDED)
        keep_section = np.isin(self.owner, list(live)) & ~debug
        keep_section[0] = True
        dropped_symbol = (self.sym_section >= 0) & ~keep_section[np.maximum(self.sym_section, 0)]
        self._check_links(keep_section, dropped_symbol, debug)
        out = self._write(keep_section, dropped_symbol)
        kept = sum(1 for sec in self.kernel_text.values() if keep_section[sec])
        # What comes out must read back as a cubin holding what was asked.
        if not keep <= set(elf.cubin_info(out).kernels) or elf.check_cubin(out, sorted(keep)):
            raise _Refused("the cut image does not read back with the kernels asked for")
        return out, kept

    def _check_links(self, keep_section, dropped_symbol, debug) -> None:
        """Nothing kept may point at anything dropped (the closure above should guarantee it)."""
        n = len(self.sections)
        for s in self.sections:
            if not keep_section[s.index] or s.index == 0:
                continue
            if 0 < s.link < n and not keep_section[s.link]:
                raise _Refused(f"section {s.name!r} links to a dropped section")
            if (s.flags & SHF_INFO_LINK or s.type in (SHT_REL, SHT_RELA)) and 0 < s.info < n \
                    and not keep_section[s.info]:
                raise _Refused(f"section {s.name!r} refers to a dropped section")
            if s.type in (SHT_REL, SHT_RELA):
                symbols = self._relocation_symbols(s)
                if len(symbols) and dropped_symbol[symbols[symbols < len(dropped_symbol)]].any():
                    raise _Refused(f"relocations in {s.name!r} use a dropped symbol")

    # ---- rewriting --------------------------------------------------------------------------
    def _filtered_info(self, s, dropped_symbol) -> bytes:
        """The global .nv.info without the entries about dropped functions."""
        out = bytearray()
        for fmt, attr, entry, value in self._attributes(s):
            if fmt == EIFMT_SVAL and attr in FUNCTION_ATTRIBUTES and len(value) >= 4:
                symbol = int.from_bytes(value[:4], "little")
                if symbol < len(dropped_symbol) and dropped_symbol[symbol]:
                    continue
            out += entry
        return bytes(out)

    @staticmethod
    def _gone(words: np.ndarray, dropped_symbol: np.ndarray) -> np.ndarray:
        words = words.astype(np.int64)
        is_symbol = (words < len(dropped_symbol))
        gone = np.zeros(words.shape, dtype=bool)
        gone[is_symbol] = dropped_symbol[words[is_symbol]]
        return gone

    def _string_table(self, index: int, offsets) -> tuple:
        """A new string table holding the strings at ``offsets`` of string table ``index``;
        returns (bytes, {old offset: new offset})."""
        link = self.sections[index]
        if link.type != SHT_STRTAB:
            raise BinaryFormatError(f"section {index} ({link.name!r}) is not a string table")
        old = bytes(self.view[link.offset:link.offset + link.size])
        table, where, remap = bytearray(b"\0"), {b"": 0}, {0: 0}
        for off in offsets:
            if off in remap:
                continue
            end = old.find(b"\0", off)
            if off >= len(old) or end < 0:
                raise BinaryFormatError(f"a name offset {off} is outside {link.name!r}")
            name = old[off:end]
            if name not in where:
                where[name] = len(table)
                table += name + b"\0"
            remap[off] = where[name]
        return bytes(table), remap

    def _write(self, keep_section: np.ndarray, dropped_symbol: np.ndarray) -> bytes:
        h = self.header
        sh, sym = self.sh.copy(), self.sym.copy()
        sym[dropped_symbol] = np.zeros(1, dtype=_SYM)
        shstrndx = h.e_shstrndx if h.e_shstrndx != elf.SHN_XINDEX else int(sh[0]["sh_link"])
        strndx = self.symtab.link
        # Call graph and prototypes: entries about dropped functions go; the prototype strings
        # of the rest are .strtab offsets, kept and renumbered with the names.
        string_cols = []       # (array, row mask) whose column 1 holds .strtab offsets
        graph, proto = self._callgraph, self._prototypes
        if graph is not None:
            gs, pairs, blocks = graph
            gone = self._gone(pairs, dropped_symbol)
            drop = np.where(np.isin(blocks, CALLGRAPH_EDGES), gone.any(axis=1),
                            np.isin(blocks, CALLGRAPH_STRINGS) & gone[:, 0])
            graph = (gs, pairs[~drop].copy(), blocks[~drop])
            string_cols.append((graph[1], np.isin(graph[2], CALLGRAPH_STRINGS)))
        if proto is not None:
            ps, pairs = proto
            proto = (ps, pairs[~self._gone(pairs[:, 0], dropped_symbol)].copy())
            string_cols.append((proto[1], np.ones(len(proto[1]), dtype=bool)))
        extra = [int(v) for arr, rows in string_cols for v in arr[rows, 1].tolist()]
        # Names: one new table per string table (shared when the two are one section).
        kept_idx = np.flatnonzero(keep_section)
        if not (0 < shstrndx < len(self.sections)):
            raise BinaryFormatError(f"section name table index {shstrndx} out of range")
        if shstrndx == strndx:
            table, remap = self._string_table(strndx, sym["st_name"].tolist() + extra +
                                              sh["sh_name"][kept_idx].tolist())
            sym_remap = sec_remap = remap
            replaced = {strndx: table}
        else:
            table, sym_remap = self._string_table(strndx, sym["st_name"].tolist() + extra)
            names, sec_remap = self._string_table(shstrndx, sh["sh_name"][kept_idx].tolist())
            replaced = {strndx: table, shstrndx: names}
        sym["st_name"] = [sym_remap[v] for v in sym["st_name"].tolist()]
        for arr, rows in string_cols:
            arr[rows, 1] = [sym_remap[int(v)] for v in arr[rows, 1].tolist()]
        if graph is not None:
            replaced[graph[0].index] = graph[1].tobytes()
        if proto is not None:
            replaced[proto[0].index] = proto[1].tobytes()
        sh["sh_name"][kept_idx] = [sec_remap[v] for v in sh["sh_name"][kept_idx].tolist()]
        replaced[self.symtab.index] = sym.tobytes()
        if self.xindex is not None:
            if self.xindex.size != 4 * len(sym):
                raise _Refused("extended section index table does not match the symbol table")
            xi = np.frombuffer(self.view, "<u4", len(sym), self.xindex.offset).copy()
            xi[dropped_symbol] = 0
            replaced[self.xindex.index] = xi.tobytes()
        for s in self.sections:
            if not keep_section[s.index]:
                continue
            if s.type == SHT_CUDA_INFO and s.name == ".nv.info" and not s.flags & SHF_INFO_LINK:
                replaced[s.index] = self._filtered_info(s, dropped_symbol)

        # File items in their original order: sections with bytes and the two header tables.
        items = []      # (original offset, original size, kind, index, kept)
        for s in self.sections:
            if s.type not in (SHT_NULL, SHT_NOBITS) and s.size:
                items.append((s.offset, s.size, "section", s.index, bool(keep_section[s.index])))
        items.append((h.e_shoff, len(sh) * _SHDR.itemsize, "shdr", -1, True))
        if h.e_phnum:
            if h.e_phentsize != _PHDR.itemsize:
                raise _Refused(f"program header size {h.e_phentsize}")
            elf.check_range(self.view, h.e_phoff, h.e_phnum * _PHDR.itemsize, "program headers")
            items.append((h.e_phoff, h.e_phnum * _PHDR.itemsize, "phdr", -1, True))
        items.sort(key=lambda it: (it[0], it[1]))
        for a, b in zip(items, items[1:]):
            if a[0] + a[1] > b[0]:
                raise _Refused("overlapping sections")
        cursor = elf.ELF64_EHDR.size
        if items and items[0][0] < cursor:
            raise _Refused("a section overlaps the ELF header")
        placed = []     # (new offset, new size) per item; dropped: (cursor, 0)
        for off, size, kind, idx, kept in items:
            if not kept:
                placed.append((cursor, 0))
                continue
            if kind == "section":
                size = len(replaced[idx]) if idx in replaced else size
                alignment = max(1, int(sh[idx]["sh_addralign"]))
            else:
                alignment = 8
            start = _align(cursor, alignment)
            placed.append((start, size))
            cursor = start + size
        total = cursor
        starts = np.array([it[0] for it in items], dtype=np.int64)

        def moved(offset: int) -> int:
            """New position of an original file offset that starts no item of its own."""
            k = int(np.searchsorted(starts, offset, side="left"))
            return placed[k][0] if k < len(placed) else total

        new_offset = {}
        for (off, size, kind, idx, kept), (start, new_size) in zip(items, placed):
            if kind == "section":
                new_offset[idx] = (start, new_size)
            else:
                new_offset[kind] = (start, new_size)
        for s in self.sections:
            i = s.index
            if not keep_section[i]:
                sh[i] = np.zeros(1, dtype=_SHDR)
            elif i in new_offset:
                sh[i]["sh_offset"], sh[i]["sh_size"] = new_offset[i]
            elif i != 0:
                sh[i]["sh_offset"] = moved(s.offset)
        if not keep_section[shstrndx] or not keep_section[strndx]:
            raise _Refused("a string table would be dropped")
        ph = None
        if h.e_phnum:
            ph, tail_offsets = self._program_headers(items, starts, placed, keep_section,
                                                     new_offset, moved)
            for i, offset in tail_offsets.items():
                sh[i]["sh_offset"] = offset
                total = max(total, offset)

        if total > len(self.view) + MAX_ALIGNMENT:
            raise _Refused("the cut image would be larger than the whole one")
        out = bytearray(total)
        header = bytearray(self.view[:elf.ELF64_EHDR.size])
        header[0x20:0x28] = int(new_offset["phdr"][0] if h.e_phnum else 0).to_bytes(8, "little")
        header[0x28:0x30] = int(new_offset["shdr"][0]).to_bytes(8, "little")
        out[:len(header)] = header
        for (off, size, kind, idx, kept), (start, new_size) in zip(items, placed):
            if not kept:
                continue
            if kind == "shdr":
                blob = sh.tobytes()
            elif kind == "phdr":
                blob = ph.tobytes()
            else:
                blob = replaced[idx] if idx in replaced else self.view[off:off + size]
            out[start:start + new_size] = blob
        return bytes(out)

    def _program_headers(self, items, starts, placed, keep_section, new_offset, moved) -> tuple:
        """Each segment re-derived from the sections it spans. The rules are first applied to
        the original layout and must give back its headers exactly. A segment with a NOBITS
        tail (``.nv.global``, ``.nv.shared.*``) ends its file part where the tail starts, at the
        tail's alignment; the tail sections' offsets are that point. Returns the headers and
        ``{section index: new offset}`` for the tail sections."""
        h = self.header
        ph = np.frombuffer(self.view, _PHDR, h.e_phnum, h.e_phoff).copy()
        nobits = [s for s in self.sections if s.type == SHT_NOBITS and s.flags & SHF_ALLOC]
        tail_offsets = {}
        sizes = np.array([it[1] for it in items], dtype=np.int64)
        ends = starts + sizes
        for p in ph:
            ptype, off, filesz, memsz = (int(p["p_type"]), int(p["p_offset"]), int(p["p_filesz"]),
                                         int(p["p_memsz"]))
            elf.check_range(self.view, off, filesz, "program segment")
            if memsz < filesz:
                raise BinaryFormatError(f"program segment at {off}: memory size {memsz} below "
                                        f"its file size {filesz}")
            if ptype == PT_PHDR:
                p["p_offset"] = new_offset["phdr"][0]
                continue
            if ptype != PT_LOAD:
                raise _Refused(f"program header of type {ptype:#x}")
            tail = [s for s in nobits if s.offset == off + filesz] if memsz > filesz else []
            if self._nobits_size(tail, lambda s: True) != memsz - filesz:
                raise _Refused("a segment's memory size is not its sections'")
            pad = max([int(self.sh[s.index]["sh_addralign"]) for s in tail] + [1])
            inside = (starts >= off) & (ends <= off + filesz) & (sizes > 0)
            members = np.flatnonzero(inside).tolist()
            if filesz:
                if not members or items[members[0]][0] != off or \
                        _align(max(items[k][0] + items[k][1] for k in members), pad) != off + filesz:
                    raise _Refused("a segment does not span whole sections")
                if ((starts < off + filesz) & (ends > off) & ~inside).any():
                    raise _Refused("a section straddles a segment boundary")
            live = [k for k in members if placed[k][1]]
            if live:
                start = placed[live[0]][0]
                end = _align(max(placed[k][0] + placed[k][1] for k in live), pad)
                p["p_offset"], p["p_filesz"] = start, end - start
            else:
                p["p_offset"], p["p_filesz"] = moved(off), 0
            for s in tail:
                if keep_section[s.index]:
                    tail_offsets[s.index] = int(p["p_offset"]) + int(p["p_filesz"])
            p["p_memsz"] = int(p["p_filesz"]) + self._nobits_size(tail, lambda s: keep_section[s.index])
        return ph, tail_offsets

    def _nobits_size(self, sections, kept) -> int:
        size = 0
        for s in sections:
            if kept(s):
                size = _align(size, max(1, int(self.sh[s.index]["sh_addralign"]))) + s.size
        return size
