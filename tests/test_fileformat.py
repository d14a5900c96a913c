"""Tests of the snapshot container (cgsnap.format.fileformat) against docs/FORMAT.md.

The header and table structures are declared again here from the spec, not imported, so the
tests also check that the implementation matches the document.
"""
from __future__ import annotations

import os
import re
import struct

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgsnap.errors import FormatError, LimitError
from cgsnap.limits import Limits
from cgsnap.format import fileformat
from cgsnap.format.fileformat import BlobSource, open_file, pack_manifest, read_manifest, write_file
from cgsnap.format.hashing import blob_checksum

# From docs/FORMAT.md.
HEADER = struct.Struct("<8sHHIIIQIIQ16s")
HEADER_FIELDS = ("magic", "major", "minor", "flags", "manifest_offset", "manifest_length",
                 "blob_table_offset", "blob_count", "reserved", "blobs_offset", "checksum")
ENTRY = struct.Struct("<QQQB7x16s")
ENTRY_FIELDS = ("offset", "stored_length", "raw_length", "compression", "checksum")

MANIFEST = {
    "name": "graph", "nodes": [{"kind": "kernel", "args": b"\x00\x01", "grid": [1, 2, 3]}],
    "big": 2**64 - 1, "neg": -2**63, "pi": 3.25, "flag": True, "none": None, "unicode": "µs",
    "nested": {"z": {"y": [[], {}]}},
}
COMPRESSIBLE = bytes(range(256)) * 8


def align(n: int) -> int:
    return -(-n // 64) * 64


def header(data) -> dict:
    return dict(zip(HEADER_FIELDS, HEADER.unpack_from(data)))


def table(data) -> list[dict]:
    h = header(data)
    return [dict(zip(ENTRY_FIELDS, ENTRY.unpack_from(data, h["blob_table_offset"] + i * ENTRY.size)))
            for i in range(h["blob_count"])]


def spec_checksum(data) -> bytes:
    h = header(data)
    manifest = data[h["manifest_offset"]:h["manifest_offset"] + h["manifest_length"]]
    table_bytes = data[h["blob_table_offset"]:h["blob_table_offset"] + ENTRY.size * h["blob_count"]]
    return xxhash.xxh3_128(bytes(data[:48]) + bytes(manifest) + bytes(table_bytes)).digest()


def set_header(data: bytearray, reseal=True, **fields) -> bytearray:
    h = header(data) | fields
    data[:64] = HEADER.pack(*(h[f] for f in HEADER_FIELDS))
    if reseal:
        data[48:64] = spec_checksum(data)
    return data


def set_entry(data: bytearray, i: int, **fields) -> bytearray:
    entry = table(data)[i] | fields
    ENTRY.pack_into(data, header(data)["blob_table_offset"] + i * ENTRY.size,
                    *(entry[f] for f in ENTRY_FIELDS))
    return set_header(data)


def assemble(manifest_bytes: bytes, blobs=()) -> bytes:
    """A file built straight from the spec (uncompressed blobs only)."""
    table_offset = 64 + len(manifest_bytes)
    blobs_offset = align(table_offset + ENTRY.size * len(blobs))
    section, entries = bytearray(), b""
    for blob in blobs:
        section += bytes(align(len(section)) - len(section))
        entries += ENTRY.pack(len(section), len(blob), len(blob), 0, blob_checksum(blob))
        section += blob
    data = bytearray(HEADER.pack(b"\x89CGSNAP\n", 1, 0, 0, 64, len(manifest_bytes), table_offset,
                                 len(blobs), 0, blobs_offset, bytes(16)))
    data += manifest_bytes + entries + bytes(blobs_offset - table_offset - len(entries)) + section
    data[48:64] = spec_checksum(data)
    return bytes(data)


def sample_blobs():
    return [
        b"hello world" * 9,
        BlobSource(COMPRESSIBLE, compress=True),
        b"",
        BlobSource(b"", compress=True),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        BlobSource(chunks=[COMPRESSIBLE[:100], bytearray(COMPRESSIBLE[100:])],
                   raw_length=len(COMPRESSIBLE), compress=True),
    ]


SAMPLE_RAW = [b"hello world" * 9, COMPRESSIBLE, b"", b"",
              np.arange(12, dtype=np.float32).tobytes(), COMPRESSIBLE]


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "snap.cgs"
    write_file(path, MANIFEST, sample_blobs())
    return path


def rewrite(path, data) -> None:
    path.write_bytes(bytes(data))


def expect_error(path, match=None, *, verify_blobs=False) -> FormatError:
    with pytest.raises(FormatError, match=match) as info:
        open_file(path, verify_blobs=verify_blobs).close()
    assert str(info.value).startswith(str(path)), "every message names the file"
    return info.value


# --------------------------------------------------------------------------- round trip


def test_round_trip(sample):
    with open_file(sample) as snap:
        assert snap.manifest == MANIFEST
        assert snap.version == (1, 0)
        assert [b.raw_length for b in snap.blobs] == [len(r) for r in SAMPLE_RAW]
        assert [b.compression for b in snap.blobs] == [0, 1, 0, 1, 0, 1]
        for i, raw in enumerate(SAMPLE_RAW):
            assert bytes(snap.blob(i)) == raw
            dest = np.empty(len(raw), np.uint8)
            snap.read_into(i, dest)
            assert dest.tobytes() == raw
            assert b"".join(snap.iter_chunks(i, 100)) == raw
            assert all(len(c) <= 100 for c in snap.iter_chunks(i, 100))
        assert all(b.offset % 64 == 0 for b in snap.blobs)
        snap.verify()
    assert read_manifest(sample) == MANIFEST


def test_uncompressed_blob_is_a_zero_copy_view_that_survives_close(sample):
    snap = open_file(sample)
    view = snap.blob(0)
    assert isinstance(view, memoryview) and view.readonly
    snap.close()
    assert bytes(view) == SAMPLE_RAW[0]
    with pytest.raises(ValueError, match="closed"):
        snap.blob(0)


def test_empty_blob_list(tmp_path):
    path = tmp_path / "empty.cgs"
    write_file(path, {}, [])
    data = path.read_bytes()
    assert len(data) == header(data)["blobs_offset"]
    with open_file(path, verify_blobs=True) as snap:
        assert snap.manifest == {} and snap.blobs == []


def test_writer_matches_spec_assembly(tmp_path):
    path = tmp_path / "a.cgs"
    blobs = [b"x" * 70, b"", b"yz"]
    write_file(path, MANIFEST, blobs)
    assert path.read_bytes() == assemble(pack_manifest(MANIFEST), blobs)


def test_header_fields_follow_spec(sample):
    data = sample.read_bytes()
    h = header(data)
    assert h["magic"] == b"\x89CGSNAP\n" and (h["major"], h["minor"], h["flags"]) == (1, 0, 0)
    assert h["manifest_offset"] == 64 and h["blob_table_offset"] == 64 + h["manifest_length"]
    assert h["blobs_offset"] == align(h["blob_table_offset"] + 48 * h["blob_count"])
    assert h["checksum"] == spec_checksum(data)
    last = table(data)[-1]
    assert len(data) == h["blobs_offset"] + last["offset"] + last["stored_length"]


def test_blob_index_out_of_range_and_wrong_destination(sample):
    with open_file(sample) as snap:
        with pytest.raises(FormatError, match="blob 6 does not exist"):
            snap.blob(6)
        with pytest.raises(FormatError, match="blob 0 holds 99 bytes"):
            snap.read_into(0, bytearray(98))


# --------------------------------------------------------------------------- writer


def test_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_file(a, MANIFEST, sample_blobs())
    write_file(b, MANIFEST, sample_blobs())
    # Same value, other key order; zstd data whole instead of chunked and vice versa.
    shuffled = dict(reversed(list(MANIFEST.items())))
    blobs = sample_blobs()
    blobs[1] = BlobSource(chunks=(COMPRESSIBLE[i:i + 7] for i in range(0, 2048, 7)),
                          raw_length=2048, compress=True)
    blobs[5] = BlobSource(COMPRESSIBLE, compress=True)
    write_file(c, shuffled, blobs)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_pack_manifest_is_canonical_and_strict():
    assert pack_manifest({"b": 1, "a": {"d": 2, "c": 3}}) == pack_manifest({"a": {"c": 3, "d": 2}, "b": 1})
    deep = {}
    for _ in range(63):
        deep = {"k": deep}
    pack_manifest(deep)  # 64 levels is the limit
    for bad, where in [({"a": (1, 2)}, r"\['a'\] holds a tuple"), ({1: 2}, "not a str"),
                       ({"a": [object()]}, r"\['a'\]\[0\]"), ({"k": deep}, "deeper than 64"),
                       ({"a": 2**64}, "cannot be encoded"), ({"a": "\ud800"}, "cannot be encoded"),
                       ([1], "must be a map")]:
        with pytest.raises(FormatError, match=where):
            pack_manifest(bad)


def test_manifest_over_cap_is_refused_by_writer_and_reader(tmp_path, monkeypatch):
    path = tmp_path / "m.cgs"
    write_file(path, {"pad": "x" * 200}, [])
    monkeypatch.setattr(fileformat, "MAX_MANIFEST", 100)
    with pytest.raises(FormatError, match="cap"):
        write_file(tmp_path / "n.cgs", {"pad": "x" * 200}, [])
    expect_error(path, "cap")


def test_blob_source_contract(tmp_path):
    with pytest.raises(TypeError):
        BlobSource()
    with pytest.raises(TypeError):
        BlobSource(b"x", chunks=[b"x"], raw_length=1)
    with pytest.raises(TypeError):
        BlobSource(chunks=[b"x"])
    with pytest.raises(ValueError):
        BlobSource(b"xy", raw_length=3)
    with pytest.raises(ValueError, match="contiguous"):
        BlobSource(np.zeros((4, 4))[:, ::2])
    for compress in (False, True):
        for chunks in ([b"ab"], [b"ab", b"cd"]):
            with pytest.raises(FormatError, match="blob 0: source produced"):
                write_file(tmp_path / "x", {}, [BlobSource(chunks=chunks, raw_length=3, compress=compress)])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("compress", [False, True])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, compress):
    path = tmp_path / "snap.cgs"
    write_file(path, MANIFEST, [b"old"])
    old = path.read_bytes()

    def failing():
        yield COMPRESSIBLE
        raise RuntimeError("device copy failed")

    with pytest.raises(RuntimeError, match="device copy failed"):  # the source's own error, unmasked
        write_file(path, {"new": 1}, [BlobSource(chunks=failing(), raw_length=4096, compress=compress)])
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["snap.cgs"]


def test_temporary_file_name_is_unpredictable_and_replaced(tmp_path, monkeypatch):
    from cgsnap import _fs
    seen = []
    monkeypatch.setattr(_fs, "_fault", lambda step: seen.append((step, sorted(os.listdir(tmp_path)))))
    write_file(tmp_path / "snap.cgs", {}, [])
    names = dict(seen)["rename"]
    (tmp,) = names
    assert re.fullmatch(rf"\.snap\.cgs\.tmp-{os.getpid()}-[0-9a-f]{{16}}", tmp)
    assert os.listdir(tmp_path) == ["snap.cgs"]


# --------------------------------------------------------------------------- corruption


def test_read_manifest_ignores_blob_bytes_but_verify_does_not(sample):
    data = bytearray(sample.read_bytes())
    data[table(data)[0]["offset"] + header(data)["blobs_offset"]] ^= 0xFF
    rewrite(sample, data)
    assert read_manifest(sample) == MANIFEST
    with open_file(sample) as snap:
        assert len(bytes(snap.blob(0, verify=False))) == 99
        for read in (snap.verify, lambda: snap.blob(0), lambda: snap.read_into(0, bytearray(99)),
                     lambda: list(snap.iter_chunks(0, 10))):
            with pytest.raises(FormatError, match="blob 0: checksum mismatch") as e:
                read()
            assert str(sample) in str(e.value)
        bytes(snap.blob(1))  # other blobs are still fine
    expect_error(sample, "blob 0", verify_blobs=True)


def test_corrupt_zstd_blob_is_caught_before_decoding(sample):
    data = bytearray(sample.read_bytes())
    entry = table(data)[1]
    data[header(data)["blobs_offset"] + entry["offset"] + entry["stored_length"] // 2] ^= 0x55
    rewrite(sample, data)
    with open_file(sample) as snap:
        for read in (lambda: snap.blob(1), lambda: snap.read_into(1, bytearray(2048)),
                     lambda: list(snap.iter_chunks(1, 100))):
            with pytest.raises(FormatError, match="blob 1: checksum mismatch"):
                read()


def test_truncation_everywhere(sample):
    data = sample.read_bytes()
    h = header(data)
    cuts = set(range(65)) | {h["blob_table_offset"], h["blob_table_offset"] + 1,
                             h["blobs_offset"] - 1, h["blobs_offset"], len(data) - 1}
    cuts |= {h["blobs_offset"] + e["offset"] + d for e in table(data) for d in (0, 1)}
    for cut in sorted(c for c in cuts if c < len(data)):
        rewrite(sample, data[:cut])
        expect_error(sample)


def test_bit_flips_in_header_manifest_and_table(sample):
    data = sample.read_bytes()
    h = header(data)
    table_end = h["blob_table_offset"] + 48 * h["blob_count"]
    for pos in list(range(64)) + list(range(64, table_end, 5)):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (pos % 8)
        rewrite(sample, flipped)
        expect_error(sample)


def test_bit_flips_in_blobs_fail_verification(sample):
    data = sample.read_bytes()
    for pos in range(header(data)["blobs_offset"], len(data), 7):
        flipped = bytearray(data)
        flipped[pos] ^= 0x80
        rewrite(sample, flipped)
        with open_file(sample) as snap:  # blobs are not read on open
            with pytest.raises(FormatError):
                snap.verify()


def test_magic(sample):
    data = sample.read_bytes()
    rewrite(sample, b"PK\x03\x04" + data[4:])
    expect_error(sample, "not a cgsnap snapshot")
    rewrite(sample, data.replace(b"\n", b"\r\n", 1))  # a text-mode transfer
    expect_error(sample, "text-mode")


def test_major_version_refused_naming_both(sample):
    data = bytearray(sample.read_bytes())
    rewrite(sample, set_header(data, major=2))
    expect_error(sample, re.escape("file is format 2.x, this cgsnap reads 1.x"))
    rewrite(sample, set_header(data, reseal=False, major=7))  # checked before the checksum
    expect_error(sample, re.escape("file is format 7.x"))


def test_minor_version_and_reserved_accepted(sample):
    rewrite(sample, set_header(bytearray(sample.read_bytes()), minor=3, reserved=9))
    with open_file(sample, verify_blobs=True) as snap:
        assert snap.version == (1, 3) and snap.manifest == MANIFEST


@pytest.mark.parametrize("change, match", [
    (lambda h: {"flags": 1}, "flags is 1"),
    # Moved ranges stay clear of the header, which the checksum would otherwise cover twice.
    (lambda h: {"manifest_offset": 65}, "manifest_offset is 65"),
    (lambda h: {"blob_table_offset": h["blob_table_offset"] + 1}, "blob_table_offset is"),
    (lambda h: {"blobs_offset": h["blobs_offset"] + 64}, "blobs_offset is"),
    (lambda h: {"blob_count": h["blob_count"] - 2}, "blobs_offset is"),
    (lambda h: {"blob_count": 2**32 - 1}, "truncated"),
    (lambda h: {"manifest_length": 2**32 - 1}, "cap"),
    (lambda h: {"blob_table_offset": 2**63}, "truncated"),
])
def test_header_fields_are_checked_after_resealing(sample, change, match):
    data = bytearray(sample.read_bytes())
    rewrite(sample, set_header(data, **change(header(data))))
    expect_error(sample, match)


@pytest.mark.parametrize("index, fields, match", [
    (1, {"offset": 0}, "blob 1: offset 0, expected 128"),  # overlaps blob 0
    (1, {"offset": 129}, "blob 1: offset 129"),  # misaligned
    (1, {"offset": 192}, "blob 1: offset 192"),  # leaves a hole
    (1, {"offset": 2**63}, "blob 1: offset"),
    (0, {"stored_length": 2**63, "raw_length": 2**63}, "blob 0: .* run past the end"),
    (5, {"stored_length": 10**6}, "blob 5: .* run past the end"),
    (0, {"raw_length": 2**63}, "blob 0: uncompressed but raw_length"),
    (1, {"raw_length": 2**63}, "blob 1: raw_length .* more than zstd"),
    (2, {"compression": 7}, "blob 2: unknown compression 7"),
    (5, {"stored_length": 1}, "last blob ends"),  # bytes left over after the last blob
])
def test_blob_table_structure_after_resealing(sample, index, fields, match):
    data = bytearray(sample.read_bytes())
    assert table(data)[1]["offset"] == 128  # the cases above are written for this layout
    rewrite(sample, set_entry(data, index, **fields))
    expect_error(sample, match)


def test_trailing_and_padding_bytes(sample):
    data = sample.read_bytes()
    rewrite(sample, data + b"\0")
    expect_error(sample, "last blob ends")
    h = header(data)
    table_end = h["blob_table_offset"] + 48 * h["blob_count"]
    assert table_end < h["blobs_offset"]
    rewrite(sample, data[:table_end] + b"\1" + data[table_end + 1:])
    expect_error(sample, "padding after the blob table")
    gap = h["blobs_offset"] + table(data)[0]["stored_length"]  # blob 0 is 99 bytes: padding follows
    rewrite(sample, data[:gap] + b"\1" + data[gap + 1:])
    with open_file(sample) as snap:
        with pytest.raises(FormatError, match="padding before blob 1"):
            snap.verify()


def test_zstd_frame_must_match_raw_length(tmp_path):
    path = tmp_path / "z.cgs"
    write_file(path, {}, [BlobSource(COMPRESSIBLE, compress=True)])
    data = bytearray(path.read_bytes())
    rewrite(path, set_entry(data, 0, raw_length=2047))
    with open_file(path) as snap:
        for read in (lambda: snap.blob(0), lambda: snap.read_into(0, bytearray(2047)),
                     lambda: list(snap.iter_chunks(0))):
            with pytest.raises(FormatError, match="blob 0: bad zstd data: frame records 2048"):
                read()


@pytest.mark.parametrize("manifest_bytes, match", [
    (msgpack.packb([1, 2]), "must be a map"),
    (msgpack.packb({"a": 1}) + b"\xc0", "not valid msgpack"),  # trailing data
    (msgpack.packb({"a": [1, 2]})[:-1], "not valid msgpack"),  # truncated
    (b"\x81\x01\x02", "not valid msgpack"),  # int key
    (b"\x81\xc4\x01k\x01", "not a str"),  # bytes key
    (b"\x82\xa1a\x01\xa1a\x02", "duplicate key"),
    (b"\x81\xa1a\xa1\xff", "not valid msgpack"),  # invalid UTF-8
    (b"\x81\xa1t\xd6\xff\x00\x00\x00\x01", "not valid msgpack"),  # timestamp ext
    (b"\x81\xa1e\xd4\x05\x00", "not valid msgpack"),  # ext type 5
    (b"\x81\xa1e\xc7\x00\x05", "ExtType"),  # empty ext
    (b"\x81\xa1a\xdd\xff\xff\xff\xff", "not valid msgpack"),  # 4G-item array in a tiny manifest
    (b"\x81\xa1a\xdf\xff\xff\xff\xff", "not valid msgpack"),  # 4G-entry map
    (b"\x81\xa1a\xdb\xff\xff\xff\xff", "not valid msgpack"),  # 4 GiB str
    (b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0", "not valid msgpack"),  # beyond msgpack's stack
    (b"\x81\xa1a" * 65 + b"\xc0", "deeper than 64"),
    (b"", "not valid msgpack"),
])
def test_bad_manifests(tmp_path, manifest_bytes, match):
    path = tmp_path / "m.cgs"
    rewrite(path, assemble(manifest_bytes, [b"blob"]))
    expect_error(path, match)


def test_manifest_depth_limit_is_inclusive(tmp_path):
    path = tmp_path / "m.cgs"
    rewrite(path, assemble(b"\x81\xa1a" * 64 + b"\xc0"))
    value, depth = read_manifest(path), 0
    while isinstance(value, dict):
        value, depth = value["a"], depth + 1
    assert depth == 64


def test_missing_file_and_non_file(tmp_path):
    expect_error(tmp_path / "absent.cgs", "cannot read")
    expect_error(tmp_path, "cannot read")


# --------------------------------------------------------------------------- fuzzing


def exercise(path) -> None:
    """Every read path over a possibly corrupt file; only FormatError may come out."""
    def attempt(read):
        try:
            read()
        except FormatError:
            pass

    attempt(lambda: read_manifest(path))
    try:
        snap = open_file(path)
    except FormatError:
        return
    with snap:
        for i, info in enumerate(snap.blobs):
            for verify in (False, True):
                attempt(lambda: bytes(snap.blob(i, verify=verify)))
                attempt(lambda: snap.read_into(i, bytearray(info.raw_length), verify=verify))
                attempt(lambda: list(snap.iter_chunks(i, 50, verify=verify)))
        attempt(snap.verify)


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "base.cgs"
    write_file(path, MANIFEST, sample_blobs())
    return path.read_bytes()


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_format_errors(tmp_path, fuzz_base, data):
    blob = bytearray(fuzz_base)
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # get past the header checksum to the structural checks
        blob = set_header(blob)
    blob = blob[:data.draw(st.integers(0, len(blob)))] if data.draw(st.booleans()) else blob
    path = tmp_path / "fuzz.cgs"
    rewrite(path, blob)
    exercise(path)


# --------------------------------------------------------------------------- kernel images


def image_file(tmp_path, count=5):
    images = [bytes([i]) * (3000 + 100 * i) + os.urandom(64) for i in range(count)]
    path = tmp_path / "images.cgs"
    write_file(path, {}, [BlobSource(im, compress=True) for im in images])
    return path, images


@pytest.fixture(params=["serial", "threads"])
def image_threads(request, monkeypatch):
    if request.param == "threads":      # one thread per image, whatever the machine
        monkeypatch.setattr(fileformat, "IMAGES_PER_THREAD", 1)
        monkeypatch.setattr(fileformat.os, "cpu_count", lambda: 4)
    return request.param


def test_images_in_order_each_blob_read_once(tmp_path, image_threads):
    path, images = image_file(tmp_path)
    with open_file(path) as f:
        got = f.images([3, 0, 3, 4])
        assert got == [images[3], images[0], images[3], images[4]]
        assert all(type(g) is bytes for g in got) and got[0] is got[2]
    with open_file(path, limits=Limits(image_total=len(images[3]) + len(images[0]))) as f:
        f.images([3, 0, 3])             # blob 3 charged once against image_total
        with pytest.raises(LimitError, match="image_total"):
            f.images([4])


def test_images_raise_the_first_failure_in_order(tmp_path, image_threads):
    path, _ = image_file(tmp_path)
    with open_file(path) as f:
        blobs = f.blobs
    data = bytearray(path.read_bytes())
    for i in (4, 1):                    # stored bytes of blobs 1 and 4 corrupt
        data[blobs[i].offset + blobs[i].stored_length // 2] ^= 0xFF
    rewrite(path, data)
    with open_file(path) as f:
        with pytest.raises(FormatError, match=r"blob 1: checksum mismatch") as info:
            f.images([0, 1, 4])
        assert str(info.value).startswith(str(path))
        with pytest.raises(FormatError, match=r"blob 4: checksum"):
            f.images([2, 4, 1])
    with open_file(path, limits=Limits(image_bytes=3100)) as f:   # blob 0 fits, 2 does not
        with pytest.raises(LimitError, match=r"blob 2 \(a kernel image\).*image_bytes"):
            f.images([0, 2, 1])


def test_the_image_total_budget_refuses_the_same_blob_whatever_the_threads(tmp_path, image_threads):
    """image_total is charged in order before any thread starts: the refused blob is the first
    one, in order, past the budget -- every time (threads raced for it before)."""
    path, images = image_file(tmp_path, count=8)
    budget = sum(len(im) for im in images) - 1          # one byte short of all eight
    for _ in range(20):
        with open_file(path, limits=Limits(image_total=budget)) as f:
            with pytest.raises(LimitError, match=r"blob 7 \(kernel images\)"):
                f.images(list(range(8)))
