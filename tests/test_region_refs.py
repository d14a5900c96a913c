"""Schema 3 (CPU): pointers stored in region contents (Region.refs), strided named views
(Region.strides / view_offset), their validation, and how a restore plans the rewrite."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import make_snapshot

import cgsnap
from cgsnap.errors import FormatError
from cgsnap.format import fileformat, snapfile
from cgsnap.format.model import REGION_REF_DTYPE, Snapshot
from cgsnap.restore.plan import RegionPatches, region_patches, word_runs

SAMPLE = "cgsnap/tools/data/sample.cgsnap"


def table(*rows) -> bytes:
    return np.array(rows, dtype="<u8").reshape(-1, 3).tobytes()


def snap_with_refs():
    """The synthetic snapshot with stored pointers in the weights allocation (region 2, 4 KiB):
    a pointer array at 0..24 into x, y and the module global, one more word further on."""
    snap = make_snapshot()
    snap.regions[2].refs = table((0, 0, 0), (8, 1, 64), (16, 3, 8), (512, 2, 1024))
    snap.regions[1].strides, snap.regions[1].view_offset = (1,), 0
    return snap


def manifest_and_sizes(snap):
    manifest, blobs = snap.to_manifest()
    return manifest, [len(memoryview(b).cast("B")) for b in blobs]


def test_refs_and_strides_round_trip_through_a_file(tmp_path):
    snap = snap_with_refs()
    path = tmp_path / "s.cgsnap"
    snap.save(path, prune=False)
    back = cgsnap.read(path)
    assert back.regions[2].refs == snap.regions[2].refs
    assert back.regions[1].strides == (1,) and back.regions[1].view_offset == 0
    assert back.regions[0].refs == b"" and back.regions[0].strides is None
    with fileformat.open_file(path) as f:
        assert f.manifest["schema"] == 3
        assert "refs" not in f.manifest["regions"][0]


def _set_region_ref(m, rid, j, field, value):
    t = np.frombuffer(m["regions"][rid]["refs"], dtype="<u8").reshape(-1, 3).copy()
    t[j, field] = value
    m["regions"][rid]["refs"] = t.tobytes()


REF_CORRUPTIONS = [
    ("refs not bytes", lambda m: m["regions"][2].__setitem__("refs", [1, 2, 3]),
     r"regions\[2\].refs: expected bytes"),
    ("truncated table", lambda m: m["regions"][2].__setitem__("refs", m["regions"][2]["refs"][:-1]),
     r"regions\[2\].refs: .*24-byte entry"),
    ("more entries than words", lambda m: m["regions"][3].__setitem__("refs", table(
        (0, 0, 0), (8, 0, 0), (16, 0, 0))), r"regions\[3\].refs: 72 bytes"),
    ("word past the end", lambda m: _set_region_ref(m, 2, 3, 0, 4096 - 4),
     r"regions\[2\].refs\[3\]: the word at offset 4092 runs past"),
    ("offsets out of order", lambda m: _set_region_ref(m, 2, 1, 0, 0),
     r"regions\[2\].refs\[1\]: stored pointer offsets must be increasing"),
    ("overlapping words", lambda m: _set_region_ref(m, 2, 1, 0, 4),
     r"regions\[2\].refs\[1\]: stored pointer offsets"),
    ("dangling target", lambda m: _set_region_ref(m, 2, 2, 1, 99),
     r"regions\[2\].refs\[2\]: region 99 does not exist"),
    ("huge target id", lambda m: _set_region_ref(m, 2, 0, 1, (1 << 64) - 1),
     r"regions\[2\].refs\[0\]: region 18446744073709551615 does not exist"),
    ("target offset beyond", lambda m: _set_region_ref(m, 2, 0, 2, 1025),
     r"regions\[2\].refs\[0\]: offset 1025 is beyond the end of region 0"),
    ("graph_alloc target", lambda m: _set_region_ref(m, 2, 1, 1, 4),
     r"regions\[2\].refs\[1\]: region 4 is a graph_alloc region"),
    ("refs on scratch", lambda m: m["regions"][1].__setitem__("refs", table((0, 0, 0))),
     r"regions\[1\].refs: a scratch region has no saved contents"),
    ("strides without shape", lambda m: (m["regions"][2].__setitem__("strides", [1])),
     r"regions\[2\].strides: a strided view needs a shape"),
    ("strides of unknown dtype", lambda m: (m["regions"][1].__setitem__("dtype", "qint8")),
     r"regions\[1\].strides: a strided view needs a dtype of known item size"),
    ("strides per dimension", lambda m: m["regions"][1].__setitem__("strides", [1, 1]),
     r"regions\[1\].strides: 2 strides for 1 dimensions"),
    ("stride not an int", lambda m: m["regions"][1].__setitem__("strides", ["x"]),
     r"regions\[1\].strides\[0\]: expected an integer"),
    ("view beyond the span", lambda m: m["regions"][1].__setitem__("strides", [2]),
     r"regions\[1\].strides: the view's elements 0..510 of 4 bytes do not lie inside"),
    ("view before the span", lambda m: m["regions"][1].__setitem__("strides", [-1]),
     r"regions\[1\].strides: the view's elements -255..0"),
    ("view_offset without strides", lambda m: (m["regions"][0].__setitem__("view_offset", 1)),
     r"regions\[0\].view_offset: given without strides"),
    ("negative view_offset", lambda m: m["regions"][1].__setitem__("view_offset", -1),
     r"regions\[1\].view_offset: -1 is out of range"),
]


@pytest.mark.parametrize("label,mutate,match", REF_CORRUPTIONS, ids=[c[0] for c in REF_CORRUPTIONS])
def test_malformed_schema_3_region_fields_are_format_errors(label, mutate, match):
    manifest, sizes = manifest_and_sizes(snap_with_refs())
    Snapshot.from_manifest(copy.deepcopy(manifest), sizes, "ok.cgsnap")     # the base is valid
    mutate(manifest)
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(manifest, sizes, "bad.cgsnap")


def test_negative_strides_with_an_offset_are_valid():
    snap = make_snapshot()
    r = snap.regions[1]                    # 256 float32
    r.shape, r.strides, r.view_offset = (16, 16), (-16, 1), 240
    manifest, sizes = manifest_and_sizes(snap)
    back = Snapshot.from_manifest(manifest, sizes, "x.cgsnap")
    assert back.regions[1].strides == (-16, 1) and back.regions[1].view_offset == 240


def test_schema_2_files_still_read_and_refuse_schema_3_fields():
    snap = cgsnap.read(SAMPLE)               # the bundled sample is a schema-2 file
    assert len(snap.regions) == 9 and not any(r.refs or r.strides for r in snap.regions)
    with fileformat.open_file(SAMPLE) as f:
        manifest = copy.deepcopy(f.manifest)
        sizes = [b.raw_length for b in f.blobs]
    assert manifest["schema"] == 2
    manifest["regions"][8]["refs"] = table((0, 6, 0))
    with pytest.raises(FormatError, match=r"regions\[8\]: unknown field\(s\) refs"):
        Snapshot.from_manifest(manifest, sizes, SAMPLE)
    # The same field is fine in a schema-3 manifest.
    m3, blobs = make_snapshot().to_manifest()
    m3["regions"][2]["refs"] = table((0, 1, 0))
    sizes3 = [len(memoryview(b).cast("B")) for b in blobs]
    assert Snapshot.from_manifest(m3, sizes3, "s3.cgsnap").regions[2].refs == table((0, 1, 0))


def test_merge_renumbers_stored_pointer_targets():
    a, b = make_snapshot(), snap_with_refs()
    for s in (a, b):
        for r in s.regions:
            r.origin = 0x7000_0000 + r.id * 0x10000
    b.regions[2].origin = 0x9000_0000        # b's allocation is another one than a's
    b.graphs[0].name, b.graphs[1].name = "step2", "step2/child6"
    b.graphs[0].nodes[6].graph = "step2/child6"
    merged = snapfile.merge([a, b])
    moved = [r for r in merged.regions if r.origin == 0x9000_0000]
    assert len(moved) == 1
    t = moved[0].pointer_table()
    # x, y and the global are shared with a (ids 0, 1, 3); the self-reference follows the move.
    assert t["region"].tolist() == [0, 1, 3, moved[0].id]


def test_patch_plan_writes_each_word_where_it_belongs():
    snap = snap_with_refs()
    patches = region_patches(snap)
    assert set(patches) == {2}
    p = patches[2]
    assert p.runs == [(0, 3), (3, 4)]                      # the pointer array, then one word
    bases = np.array([0x1000, 0x2000, 0x3000, 0x4000, 0, 0x6000], dtype=np.uint64)
    assert p.values(bases).tolist() == [0x1000, 0x2040, 0x4008, 0x3400]
    data = np.arange(4096, dtype=np.uint32).view(np.uint8)[:4096].copy()
    before = data.copy()
    p.apply(data, bases)
    words = data.view("<u8")
    assert words[[0, 1, 2, 64]].tolist() == [0x1000, 0x2040, 0x4008, 0x3400]
    changed = np.flatnonzero(data != before)
    assert set(changed.tolist()) <= set(range(24)) | set(range(512, 520))
    assert p.chunks(bases) == [(0, np.array([0x1000, 0x2040, 0x4008], "<u8").tobytes()),
                               (512, np.array([0x3400], "<u8").tobytes())]


def test_word_runs():
    assert word_runs(np.array([], dtype=np.int64)) == []
    assert word_runs(np.array([0, 8, 16, 32, 40, 100], dtype=np.int64)) == [(0, 3), (3, 5),
                                                                            (5, 6)]


def test_patches_at_unaligned_offsets():
    p = RegionPatches(table((3, 0, 1), (11, 0, 2)))
    data = np.zeros(24, dtype=np.uint8)
    p.apply(data, np.array([0x100], dtype=np.uint64))
    assert int.from_bytes(data[3:11].tobytes(), "little") == 0x101
    assert int.from_bytes(data[11:19].tobytes(), "little") == 0x102
    assert np.frombuffer(b"", dtype=REGION_REF_DTYPE).size == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.integers(0, 4100), st.integers(0, 7),
                                  st.integers(0, 1 << 12)), max_size=6),
       rid=st.sampled_from([0, 2, 3]))
def test_region_pointer_tables_are_validated_exactly(entries, rid):
    """Any stored-pointer table is refused with a FormatError naming regions[i].refs, or obeys
    every rule -- and then plans into patches that stay inside the region."""
    snap = make_snapshot()
    manifest, sizes = manifest_and_sizes(snap)
    manifest["regions"][rid]["refs"] = table(*entries) if entries else b""
    region_sizes = [r["size"] for r in manifest["regions"]]
    kinds = [r["kind"] for r in manifest["regions"]]
    size = region_sizes[rid]
    valid = len(entries) <= size // 8 and \
        all(o + 8 <= size and t < len(region_sizes) and to <= region_sizes[t] and
            kinds[t] != "graph_alloc" for o, t, to in entries) and \
        all(b[0] >= a[0] + 8 for a, b in zip(entries, entries[1:]))
    try:
        back = Snapshot.from_manifest(manifest, sizes, "x.cgsnap")
    except FormatError as exc:
        assert not valid, exc
        assert f"regions[{rid}].refs" in str(exc)
        return
    assert valid
    if entries:
        p = region_patches(back)[rid]
        data = np.zeros(size, dtype=np.uint8)
        p.apply(data, np.arange(len(region_sizes), dtype=np.uint64) << np.uint64(32))
        assert [int.from_bytes(data[o:o + 8].tobytes(), "little") for o, _, _ in entries] == \
            [(t << 32) + to for _, t, to in entries]
