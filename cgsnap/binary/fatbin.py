"""Parser for NVIDIA fatbin containers (``nvcc -fatbin`` files, ``.nv_fatbin`` sections).

No NVIDIA header documents this format. The layout below was checked field by field against
nvcc/fatbinary 13.0 output (every --compress-mode, -G, -rdc, lto_XX, 'a'/'f' targets) with
cuobjdump 13.5 as the oracle, and agrees with the public parsers n-eiling/cuda-fatbin-decompression
(fatbin-decompress.h), jiegec/fatbinary (src/lib.rs) and GrigoryEvko/nvopen-tools
(fatbin/FORMAT_SPECIFICATION.md). All integers are little-endian.

Container header (16 bytes)::

    0  u32 magic        0xBA55ED50
    4  u16 version      1
    6  u16 header_size  16: entries start at container + header_size
    8  u64 fat_size     bytes of entries that follow the header

Entry header (64 bytes, then header_size - 64 bytes of optional data), then the payload::

    0  u16 kind              1 PTX, 2 ELF cubin, 8 NVVM/LTO IR
    2  u16 version           0x0101
    4  u32 header_size       64, 80, 96, 112, ...: payload starts at entry + header_size
    8  u64 payload_size      stored payload bytes, padded to 8; next entry follows them
   16  u32 compressed_size   bytes of compressed data in the payload (0 when uncompressed)
   20  u32 options_offset    entry-relative offset of {u32 offset, u32 size} of ptxas options
   24  u16 minor, u16 major  code version: ELF ABI (1.8) or PTX ISA (9.0)
   28  u32 arch             SM number: 90 for sm_90, sm_90a and compute_90
   32  u32 name_offset, u32 name_size    entry-relative source file name (-G builds)
   40  u64 flags             see FLAG_* below
   48  u64 reserved
   56  u64 uncompressed_size payload size after decompression (0 when uncompressed)

A section can hold several containers back to back (one per linked object file).

Budgets (:class:`cgsnap.Limits`, charged to one :class:`~cgsnap.limits.Meter` per file):
``fatbin_entries`` entries in all; an entry is decompressed only if its declared size is at most
``fatbin_entry_bytes`` and the file's total stays within ``binary_decompressed_bytes`` (checked
before anything is allocated; a declared size is also refused when parsed if the compressed
bytes cannot make it). Overlapping fatbin sections are refused (each would be parsed again:
2048 of them cost quadratic time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import lz4.block
import zstandard

from ..errors import BinaryFormatError
from ..limits import Meter
from .elf import SHT_NOBITS, ElfFile, Section, StructLayout, as_view, check_range

FATBIN_MAGIC = 0xBA55ED50
FATBIN_VERSION = 1

# Host-ELF sections that hold fatbin containers. .nvFatBinSegment holds only the
# __fatBinC_Wrapper_t structs (magic 0x466243B1) that point at .nv_fatbin, so it is not listed.
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")

FLAG_64BIT = 0x1
FLAG_DEBUG = 0x2
FLAG_HOST_LINUX = 0x10
FLAG_COMPRESSED_LZ4 = 0x2000   # LZ4 block format, no frame: --compress-mode=speed
FLAG_COMPRESSED_ZSTD = 0x8000  # one zstd frame: --compress-mode=default/balance/size
# Set by nvcc on LTO-IR entries, whose payload is then neither plain nor zstd/LZ4 (it looks
# encrypted; the 'reserved' header field becomes nonzero). cgsnap cannot read such payloads.
FLAG_ENCODED = 0x10000
FLAG_ARCH_SPECIFIC = 0x100000    # sm_90a / compute_90a
FLAG_FAMILY_SPECIFIC = 0x200000  # sm_100f / compute_100f (the cubin itself cannot tell)

KINDS = {1: "ptx", 2: "cubin", 8: "ltoir"}


CONTAINER_HEADER = StructLayout("FatbinHeader", [
    ("I", "magic"), ("H", "version"), ("H", "header_size"), ("Q", "fat_size"),
])
ENTRY_HEADER = StructLayout("FatbinEntryHeader", [
    ("H", "kind"), ("H", "version"), ("I", "header_size"), ("Q", "payload_size"),
    ("I", "compressed_size"), ("I", "options_offset"), ("H", "minor"), ("H", "major"),
    ("I", "arch"), ("I", "name_offset"), ("I", "name_size"), ("Q", "flags"),
    ("Q", "reserved"), ("Q", "uncompressed_size"),
])


@dataclass(slots=True)     # not frozen: a frozen init costs 3 us an entry, and files have 10^5
class Entry:
    """One image of a container. ``offset`` is that of its header in the data given to the parser."""

    offset: int
    kind: str  # 'ptx' | 'cubin' | 'ltoir' | 'unknown'
    kind_id: int
    arch: int
    variant: str  # '' | 'a' | 'f'
    flags: int
    compression: str  # 'none' | 'zstd' | 'lz4'
    header_size: int
    payload_size: int
    uncompressed_size: int
    _stored: memoryview = field(repr=False, compare=False)
    _meter: Meter | None = field(default=None, repr=False, compare=False)

    @property
    def arch_name(self) -> str:
        return f"sm_{self.arch}{self.variant}"

    def raw(self) -> memoryview:
        """The payload as stored (still compressed, without the padding), zero-copy."""
        return self._stored

    def payload(self) -> bytes:
        """The decompressed payload; PTX text loses its trailing NUL padding."""
        if self.flags & FLAG_ENCODED:
            raise BinaryFormatError(
                f"fatbin entry at offset {self.offset} has an encoded payload cgsnap cannot read")
        if self.compression != "none":
            meter = self._meter if self._meter is not None else Meter()
            what = f"fatbin entry at offset {self.offset}"
            meter.limits.check("fatbin_entry_bytes", self.uncompressed_size,
                               f"{what} (uncompressed size)")
            meter.charge("binary_decompressed_bytes", self.uncompressed_size, what)
            data = _decompress(self)
        else:
            data = bytes(self._stored)
        return data.rstrip(b"\0") if self.kind == "ptx" else data


class Container(NamedTuple):
    offset: int
    size: int  # header and entries: the next container starts at offset + size
    entries: list[Entry]


def iter_containers(data, meter: Meter | None = None) -> Iterator[Container]:
    """Every container in ``data``, in order; zero padding between and after them is skipped.
    ``meter``: the file's budgets (:class:`cgsnap.limits.Meter`); by default those of
    :data:`cgsnap.limits.DEFAULT_LIMITS` for ``data`` alone."""
    view = as_view(data)
    meter = meter if meter is not None else Meter()
    offset = _skip_padding(view, 0)
    while offset < len(view):
        container = _parse_container(view, offset, meter)
        yield container
        offset = _skip_padding(view, offset + container.size)


def fatbin_section_headers(elf: ElfFile) -> list[Section]:
    """A host ELF's fatbin sections (see FATBIN_SECTIONS) in section order, refused when two
    overlap: no linker writes that, and each copy would be parsed again."""
    sections = [sec for sec in elf.sections if sec.name in FATBIN_SECTIONS
                and sec.type != SHT_NOBITS and sec.size]
    spans = sorted((sec.offset, sec.offset + sec.size, sec.name) for sec in sections)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise BinaryFormatError(f"fatbin sections overlap ({name} and {other} at offset "
                                    f"{start})")
    return sections


def fatbin_sections(elf: ElfFile) -> list[memoryview]:
    """Contents of a host ELF's fatbin sections (see :func:`fatbin_section_headers`)."""
    return [elf.section_data(sec) for sec in fatbin_section_headers(elf)]


_PAD_STEP = 1 << 16


def _skip_padding(view: memoryview, offset: int) -> int:
    # The linker aligns each object file's container inside .nv_fatbin; any gap is zeros.
    # Scanned a block at a time (a byte-at-a-time loop took seconds over a large zero gap).
    end = len(view)
    while offset < end:
        block = bytes(view[offset:offset + _PAD_STEP])
        rest = block.lstrip(b"\0")
        if rest:
            return offset + len(block) - len(rest)
        offset += len(block)
    return end


def _parse_container(view: memoryview, offset: int, meter: Meter) -> Container:
    header = CONTAINER_HEADER.read(view, offset, "fatbin header")
    if header.magic != FATBIN_MAGIC:
        raise BinaryFormatError(f"bad fatbin magic {header.magic:#010x} at offset {offset}")
    if header.version != FATBIN_VERSION:
        raise BinaryFormatError(f"unsupported fatbin version {header.version} at offset {offset}")
    if header.header_size < CONTAINER_HEADER.size:
        raise BinaryFormatError(
            f"fatbin header size {header.header_size} at offset {offset} is too small")
    size = header.header_size + header.fat_size
    check_range(view, offset, size, "fatbin container")
    end = offset + size
    entries = []
    position = offset + header.header_size
    while position < end:
        meter.charge("fatbin_entries", 1, f"fatbin entry at offset {position}")
        entry = _parse_entry(view, position, end, meter)
        entries.append(entry)
        position += entry.header_size + entry.payload_size
    return Container(offset, size, entries)


def _parse_entry(view: memoryview, offset: int, end: int, meter: Meter) -> Entry:
    # Bounded by the container, not the data: an entry must not spill into the next container.
    h = ENTRY_HEADER.read(view[:end], offset, "fatbin entry header")
    if h.header_size < ENTRY_HEADER.size:
        raise BinaryFormatError(
            f"fatbin entry header size {h.header_size} at offset {offset} is too small")
    payload_offset = offset + h.header_size
    check_range(view[:end], payload_offset, h.payload_size, "fatbin entry payload")
    compression = _compression(h, offset)
    stored = h.compressed_size if compression != "none" else h.payload_size
    return Entry(
        offset=offset, kind=KINDS.get(h.kind, "unknown"), kind_id=h.kind, arch=h.arch,
        variant="a" if h.flags & FLAG_ARCH_SPECIFIC else "f" if h.flags & FLAG_FAMILY_SPECIFIC else "",
        flags=h.flags, compression=compression, header_size=h.header_size, payload_size=h.payload_size,
        uncompressed_size=h.uncompressed_size if compression != "none" else h.payload_size,
        _stored=view[payload_offset:payload_offset + stored], _meter=meter)


# The most each format can expand: an LZ4 sequence copies at most 255 bytes per input byte (plus
# a few); a zstd RLE block makes 128 KiB of 4 bytes.
_MAX_RATIO = {True: 256, False: 32768}


def _compression(h, offset: int) -> str:
    lz4_flag, zstd_flag = bool(h.flags & FLAG_COMPRESSED_LZ4), bool(h.flags & FLAG_COMPRESSED_ZSTD)
    if lz4_flag and zstd_flag:
        raise BinaryFormatError(f"fatbin entry at offset {offset} claims both LZ4 and zstd compression")
    if not (lz4_flag or zstd_flag):
        return "none"
    if not 0 < h.compressed_size <= h.payload_size:
        raise BinaryFormatError(
            f"fatbin entry at offset {offset}: compressed size {h.compressed_size} "
            f"does not fit its payload of {h.payload_size} bytes")
    ratio = _MAX_RATIO[lz4_flag]
    if not 0 < h.uncompressed_size <= ratio * h.compressed_size:
        raise BinaryFormatError(
            f"fatbin entry at offset {offset}: uncompressed size {h.uncompressed_size} is not "
            f"in 1..{ratio * h.compressed_size} ({'LZ4' if lz4_flag else 'zstd'} cannot expand "
            f"{h.compressed_size} bytes more than {ratio}x)")
    return "lz4" if lz4_flag else "zstd"


def _decompress(entry: Entry) -> bytes:
    size = entry.uncompressed_size
    try:
        if entry.compression == "lz4":
            data = lz4.block.decompress(entry.raw(), uncompressed_size=size)
        else:
            data = _unzstd(entry.raw(), size)
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise BinaryFormatError(
            f"fatbin entry at offset {entry.offset}: corrupt {entry.compression} data ({e})") from e
    if len(data) != size:
        raise BinaryFormatError(
            f"fatbin entry at offset {entry.offset}: {entry.compression} data decompressed to "
            f"{len(data)} bytes, header says {size}")
    return data


def _unzstd(data: memoryview, size: int) -> bytes:
    # A frame may declare its own content size; refuse one that disagrees with the header
    # before zstandard allocates it. Without one, max_output_size bounds the output.
    declared = zstandard.get_frame_parameters(data).content_size
    if declared not in (0, zstandard.CONTENTSIZE_UNKNOWN) and declared != size:
        raise BinaryFormatError(f"zstd frame declares {declared} bytes, fatbin header says {size}")
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
