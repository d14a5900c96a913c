"""The per-node trace of a graph: what each node left in the memory it may write.

``snapshot(..., trace=True)`` replays the graph node by node from the saved state (in a fresh
restore of the just-recorded snapshot: the original graph's memory is not touched) and records,
after each node, a digest of every region the node may write and -- within a byte budget -- the
bytes the node changed there. ``cgsnap bisect`` replays the same steps elsewhere and names the
first node whose result differs; ``cgsnap diff`` compares the traces of two files.

A node *may write* (:class:`WriteSets`): a kernel node every region its pointer table refers to
and the module globals of its kernel's image; a memcpy its destination; a memset its destination;
a child-graph node what the nodes of its graph may write. Other nodes write nothing.

Stored as the optional graph field ``trace`` (docs/FORMAT.md): one step per node in the order
they ran, which is a topological order of the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import xxhash

from .model import RegionKind

DIGEST_SIZE = 16          # xxh3-128, canonical (big-endian) bytes


def digest(data) -> bytes:
    """The trace digest of a region's contents (any contiguous buffer)."""
    return xxhash.xxh3_128(memoryview(data).cast("B")).digest()


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """Region ``region`` after the step: its digest and, when kept, the bytes the step changed
    (``data`` placed at ``offset``; every byte outside is as it was before the step). ``data``
    is bytes-like in a model built in memory and a blob index in one read from a file."""
    region: int
    digest: bytes
    offset: int = 0
    data: Any = None

    @property
    def kept(self) -> bool:
        return self.data is not None


@dataclass(frozen=True, slots=True)
class TraceStep:
    node: int          # the node's id
    entries: tuple     # TraceEntry, one per region the node may write


class WriteSets:
    """The regions each node of a snapshot may write, worked out once per image and graph."""

    def __init__(self, snap):
        self.snap = snap
        self._globals: dict = {}
        for r in snap.regions:
            if r.kind is RegionKind.MODULE_GLOBAL:
                self._globals.setdefault(r.image, []).append(r.id)
        self._graphs = {g.name: g for g in snap.graphs}
        self._child: dict = {}

    def of(self, node) -> tuple:
        """Sorted region ids ``node`` may write."""
        t = node.TYPE
        if t == "kernel":
            k = self.snap.kernels[node.kernel]
            out = set(node.regions())
            out.update(self._globals.get(k.image, ()))
            if k.ptx_image:
                out.update(self._globals.get(k.ptx_image, ()))
            return tuple(sorted(out))
        if t in ("memcpy", "memset"):
            return (node.dst.region,)
        if t == "graph":
            return self.of_graph(node.graph)
        return ()

    def of_graph(self, name: str) -> tuple:
        got = self._child.get(name)
        if got is None:
            out: set = set()
            for n in self._graphs[name].nodes:
                out.update(self.of(n))
            got = self._child[name] = tuple(sorted(out))
        return got


# ---- manifest --------------------------------------------------------------------------------

def trace_to_manifest(trace, add_blob) -> list:
    out = []
    for step in trace:
        entries = []
        for e in step.entries:
            if e.kept:
                entries.append([e.region, bytes(e.digest), e.offset, add_blob(e.data)])
            else:
                entries.append([e.region, bytes(e.digest)])
        out.append([step.node, entries])
    return out


def parse_trace(v, raw, graph, ctx, where: str) -> tuple:
    """Validate a graph's ``trace`` (``v``: the schema Validator): every node exactly once, in an
    order every edge respects; entries naming existing regions, once per step, 16-byte digests,
    kept bytes inside their region."""
    steps_raw = v.list(raw, where, len(graph.nodes))
    if len(steps_raw) != len(graph.nodes):
        v.fail(where, f"{len(steps_raw)} steps for {len(graph.nodes)} nodes: every node runs once")
    ids = {n.id for n in graph.nodes}
    position: dict = {}
    steps = []
    for i, s in enumerate(steps_raw):
        w = f"{where}[{i}]"
        s = v.list(s, w, 2)
        if len(s) != 2:
            v.fail(w, "expected [node, entries]")
        nid = v.int(s[0], f"{w}[0]")
        if nid not in ids:
            v.fail(f"{w}[0]", f"node {nid} is not in the graph")
        if nid in position:
            v.fail(f"{w}[0]", f"node {nid} runs twice")
        position[nid] = i
        entries, seen = [], set()
        for j, e in enumerate(v.list(s[1], f"{w}[1]", max(len(ctx.regions), 1))):
            ew = f"{w}[1][{j}]"
            e = v.list(e, ew, 4)
            if len(e) not in (2, 4):
                v.fail(ew, "expected [region, digest] or [region, digest, offset, blob]")
            rid = v.int(e[0], f"{ew}[0]", 0, len(ctx.regions) - 1)
            if rid in seen:
                v.fail(f"{ew}[0]", f"region {rid} is listed twice in one step")
            seen.add(rid)
            d = v.bytes(e[1], f"{ew}[1]")
            if len(d) != DIGEST_SIZE:
                v.fail(f"{ew}[1]", f"a digest has {DIGEST_SIZE} bytes, found {len(d)}")
            if len(e) == 2:
                entries.append(TraceEntry(rid, d))
                continue
            size = ctx.regions[rid].size
            off = v.int(e[2], f"{ew}[2]", 0, size)
            blob = v.blob(e[3], f"{ew}[3]")
            if off + v.blob_sizes[blob] > size:
                v.fail(f"{ew}[3]", f"{v.blob_sizes[blob]} bytes at offset {off} overrun region "
                                   f"{rid} of {size} bytes")
            entries.append(TraceEntry(rid, d, off, blob))
        steps.append(TraceStep(nid, tuple(entries)))
    for k, e in enumerate(graph.edges):
        if position[e.src] > position[e.dst]:
            v.fail(where, f"node {e.dst} runs before node {e.src}, which edge {k} puts first")
    return tuple(steps)


def remap_trace(trace, rmap) -> Optional[tuple]:
    """``trace`` with region ids renumbered (``rmap``: old -> new)."""
    if trace is None:
        return None
    return tuple(TraceStep(s.node, tuple(replace(e, region=rmap[e.region]) for e in s.entries))
                 for s in trace)
