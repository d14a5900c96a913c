"""Block granularity on CPU: which live blocks of a segment the graphs reach
(cgsnap.capture.blocks, record._plan_extents), and the staging ring that reads them in order
(cgsnap.cuda.transfer.ChunkRing) with the scan and stream built on it
(cgsnap.capture.contents), driven by a fake DMA engine over host memory."""
from __future__ import annotations

import random
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cgsnap.capture import contents as device_contents
from cgsnap.capture import record
from cgsnap.capture.blocks import AllocatorMap, Block, Segment, reached_extents
from cgsnap.cuda import transfer
from cgsnap.format import contents, hashing
from cgsnap.format.model import (Graph, KernelNode, MemcpyNode, MemsetNode, Policy, Ref, Region,
                                 RegionKind)

KiB = 1024


def segment():
    """A 64 KiB segment: live, free, live (requested 3000 of 4096), live, free, live."""
    return Segment(0x10000, 64 * KiB, (
        Block(0, 8 * KiB, 8 * KiB),
        Block(8 * KiB, 8 * KiB, 0),
        Block(16 * KiB, 4 * KiB, 3000),
        Block(20 * KiB, 12 * KiB, 12 * KiB),
        Block(32 * KiB, 16 * KiB, 0),
        Block(48 * KiB, 16 * KiB, 16 * KiB)))


def test_a_pointer_reaches_the_live_block_it_lands_in():
    seg = segment()
    assert reached_extents(seg, pointers=[100]) == [(0, 8 * KiB)]
    assert reached_extents(seg, pointers=[16 * KiB + 5]) == [(16 * KiB, 3000)]   # requested size
    assert reached_extents(seg, pointers=[9 * KiB]) == [(8 * KiB, 8 * KiB)]       # a free block: whole
    assert reached_extents(seg, pointers=[64 * KiB, 1 << 40]) == []              # past the end
    # The start of the next block is the next block (not the end of the previous one).
    assert reached_extents(seg, pointers=[20 * KiB]) == [(20 * KiB, 12 * KiB)]
    assert reached_extents(seg, pointers=[100, 200, 300]) == [(0, 8 * KiB)]     # once


def test_a_span_reaches_every_block_it_overlaps():
    seg = segment()
    assert reached_extents(seg, spans=[(7 * KiB, 10 * KiB)]) == [
        (0, 8 * KiB), (8 * KiB, 8 * KiB), (16 * KiB, 3000)]
    assert reached_extents(seg, spans=[(0, 64 * KiB)]) == [
        (0, 8 * KiB), (8 * KiB, 8 * KiB), (16 * KiB, 3000), (20 * KiB, 12 * KiB),
        (32 * KiB, 16 * KiB), (48 * KiB, 16 * KiB)]
    assert reached_extents(seg, spans=[(33 * KiB, 1 * KiB)]) == [(32 * KiB, 16 * KiB)]  # a free block
    assert reached_extents(seg, spans=[(20 * KiB, 0)]) == [(20 * KiB, 12 * KiB)]  # empty: a pointer


def test_free_blocks_reached_are_reported():
    from cgsnap.capture.blocks import reached_free_blocks
    seg = segment()
    assert reached_free_blocks(seg, pointers=[100, 9 * KiB], spans=[(40 * KiB, 100)]) == [
        (8 * KiB, 8 * KiB), (32 * KiB, 16 * KiB)]
    assert reached_free_blocks(seg, pointers=[100, 20 * KiB]) == []


def test_excluded_views_are_cut_out_of_the_blocks():
    seg = segment()
    got = reached_extents(seg, pointers=[20 * KiB], exclude=[(22 * KiB, 2 * KiB), (30 * KiB, 8 * KiB)])
    assert got == [(20 * KiB, 2 * KiB), (24 * KiB, 6 * KiB)]
    # Overlapping and nested exclusions, one covering the block entirely.
    assert reached_extents(seg, pointers=[0], exclude=[(0, 4 * KiB), (1 * KiB, 1 * KiB)]) == \
        [(4 * KiB, 4 * KiB)]
    assert reached_extents(seg, pointers=[0], exclude=[(0, 1 * KiB), (0, 9 * KiB)]) == []


def test_reach_agrees_with_a_brute_force_model():
    """Random segments, pointers, spans and exclusions against a byte-by-byte model."""
    rng = random.Random(7)
    for _ in range(300):
        sizes = [rng.choice([512, 1024, 4096]) for _ in range(rng.randint(1, 8))]
        blocks, off = [], 0
        for n in sizes:
            live = rng.choice([0, n, rng.randint(1, n)])
            blocks.append(Block(off, n, live))
            off += n
        seg = Segment(0, off, tuple(blocks))
        ptrs = [rng.randrange(0, off + 600) for _ in range(rng.randint(0, 3))]
        spans = [(rng.randrange(0, off), rng.randint(0, 3000)) for _ in range(rng.randint(0, 2))]
        excl = [(rng.randrange(0, off), rng.randint(0, 2000)) for _ in range(rng.randint(0, 2))]
        want = np.zeros(off, dtype=bool)
        for b in blocks:
            hit = any(b.offset <= p < b.offset + b.size for p in ptrs) or any(
                (n == 0 and b.offset <= o < b.offset + b.size) or
                (n > 0 and o < b.offset + b.size and b.offset < o + n) for o, n in spans)
            if hit:      # a live block's live bytes; a free block (live 0) whole
                want[b.offset:b.offset + (b.live or b.size)] = True
        for o, n in excl:
            want[o:o + n] = False
        got = np.zeros(off, dtype=bool)
        extents = reached_extents(seg, ptrs, spans, excl)
        assert extents == sorted(extents)
        for o, n in extents:
            assert n > 0 and not got[o:o + n].any()
            got[o:o + n] = True
        assert (got == want).all(), (blocks, ptrs, spans, excl, extents)


def test_the_span_covers_reached_blocks_free_ones_too_and_every_pointer():
    from cgsnap.capture.blocks import reached_span
    seg = segment()
    assert reached_span(seg, pointers=[9 * KiB]) == (8 * KiB, 16 * KiB)      # a free block
    assert reached_span(seg, pointers=[17 * KiB], spans=[(40 * KiB, 100)]) == (16 * KiB, 48 * KiB)
    assert reached_span(seg, pointers=[100, 64 * KiB]) == (0, 64 * KiB)   # one past the end
    assert reached_span(seg) == (0, 0)


def test_allocator_map_finds_segments():
    amap = AllocatorMap([Segment(0x2000, 0x1000), Segment(0x1000, 0x800)])
    assert amap.segment_at(0x1000).address == 0x1000
    assert amap.segment_at(0x17ff).address == 0x1000
    assert amap.segment_at(0x1800) is None                       # between segments
    assert amap.segment_at(0x2fff).address == 0x2000
    assert amap.segment_at(0x3000) is None and amap.segment_at(0) is None


def _kernel(i, refs):
    return KernelNode(i, 0, (1, 1, 1), (1, 1, 1), 0, bytes(8 * max(1, len(refs))),
                      np.array([(8 * j, r, o) for j, (r, o) in enumerate(refs)],
                               dtype="<u8").reshape(-1, 3).tobytes())


def test_plan_extents_from_the_graphs_refs():
    """The recorder's reach: kernel pointers, memcpy and memset boxes, named views (saved
    ones cut out of the parent's extents, scratch ones too), and extra in-memory pointers."""
    seg = segment()
    regions = [
        Region(0, RegionKind.ALLOCATION, seg.size, Policy.SAVED, origin=seg.address),
        Region(1, RegionKind.NAMED, 1 * KiB, Policy.SAVED, name="out", parent=0,
               parent_offset=49 * KiB, origin=seg.address + 49 * KiB),
        Region(2, RegionKind.ALLOCATION, 4096, Policy.SAVED, origin=0x900000),   # plain
        Region(3, RegionKind.ALLOCATION, seg.size, Policy.SAVED, origin=0x800000),
    ]
    nodes = [
        _kernel(0, [(0, 100), (2, 0)]),                       # block 0; the plain allocation
        MemcpyNode(1, Ref(2, 0), Ref(0, 17 * KiB), 4 * KiB),  # blocks 2 and 3
        MemsetNode(2, Ref(1, 0), 0, 1, 16),                   # the view: block 5 (cut out)
    ]
    rec = types.SimpleNamespace(regions=regions, graphs=[Graph("g", nodes, [])],
                                segments={0: seg, 3: segment()}, extra_accesses=[(3, 20 * KiB, 0)],
                                planned={}, freed={}, freed_seen={})
    record._plan_extents(rec)
    assert [(e.offset, e.length) for e in regions[0].extents] == [
        (0, 8 * KiB), (16 * KiB, 3000), (20 * KiB, 12 * KiB), (48 * KiB, 1 * KiB),
        (50 * KiB, 14 * KiB)]
    assert regions[2].extents is None and regions[2].span is None     # no map: saved whole
    assert [(e.offset, e.length) for e in regions[3].extents] == [(20 * KiB, 12 * KiB)]
    assert regions[0].span == (0, 64 * KiB) and regions[3].span == (20 * KiB, 32 * KiB)
    assert rec.freed == {} and record.freed_report(rec) is None


def test_a_freed_block_the_graph_reads_is_saved_whole_and_reported():
    """A kernel pointer into a block the allocator has freed (a model dropped after capture,
    seen on the H200): the block is saved as it is now and the snapshot says so."""
    seg = segment()
    regions = [Region(0, RegionKind.ALLOCATION, seg.size, Policy.SAVED, origin=seg.address)]
    nodes = [_kernel(0, [(0, 100), (0, 33 * KiB)])]        # block 0 (live), block 4 (free)
    rec = types.SimpleNamespace(regions=regions, graphs=[Graph("g", nodes, [])],
                                segments={0: seg}, extra_accesses=[], planned={}, freed={}, freed_seen={})
    record._plan_extents(rec)
    assert [(e.offset, e.length) for e in regions[0].extents] == [(0, 8 * KiB), (32 * KiB, 16 * KiB)]
    assert record.freed_report(rec) == {
        "count": 1, "bytes": 16 * KiB,
        "blocks": [{"region": 0, "address": seg.address + 32 * KiB, "size": 16 * KiB,
                    "saved": True}]}
    import cgsnap
    meta: dict = {}
    with pytest.warns(cgsnap.CgsnapWarning, match=r"graph 'g' reaches 1 block\(s\) the allocator "
                                                  r"has freed \(16384 bytes; the first at 0x18000"):
        record.report_freed(rec, "g", meta)
    assert meta["freed_blocks_read"]["count"] == 1


# ---- the staging ring, with a fake DMA engine --------------------------------------------------

class FakeEngine:
    """Copies host "device" memory into slots at start() (a DMA may land at any time after
    it is started) and checks that no slot is started twice before it was waited for."""

    def __init__(self, memory: np.ndarray, chunk: int, slots: int):
        self.mem, self.slots = memory, [bytearray(chunk) for _ in range(slots)]
        self.started, self.log = set(), []

    def start(self, slot, copies):
        assert slot not in self.started, "slot restarted before its chunk was consumed"
        self.started.add(slot)
        for at, src, n in copies:
            self.slots[slot][at:at + n] = self.mem[src:src + n].tobytes()
        self.log.append(("start", slot))

    def wait(self, slot):
        self.started.discard(slot)
        self.log.append(("wait", slot))

    def view(self, slot, at, n):
        return memoryview(self.slots[slot])[at:at + n]

    def drain(self):
        self.started.clear()


class FakeStager:
    def __init__(self, memory, chunk, slots):
        self.memory, self.chunk, self.slots = memory, chunk, slots
        self.hashers = ThreadPoolExecutor(4)

    def read_chunks(self, spans):
        return transfer.ChunkRing(FakeEngine(self.memory, self.chunk, self.slots), spans,
                                  self.chunk, self.slots)


def test_plan_chunks_packs_small_items_and_aligns_large_ones():
    plan = transfer.plan_chunks([100, 300, 0, 1000, 2500, 10], 1024)
    assert plan == [
        [(0, 0, 100, 0), (1, 0, 300, 256)],
        [(3, 0, 1000, 0)],
        [(4, 0, 1024, 0)], [(4, 1024, 1024, 0)], [(4, 2048, 452, 0), (5, 0, 10, 512)]]
    assert transfer.plan_chunks([1024, 1], 1024) == [[(0, 0, 1024, 0)], [(1, 0, 1, 0)]]
    assert transfer.plan_chunks([], 1024) == []


@pytest.mark.parametrize("slots", [1, 2, 3, 8])
def test_ring_yields_every_byte_in_order(slots):
    rng = np.random.default_rng(slots)
    mem = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    spans = [(0, 5000), (6000, 1), (7000, 300), (8000, 2048), (12000, 0), (20000, 9000)]
    ring = transfer.ChunkRing(FakeEngine(mem, 2048, slots), spans, 2048, slots)
    got = {i: bytearray() for i in range(len(spans))}
    for chunk in ring:
        for i, off, view in chunk.pieces:
            assert off == len(got[i])
            got[i] += view
    for i, (a, n) in enumerate(spans):
        assert bytes(got[i]) == mem[a:a + n].tobytes()


def test_ring_reuses_a_slot_only_after_its_held_jobs(monkeypatch):
    """The scan hashes chunks on threads and holds them; the ring must wait for those jobs
    before a slot is overwritten (the fake copies eagerly, so a premature reuse would change
    the bytes a job hashes)."""
    chunk = 4096
    monkeypatch.setattr(transfer, "CHUNK", chunk)
    monkeypatch.setattr(hashing, "BLOB_PIECE", chunk)
    rng = np.random.default_rng(3)
    mem = rng.integers(0, 256, 1 << 18, dtype=np.uint8)
    mem[100_000:140_000] = 0
    items_spec = [(0, 10_000), (10_000, 50), (20_000, 4096), (100_000, 40_000), (150_000, 100_000)]
    reader = types.SimpleNamespace()
    items = [device_contents.DeviceContents(a, n, reader) for a, n in items_spec]
    st = FakeStager(mem, chunk, 3)
    device_contents._scan_staged(st, items)
    for c, (a, n) in zip(items, items_spec):
        data = mem[a:a + n]
        assert c.digest == hashing.blob_checksum(data)
        assert c.zero == (not data.any())
        assert c.ratio == (0.0 if c.zero else contents.sample_ratio(data))
    # And the stream the writer reads gives the same bytes, item by item, in order.
    st = FakeStager(mem, chunk, 2)
    out = []
    for item, views in device_contents._stream_staged(st, items):
        out.append((item, b"".join(bytes(v) for v in views)))
    assert [i for i, _ in out] == items
    assert [b for _, b in out] == [mem[a:a + n].tobytes() for a, n in items_spec]


# ---- contents kept elsewhere until the file is written (the reader protocol) -------------------

class FakeReader:
    """A reader over host "device" memory, with the device reader's contract: scan in one
    batch, stream items in the order given, each view valid until the next is asked for."""

    def __init__(self, memory: np.ndarray, chunk: int = 1000):
        self.mem, self.chunk, self.streams, self.scans = memory, chunk, [], 0

    def scan(self, items):
        self.scans += 1
        for c in items:
            device_contents._scan_host(c, self.read(c))

    def stream(self, items):
        import contextlib
        items = list(items)
        self.streams.append(items)
        scratch = bytearray(self.chunk)

        def views(c):
            for off in range(0, c.nbytes, self.chunk):
                n = min(self.chunk, c.nbytes - off)
                scratch[:n] = self.mem[c.addr + off:c.addr + off + n].tobytes()   # reused
                yield memoryview(scratch)[:n]
        return contextlib.nullcontext(((c, views(c)) for c in items))

    def equal(self, a, b):
        return np.array_equal(self.read(a), self.read(b))

    def read(self, c):
        return self.mem[c.addr:c.addr + c.nbytes].copy()


def _fake_device_snapshot(mem, reader):
    from synthetic import make_snapshot
    from cgsnap.format.model import Extent
    snap = make_snapshot()
    r = snap.regions[2]                                  # 4096-byte allocation
    r.data, r.content_hash = None, None
    r.extents = [Extent(0, 1024, device_contents.DeviceContents(0, 1024, reader)),
                 Extent(2048, 2048, device_contents.DeviceContents(5000, 2048, reader))]
    snap.regions[0].data = device_contents.DeviceContents(0, 1024, reader)   # same bytes
    return snap


def test_save_streams_device_contents_in_file_order(tmp_path):
    from cgsnap.format import fileformat, snapfile
    rng = np.random.default_rng(4)
    mem = rng.integers(0, 256, 1 << 14, dtype=np.uint8)
    reader = FakeReader(mem)
    snap = _fake_device_snapshot(mem, reader)
    path = tmp_path / "d.cgsnap"
    snapfile.save(path, snap, prune=False)
    assert reader.scans == 1, "every item is scanned in one batch"
    assert len(reader.streams) == 1 and [c.nbytes for c in reader.streams[0]] == [1024, 2048], \
        "one stream, in blob order, the shared bytes once"
    m = fileformat.read_manifest(path)
    assert m["regions"][0]["blob"] == m["regions"][2]["extents"][0][2]
    with fileformat.open_file(path, verify_blobs=True) as f:
        assert bytes(f.blob(m["regions"][0]["blob"])) == mem[:1024].tobytes()
        assert bytes(f.blob(m["regions"][2]["extents"][1][2])) == mem[5000:7048].tobytes()
    back = snapfile.read(path)[0]
    assert back.regions[2].content_hash == hashing.extents_hash(
        [(0, 1024, hashing.blob_checksum(mem[:1024])),
         (2048, 2048, hashing.blob_checksum(mem[5000:7048]))])


def test_memory_changed_after_the_scan_fails_the_save(tmp_path):
    from cgsnap.errors import FormatError
    from cgsnap.format import snapfile
    mem = np.random.default_rng(5).integers(0, 256, 1 << 14, dtype=np.uint8)
    reader = FakeReader(mem)
    snap = _fake_device_snapshot(mem, reader)
    contents.scan_all([snap.regions[0].data] + [e.data for e in snap.regions[2].extents])
    mem[6000] ^= 0xFF                       # the program ran on between snapshot and save
    with pytest.raises(FormatError, match="other bytes than it was scanned with"):
        snapfile.save(tmp_path / "x.cgsnap", snap, prune=False)
    assert not (tmp_path / "x.cgsnap").exists()


def test_read_contents_hashes_and_drops_zero_extents(monkeypatch):
    """The recorder's last step over held contents: whole regions and extents get their
    contents and hashes; extents that are all zero are left out (the restore zero-fills)."""
    from cgsnap.format.model import Extent
    mem = np.random.default_rng(6).integers(0, 256, 1 << 16, dtype=np.uint8)
    mem[8192:12288] = 0
    reader = FakeReader(mem)
    monkeypatch.setattr(record, "hold_contents", lambda spans, hold, st=None: (
        [device_contents.DeviceContents(a, n, reader) for a, n in spans], hold))
    regions = [Region(0, RegionKind.ALLOCATION, 1 << 14, Policy.SAVED, origin=4096,
                      extents=[Extent(0, 1024), Extent(4096, 4096), Extent(9000, 100)]),
               Region(1, RegionKind.NAMED, 512, Policy.SAVED, name="x", origin=30000),
               Region(2, RegionKind.ALLOCATION, 64, Policy.SCRATCH, origin=40000)]
    rec = types.SimpleNamespace(regions=regions)
    cache: dict = {}
    record._read_contents(rec, "live", cache)
    r0 = regions[0]
    assert [(e.offset, e.length) for e in r0.extents] == [(0, 1024), (9000, 100)]
    assert r0.content_hash == hashing.extents_hash(
        [(0, 1024, hashing.blob_checksum(mem[4096:5120])),
         (9000, 100, hashing.blob_checksum(mem[13096:13196]))])
    assert regions[1].content_hash == hashing.blob_checksum(mem[30000:30512]).hex()
    assert regions[2].data is None and regions[2].content_hash is None
    assert set(cache) == {(4096, 1024), (8192, 4096), (13096, 100), (30000, 512)}


def test_patching_saved_bytes_of_extents_and_whole_regions():
    """torch's RNG words are patched into the saved contents after the probe replay: inside
    an extent (held on the "device": patched in host memory from then on), as a new extent
    where the word was left out for being zero, in whole contents; never across an extent."""
    from cgsnap.errors import CaptureError
    from cgsnap.format.model import Extent
    mem = np.random.default_rng(11).integers(0, 256, 1 << 12, dtype=np.uint8)
    reader = FakeReader(mem)
    r = Region(0, RegionKind.ALLOCATION, 4096, Policy.SAVED, origin=0,
               extents=[Extent(512, 8, device_contents.DeviceContents(512, 8, reader)),
                        Extent(2048, 512, device_contents.DeviceContents(2048, 512, reader))])
    record.patch_saved_bytes(r, 512, (42).to_bytes(8, "little"))
    assert isinstance(r.extents[0].data, np.ndarray) and bytes(r.extents[0].data) == \
        (42).to_bytes(8, "little")
    record.patch_saved_bytes(r, 1024, (7).to_bytes(8, "little"))        # was a zero word
    assert [(e.offset, e.length) for e in r.extents] == [(512, 8), (1024, 8), (2048, 512)]
    record.patch_saved_bytes(r, 3000, bytes(8))          # zero where nothing is saved: nothing
    assert len(r.extents) == 3
    assert r.content_hash == hashing.extents_hash(
        [(512, 8, hashing.blob_checksum((42).to_bytes(8, "little"))),
         (1024, 8, hashing.blob_checksum((7).to_bytes(8, "little"))),
         (2048, 512, hashing.blob_checksum(mem[2048:2560]))])
    with pytest.raises(CaptureError, match="straddle"):
        record.patch_saved_bytes(r, 2044, bytes(range(1, 9)))
    whole = Region(1, RegionKind.NAMED, 64, Policy.SAVED, name="w", data=bytes(64))
    record.patch_saved_bytes(whole, 8, (5).to_bytes(8, "little"))
    assert bytes(whole.data[8:16]) == (5).to_bytes(8, "little")
    assert whole.content_hash == hashing.blob_checksum(whole.data).hex()


def test_stored_pointers_reach_blocks_of_a_segment_saved_by_block(monkeypatch):
    """A pointer array in a reached block points into a block no kernel names: following it
    adds that block to the segment's extents (its contents read and scanned in a second
    round), records the word in the segment's refs, and leaves the unreached block out."""
    from cgsnap.capture.record import Recording
    from cgsnap.format.model import Kernel
    base = 0x7F00_1234_0000
    mem = np.zeros(64 * KiB, dtype=np.uint8)
    mem[0:8] = np.frombuffer((base + 4 * KiB + 16).to_bytes(8, "little"), np.uint8)
    mem[8:4096] = 3                                          # the rest of the pointer block
    mem[4 * KiB:8 * KiB] = np.arange(4 * KiB, dtype=np.uint8) % 200 + 1     # the target
    mem[8 * KiB:12 * KiB] = 9                                # live, reached by nothing

    class Reader(FakeReader):
        def read(self, c):
            return self.mem[c.addr - base:c.addr - base + c.nbytes].copy()

        def stream(self, items):
            raise AssertionError("not saved here")
    reader = Reader(mem)
    monkeypatch.setattr(record, "hold_contents", lambda spans, hold, st=None: (
        [device_contents.DeviceContents(a, n, reader) for a, n in spans], hold))
    seg = Segment(base, 64 * KiB, (Block(0, 4 * KiB, 4 * KiB), Block(4 * KiB, 4 * KiB, 4 * KiB),
                                   Block(8 * KiB, 4 * KiB, 4 * KiB),
                                   Block(12 * KiB, 52 * KiB, 0)))
    rec = Recording(None, None, None, allocator_map=AllocatorMap([seg]))
    region = rec._allocation_region(base, 64 * KiB)
    rec.kernels = [Kernel(0, "k", "0" * 32, ((0, 8),))]
    node = KernelNode(0, 0, (1, 1, 1), (1, 1, 1), 0, base.to_bytes(8, "little"),
                      np.array([[0, region.id, 0]], dtype="<u8").tobytes())
    rec.graphs = [Graph("g", [node], [])]
    record._plan_extents(rec)
    assert [(e.offset, e.length) for e in region.extents] == [(0, 4 * KiB)]
    cache: dict = {}
    record._read_contents(rec, "live", cache)
    record._follow_memory_pointers(rec, "g", 1 << 30, "live", cache)
    assert [(e.offset, e.length) for e in region.extents] == [(0, 4 * KiB), (4 * KiB, 4 * KiB)]
    assert np.frombuffer(region.refs, dtype="<u8").reshape(-1, 3).tolist() == \
        [[0, region.id, 4 * KiB + 16]]
    assert region.span == (0, 8 * KiB)
    assert region.content_hash == hashing.extents_hash(
        [(0, 4096, hashing.blob_checksum(mem[:4096])),
         (4096, 4096, hashing.blob_checksum(mem[4096:8192]))])


def test_a_stored_word_into_a_free_block_pulls_nothing_in():
    """A pointer found stored in saved memory (often a stale address) reaches no free block:
    nothing saved, nothing reported -- only what the graph's nodes address does."""
    seg = segment()
    regions = [Region(0, RegionKind.ALLOCATION, seg.size, Policy.SAVED, origin=seg.address)]
    nodes = [_kernel(0, [(0, 100)])]
    rec = types.SimpleNamespace(regions=regions, graphs=[Graph("g", nodes, [])],
                                segments={0: seg}, planned={}, freed={}, freed_seen={},
                                extra_accesses=[(0, 33 * KiB, 0, "stored"),     # free block 4
                                                (0, 17 * KiB, 0, "stored")])    # live block 2
    record._plan_extents(rec)
    assert [(e.offset, e.length) for e in regions[0].extents] == [(0, 8 * KiB), (16 * KiB, 3000)]
    assert record.freed_report(rec) is None


def test_a_free_block_under_a_saved_view_is_not_reported():
    from cgsnap.capture.blocks import reached_free_blocks
    seg = segment()
    assert reached_free_blocks(seg, pointers=[9 * KiB], exclude=[(8 * KiB, 8 * KiB)]) == []
    assert reached_free_blocks(seg, pointers=[9 * KiB], exclude=[(8 * KiB, 4 * KiB)]) == [
        (8 * KiB, 8 * KiB)]


def test_dropping_regions_renumbers_the_freed_blocks():
    """Module globals dropped after planning (record._keep_regions) must not leave the freed
    report pointing at other regions."""
    seg = segment()
    regions = [Region(0, RegionKind.ALLOCATION, 16, Policy.SAVED, origin=0x500000),
               Region(1, RegionKind.ALLOCATION, seg.size, Policy.SAVED, origin=seg.address)]
    table = types.SimpleNamespace(renumber=lambda rmap: None)
    rec = types.SimpleNamespace(regions=regions, graphs=[], segments={1: seg}, planned={},
                                freed={1: [(seg.address + 8 * KiB, 8 * KiB, True)]},
                                extra_accesses=[], table=table)
    record._keep_regions(rec, [regions[1]])
    assert rec.freed == {0: [(seg.address + 8 * KiB, 8 * KiB, True)]}
    assert record.freed_report(rec)["blocks"] == [
        {"region": 0, "address": seg.address + 8 * KiB, "size": 8 * KiB, "saved": True}]


def test_freed_blocks_past_the_budget_are_reported_not_saved(monkeypatch):
    """A stale word can land in a large coalesced free block: what one snapshot saves of freed
    memory is bounded (CGSNAP_FREED_BUDGET), and the rest is reported as not saved."""
    import cgsnap
    monkeypatch.setenv("CGSNAP_FREED_BUDGET", str(10 * KiB))
    seg = segment()
    regions = [Region(0, RegionKind.ALLOCATION, seg.size, Policy.SAVED, origin=seg.address)]
    nodes = [_kernel(0, [(0, 9 * KiB), (0, 33 * KiB)])]     # free blocks 1 (8 KiB), 4 (16 KiB)
    rec = types.SimpleNamespace(regions=regions, graphs=[Graph("g", nodes, [])],
                                segments={0: seg}, extra_accesses=[], planned={}, freed={},
                                freed_seen={})
    record._plan_extents(rec)
    assert [(e.offset, e.length) for e in regions[0].extents] == [(8 * KiB, 8 * KiB)]
    report = record.freed_report(rec)
    assert report["count"] == 2 and report["bytes"] == 24 * KiB
    assert report["not_saved"] == {"count": 1, "bytes": 16 * KiB}
    assert [b["saved"] for b in report["blocks"]] == [True, False]
    with pytest.warns(cgsnap.CgsnapWarning, match=r"16384 bytes of them, past the freed-block "
                                                  r"budget \(10240 bytes"):
        record.report_freed(rec, "g", {})
    # decided once: asked again, the same blocks are saved and nothing is charged twice
    assert record._note_free(rec, 0, seg, ([9 * KiB, 33 * KiB], []), ()) == {8 * KiB}
    assert record.freed_report(rec)["count"] == 2


def test_a_save_of_many_graphs_warns_once_for_their_freed_blocks():
    """cgsnap.torch.save snapshots every graph with one shared freed-block budget and warns
    once, naming the graphs, a block they share counted once."""
    import warnings as _warnings

    import cgsnap
    from cgsnap import torch as cgtorch
    row = {"region": 3, "address": 0x7000_0000, "size": 4096, "saved": True}
    snaps = [types.SimpleNamespace(meta={"name": f"bs{b}", "freed_blocks_read": {
        "count": 1, "bytes": 4096, "blocks": [dict(row)]}}) for b in (1, 2, 4, 8, 16)]
    snaps.append(types.SimpleNamespace(meta={"name": "bs32"}))        # reaches none
    with _warnings.catch_warnings(record=True) as got:
        _warnings.simplefilter("always")
        cgtorch._warn_freed(snaps)
    assert len(got) == 1 and issubclass(got[0].category, cgsnap.CgsnapWarning)
    text = str(got[0].message)
    assert text.startswith("graphs 'bs1', 'bs2', 'bs4', 'bs8' and 1 more reach 1 block(s)")
    assert "(4096 bytes; the first at 0x70000000" in text
    with _warnings.catch_warnings(record=True) as got:
        _warnings.simplefilter("always")
        cgtorch._warn_freed(snaps[5:])
    assert got == []


def test_a_batch_mem_op_reaches_the_blocks_of_its_words_only():
    """A wait / write-value node on a flag word inside a torch segment reaches the block of
    that word, not the whole segment (it used to: every block, free ones whole since freed
    blocks are saved)."""
    from cgsnap.format.nodes import BatchMemOpNode, MemOp
    seg = segment()
    regions = [Region(0, RegionKind.ALLOCATION, seg.size, Policy.SAVED, origin=seg.address)]
    node = BatchMemOpNode(0, (MemOp("write32", Ref(0, 20 * KiB + 8), 1),
                              MemOp("flush")))
    rec = types.SimpleNamespace(regions=regions, graphs=[Graph("g", [node], [])],
                                segments={0: seg}, extra_accesses=[], planned={}, freed={},
                                freed_seen={})
    record._plan_extents(rec)
    assert [(e.offset, e.length) for e in regions[0].extents] == [(20 * KiB, 12 * KiB)]
    assert record.freed_report(rec) is None
