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

from .. import _fs
from ..errors import BinaryFormatError, CgsnapError, LimitError
from ..limits import Limits, Meter, over_budget, resolve
from . import elf as elfmod
from . import fatbin, ptx
from .demangle import printable

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


def list_binary(path: str | os.PathLike, arch: int | str | None = None,
                limits: Limits | None = None) -> list[dict]:
    """One JSON-ready record per GPU image in the file at ``path``, optionally only for one SM.
    ``limits``: the reading budgets (:class:`cgsnap.Limits`), charged for the whole file."""
    try:
        fd = _fs.open_regular(path)
    except _fs.UnsafePathError as exc:
        raise BinaryFormatError(f"{os.fspath(path)}: {exc.why}") from None
    try:
        if os.fstat(fd).st_size == 0:
            raise BinaryFormatError(f"{os.fspath(path)}: empty file")
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        with _context(os.fspath(path)):
            return list_image(mapped, arch, limits)
    finally:
        # If parsing failed, the traceback can still hold views into the map; it is then
        # unmapped when they are collected instead.
        with contextlib.suppress(BufferError):
            mapped.close()


def list_image(data, arch: int | str | None = None, limits: Limits | None = None) -> list[dict]:
    """Like :func:`list_binary`, for an image already in memory (bytes, memoryview, mmap)."""
    view = elfmod.as_view(data)
    want = None if arch is None else parse_arch(arch)
    meter = Meter(limits)
    magic = bytes(view[:4])
    if magic == _ELF_MAGIC:
        elf = elfmod.ElfFile(view, limits=meter.limits)
        if elf.machine == elfmod.EM_CUDA:
            records = [_cubin_record(None, None, None, view, meter)]
        else:
            records = list(_host_records(elf, want, meter))
    elif magic == _FATBIN_MAGIC:
        records = list(_fatbin_records(None, view, want, meter))
    else:
        raise BinaryFormatError("neither an ELF file nor a fatbin")
    # Fatbin entries were already filtered before decompression; this catches a lone cubin.
    return [r for r in records if want is None or parse_arch(r["arch"]) == want]


def _host_records(elf: elfmod.ElfFile, want: int | None, meter: Meter) -> Iterator[dict]:
    for sec in fatbin.fatbin_section_headers(elf):
        with _context(sec.name):
            yield from _fatbin_records(sec.name, elf.section_data(sec), want, meter)


def _fatbin_records(section: str | None, data, want: int | None, meter: Meter) -> Iterator[dict]:
    for i, container in enumerate(fatbin.iter_containers(data, meter)):
        for j, entry in enumerate(container.entries):
            if want is None or entry.arch == want:  # Skip decompressing what is filtered out.
                try:            # (not _context: files have 10^5 entries)
                    record = _entry_record(section, i, j, entry, meter)
                except BinaryFormatError as e:
                    raise _prefixed(e, f"container {i} entry {j}") from e
                yield record


def _entry_record(section: str | None, container: int, index: int, entry: fatbin.Entry,
                  meter: Meter) -> dict:
    record = _record(section, container, index, entry.kind, entry.arch_name, entry.compression,
                     entry.uncompressed_size, len(entry.raw()))
    if entry.kind == "cubin":
        info = elfmod.cubin_info(entry.payload(), meter.limits)
        # The entry flags may say 'a' or 'f'; a cubin can only say 'a' (and older fatbins may not).
        variant = entry.variant or ("a" if info.arch_name.endswith("a") else "")
        record["arch"] = f"sm_{entry.arch}{variant}"
        _add_cubin_symbols(record, info)
    elif entry.kind == "ptx":
        _add_ptx_symbols(record, entry.payload(), meter.limits)
    return record


def _cubin_record(section, container, index, data, meter: Meter) -> dict:
    info = elfmod.cubin_info(data, meter.limits)
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


# PTX variables as nvcc writes them, e.g. ".visible .global .align 4 .b8 g_table[1024];",
# ".global .attribute(.managed) .align 4 .u32 m;": matched the way cgsnap.binary.ptx matches
# entries (from the keyword, every repetition bounded, qualifiers checked on the line).
_PTX_VARIABLE_TAIL = (
    ptx.WS + rb"(?:\.(?:attribute\([^)\n]{0,256}\)|align" + ptx.WS + rb"\d{1,10})[ \t]{0,64}){0,8}"
    rb"(?:\.v([248])" + ptx.WS + rb")?"
    rb"\.[a-z]{1,8}?(\d{1,4})?(x2)?" + ptx.WS +
    rb"(" + ptx.NAME + rb")((?:\[\d{0,20}\]){0,16})")
_PTX_VARIABLES = [re.compile(rb"\.(global)" + _PTX_VARIABLE_TAIL),
                  re.compile(rb"\.(const)" + _PTX_VARIABLE_TAIL)]
_VARIABLE_QUALIFIERS = ptx.ENTRY_QUALIFIERS | {b".common"}


def _add_ptx_symbols(record: dict, text: bytes, limits: Limits | None = None) -> None:
    record["kernels"], record["globals"] = [], []
    if b".entry" not in text and b".global" not in text and b".const" not in text:
        return
    budget = resolve(limits).elf_symbols
    try:
        kernels = ptx.kernels(text, budget)
    except BinaryFormatError:
        raise over_budget("elf_symbols", budget + 1, budget, "PTX declarations") from None
    variables = []
    matches = sorted((m for pattern in _PTX_VARIABLES for m in _bounded(pattern, text, budget)),
                     key=lambda m: m.start())
    for m in matches:
        words = ptx.qualifiers(text, m.start(), _VARIABLE_QUALIFIERS)
        # Declarations of other modules' variables are not ours; '$' names are compiler literals.
        if words is not None and b".extern" not in words and not m.group(5).startswith(b"$"):
            variables.append({"name": m.group(5).decode(), "size": _ptx_size(m),
                              "space": "global" if m.group(1) == b"global" else "constant"})
    record["kernels"], record["globals"] = kernels, variables


def _bounded(pattern: re.Pattern, text: bytes, budget: int) -> list:
    out = []
    for m in pattern.finditer(text):
        out.append(m)
        if len(out) > budget:
            raise over_budget("elf_symbols", len(out), budget, "PTX declarations")
    return out


def _ptx_size(m: re.Match) -> int | None:
    """Bytes of a PTX variable, or None for an unsized array or a type without a bit width."""
    vector, bits, pair, dims = m.group(2), m.group(3), m.group(4), m.group(6)
    if bits is None or b"[]" in dims:
        return None
    size = int(bits) // 8 * int(vector or 1) * (2 if pair else 1)
    for dim in re.findall(rb"\[(\d+)\]", dims):
        size *= int(dim)
    return size


@contextlib.contextmanager
def _context(where: str):
    """Prefix parse errors with where in the file they happened."""
    try:
        yield
    except BinaryFormatError as e:
        raise _prefixed(e, where) from e


def _prefixed(e: BinaryFormatError, where: str) -> BinaryFormatError:
    if isinstance(e, LimitError):
        return LimitError(f"{where}: {e}", e.budget)
    return BinaryFormatError(f"{where}: {e}")


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
        blocks.append("\n".join(printable(line) for line in lines))   # names come from the file
    return "\n\n".join(blocks) if blocks else "no GPU code found"


def _position(r: dict) -> str:
    return "" if r["container"] is None else f"container {r['container']} entry {r['entry']}"


def _bytes(size: int | None) -> str:
    return "unknown size" if size is None else f"{size} bytes"
