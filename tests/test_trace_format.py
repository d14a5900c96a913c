"""The optional per-node trace of a graph: round trip through a file and strict validation (CPU)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from synthetic import make_snapshot

import cgsnap
from cgsnap.errors import FormatError
from cgsnap.format import fileformat, snapfile
from cgsnap.format.model import Snapshot
from cgsnap.format.trace import TraceEntry, TraceStep, WriteSets, digest


def traced_snapshot():
    snap = make_snapshot()
    g = snap.graphs[0]
    ws = WriteSets(snap)
    steps = []
    for n in g.topological_order():
        entries = tuple(TraceEntry(rid, digest(bytes([rid]) * 8)) for rid in ws.of(n))
        steps.append(TraceStep(n.id, entries))
    # One entry keeps the bytes its node changed: 8 bytes at offset 16 of region 1 ("y").
    first = steps[0]
    steps[0] = TraceStep(first.node, (TraceEntry(1, digest(b"y"), 16, np.arange(8, dtype=np.uint8)),))
    g.trace = tuple(steps)
    return snap


def test_write_sets_follow_the_node_types():
    snap = make_snapshot()
    ws = WriteSets(snap)
    nodes = {n.id: n for n in snap.graphs[0].nodes}
    assert ws.of(nodes[0]) == (0, 1, 3)          # its refs (x, y) + the image's module global
    assert ws.of(nodes[1]) == (2, 3, 4)
    assert ws.of(nodes[2]) == (2,)               # memcpy: its destination only
    assert ws.of(nodes[4]) == (1,)               # memset
    assert ws.of(nodes[6]) == ()                 # a child graph of one empty node
    assert ws.of(nodes[7]) == ws.of(nodes[11]) == ()


def test_trace_round_trips_through_a_file(tmp_path):
    snap = traced_snapshot()
    path = tmp_path / "t.cgsnap"
    snap.save(path, prune=False)
    back, f = snapfile.read(path)
    with f:
        t = back.graphs[0].trace
        assert [s.node for s in t] == [s.node for s in snap.graphs[0].trace]
        assert t[1:] == snap.graphs[0].trace[1:]
        e = t[0].entries[0]
        assert (e.region, e.digest, e.offset) == (1, digest(b"y"), 16)
        assert bytes(f.blob(e.data)) == bytes(range(8))
    assert back.graphs[1].trace is None           # optional: the child graph has none


def test_merge_renumbers_trace_regions():
    a, b = traced_snapshot(), traced_snapshot()
    for s in (a, b):
        for r in s.regions:
            r.origin = 0x7000_0000 + r.id * 0x10000
    b.graphs[0].name, b.graphs[1].name = "step2", "step2/child6"
    b.graphs[0].nodes[6].graph = "step2/child6"
    b.regions[2].origin = 0x9000_0000             # not shared: renumbered in the merge
    merged = snapfile.merge([a, b])
    old = {e.region for s in b.graphs[0].trace for e in s.entries}
    new = {e.region for s in merged.graphs[2].trace for e in s.entries}
    assert 2 in old and 2 not in new and len(merged.regions) == len(a.regions) + 1


def _manifest():
    manifest, blobs = traced_snapshot().to_manifest()
    return manifest, [len(memoryview(b).cast("B")) for b in blobs]


def _swap_first_steps(t):
    """Node 1 before node 0, against edge 0 -> 1."""
    i, j = (next(k for k, s in enumerate(t) if s[0] == n) for n in (0, 1))
    t[i], t[j] = t[j], t[i]


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.pop(), "steps for 12 nodes"),
    (lambda t: t[1].__setitem__(0, t[0][0]), "runs twice"),
    (lambda t: t[0].__setitem__(0, 99), "node 99 is not in the graph"),
    (_swap_first_steps, "runs before node"),
    (lambda t: t[2][1].append([0, b"x" * 15]), "16 bytes, found 15"),
    (lambda t: t[2][1].append([77, b"x" * 16]), r"trace\[2\]\[1\]\[\d\]\[0\]: 77 is out of range"),
    (lambda t: t[2][1].append(list(t[2][1][0])), "listed twice"),
    (lambda t: t[0][1][0].__setitem__(2, 1020), "overrun region 1"),
    (lambda t: t[0][1][0].__setitem__(1, "not bytes"), "expected bytes"),
    (lambda t: t[0][1][0].pop(), "expected \\[region, digest\\]"),
])
def test_invalid_trace_is_a_format_error(mutate, match):
    manifest, sizes = _manifest()
    m = copy.deepcopy(manifest)
    mutate(m["graphs"][0]["trace"])
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(m, sizes, "t.cgsnap")


def test_unknown_graph_field_is_still_refused():
    manifest, sizes = _manifest()
    manifest["graphs"][0]["traces"] = []
    with pytest.raises(FormatError, match="unknown field"):
        Snapshot.from_manifest(manifest, sizes, "t.cgsnap")


def test_a_file_with_a_trace_reads_with_the_public_api(tmp_path):
    path = tmp_path / "t.cgsnap"
    traced_snapshot().save(path, prune=False)
    assert len(cgsnap.read(path).graphs[0].trace) == 12
    with fileformat.open_file(path) as f:
        assert len(f.manifest["graphs"][0]["trace"]) == 12
