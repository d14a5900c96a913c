"""Block granularity on the GPU: torch graphs whose caching-allocator segments hold live and
free blocks save only the live blocks they reach; fresh-process restores are bit-exact; graphs
that share a segment still share it; identical blocks are stored once; device-held snapshot
contents behave as documented (cgsnap.torch, cgsnap.capture.contents)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cgsnap
from cgsnap.format import fileformat

pytestmark = pytest.mark.gpu
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MiB = 1 << 20


@pytest.fixture(scope="module")
def torch():
    t = pytest.importorskip("torch")
    cgsnap.start_recorder()
    return t


def _segment_of(torch, t) -> tuple:
    """``(segment base, segment size, block offset, block size, requested size)`` of the
    caching-allocator block holding tensor ``t``."""
    p = t.data_ptr()
    for seg in torch.cuda.memory.memory_snapshot():
        base = int(seg["address"])
        if base <= p < base + int(seg["total_size"]):
            for b in seg["blocks"]:
                a = int(b["address"])
                if a <= p < a + int(b["size"]):
                    return base, int(seg["total_size"]), a - base, int(b["size"]), \
                        int(b["requested_size"])
    raise AssertionError(f"tensor at {p:#x} is in no allocator segment")


def _run_fresh(script: str, *args) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# Restore in a process that never imports torch: launch the named graphs in order (after
# writing the given inputs), save the named outputs.
RESTORE = """
    import sys
    import numpy as np
    import cgsnap
    path, inputs, graphs, outputs, result = sys.argv[1:6]
    data = np.load(inputs)
    with cgsnap.load(path) as r:
        for key in data.files:
            r.buffer(key).copy_from(data[key])
        for g in graphs.split(","):
            r.graph(g).launch()
        r.synchronize()
        np.savez(result, **{k: r.buffer(k).to_numpy().view(np.uint8) for k in outputs.split(",")})
    assert "torch" not in sys.modules, "the restore imported torch"
    print("restored")
"""


def restore_fresh(tmp_path, path, graphs, outputs, inputs=None) -> dict:
    inp, res = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, **(inputs or {}))
    _run_fresh(RESTORE, path, inp, ",".join(graphs), ",".join(outputs), res)
    with np.load(res) as d:
        return {k: d[k] for k in d.files}


def _bytes(torch, t) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()


def _capture(torch, fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def _region_at(snap, origin):
    hits = [r for r in snap.regions if r.origin == origin and r.kind.value == "allocation"]
    assert len(hits) == 1, f"expected one allocation region at {origin:#x}, found {len(hits)}"
    return hits[0]


def test_only_the_reached_live_blocks_are_saved(torch, tmp_path):
    """a and d are read by the graph, b is live but unused, c was freed: the segments hold
    all four, the file holds a's and d's requested bytes and the named output -- nothing of b,
    c or the segments' free space -- and the restore is bit-exact."""
    import cgsnap.torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    n = MiB                                             # 4 MiB of float32 each
    a, b, c, d = (torch.randn(n, device="cuda") for _ in range(4))
    del c
    g, out = _capture(torch, lambda: a * 2 + d)
    where = {name: _segment_of(torch, t) for name, t in (("a", a), ("b", b), ("d", d))}
    for name in ("a", "d"):
        base, seg_size, off, size, req = where[name]
        assert seg_size > size, f"{name}'s segment holds only {name}: the test proves nothing"
    path = tmp_path / "blocks.cgsnap"
    snap = cgsnap.torch.save(path, {"g": g}, tensors={"out": out})
    expected: dict = {}
    for name in ("a", "d"):
        base, _, off, _, req = where[name]
        expected.setdefault(base, []).append((off, req))
    for base, want in expected.items():
        r = _region_at(snap, base)
        got = [(e.offset, e.length) for e in r.extents]
        assert got == sorted(want), f"segment {base:#x}: extents {got}, expected {sorted(want)}"
        b_base, _, b_off, b_size, _ = where["b"]
        if b_base == base:
            assert all(e.offset + e.length <= b_off or e.offset >= b_off + b_size
                       for e in r.extents), "the unused live block b was saved"
    m = fileformat.read_manifest(path)
    with fileformat.open_file(path) as f:
        image_blobs = {im["blob"] for im in m["images"]}
        contents = sum(f.blobs[i].raw_length for i in range(len(f.blobs)) if i not in image_blobs)
    # a, d and out; at most a few small module globals besides.
    assert 3 * 4 * MiB <= contents < 3 * 4 * MiB + (64 << 10), \
        f"{contents} bytes of contents, expected a, d and out ({3 * 4 * MiB})"
    g.replay()
    torch.cuda.synchronize()
    want = _bytes(torch, out)
    got = restore_fresh(tmp_path, path, ["g"], ["out"])
    assert np.array_equal(got["out"].reshape(-1), want)


def test_graphs_that_share_a_segment_still_share_it(torch, tmp_path):
    """g1 writes s from p and x, g2 reads s and q: one region per segment in the file, with the
    blocks both graphs reach, and in a fresh process g2 sees what g1 wrote (x changed there)."""
    import cgsnap.torch
    n = 256 * 1024
    x = torch.randn(n, device="cuda")
    p, q = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    s = torch.zeros(n, device="cuda")
    g1, _ = _capture(torch, lambda: s.copy_(x * 3 + p))
    g2, y = _capture(torch, lambda: s + q)
    s.zero_()               # the warm-up wrote s; at save time it holds zeros
    torch.cuda.synchronize()
    path = tmp_path / "shared.cgsnap"
    snap = cgsnap.torch.save(path, {"g1": g1, "g2": g2}, tensors={"x": x, "y": y})
    seg = {k: _segment_of(torch, t) for k, t in (("p", p), ("q", q), ("s", s))}
    origins = [r.origin for r in snap.regions if r.kind.value == "allocation"]
    assert len(origins) == len(set(origins)), "a segment became two regions"
    for k in ("p", "q"):
        base, _, off, _, req = seg[k]
        r = _region_at(snap, base)
        assert (off, req) in [(e.offset, e.length) for e in r.extents], f"{k}'s block is missing"
    s_base, _, s_off, _, _ = seg["s"]
    # s holds zeros at save time: its extent is left out (the restore zero-fills it).
    assert not [e for e in _region_at(snap, s_base).extents if e.offset == s_off]
    x2 = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    got = restore_fresh(tmp_path, path, ["g1", "g2"], ["y"], {"x": x2})
    x.copy_(torch.from_numpy(x2))
    g1.replay()
    g2.replay()
    torch.cuda.synchronize()
    assert np.array_equal(got["y"].reshape(-1), _bytes(torch, y))


def test_identical_blocks_are_stored_once(torch, tmp_path):
    import cgsnap.torch
    n = 512 * 1024
    u = torch.randn(n, device="cuda")
    v = u.clone()
    g, out = _capture(torch, lambda: u * 0.5 + v)
    path = tmp_path / "dedup.cgsnap"
    snap = cgsnap.torch.save(path, {"g": g}, tensors={"out": out})
    for t in (u, v):          # both blocks are extents of the snapshot ...
        base, _, off, _, req = _segment_of(torch, t)
        assert (off, req) in [(e.offset, e.length) for e in _region_at(snap, base).extents]
    m = fileformat.read_manifest(path)
    blobs = [e[2] for r in m["regions"] for e in r.get("extents", ()) if e[1] == u.numel() * 4]
    assert len(blobs) == 2, f"expected the extents of u and v in the file, found {blobs}"
    assert blobs[0] == blobs[1], "... and the file stores their identical bytes once"
    g.replay()
    torch.cuda.synchronize()
    got = restore_fresh(tmp_path, path, ["g"], ["out"])
    assert np.array_equal(got["out"].reshape(-1), _bytes(torch, out))


def test_live_contents_that_change_fail_the_save_and_copies_keep_the_old_state(torch, tmp_path):
    """hold='live' reads the memory at save time and checks it against the snapshot's scan;
    hold='copy' (the default) keeps a device copy of the state the snapshot saw."""
    import cgsnap.torch
    t = torch.randn(4 * MiB, device="cuda")            # 16 MiB: held on the device
    g, out = _capture(torch, lambda: t * 2)
    before = t.clone()
    live = cgsnap.torch.snapshot({"g": g}, tensors={"out": out}, hold="live")
    copy = cgsnap.torch.snapshot({"g2": g}, tensors={"out": out}, hold="copy")
    t.add_(1)
    torch.cuda.synchronize()
    with pytest.raises(cgsnap.FormatError, match="other bytes than it was scanned"):
        cgsnap.save(tmp_path / "live.cgsnap", live)
    assert not (tmp_path / "live.cgsnap").exists()
    path = tmp_path / "copy.cgsnap"
    cgsnap.save(path, copy)
    got = restore_fresh(tmp_path, path, ["g2"], ["out"])
    t.copy_(before)
    g.replay()
    torch.cuda.synchronize()
    assert np.array_equal(got["out"].reshape(-1), _bytes(torch, out))


EXPANDABLE = """
    import os, sys
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import numpy as np, torch
    import cgsnap, cgsnap.torch
    cgsnap.start_recorder()
    torch.manual_seed(0)
    small = [torch.randn(3 * 1024 * 1024, device="cuda") for _ in range(3)]   # 12 MiB each
    big = torch.randn(15 * 1024 * 1024, device="cuda")       # 60 MiB: spans several 20 MiB handles
    segs = [s for s in torch.cuda.memory.memory_snapshot() if s.get("is_expandable")]
    assert segs, "expandable segments are not in use"
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = big.view(64, -1).sum(1) + small[1][:64]
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        out = big.view(64, -1).sum(1) + small[1][:64]
    snap = cgsnap.torch.save(sys.argv[1], {"g": g}, tensors={"out": out})
    regions = [r for r in snap.regions if r.kind.value == "allocation" and r.extents is not None]
    p = big.data_ptr()
    holder = [r for r in regions if r.origin <= p < r.origin + r.size]
    assert holder and holder[0].size >= big.numel() * 4, [(hex(r.origin), r.size) for r in regions]
    g.replay(); torch.cuda.synchronize()
    np.save(sys.argv[2], out.cpu().numpy())
    print("saved", [(hex(r.origin), r.size, len(r.extents)) for r in regions])
"""


def test_expandable_segments_take_bounds_from_the_allocator(torch, tmp_path):
    """With expandable segments the driver reports one 20 MiB handle per address; the region
    must be the allocator's mapped range, so a tensor spanning handles restores whole."""
    path, ref = tmp_path / "exp.cgsnap", tmp_path / "ref.npy"
    print(_run_fresh(EXPANDABLE, path, ref))
    got = restore_fresh(tmp_path, path, ["g"], ["out"])
    assert np.array_equal(got["out"].reshape(-1), np.load(ref).view(np.uint8).reshape(-1))


@pytest.mark.heavy
def test_a_gigabyte_of_live_blocks_round_trips(torch, tmp_path):
    """Over 1 GiB of unnamed saved memory through every large path: the scan through the pinned
    ring, the streamed parallel write, the page-locked restore; a reduction over all of it
    restores bit-exact in a fresh process."""
    import cgsnap.torch
    big = [torch.randn(288 * MiB, device="cuda")]        # 1.125 GiB of float32, its own segment
    g, out = _capture(torch, lambda: big[0].view(1024, -1).sum(1))
    path = tmp_path / "big.cgsnap"
    snap = cgsnap.torch.save(path, {"g": g}, tensors={"out": out})
    base, _, off, _, req = _segment_of(torch, big[0])
    assert [(e.offset, e.length) for e in _region_at(snap, base).extents] == [(off, req)]
    with fileformat.open_file(path, verify_blobs=True) as f:
        assert max(b.raw_length for b in f.blobs) == req
    g.replay()
    torch.cuda.synchronize()
    got = restore_fresh(tmp_path, path, ["g"], ["out"])
    assert np.array_equal(got["out"].reshape(-1), _bytes(torch, out))
    big.clear()
    del g, out, snap
    torch.cuda.empty_cache()
