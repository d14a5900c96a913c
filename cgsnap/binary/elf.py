"""A minimal, bounds-checked reader for little-endian ELF64 files: CUDA cubins and host binaries.

Hand-written rather than pyelftools because cgsnap scans thousands of cubins (one per fatbin
entry, many per library) and must stay fast and dependency-free. Everything is zero-copy over
the caller's ``bytes``/``memoryview``/``mmap``, parsed lazily, and every offset read from the
file is checked before use: a malformed image raises :class:`BinaryFormatError`, never
``IndexError`` or ``struct.error``. What a crafted image can make the reader do is bounded by
:class:`cgsnap.Limits` (``elf_sections``, ``elf_symbols``, ``elf_name_bytes``): section and symbol
counts are checked before their tables are read, and each distinct name is decoded once.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from functools import cached_property
from typing import NamedTuple

import numpy as np

from ..errors import BinaryFormatError
from ..limits import Limits, resolve

EM_CUDA = 190

EI_OSABI = 7
EI_ABIVERSION = 8

SHT_SYMTAB = 2
SHT_NOBITS = 8
SHT_DYNSYM = 11
SHT_SYMTAB_SHNDX = 18

STT_OBJECT = 1
STT_FUNC = 2
STT_CUDA_OBJECT = 13  # what relocatable (-rdc) cubins use for externally visible variables

SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
SHN_XINDEX = 0xFFFF

# st_other bit that ptxas sets on kernel entry points (``__global__`` functions). Device
# functions compiled with -rdc also get their own .text.<name> and .nv.info.<name> sections,
# and kernels with internal linkage are STB_LOCAL, so this bit is the only reliable marker.
STO_CUDA_ENTRY = 0x10


def as_view(data) -> memoryview:
    """A flat, byte-indexed memoryview over ``data`` (bytes, bytearray, memoryview, mmap)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def check_range(view: memoryview, offset: int, size: int, what: str) -> None:
    """Raise unless ``view[offset:offset + size]`` lies entirely inside ``view``."""
    if offset < 0 or size < 0 or offset + size > len(view):
        raise BinaryFormatError(
            f"{what} at offset {offset} (size {size}) runs past the end of the data ({len(view)} bytes)")


class StructLayout:
    """A fixed-size little-endian record, declared once with its field names from the spec."""

    def __init__(self, name: str, fields: list[tuple[str, str]]):
        self.struct = struct.Struct("<" + "".join(fmt for fmt, _ in fields))
        self.size = self.struct.size
        self._tuple = namedtuple(name, [field for _, field in fields])

    def read(self, view: memoryview, offset: int, what: str):
        check_range(view, offset, self.size, what)
        return self._tuple._make(self.struct.unpack_from(view, offset))

    def read_array(self, view: memoryview, offset: int, count: int, what: str) -> list:
        check_range(view, offset, self.size * count, what)
        make = self._tuple._make
        table = view[offset:offset + self.size * count]
        return [make(fields) for fields in self.struct.iter_unpack(table)]


ELF64_EHDR = StructLayout("Elf64_Ehdr", [
    ("16s", "e_ident"), ("H", "e_type"), ("H", "e_machine"), ("I", "e_version"),
    ("Q", "e_entry"), ("Q", "e_phoff"), ("Q", "e_shoff"), ("I", "e_flags"),
    ("H", "e_ehsize"), ("H", "e_phentsize"), ("H", "e_phnum"),
    ("H", "e_shentsize"), ("H", "e_shnum"), ("H", "e_shstrndx"),
])
ELF64_SHDR = StructLayout("Elf64_Shdr", [
    ("I", "sh_name"), ("I", "sh_type"), ("Q", "sh_flags"), ("Q", "sh_addr"),
    ("Q", "sh_offset"), ("Q", "sh_size"), ("I", "sh_link"), ("I", "sh_info"),
    ("Q", "sh_addralign"), ("Q", "sh_entsize"),
])
ELF64_SYM = StructLayout("Elf64_Sym", [
    ("I", "st_name"), ("B", "st_info"), ("B", "st_other"), ("H", "st_shndx"),
    ("Q", "st_value"), ("Q", "st_size"),
])

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1


class Section(NamedTuple):
    name: str
    type: int
    offset: int
    size: int
    addr: int
    flags: int
    link: int
    info: int
    entsize: int
    index: int


class Symbol(NamedTuple):
    name: str
    value: int
    size: int
    type: int
    bind: int
    shndx: int
    section_name: str | None  # None for SHN_UNDEF, SHN_ABS, SHN_COMMON, ...
    other: int


class ElfFile:
    """A little-endian ELF64 image. Only the ELF header is read up front. ``limits``: the
    reading budgets (:class:`cgsnap.Limits`)."""

    def __init__(self, data, name: str = "<bytes>", limits: Limits | None = None):
        self.name = name
        self.limits = resolve(limits)
        self._names: dict = {}          # (string table, offset) -> name, each decoded once
        self._name_bytes = 0
        self._view = as_view(data)
        if bytes(self._view[:4]) != _ELF_MAGIC:
            raise BinaryFormatError("not an ELF file (bad magic)")
        self.header = ELF64_EHDR.read(self._view, 0, "ELF header")
        ident = self.header.e_ident
        if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB:
            raise BinaryFormatError("only little-endian ELF64 is supported")
        self._strtabs: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"<ElfFile {self.name} machine={self.machine} flags={self.e_flags:#x}>"

    @property
    def machine(self) -> int:
        return self.header.e_machine

    @property
    def e_flags(self) -> int:
        return self.header.e_flags

    @property
    def e_type(self) -> int:
        return self.header.e_type

    @property
    def osabi(self) -> int:
        return self.header.e_ident[EI_OSABI]

    @property
    def abiversion(self) -> int:
        return self.header.e_ident[EI_ABIVERSION]

    @cached_property
    def sections(self) -> list[Section]:
        headers = self._section_headers()
        names = self._section_names(headers)
        table = self._name_table_index(len(headers), headers[0].sh_link) if headers else None
        return [
            Section(self._string(table, names, h.sh_name, "section name")
                    if names is not None else "",
                    h.sh_type, h.sh_offset, h.sh_size, h.sh_addr, h.sh_flags, h.sh_link, h.sh_info,
                    h.sh_entsize, index)
            for index, h in enumerate(headers)
        ]

    def section(self, name: str) -> Section | None:
        return next((sec for sec in self.sections if sec.name == name), None)

    def section_data(self, sec: Section) -> memoryview:
        """The section's bytes, zero-copy; empty for SHT_NOBITS (.bss-like) sections."""
        if sec.type == SHT_NOBITS:
            return self._view[0:0]
        check_range(self._view, sec.offset, sec.size, f"section {sec.name!r}")
        return self._view[sec.offset:sec.offset + sec.size]

    def symbols(self) -> list[Symbol]:
        """Symbols of .symtab, or of .dynsym when the image is stripped; [] when it has neither."""
        return list(self._symbols)

    @cached_property
    def _symbols(self) -> tuple[Symbol, ...]:
        sections = self.sections
        table = (next((s for s in sections if s.type == SHT_SYMTAB), None)
                 or next((s for s in sections if s.type == SHT_DYNSYM), None))
        if table is None:
            return ()
        if table.entsize not in (0, ELF64_SYM.size):
            raise BinaryFormatError(f"symbol table {table.name!r} has entry size {table.entsize}")
        if table.link >= len(sections):
            raise BinaryFormatError(f"symbol table {table.name!r} links to missing section {table.link}")
        link = sections[table.link]
        strings = self._strtab_bytes(table.link, link.type, link.offset, link.size)
        count = table.size // ELF64_SYM.size
        self.limits.check("elf_symbols", count, self._where(f"symbol table {table.name!r}"))
        entries = ELF64_SYM.read_array(self._view, table.offset, count,
                                       f"symbol table {table.name!r}")
        extended = self._extended_indices(table)
        return tuple(self._symbol(i, e, table.link, strings, extended)
                     for i, e in enumerate(entries))

    def _symbol(self, i: int, entry, link: int, strings: bytes,
                extended: memoryview | None) -> Symbol:
        shndx, special = entry.st_shndx, entry.st_shndx == SHN_UNDEF or entry.st_shndx >= SHN_LORESERVE
        if shndx == SHN_XINDEX and extended is not None:
            check_range(extended, 4 * i, 4, "extended section index")
            shndx, special = int.from_bytes(extended[4 * i:4 * i + 4], "little"), False
        if not special and shndx >= len(self.sections):
            raise BinaryFormatError(f"symbol {i} refers to missing section {shndx}")
        return Symbol(self._string(link, strings, entry.st_name, "symbol name"), entry.st_value,
                      entry.st_size,
                      entry.st_info & 0xF, entry.st_info >> 4, shndx,
                      None if special else self.sections[shndx].name, entry.st_other)

    def _extended_indices(self, table: Section) -> memoryview | None:
        """The SHT_SYMTAB_SHNDX table that holds section indices >= SHN_LORESERVE, if any."""
        indices = next((s for s in self.sections
                        if s.type == SHT_SYMTAB_SHNDX and s.link == table.index), None)
        return self.section_data(indices) if indices else None

    def _section_count(self) -> int:
        """Entries of the section header table (0 when there is none)."""
        h = self.header
        if h.e_shoff == 0:
            return 0
        if h.e_shentsize != ELF64_SHDR.size:
            raise BinaryFormatError(f"section header size {h.e_shentsize}, expected {ELF64_SHDR.size}")
        count = h.e_shnum or \
            ELF64_SHDR.read(self._view, h.e_shoff, "section header 0").sh_size
        # (More than SHN_LORESERVE sections: the real count is in section 0.)
        self.limits.check("elf_sections", count, self._where("the section header table"))
        return count

    def _section_headers(self) -> list:
        count = self._section_count()
        if not count:
            return []
        return ELF64_SHDR.read_array(self._view, self.header.e_shoff, count, "section header table")

    def _name_table_index(self, count: int, section0_link: int) -> int | None:
        """Index of the section-name string table among ``count`` sections, or None."""
        index = self.header.e_shstrndx
        if index == SHN_XINDEX:  # Index too large for the header field: it is in section 0.
            index = section0_link
        if index == SHN_UNDEF:
            return None
        if index >= count:
            raise BinaryFormatError(f"section name table index {index} out of range ({count} sections)")
        return index

    def _section_names(self, headers: list) -> bytes | None:
        """The section-name string table, or None when the image has none."""
        if not headers:
            return None
        index = self._name_table_index(len(headers), headers[0].sh_link)
        if index is None:
            return None
        h = headers[index]
        return self._strtab_bytes(index, h.sh_type, h.sh_offset, h.sh_size)

    def _strtab_bytes(self, index: int, sh_type: int, offset: int, size: int) -> bytes:
        # String tables are copied once so that names can be found with bytes.find.
        if index not in self._strtabs:
            if sh_type == SHT_NOBITS:
                raise BinaryFormatError(f"string table (section {index}) has no data")
            check_range(self._view, offset, size, f"string table (section {index})")
            self._strtabs[index] = bytes(self._view[offset:offset + size])
        return self._strtabs[index]

    def _string(self, table_index, table: bytes, offset: int, what: str) -> str:
        """The NUL-terminated name at ``offset`` of a string table, decoded once per offset and
        charged to the ``elf_name_bytes`` budget (4096 headers naming one 1 MB string would
        otherwise be 4 GB of names)."""
        key = (table_index, offset)
        name = self._names.get(key)
        if name is None:
            end = table.find(b"\0", offset)
            if offset >= len(table) or end < 0:
                raise BinaryFormatError(
                    f"{what} at string table offset {offset} is out of range or unterminated")
            self.charge_names(end - offset, what)
            name = self._names[key] = table[offset:end].decode("utf-8", "replace")
        return name

    def charge_names(self, n: int, what: str) -> None:
        self._name_bytes += n
        self.limits.check("elf_name_bytes", self._name_bytes, self._where(f"{what}s"))

    def _where(self, what: str) -> str:
        return what if self.name == "<bytes>" else f"{self.name}: {what}"


# --- CUDA architecture decoding ---------------------------------------------------------------
#
# Sources: LLVM's llvm/include/llvm/BinaryFormat/ELF.h (EF_CUDA_* and ELFABIVERSION_CUDA_V1/V2),
# checked against real output of nvcc/ptxas 13.0 and ptxas 12.9 (pip nvidia-cuda-nvcc-cu12) with
# `cuobjdump -elf` / `--list-elf` 13.5 as the oracle (no CUDA header documents these bits):
#
#   EI_ABIVERSION 7 (ptxas <= 12.9 for sm < 100; EI_OSABI 0x33):
#       e_flags = virtual SM << 16 | 0x800 ('a', EF_CUDA_ACCELERATORS_V1) | 0x400 (64-bit address)
#                 | 0x100 (unified texmode) | SM.         sm_90 = 0x5a055a, sm_90a = 0x5a0d5a
#   EI_ABIVERSION 8 (ptxas 12.8+ for sm >= 100, ptxas 13 for every SM; EI_OSABI 0x41):
#       e_flags = SM << 8 | small flags in the low byte (0x02 or 0x04 seen; 0x08 is
#                 EF_CUDA_ACCELERATORS, set for 'a' by ptxas 12.9 only) | 0x06000000.
#                 The virtual SM is no longer in e_flags.
#                 sm_90 = 0x06005a04, sm_100 = 0x06006402, sm_100a (ptxas 12.9) = 0x0600640a
#
# ptxas 13.0 writes *identical* e_flags for sm_90 and sm_90a (and sm_100/sm_100a, ...): the
# 'a' marker moved to attribute 0x09 of the .nv.compat section (value 1), which is what
# cuobjdump reads first; it only falls back to the e_flags bit when that attribute is absent.
# The 'f' (family) suffix is recorded nowhere in a cubin: sm_100f and sm_100 cubins differ
# only in the .note.nv.tkinfo command-line string, and cuobjdump names both "sm_100". Only the
# fatbin entry flags carry 'f' (see cgsnap.binary.fatbin).

ELFABIVERSION_CUDA_V2 = 8
EF_CUDA_SM = 0xFF
EF_CUDA_ACCELERATORS_V1 = 0x800
EF_CUDA_SM_MASK = 0xFF00
EF_CUDA_SM_OFFSET = 8
EF_CUDA_ACCELERATORS = 0x8
_LOWEST_SM = 0x14  # sm_20; new-ABI low bytes hold only flags below this

NV_COMPAT_ARCH_SPECIFIC = 0x09
_EIFMT_SVAL = 4


def _new_abi(e_flags: int, abiversion: int | None) -> bool:
    if abiversion is not None:
        return abiversion >= ELFABIVERSION_CUDA_V2
    # Without EI_ABIVERSION, the old layout is the one whose low byte is a real SM number.
    return (e_flags & EF_CUDA_SM) < _LOWEST_SM


def cuda_arch(e_flags: int, abiversion: int | None = None) -> int:
    """SM number of a cubin (90 for sm_90/sm_90a) from its e_flags and EI_ABIVERSION."""
    if _new_abi(e_flags, abiversion):
        return (e_flags & EF_CUDA_SM_MASK) >> EF_CUDA_SM_OFFSET
    return e_flags & EF_CUDA_SM


def cuda_arch_name(e_flags: int, abiversion: int | None = None,
                   arch_specific: bool | None = None) -> str:
    """'sm_90a'-style name. ``arch_specific`` (from .nv.compat) overrides the e_flags 'a' bit."""
    if arch_specific is None:
        bit = EF_CUDA_ACCELERATORS if _new_abi(e_flags, abiversion) else EF_CUDA_ACCELERATORS_V1
        arch_specific = bool(e_flags & bit)
    return f"sm_{cuda_arch(e_flags, abiversion)}{'a' if arch_specific else ''}"


def nv_info_records(data: memoryview, what: str):
    """``(format, attribute, value, start, end)`` of each record of an ``.nv.info``-style
    section (``.nv.info``, ``.nv.info.<function>``, ``.nv.compat``): u8 format, u8 attribute,
    u16 value -- except format 4 (EIFMT_SVAL), where the u16 is the length of the value bytes
    that follow. ``value`` is the int, or for EIFMT_SVAL a view of the bytes; the record spans
    ``data[start:end]``."""
    offset = 0
    while offset < len(data):
        check_range(data, offset, 4, f"{what} record")
        fmt, attribute = data[offset], data[offset + 1]
        value = int.from_bytes(data[offset + 2:offset + 4], "little")
        start, offset = offset, offset + 4
        if fmt == _EIFMT_SVAL:
            check_range(data, offset, value, f"{what} value")
            value, offset = data[offset:offset + value], offset + value
        yield fmt, attribute, value, start, offset


def nv_compat_attributes(data: memoryview) -> dict[int, int | memoryview]:
    """Attributes of a .nv.compat section: {attribute: value} (see :func:`nv_info_records`)."""
    return {attribute: value
            for _, attribute, value, _, _ in nv_info_records(data, ".nv.compat")}


# --- cubin contents ---------------------------------------------------------------------------

class GlobalSym(NamedTuple):
    name: str
    size: int
    section: str
    space: str  # "global" (__device__, __managed__) or "constant" (__constant__)


class CubinInfo(NamedTuple):
    arch: int
    arch_name: str
    kernels: list[str]
    globals: list[GlobalSym]


def _variable_space(section_name: str) -> str | None:
    if section_name in (".nv.global", ".nv.global.init"):
        return "global"
    # .nv.constant<bank> holds __constant__ variables; .nv.constant0.<kernel> (parameters) and
    # other per-kernel banks carry a suffix and hold no user variables.
    if section_name.startswith(".nv.constant") and section_name[len(".nv.constant"):].isdigit():
        return "constant"
    return None


def cubin_info(data, limits: Limits | None = None) -> CubinInfo:
    """Architecture, kernel entry points and module-scope variables of a CUDA cubin."""
    elf = ElfFile(data, limits=limits)
    if elf.machine != EM_CUDA:
        raise BinaryFormatError(f"not a CUDA cubin (e_machine {elf.machine}, expected {EM_CUDA})")
    kernels: list[str] = []
    variables: list[GlobalSym] = []
    for sym in elf.symbols():
        if sym.section_name is None:
            continue
        is_entry = sym.type == STT_FUNC and sym.other & STO_CUDA_ENTRY
        if is_entry and sym.section_name == f".text.{sym.name}":
            kernels.append(sym.name)
        elif sym.type in (STT_OBJECT, STT_CUDA_OBJECT) and not sym.name.startswith("$"):
            # '$'-names ($str, $str$1, ...) are compiler-made literals, not user variables.
            space = _variable_space(sym.section_name)
            if space:
                variables.append(GlobalSym(sym.name, sym.size, sym.section_name, space))
    return CubinInfo(cuda_arch(elf.e_flags, elf.abiversion),
                     cuda_arch_name(elf.e_flags, elf.abiversion, _compat_arch_specific(elf)),
                     kernels, variables)


def cubin_arch_name(data, limits: Limits | None = None) -> str:
    """``sm_90a``-style name of a CUDA cubin from its header and ``.nv.compat`` alone (what
    :func:`cubin_info` also reports, without reading its symbols)."""
    elf = ElfFile(data, limits=limits)
    if elf.machine != EM_CUDA:
        raise BinaryFormatError(f"not a CUDA cubin (e_machine {elf.machine}, expected {EM_CUDA})")
    return cuda_arch_name(elf.e_flags, elf.abiversion, _compat_arch_specific(elf))


def global_initial_values(data) -> dict:
    """``{name: bytes}``: the contents a freshly loaded module gives each ``__device__`` /
    ``__constant__`` variable -- its bytes in the defining section, zeros for a ``.nv.global``
    (NOBITS) one. Variables whose bytes lie outside their section are left out (unknown)."""
    elf = ElfFile(data)
    sections = elf.sections
    values = {}
    for sym in elf.symbols():
        if sym.section_name is None or sym.type not in (STT_OBJECT, STT_CUDA_OBJECT) or \
                sym.name.startswith("$") or not _variable_space(sym.section_name):
            continue
        sec = sections[sym.shndx]
        if sec.type == SHT_NOBITS:
            values[sym.name] = bytes(sym.size)
        elif sym.value + sym.size <= sec.size:
            values[sym.name] = bytes(elf.section_data(sec)[sym.value:sym.value + sym.size])
    return values


def _compat_arch_specific(elf: ElfFile) -> bool | None:
    compat = elf.section(".nv.compat")
    if compat is None:
        return None
    value = nv_compat_attributes(elf.section_data(compat)).get(NV_COMPAT_ARCH_SPECIFIC)
    return None if value is None else value == 1


_SHDR_NUMPY = np.dtype([(name, "<u4" if fmt == "I" else "<u8") for fmt, name in
                        (("I", "sh_name"), ("I", "sh_type"), ("Q", "sh_flags"), ("Q", "sh_addr"),
                         ("Q", "sh_offset"), ("Q", "sh_size"), ("I", "sh_link"), ("I", "sh_info"),
                         ("Q", "sh_addralign"), ("Q", "sh_entsize"))])
assert _SHDR_NUMPY.itemsize == ELF64_SHDR.size


def check_cubin(data, kernels) -> list:
    """Cheap structural check of a cubin before it is handed to the driver: an EM_CUDA ELF
    whose section table and section names lie inside the image. Returns the names in
    ``kernels`` that have no ``.text.<name>`` section.

    Runs on every restore over tens of MB of library cubins with thousands of sections, so the
    table is read as one numpy array and the section names are cut out of the string table
    with numpy (at the offsets the sections' name fields point to)."""
    elf = ElfFile(data)
    if elf.machine != EM_CUDA:
        raise BinaryFormatError(f"not a CUDA cubin (e_machine {elf.machine}, expected {EM_CUDA})")
    count = elf._section_count()
    if not count:
        return list(kernels)
    check_range(elf._view, elf.header.e_shoff, ELF64_SHDR.size * count, "section header table")
    table = np.frombuffer(elf._view, dtype=_SHDR_NUMPY, count=count, offset=elf.header.e_shoff)
    index = elf._name_table_index(count, int(table[0]["sh_link"]))
    if index is None:
        return list(kernels)
    strtab = elf._strtab_bytes(index, int(table[index]["sh_type"]), int(table[index]["sh_offset"]),
                               int(table[index]["sh_size"]))
    name_offsets = table["sh_name"]
    if len(name_offsets) and int(name_offsets.max()) >= len(strtab):
        raise BinaryFormatError("a section name is outside the section name table")
    # The name at each offset some section points to (string tables may share suffixes),
    # ending at the next NUL: their total length is bounded by elf_name_bytes before any is
    # sliced, and a kernel is then one set lookup (a strtab.find per kernel would cost a scan
    # of the table for each name the image lacks).
    starts = np.unique(name_offsets)
    zeros = np.flatnonzero(np.frombuffer(strtab, dtype=np.uint8) == 0)
    ends_at = np.searchsorted(zeros, starts)
    if len(starts) and (not len(zeros) or int(ends_at[-1]) >= len(zeros)):
        raise BinaryFormatError("a section name is unterminated")
    ends = zeros[ends_at]
    elf.charge_names(int((ends - starts).sum()), "section name")
    prefix = b".text."
    names = {strtab[a + len(prefix):b] for a, b in zip(starts.tolist(), ends.tolist())
             if strtab.startswith(prefix, a)}
    return [k for k in kernels if k.encode() not in names]


def arch_runs_on(image_arch: int, arch_name: str, device_arch: int) -> bool:
    """Can SASS built for ``image_arch`` run on ``device_arch``? Same major, minor not above the
    device's; arch-specific builds (sm_90a, sm_100f...) only on their exact arch."""
    if arch_name.endswith(("a", "f")):
        return image_arch == device_arch
    return image_arch // 10 == device_arch // 10 and image_arch % 10 <= device_arch % 10
