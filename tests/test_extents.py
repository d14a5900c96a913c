"""Schema 3 on CPU: sparse region contents (extents), identical contents stored once, the
compression decision, merging the extents of several snapshots, and the streamed writer's
checks (cgsnap.format)."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from synthetic import make_snapshot, schema2_manifest

import cgsnap
from cgsnap.errors import FormatError
from cgsnap.format import contents, fileformat, hashing, snapfile
from cgsnap.format.model import Extent, Policy, Region, RegionKind, Snapshot

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cgsnap",
                      "tools", "data", "sample.cgsnap")


def sparse_snapshot():
    """make_snapshot() whose allocation (region 2, 4096 bytes) is saved as two extents."""
    snap = make_snapshot()
    r = snap.regions[2]
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 255, 512, dtype=np.uint8), rng.integers(0, 255, 1024, dtype=np.uint8)
    r.extents = [Extent(0, 512, a.tobytes()), Extent(2048, 1024, b.tobytes())]
    r.data = None
    r.content_hash = hashing.extents_hash([(0, 512, hashing.blob_checksum(a)),
                                           (2048, 1024, hashing.blob_checksum(b))])
    return snap


def manifest_of(snap):
    m, blobs = snap.to_manifest()
    return m, [len(memoryview(b).cast("B")) for b in blobs]


def test_extents_round_trip_through_a_file(tmp_path):
    snap = sparse_snapshot()
    m, sizes = manifest_of(snap)
    assert "blob" not in m["regions"][2]
    assert [e[:2] for e in m["regions"][2]["extents"]] == [[0, 512], [2048, 1024]]
    path = tmp_path / "s.cgsnap"
    snap.save(path, prune=False)
    back, f = snapfile.read(path)
    with f:
        r = back.regions[2]
        assert [(e.offset, e.length) for e in r.extents] == [(0, 512), (2048, 1024)]
        assert r.saved_bytes() == 1536 and r.data is None
        for e, want in zip(r.extents, snap.regions[2].extents):
            assert bytes(f.blob(e.data)) == want.data
        assert r.content_hash == snap.regions[2].content_hash


BAD_EXTENTS = [
    ("not a list", lambda e: {"x": 1}, r"regions\[2\].extents: expected a list"),
    ("entry of two", lambda e: [[0, 512]] + e[1:], r"regions\[2\].extents\[0\]: expected \[offset"),
    ("entry not a list", lambda e: [7] + e[1:], r"regions\[2\].extents\[0\]: expected \[offset"),
    ("negative offset", lambda e: [[-1, 512, e[0][2]]] + e[1:], r"extents\[0\]\[0\]: -1 is out of range"),
    ("empty extent", lambda e: [[0, 0, e[0][2]]] + e[1:], r"extents\[0\]\[1\]: 0 is out of range"),
    ("overlap", lambda e: [e[0], [500, 1024, e[1][2]]], r"extents\[1\]: starts at 500, inside"),
    ("unsorted", lambda e: [e[1], e[0]], r"extents\[1\]: starts at 0, inside"),
    ("overrun", lambda e: [e[0], [3500, 1024, e[1][2]]], r"extents\[1\]: 1024 bytes at offset 3500 overrun"),
    ("offset beyond", lambda e: [e[0], [5000, 1024, e[1][2]]], r"extents\[1\]\[0\]: 5000 is out of range"),
    ("wrong blob size", lambda e: [[0, 512, e[1][2]], e[1]], r"extents\[0\]\[2\]: blob \d+ holds 1024 bytes, expected 512"),
    ("blob out of range", lambda e: [e[0], [2048, 1024, 99]], r"extents\[1\]\[2\]: 99 is out of range"),
    ("image blob", lambda e: [e[0], [2048, 1024, "img"]], r"blob \d+ is used twice"),
    ("offset not an int", lambda e: [["0", 512, e[0][2]]] + e[1:], r"extents\[0\]\[0\]: expected an integer"),
]


@pytest.mark.parametrize("label,change,match", BAD_EXTENTS, ids=[b[0] for b in BAD_EXTENTS])
def test_malformed_extents_are_format_errors_naming_the_extent(label, change, match):
    m, sizes = manifest_of(sparse_snapshot())
    extents = m["regions"][2]["extents"]
    new = change(copy.deepcopy(extents))
    if isinstance(new, list):
        for e in new:
            if isinstance(e, list) and len(e) == 3 and e[2] == "img":
                e[2] = m["images"][0]["blob"]
                sizes[e[2]] = e[1]
    m["regions"][2]["extents"] = new
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(m, sizes, "x.cgsnap")


def test_extents_rules_beyond_the_entries():
    m, sizes = manifest_of(sparse_snapshot())
    cases = []
    both = copy.deepcopy(m)
    both["regions"][2]["blob"] = both["regions"][0]["blob"]
    cases.append((both, sizes, r"regions\[2\]: a region has a blob or extents, not both"))
    scratch = copy.deepcopy(m)
    scratch["regions"][2]["policy"] = "scratch"
    cases.append((scratch, sizes, r"regions\[2\].extents: a scratch region carries no contents"))
    glob = copy.deepcopy(m)
    glob["regions"][3]["extents"] = [[0, 16, glob["regions"][3].pop("blob")]]
    cases.append((glob, sizes, r"regions\[3\].extents: a module_global region is saved whole"))
    old = copy.deepcopy(m)
    old["schema"] = 2
    cases.append((old, sizes, r"regions\[2\]: unknown field\(s\) extents"))
    neither = copy.deepcopy(m)
    del neither["regions"][2]["extents"]
    cases.append((neither, sizes, r"regions\[2\]: a saved region needs a blob or extents"))
    for manifest, s, match in cases:
        with pytest.raises(FormatError, match=match):
            Snapshot.from_manifest(manifest, s, "x.cgsnap")


def test_every_blob_must_be_used_from_schema_3_on():
    m, sizes = manifest_of(make_snapshot())
    with pytest.raises(FormatError, match=r"blob 5 is used by no region, extent, check or image"):
        Snapshot.from_manifest(m, sizes + [10], "x.cgsnap")
    old, _ = schema2_manifest(make_snapshot())   # older files are read as they were written
    Snapshot.from_manifest(old, sizes + [10], "x.cgsnap")


def test_sharing_a_blob_is_schema_3_only():
    m, sizes = manifest_of(make_snapshot())
    m["graphs"][0]["checks"].append([0, m["regions"][0]["blob"]])     # same size as region 0
    Snapshot.from_manifest(m, sizes, "x.cgsnap")
    old, _ = schema2_manifest(make_snapshot())
    old["graphs"][0]["checks"].append([0, old["regions"][0]["blob"]])
    with pytest.raises(FormatError, match=r"checks\[1\]\[1\]: blob 0 is used twice"):
        Snapshot.from_manifest(old, sizes, "x.cgsnap")


def test_schema_2_file_still_reads():
    assert fileformat.read_manifest(SAMPLE)["schema"] == 2
    snap = cgsnap.read(SAMPLE)
    assert snap.graphs and all(r.extents is None for r in snap.regions)


def test_identical_contents_are_stored_once(tmp_path):
    """Two regions, an extent and a check with the same bytes share one blob; the file is the
    same bytes every time, and reads back into the right contents everywhere."""
    snap = sparse_snapshot()
    same = snap.regions[2].extents[1].data            # 1024 bytes
    snap.regions[0].data = same                       # region 0 is 1024 bytes too
    snap.regions.append(Region(6, RegionKind.ALLOCATION, 1024, Policy.SAVED,
                               data=bytearray(same), alignment=256))
    snap.graphs[0].checks = {1: bytes(same)}
    m, blobs = snap.to_manifest()
    shared = m["regions"][0]["blob"]
    assert m["regions"][2]["extents"][1][2] == shared == m["regions"][6]["blob"]
    assert m["graphs"][0]["checks"] == [[1, shared]]
    assert len(blobs) == 4            # shared, extent 0, the module global, the image
    a, b = tmp_path / "a.cgsnap", tmp_path / "b.cgsnap"
    snap.save(a, prune=False)
    snap.save(b, prune=False)
    assert a.read_bytes() == b.read_bytes()
    back, f = snapfile.read(a)
    with f:
        assert bytes(f.blob(back.regions[6].data)) == bytes(same)
        assert bytes(f.blob(back.graphs[0].checks[1])) == bytes(same)
        assert back.regions[0].data == back.regions[6].data


def test_equal_checksums_are_not_enough_to_share(monkeypatch):
    """A checksum match is only a candidate: different bytes with a colliding checksum (forced
    here) keep their own blobs."""
    monkeypatch.setattr(contents, "blob_checksum", lambda view: b"\0" * 16)
    snap = make_snapshot()
    snap.regions[0].data = bytes(1024)
    snap.graphs[0].checks = {1: bytes([1]) * 1024}
    m, blobs = snap.to_manifest()
    assert m["regions"][0]["blob"] != m["graphs"][0]["checks"][0][1]


def test_compression_decision_from_a_sample():
    rng = np.random.default_rng(0)
    zeros = np.zeros(8 << 20, dtype=np.uint8)
    ints = rng.integers(0, 100, 2 << 20).astype(np.int32)
    random = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    halves = rng.standard_normal(4 << 20).astype(np.float16)
    assert contents.sample_ratio(zeros) < 0.01
    assert contents.sample_ratio(ints) < contents.AUTO_RATIO
    assert contents.sample_ratio(random) > 0.99
    assert contents.sample_ratio(halves) > contents.AUTO_RATIO
    # The sample is bounded: 4 pieces of 64 KiB however large the blob, spread over all of it.
    spans = contents.sample_spans(1 << 34)
    assert len(spans) == 4 and all(n == 64 << 10 for _, n in spans)
    assert spans[0][0] == 0 and spans[-1][0] + (64 << 10) > (1 << 34) - (1 << 20)
    assert contents.sample_spans(1000) == [(0, 1000)] and contents.sample_spans(0) == []
    assert contents.worth_compressing("auto", 0.1) and not contents.worth_compressing("auto", 0.9)
    assert contents.worth_compressing(True, 0.99) and not contents.worth_compressing(False, 0.01)


@pytest.mark.parametrize("compress,zeros_packed,random_packed", [
    ("auto", True, False), (True, True, True), (False, False, False)])
def test_save_compresses_where_it_pays(tmp_path, compress, zeros_packed, random_packed):
    snap = make_snapshot()
    rng = np.random.default_rng(5)
    snap.regions[0].data = bytes(1024)                                   # zeros
    snap.regions[2].data = rng.integers(0, 256, 4096, dtype=np.uint8)   # random
    path = tmp_path / "c.cgsnap"
    snap.save(path, compress=compress, prune=False)
    m = fileformat.read_manifest(path)
    with fileformat.open_file(path, verify_blobs=True) as f:
        info = {i: f.blobs[i].compression for i in range(len(f.blobs))}
        assert (info[m["regions"][0]["blob"]] == fileformat.Compression.ZSTD) == zeros_packed
        assert (info[m["regions"][2]["blob"]] == fileformat.Compression.ZSTD) == random_packed
        assert info[m["images"][0]["blob"]] == fileformat.Compression.ZSTD    # always
        assert bytes(f.blob(m["regions"][2]["blob"])) == snap.regions[2].data.tobytes()
    with pytest.raises(ValueError, match="compress="):
        snap.save(path, compress="yes", prune=False)


def _two_sparse():
    """Two sparse snapshots of the same memory (same origins), their graphs named apart."""
    s1, s2 = sparse_snapshot(), sparse_snapshot()
    for s in (s1, s2):
        for r in s.regions:
            r.origin = 0x7000_0000 + r.id * 0x10000
    s2.graphs[0].name, s2.graphs[1].name = "step2", "step2/child6"
    s2.graphs[0].nodes[6].graph = "step2/child6"
    return s1, s2


def test_merge_takes_the_union_of_extents():
    s1, s2 = _two_sparse()
    rng = np.random.default_rng(9)
    late = rng.integers(0, 255, 2048, dtype=np.uint8).tobytes()
    s2.regions[2].extents = [Extent(256, 512, late[:512]),       # overlaps the first's [0, 512)
                             Extent(1024, 2048, late)]           # overlaps [2048, 3072)
    merged = snapfile.merge([s1, s2])
    got = [(e.offset, e.length) for e in merged.regions[2].extents]
    assert got == [(0, 512), (512, 256), (1024, 1024), (2048, 1024)]
    first = s1.regions[2].extents
    e = merged.regions[2].extents
    assert e[0].data is first[0].data and e[3].data is first[1].data      # the first's bytes win
    assert bytes(memoryview(e[1].data.view)) == late[256:512]
    assert bytes(memoryview(e[2].data.view)) == late[:1024]
    assert merged.regions[2].content_hash is None       # recomputed when saved
    m, _ = merged.to_manifest()
    assert [x[:2] for x in m["regions"][2]["extents"]] == [list(g) for g in got]


def test_a_streamed_source_that_changed_fails_the_write(tmp_path):
    data = np.arange(1 << 16, dtype=np.uint8)
    good = hashing.blob_checksum(data)
    for compress in (False, True):
        path = tmp_path / f"x{compress}.cgsnap"
        src = fileformat.BlobSource(chunks=[data[:1000], data[1000:]], raw_length=len(data),
                                    compress=compress, digest=b"\1" * 16)
        with pytest.raises(FormatError, match="other bytes than it was scanned with"):
            fileformat.write_file(path, {"a": 1}, [src])
        assert not path.exists()
        src = fileformat.BlobSource(chunks=[data[:1000], data[1000:]], raw_length=len(data),
                                    compress=compress, digest=good)
        fileformat.write_file(path, {"a": 1}, [src])
        with fileformat.open_file(path, verify_blobs=True) as f:
            assert bytes(f.blob(0)) == data.tobytes()


def test_parallel_chunked_writes_hash_like_the_reader(tmp_path, monkeypatch):
    """Large chunked blobs are written by several threads, their whole pieces hashed on the
    pool: the stored checksum is the one the reader computes, for aligned and ragged chunks."""
    monkeypatch.setattr(fileformat, "PARALLEL_WRITE", 1 << 12)
    monkeypatch.setattr(fileformat, "_PIECE", 1 << 10)
    monkeypatch.setattr(fileformat, "BLOB_PIECE", 1 << 12)
    monkeypatch.setattr(hashing, "BLOB_PIECE", 1 << 12)
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 5 * (1 << 12) + 777, dtype=np.uint8)
    piece = 1 << 12
    aligned = [data[o:o + piece] for o in range(0, len(data), piece)]
    ragged = [data[:100], data[100:9000], data[9000:]]
    path = tmp_path / "p.cgsnap"
    for chunks in (aligned, ragged, None):
        src = fileformat.BlobSource(data) if chunks is None else \
            fileformat.BlobSource(chunks=chunks, raw_length=len(data))
        fileformat.write_file(path, {"a": 1}, [b"head", src, b"tail"])
        with fileformat.open_file(path, verify_blobs=True) as f:
            assert bytes(f.blob(1)) == data.tobytes()
            assert f.blobs[1].checksum == hashing.blob_checksum(data)
            assert bytes(f.blob(2)) == b"tail"


def _spanned_snapshot():
    """make_snapshot() whose allocation (region 2, 4096 bytes at 0x7000_2000) is a segment the
    graphs use only from byte 512 to 3584: refs, a view and extents inside that part."""
    from cgsnap.format.model import KernelNode, MemcpyNode, MemsetNode, Ref
    snap = make_snapshot()
    for r in snap.regions:
        r.origin = 0x7000_0000 + r.id * 0x2000
    r = snap.regions[2]
    rng = np.random.default_rng(3)
    a = rng.integers(0, 255, 512, dtype=np.uint8).tobytes()
    r.extents, r.data, r.content_hash = [Extent(1024, 512, a)], None, None
    r.span = (512, 3584)
    snap.regions.append(Region(6, RegionKind.NAMED, 256, Policy.SAVED, name="view", parent=2,
                               parent_offset=2048, data=bytes(range(256)), alignment=256,
                               origin=r.origin + 2048))
    g = snap.graphs[0]
    refs = np.array([[0, 2, 512], [16, 4, 64], [32, 2, 3584]], dtype="<u8").tobytes()
    g.nodes[1] = KernelNode(1, 1, (1, 1, 1), (256, 1, 1), 128, g.nodes[1].params, refs,
                            dict(g.nodes[1].attrs))
    g.nodes[2] = MemcpyNode(2, Ref(1, 0), Ref(2, 1000), 1024)
    g.nodes[3] = MemcpyNode(3, Ref(2, 600), Ref(2, 2100), 64, 4, 1, 128, 0, 64, 0)
    g.nodes[4] = MemsetNode(4, Ref(2, 3000), 0, 4, 16)
    from cgsnap.format.model import RngState
    g.rng = [RngState(seed=Ref(2, 1024), offset=Ref(2, 1032), increment=4, device=0,
                      saved_seed=7, saved_offset=8)]
    # Stored pointers: in the trimmed region, to itself; in region 0, into it.
    r.refs = np.array([[1024, 2, 600], [1032, 0, 8]], dtype="<u8").tobytes()
    snap.regions[0].refs = np.array([[0, 2, 3000]], dtype="<u8").tobytes()
    return snap


def _addresses(snap):
    """Every address a node names, as (origin of its region + offset)."""
    out = []
    for g in snap.graphs:
        for n in g.nodes:
            if n.TYPE == "kernel":
                for _, rid, off in np.frombuffer(n.refs, dtype="<u8").reshape(-1, 3).tolist():
                    out.append(snap.regions[rid].origin + off)
            for side in ("src", "dst", "ptr"):
                ref = getattr(n, side, None)
                if ref is not None:
                    out.append(snap.regions[ref.region].origin + ref.offset)
        for e in g.rng:
            out += [snap.regions[r.region].origin + r.offset for r in (e.seed, e.offset)]
    for r in snap.regions:
        for off, target, toff in np.frombuffer(r.refs, dtype="<u8").reshape(-1, 3).tolist():
            out += [r.origin + off, snap.regions[target].origin + toff]
    return out


def test_trim_keeps_every_address_and_only_the_used_part():
    snap = _spanned_snapshot()
    before = _addresses(snap)
    trimmed = snapfile.trim_regions(snap)
    r = trimmed.regions[2]
    assert (r.origin, r.size, r.span) == (0x7000_4000 + 512, 3072, None)
    assert r.alignment == 512 and snap.regions[2].size == 4096     # the input is not changed
    assert [(e.offset, e.length) for e in r.extents] == [(512, 512)]
    assert trimmed.regions[6].parent_offset == 2048 - 512
    assert _addresses(trimmed) == before
    m, blobs = trimmed.to_manifest()
    back = Snapshot.from_manifest(m, [len(memoryview(b).cast("B")) for b in blobs], "t.cgsnap")
    assert [list(x) for x in np.frombuffer(back.graphs[0].nodes[1].refs, dtype="<u8")
            .reshape(-1, 3)] == [[0, 2, 0], [16, 4, 64], [32, 2, 3072]]   # one past the end


def test_save_trims_and_merge_takes_the_union_of_spans(tmp_path):
    s1, s2 = _spanned_snapshot(), _spanned_snapshot()
    s2.graphs[0].name, s2.graphs[1].name = "step2", "step2/child6"
    s2.graphs[0].nodes[6].graph = "step2/child6"
    s2.regions[2].span = (0, 1024)
    merged = snapfile.merge([s1, s2])
    assert merged.regions[2].span == (0, 3584)
    s3 = _spanned_snapshot()
    s3.graphs[0].name, s3.graphs[1].name = "step3", "step3/child6"
    s3.graphs[0].nodes[6].graph = "step3/child6"
    s3.regions[2].span = None                 # a snapshot that does not know: the whole region
    assert snapfile.merge([s1, s3]).regions[2].span is None
    path = tmp_path / "t.cgsnap"
    snapfile.save(path, [s1, s2], prune=False)
    back = cgsnap.read(path)
    r = back.regions[2]
    assert r.size == 3584 and [(e.offset, e.length) for e in r.extents] == [(1024, 512)]
    assert r.content_hash == hashing.extents_hash(
        [(1024, 512, hashing.blob_checksum(s1.regions[2].extents[0].data))])


def test_parallel_chunked_writes_split_each_chunk_over_the_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(fileformat, "PARALLEL_WRITE", 1 << 20)
    monkeypatch.setenv("CGSNAP_IO_THREADS", "3")
    data = np.random.default_rng(8).integers(0, 256, (7 << 20) + 5, dtype=np.uint8)
    chunks = [data[o:o + (3 << 20)] for o in range(0, len(data), 3 << 20)]
    path = tmp_path / "c.cgsnap"
    fileformat.write_file(path, {"a": 1}, [b"x", fileformat.BlobSource(
        chunks=chunks, raw_length=len(data), digest=hashing.blob_checksum(data))])
    with fileformat.open_file(path, verify_blobs=True) as f:
        assert bytes(f.blob(1)) == data.tobytes()


def test_info_reports_sparse_regions(tmp_path):
    from cgsnap.tools import render
    path = tmp_path / "s.cgsnap"
    sparse_snapshot().save(path, prune=False)
    snap, f = snapfile.read(path)
    with f:
        d = render.info_dict(snap, f.blobs, f.version, str(path))
    assert d["regions"][2]["saved_bytes"] == 1536 and d["regions"][2]["extents"] == 2
    assert d["bytes"]["saved_regions"] == 1024 + 1536 + 16
    assert "sparse    1 allocator segment(s) saved as 2 extents: 1.5 KiB of 4.0 KiB" in \
        render.info_text(d)


def test_merge_reports_every_graphs_freed_blocks_once_in_merged_ids():
    """meta.freed_blocks_read of each snapshot survives a merge, its region ids renumbered
    and a block two graphs share counted once."""
    s1, s2 = _two_sparse()
    s2.regions[2].origin = 0x9000_0000        # another allocation in the second snapshot
    s1.meta["freed_blocks_read"] = {"count": 1, "bytes": 512, "blocks": [
        {"region": 2, "address": 0x7002_0000, "size": 512, "saved": True}]}
    s2.meta["freed_blocks_read"] = {"count": 3, "bytes": 4608, "blocks": [
        {"region": 0, "address": 0x7000_0000, "size": 512, "saved": True},
        {"region": 2, "address": 0x9000_0000, "size": 4096, "saved": False}],   # + one unlisted
        "not_saved": {"count": 1, "bytes": 4096}}
    merged = snapfile.merge([s1, s2])
    new_id = next(r.id for r in merged.regions if r.origin == 0x9000_0000)
    got = merged.meta["freed_blocks_read"]
    assert got["blocks"] == [{"region": 0, "address": 0x7000_0000, "size": 512, "saved": True},
                             {"region": 2, "address": 0x7002_0000, "size": 512, "saved": True},
                             {"region": new_id, "address": 0x9000_0000, "size": 4096,
                              "saved": False}]
    assert got["count"] == 4 and got["bytes"] == 512 + 512 + 4096
    assert got["not_saved"] == {"count": 1, "bytes": 4096}
    # a block both graphs list counts once
    s2.meta["freed_blocks_read"] = dict(s1.meta["freed_blocks_read"])
    once = snapfile.merge([s1, s2]).meta["freed_blocks_read"]
    assert once["count"] == 1 and once["bytes"] == 512
