"""Crafted hostile inputs, built from the specs (docs/FORMAT.md, the fatbin and ELF layouts in
cgsnap/binary): decompression bombs, structures that ask for unbounded work, and files whose
checksums are valid so that the checks behind them are what gets hit.

Used by tests/test_crafted.py (each case measured in a fresh process) and scripts/fuzz.py
(``--crafted``: random bombs and structures).
"""
from __future__ import annotations

import struct

import xxhash

from cgsnap.format import fileformat
from cgsnap.format.hashing import BLOB_PIECE, blob_checksum, combine, piece_digest

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10

# ---- zstd ------------------------------------------------------------------------------------

ZSTD_BLOCK = 128 * KiB


def rle_zstd(content_size: int, byte: int = 0, declared: int | None = None,
             blocks: int | None = None) -> bytes:
    """A valid zstd frame of ``content_size`` copies of ``byte`` made of RLE blocks: 4 bytes per
    128 KiB, the most zstd can expand (32768x). ``declared``: the content size the frame header
    records instead; ``blocks``: keep only that many blocks (the data then ends early)."""
    declared = content_size if declared is None else declared
    header = struct.pack("<I", 0xFD2FB528) + bytes([0xC0, 0x38]) + struct.pack("<Q", declared)
    n, rem = divmod(content_size, ZSTD_BLOCK)
    sizes = [ZSTD_BLOCK] * n + ([rem] if rem else [])
    if blocks is not None:
        sizes = sizes[:blocks]
    full = ((ZSTD_BLOCK << 3) | 2).to_bytes(3, "little") + bytes([byte])
    out = bytearray(header)
    out += full * (len(sizes) - 1)
    out += ((sizes[-1] << 3) | 3).to_bytes(3, "little") + bytes([byte])      # last block
    return bytes(out)


def zeros_region_hash(size: int) -> str:
    """``region_hash`` of ``size`` zero bytes, without making them (pieces repeat)."""
    full, rem = divmod(size, BLOB_PIECE)
    digests = [piece_digest(bytes(BLOB_PIECE))] * full if full else []
    if rem:
        digests.append(piece_digest(bytes(rem)))
    return combine(digests).hex()


# ---- snapshot files --------------------------------------------------------------------------

_HEADER = struct.Struct("<8sHHIIIQIIQ16s")
_ENTRY = struct.Struct("<QQQB7x16s")


def _align(n: int) -> int:
    return -(-n // 64) * 64


def assemble(manifest_bytes, blobs) -> bytes:
    """A snapshot file straight from docs/FORMAT.md with valid checksums. ``blobs``: bytes
    (stored as is) or ``(stored, raw_length)`` pairs (stored as zstd: the frame is not checked
    here, that is the reader's job)."""
    table_offset = 64 + len(manifest_bytes)
    blobs_offset = _align(table_offset + _ENTRY.size * len(blobs))
    section, entries = bytearray(), b""
    for blob in blobs:
        stored, raw, code = (blob, len(blob), 0) if isinstance(blob, (bytes, bytearray)) \
            else (blob[0], blob[1], 1)
        section += bytes(_align(len(section)) - len(section))
        entries += _ENTRY.pack(len(section), len(stored), raw, code, blob_checksum(stored))
        section += stored
    header = bytearray(_HEADER.pack(b"\x89CGSNAP\n", 1, 0, 0, 64, len(manifest_bytes),
                                    table_offset, len(blobs), 0, blobs_offset, bytes(16)))
    checksum = xxhash.xxh3_128(bytes(header[:48]))
    checksum.update(manifest_bytes)
    checksum.update(entries)
    header[48:64] = checksum.digest()
    return b"".join([header, manifest_bytes, entries,
                     bytes(blobs_offset - table_offset - len(entries)), section])


def snapshot_bytes(edit=None, blobs=None, snap=None) -> bytes:
    """The synthetic snapshot (tests/synthetic.py) as a file: ``edit(manifest, blobs)`` may
    change the manifest and the blob list (entries as :func:`assemble` takes them) in place."""
    from synthetic import make_snapshot
    snap = snap or make_snapshot()
    manifest, raw = snap.to_manifest()
    blobs = [bytes(memoryview(b).cast("B")) for b in raw] if blobs is None else blobs
    if edit is not None:
        edit(manifest, blobs)
    return assemble(fileformat.pack_manifest(manifest), blobs)


def image_bomb(raw_length: int = 4 * GiB, images: int = 1) -> bytes:
    """``images`` kernel images, each a zstd frame of ``raw_length`` bytes (a 4 GiB one takes
    128 KiB: within the format's ratio bound)."""
    def edit(manifest, blobs):
        first = manifest["images"][0]
        manifest["images"] = []
        for i in range(images):       # the first takes the old image's blob (no blob unused)
            index = first["blob"] if i == 0 else len(blobs)
            manifest["images"].append(dict(first, hash=f"{i:032x}", blob=index))
            if i == 0:
                blobs[index] = (rle_zstd(raw_length), raw_length)
            else:
                blobs.append((rle_zstd(raw_length), raw_length))
        for k in manifest["kernels"]:
            k["image"] = f"{0:032x}"
        for r in manifest["regions"]:
            if "image" in r:
                r["image"] = f"{0:032x}"
    return snapshot_bytes(edit)


def region_bomb(raw_length: int = 4 * GiB, corrupt: str | None = None) -> bytes:
    """Region 2 (the weights) made ``raw_length`` zero bytes stored as RLE zstd: a legitimate
    file that verifies by decoding 4 GiB. ``corrupt``: "short" (the frame ends early), "long"
    (it decodes to more than it records), "declared" (its header records another size) -- the
    table's checksum is valid in every case, only decoding can tell."""
    def edit(manifest, blobs):
        region = manifest["regions"][2]
        region["size"] = raw_length
        region["content_hash"] = zeros_region_hash(raw_length)
        frame = {None: lambda: rle_zstd(raw_length),
                 "short": lambda: rle_zstd(raw_length, blocks=raw_length // ZSTD_BLOCK - 1),
                 "long": lambda: rle_zstd(raw_length + ZSTD_BLOCK, declared=raw_length),
                 "declared": lambda: rle_zstd(raw_length, declared=raw_length - 1)}[corrupt]()
        blobs[region["blob"]] = (frame, raw_length)
    return snapshot_bytes(edit)


def empty_maps_manifest(total: int = 64 * MiB - 64, inner: int = 1 << 20) -> bytes:
    """A manifest of ``total`` bytes that is nearly all empty maps (1 byte each), in lists of
    ``inner``: {"a": [[{}, {}, ...], ...]}."""
    body = b"\xdd" + struct.pack(">I", inner) + b"\x80" * inner
    count = (total - 16) // len(body)
    return b"\x81\xa1a\xdd" + struct.pack(">I", count) + body * count


# ---- ELF and fatbin --------------------------------------------------------------------------

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
EM_X86_64, EM_CUDA = 62, 190


def elf(sections, blob: bytes, machine: int = EM_X86_64, shstrndx: int = 1,
        count: int | None = None) -> bytes:
    """An ELF64 image: ``blob`` at offset 64, then the section headers. ``sections``: tuples
    ``(sh_name, sh_type, offset_in_blob, size)``; section 0 is the null one. ``count``: what
    e_shnum says (0 means "in section 0's sh_size", which is then set to len(sections))."""
    table = 64 + len(blob) + (-len(blob)) % 8
    rows = [(0, 0, 0, 0, 0, len(sections) + 1 if count == 0 else 0, 0, 0, 0, 0)]
    rows += [(name, typ, 0, 0, 64 + off, size, 0, 0, 1, 0) for name, typ, off, size in sections]
    shnum = len(rows) if count is None else count
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    header = _EHDR.pack(ident, 2, machine, 1, 0, 0, table, 0, 64, 0, 0, 64, shnum, shstrndx)
    return header + blob + bytes(table - 64 - len(blob)) + b"".join(_SHDR.pack(*r) for r in rows)


def strtab_elf(headers: int, name_bytes: int, distinct: bool) -> bytes:
    """``headers`` section headers naming a ``name_bytes``-long string (all at one offset, or
    each at its own offset into it): the 4 GB-of-names case."""
    strtab = b"\0" + b"n" * name_bytes + b"\0"
    sections = [(1, 3, 0, len(strtab))]             # [1] .shstrtab (SHT_STRTAB)
    sections += [(1 + (i if distinct else 0), 1, 0, 0) for i in range(headers)]
    return elf(sections, strtab)


FATBIN_MAGIC = 0xBA55ED50
_FAT_HEADER = struct.Struct("<IHHQ")
_FAT_ENTRY = struct.Struct("<HHIQIIHHIIIQQQ")
FLAG_64BIT, FLAG_ZSTD = 0x1, 0x8000
KIND_PTX, KIND_CUBIN = 1, 2


def fatbin_entry(kind: int, arch: int, payload: bytes, uncompressed: int = 0,
                 flags: int = FLAG_64BIT) -> bytes:
    """One entry (64-byte header, payload padded to 8). ``uncompressed`` > 0 marks it zstd."""
    if uncompressed:
        flags |= FLAG_ZSTD
    padded = payload + bytes(-len(payload) % 8)
    header = _FAT_ENTRY.pack(kind, 0x0101, 64, len(padded), len(payload) if uncompressed else 0,
                             0, 0, 9, arch, 0, 0, flags, 0, uncompressed)
    return header + padded


def fatbin(entries) -> bytes:
    body = b"".join(entries)
    return _FAT_HEADER.pack(FATBIN_MAGIC, 1, 16, len(body)) + body


def ptx_bomb(raw_length: int = 1 * GiB) -> bytes:
    """A fatbin of one PTX entry claiming ``raw_length`` bytes in a 32 KB zstd frame."""
    return fatbin([fatbin_entry(KIND_PTX, 90, rle_zstd(raw_length, byte=0x20), raw_length)])


def overlapping_fatbin_sections(copies: int = 2048, entries: int = 8) -> bytes:
    """A host ELF whose ``copies`` .nv_fatbin sections all cover the same fatbin."""
    ptx = b".version 9.0\n.target sm_90\n.address_size 64\n.visible .entry k() { ret; }\n"
    data = fatbin([fatbin_entry(KIND_PTX, 90, ptx) for _ in range(entries)])
    names = b"\0.shstrtab\0.nv_fatbin\0"
    blob = names + bytes(-len(names) % 8) + data
    start = len(names) + (-len(names) % 8)
    sections = [(1, 3, 0, len(names))]
    sections += [(11, 1, start, len(data)) for _ in range(copies)]
    return elf(sections, blob)


def many_entries_fatbin(entries: int) -> bytes:
    """A fatbin of ``entries`` empty PTX entries: 64 bytes of header each."""
    return fatbin([fatbin_entry(KIND_PTX, 90, b"") for _ in range(entries)])




# ---- entry points for tests/zygote.py (each runs in a fresh child process) -----------------

def _limits(changes):
    from cgsnap.limits import Limits
    return Limits(**changes) if changes else None


def run_read(path: str, limits: dict | None = None) -> str:
    """``cgsnap.read``: the model, kernel images included."""
    import cgsnap
    snap = cgsnap.read(path, limits=_limits(limits))
    return f"{len(snap.graphs)} graphs, {len(snap.images)} images"


def run_load(path: str, limits: dict | None = None) -> str:
    """``cgsnap.load`` up to where it would first touch the GPU (on a machine without one it
    fails there: the point is what it refuses, and what it costs, before that)."""
    import cgsnap
    from cgsnap.restore.restored import Restored

    def stop(self, device):
        raise cgsnap.CompatibilityError("reached the GPU step: everything before it passed")
    Restored._setup_gpu = stop
    with cgsnap.load(path, limits=_limits(limits)):
        return "loaded"


def run_list_binary(path: str, limits: dict | None = None) -> str:
    from cgsnap.binary.binaries import list_binary
    return f"{len(list_binary(path, limits=_limits(limits)))} images"
