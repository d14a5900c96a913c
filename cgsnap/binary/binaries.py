"""What GPU code a file carries: the data behind ``cgsnap kernels PATH [--arch sm_90] [--json]``.

Accepts a host ELF (shared library or executable with fatbin sections), a standalone fatbin
(``nvcc -fatbin``) or a cubin, and lists each image with its kernels and module-scope variables.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import re
from typing import Callable, Iterator

from ..errors import BinaryFormatError, CgsnapError
from . import elf as elfmod
from . import fatbin, ptx

_ELF_MAGIC = b"\x7fELF"
_FATBIN_MAGIC = fatbin.FATBIN_MAGIC.to_bytes(4, "little")


def parse_arch(arch: int | str) -> int:
    """90 from 90, '90', 'sm_90', 'sm_90a' or 'compute_90'. A variant suffix is accepted and ignored."""
    if isinstance(arch, int):
        return arch
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)[af]?", arch.strip().lower())
    if not match:
        raise CgsnapError(f"bad architecture {arch!r}: expected sm_NN, compute_NN or NN")
    return int(match.group(1))


def list_binary(path: str | os.PathLike, arch: int | str | None = None) -> list[dict]:
    """One JSON-ready record per GPU image in the file at ``path``, optionally only for one SM."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BinaryFormatError(f"{os.fspath(path)}: empty file")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        with _context(os.fspath(path)):
            return list_image(mapped, arch)
    finally:
        # If parsing failed, the traceback can still hold views into the map; it is then
        # unmapped when they are collected instead.
        with contextlib.suppress(BufferError):
            mapped.close()


def list_image(data, arch: int | str | None = None) -> list[dict]:
    """Like :func:`list_binary`, for an image already in memory (bytes, memoryview, mmap)."""
    view = elfmod.as_view(data)
    want = None if arch is None else parse_arch(arch)
    magic = bytes(view[:4])
    if magic == _ELF_MAGIC:
        elf = elfmod.ElfFile(view)
        if elf.machine == elfmod.EM_CUDA:
            records = [_cubin_record(None, None, None, view)]
        else:
            records = list(_host_records(elf, want))
    elif magic == _FATBIN_MAGIC:
        records = list(_fatbin_records(None, view, want))
    else:
        raise BinaryFormatError("neither an ELF file nor a fatbin")
    # Fatbin entries were already filtered before decompression; this catches a lone cubin.
    return [r for r in records if want is None or parse_arch(r["arch"]) == want]


def _host_records(elf: elfmod.ElfFile, want: int | None) -> Iterator[dict]:
    for sec in elf.sections:
        if sec.name in fatbin.FATBIN_SECTIONS:
            with _context(sec.name):
                yield from _fatbin_records(sec.name, elf.section_data(sec), want)


def _fatbin_records(section: str | None, data, want: int | None) -> Iterator[dict]:
    for i, container in enumerate(fatbin.iter_containers(data)):
        for j, entry in enumerate(container.entries):
            if want is None or entry.arch == want:  # Skip decompressing what is filtered out.
                with _context(f"container {i} entry {j}"):
                    yield _entry_record(section, i, j, entry)


def _entry_record(section: str | None, container: int, index: int, entry: fatbin.Entry) -> dict:
    record = _record(section, container, index, entry.kind, entry.arch_name, entry.compression,
                     entry.uncompressed_size, len(entry.raw()))
    if entry.kind == "cubin":
        info = elfmod.cubin_info(entry.payload())
        # The entry flags may say 'a' or 'f'; a cubin can only say 'a' (and older fatbins may not).
        variant = entry.variant or ("a" if info.arch_name.endswith("a") else "")
        record["arch"] = f"sm_{entry.arch}{variant}"
        _add_cubin_symbols(record, info)
    elif entry.kind == "ptx":
        _add_ptx_symbols(record, entry.payload().decode("utf-8", "replace"))
    return record


def _cubin_record(section, container, index, data) -> dict:
    info = elfmod.cubin_info(data)
    record = _record(section, container, index, "cubin", info.arch_name, "none", len(data), len(data))
    _add_cubin_symbols(record, info)
    return record


def _record(section, container, index, kind, arch, compression, size, stored_size) -> dict:
    return {"section": section, "container": container, "entry": index, "kind": kind, "arch": arch,
            "compression": compression, "size": size, "stored_size": stored_size,
            "kernels": [], "globals": []}


def _add_cubin_symbols(record: dict, info: elfmod.CubinInfo) -> None:
    record["kernels"] = list(info.kernels)
    record["globals"] = [{"name": g.name, "size": g.size, "space": g.space} for g in info.globals]


# PTX as nvcc writes it, e.g. ".visible .entry axpy(", ".weak .entry _Z5scaleIfLi128EEvPT_S0_(",
# ".visible .global .align 4 .b8 g_table[1024];", ".global .attribute(.managed) .align 4 .u32 m;"
_PTX_NAME = r"[A-Za-z_$%][\w$]*"
_PTX_VARIABLE = re.compile(
    r"^[ \t]*((?:\.(?:visible|weak|extern|common)[ \t]+)*)"
    r"\.(global|const)[ \t]+"
    r"(?:\.(?:attribute\([^)]*\)|align[ \t]+\d+)[ \t]*)*"
    r"(?:\.v([248])[ \t]+)?"
    r"\.[a-z]+?(\d+)?(x2)?[ \t]+"
    rf"({_PTX_NAME})((?:\[\d*\])*)",
    re.M)


def _add_ptx_symbols(record: dict, text: str) -> None:
    record["kernels"] = ptx.kernels(text)
    record["globals"] = [
        {"name": m.group(6), "size": _ptx_size(m),
         "space": "global" if m.group(2) == "global" else "constant"}
        for m in _PTX_VARIABLE.finditer(text)
        # Declarations of other modules' variables are not ours; '$' names are compiler literals.
        if "extern" not in m.group(1) and not m.group(6).startswith("$")
    ]


def _ptx_size(m: re.Match) -> int | None:
    """Bytes of a PTX variable, or None for an unsized array or a type without a bit width."""
    bits, vector, pair, dims = m.group(4), m.group(3), m.group(5), m.group(7)
    if bits is None or "[]" in dims:
        return None
    size = int(bits) // 8 * int(vector or 1) * (2 if pair else 1)
    for dim in re.findall(r"\[(\d+)\]", dims):
        size *= int(dim)
    return size


@contextlib.contextmanager
def _context(where: str):
    """Prefix parse errors with where in the file they happened."""
    try:
        yield
    except BinaryFormatError as e:
        raise BinaryFormatError(f"{where}: {e}") from e


def format_listing(records: list[dict], demangle: Callable[[str], str] | None = None) -> str:
    """A human-readable listing of :func:`list_binary` records, one block per image."""
    name = demangle or (lambda s: s)
    blocks = []
    for r in records:
        where = " ".join(p for p in (r["section"], _position(r)) if p)
        size = f"{r['size']} bytes" + (f" ({r['compression']}, {r['stored_size']} stored)"
                                       if r["compression"] != "none" else "")
        lines = [f"{where + ': ' if where else ''}{r['kind']} {r['arch']}, {size}"]
        lines += [f"  kernel    {name(k)}" for k in r["kernels"]]
        lines += [f"  {g['space']:<9} {name(g['name'])} ({_bytes(g['size'])})" for g in r["globals"]]
        if not r["kernels"] and not r["globals"] and r["kind"] in ("cubin", "ptx"):
            lines.append("  (no kernels or variables)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no GPU code found"


def _position(r: dict) -> str:
    return "" if r["container"] is None else f"container {r['container']} entry {r['entry']}"


def _bytes(size: int | None) -> str:
    return "unknown size" if size is None else f"{size} bytes"
