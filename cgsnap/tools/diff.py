"""``cgsnap diff A B``: how two snapshot files differ, from their models alone (no GPU).

Graphs are matched by name; nodes by topology: the nodes of each graph in topological order,
each known by its type and, for kernel nodes, its kernel's name, aligned as sequences (an
inserted or dropped node leaves the rest matched). Regions are matched by name (named buffers),
by symbol (module globals), then by what matched nodes point at, in topological order. Matched
nodes are compared field by field: launch configuration, every argument word (literal bytes,
or a reference: which region and offset), edges (through the matching); kernels by name (image
hash, parameter layout, attributes); matched regions by size, policy, dtype and contents, and
the outputs each graph recorded for ``replay --check``. Where both files carry a per-node trace
(``snapshot(..., trace=True)``), the first matched node whose recorded results differ is named.

Contents are read in bounded windows (files may hold many GB); regions whose recorded content
hashes agree, and blobs whose stored checksums agree, are not read at all. Device and version
differences are listed but do not count: comparing across machines is what diff is for.
"""
from __future__ import annotations

import dataclasses
import difflib
import struct
from typing import Optional

from ..binary.demangle import short
from ..format.fileformat import Compression
from ..format.model import Policy, Ref, RegionKind
from .compare import WINDOW, compare_streams

DIFF_SCHEMA = 1
DEFAULT_LIMIT = 50
_ALIGN_MAX = 5000          # nodes per side aligned by difflib after the common ends are cut


class _Side:
    def __init__(self, path: str, snap, file):
        self.path, self.snap, self.file = path, snap, file

    def label(self, rid: int) -> str:
        r = self.snap.regions[rid]
        name = r.name or r.symbol
        return f'region {rid} "{name}"' if name else f"region {rid} ({r.kind.value})"

    def ref(self, ref: Ref) -> str:
        return f"→ {self.label(ref.region)} + {ref.offset:#x}"

    def node_name(self, n) -> str:
        if n.TYPE == "kernel":
            return short(self.snap.kernels[n.kernel].name, 80)
        if n.TYPE == "graph":
            return f"child graph {n.graph!r}"
        return n.TYPE

    def blob_chunks(self, index: int):
        return self.file.iter_chunks(index, WINDOW)

    def region_chunks(self, r):
        """A saved region's bytes as a restore leaves them: its blob, or its extents with
        zeros between them."""
        if r.extents is None:
            yield from self.blob_chunks(r.data)
            return
        pos = 0
        for e in r.extents:
            yield from _zeros(e.offset - pos)
            yield from self.blob_chunks(e.data)
            pos = e.offset + e.length
        yield from _zeros(r.size - pos)

    def blob_size(self, index: int) -> int:
        return self.file.blobs[index].raw_length


def _zeros(n: int):
    zero = bytes(min(n, WINDOW))
    while n > 0:
        yield zero[:min(n, WINDOW)]
        n -= WINDOW


class _List:
    """Up to ``limit`` items, and the exact count."""

    def __init__(self, limit: int):
        self.limit, self.items, self.count = limit, [], 0

    def add(self, item: dict) -> None:
        self.count += 1
        if len(self.items) < self.limit:
            self.items.append(item)

    def to_json(self) -> dict:
        return {"count": self.count, "items": self.items}


class _Regions:
    """The region correspondence, A id <-> B id, first evidence wins."""

    def __init__(self):
        self.a2b: dict = {}
        self.b2a: dict = {}

    def pair(self, ra: int, rb: int) -> None:
        if ra not in self.a2b and rb not in self.b2a:
            self.a2b[ra], self.b2a[rb] = rb, ra

    def same(self, ra: int, rb: int) -> bool:
        return self.a2b.get(ra) == rb


def _sig(snap, n) -> tuple:
    if n.TYPE == "kernel":
        return ("kernel", snap.kernels[n.kernel].name)
    return (n.TYPE,)


def match_nodes(sa, ga, sb, gb) -> tuple:
    """``(pairs, only_a, only_b)``: matched ``(node_a, node_b)`` in topological order, and the
    nodes of each side left unmatched."""
    oa, ob = ga.topological_order(), gb.topological_order()
    a, b = [_sig(sa, n) for n in oa], [_sig(sb, n) for n in ob]
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    pairs = [(oa[i], ob[i]) for i in range(head)]
    ma, mb = a[head:len(a) - tail], b[head:len(b) - tail]
    matched_a, matched_b = set(), set()
    if ma and mb:
        if len(ma) <= _ALIGN_MAX and len(mb) <= _ALIGN_MAX:
            blocks = difflib.SequenceMatcher(None, ma, mb, autojunk=False).get_matching_blocks()
            for blk in blocks:
                for k in range(blk.size):
                    pairs.append((oa[head + blk.a + k], ob[head + blk.b + k]))
                    matched_a.add(blk.a + k)
                    matched_b.add(blk.b + k)
        else:       # too long to align: nodes at the same position with the same signature
            for k in range(min(len(ma), len(mb))):
                if ma[k] == mb[k]:
                    pairs.append((oa[head + k], ob[head + k]))
                    matched_a.add(k)
                    matched_b.add(k)
    pairs.extend((oa[len(a) - tail + k], ob[len(b) - tail + k]) for k in range(tail))
    only_a = [oa[head + k] for k in range(len(ma)) if k not in matched_a]
    only_b = [ob[head + k] for k in range(len(mb)) if k not in matched_b]
    if only_a and only_b:
        # Nodes on independent branches move in a topological order when a node is added
        # elsewhere: pair what is left by signature, preferring the same predecessors.
        a2b = {x.id: y.id for x, y in pairs}
        preds_a, preds_b = _preds(ga), _preds(gb)
        left = list(only_b)
        rest_a = []
        for x in only_a:
            sig = _sig(sa, x)
            same = [y for y in left if _sig(sb, y) == sig]
            if not same:
                rest_a.append(x)
                continue
            want = sorted(a2b.get(p, -1 - p) for p in preds_a.get(x.id, ()))
            y = next((y for y in same if sorted(preds_b.get(y.id, ())) == want), same[0])
            left.remove(y)
            pairs.append((x, y))
            a2b[x.id] = y.id
        only_a, only_b = rest_a, left
        order = {n.id: i for i, n in enumerate(oa)}
        pairs.sort(key=lambda p: order[p[0].id])
    return pairs, only_a, only_b


def _preds(g) -> dict:
    out: dict = {}
    for e in g.edges:
        out.setdefault(e.dst, []).append(e.src)
    return out


def _node_refs(n) -> list:
    """``[(key, Ref)]`` of the places a node points at (key: where in the node)."""
    if n.TYPE == "kernel":
        return [(("param", pos), ref) for pos, ref in n.pointers()]
    if n.TYPE == "batch_mem_op":
        return [(("op", j), op.addr) for j, op in enumerate(n.ops) if op.addr is not None]
    out = []
    for f in dataclasses.fields(n):
        value = getattr(n, f.name)
        if isinstance(value, Ref):
            out.append((f.name, value))
    if n.TYPE == "mem_alloc":
        out.append(("region", Ref(n.region, 0)))
    return out


def _word_text(data: bytes) -> str:
    n = len(data)
    if n == 0:
        return "(empty)"
    if n in (1, 2):
        v = int.from_bytes(data, "little")
        return f"{v} ({v:#0{2 + 2 * n}x})"
    if n == 4:
        i, = struct.unpack("<i", data)
        f, = struct.unpack("<f", data)
        return f"{int.from_bytes(data, 'little'):#010x} (int {i}, float {f:.7g})"
    if n == 8:
        i, = struct.unpack("<q", data)
        f, = struct.unpack("<d", data)
        return f"{int.from_bytes(data, 'little'):#018x} (int {i}, double {f:.7g})"
    return data.hex()


class _Differ:
    def __init__(self, a: _Side, b: _Side, limit: int):
        self.a, self.b, self.limit = a, b, limit
        self.regions = _Regions()

    # ---- node level ------------------------------------------------------------------------
    def _label(self, na, nb=None) -> str:
        if nb is None or na.id == nb.id:
            return f"node {na.id}"
        return f"node {na.id} (B: {nb.id})"

    def compare_nodes(self, na, nb, out: _List) -> None:
        a, b = self.a, self.b
        label = f"{self._label(na, nb)} {a.node_name(na)}"
        if na.TYPE == "kernel":
            for name, va, vb in (("grid", na.grid, nb.grid), ("block", na.block, nb.block),
                                 ("shared_mem", na.shared_mem, nb.shared_mem),
                                 ("attrs", na.attrs, nb.attrs)):
                if _plain(va) != _plain(vb):
                    out.add({"kind": "launch", "node": [na.id, nb.id], "field": name,
                             "a": _plain(va), "b": _plain(vb),
                             "text": f"{label}: {name} {_plain(va)} vs {_plain(vb)}"})
            ka, kb = a.snap.kernels[na.kernel], b.snap.kernels[nb.kernel]
            if tuple(ka.params) == tuple(kb.params):
                self._compare_arguments(na, nb, ka.params, label, out)
            return
        for f in dataclasses.fields(na):
            if f.name == "id":
                continue
            va, vb = getattr(na, f.name), getattr(nb, f.name)
            if isinstance(va, Ref):
                if not (self.regions.same(va.region, vb.region) and va.offset == vb.offset):
                    out.add({"kind": "node_field", "node": [na.id, nb.id], "field": f.name,
                             "a": a.ref(va), "b": b.ref(vb),
                             "text": f"{label}: {f.name} {a.ref(va)} vs {b.ref(vb)}"})
            elif f.name == "ops" and na.TYPE == "batch_mem_op":
                self._compare_ops(na, nb, label, out)
            elif f.name == "region" and na.TYPE == "mem_alloc":
                if not self.regions.same(va, vb):
                    out.add({"kind": "node_field", "node": [na.id, nb.id], "field": f.name,
                             "a": a.label(va), "b": b.label(vb),
                             "text": f"{label}: allocates {a.label(va)} vs {b.label(vb)}"})
            elif va != vb:
                out.add({"kind": "node_field", "node": [na.id, nb.id], "field": f.name,
                         "a": _plain(va), "b": _plain(vb),
                         "text": f"{label}: {f.name} {_plain(va)} vs {_plain(vb)}"})

    def _compare_ops(self, na, nb, label: str, out: _List) -> None:
        """Stream memory operations one by one, their words compared through the regions."""
        a, b = self.a, self.b

        def text(side, op) -> str:
            where = f" {side.ref(op.addr)}" if op.addr is not None else ""
            return f"{op.op} {op.value:#x} flags {op.flags:#x}{where}"
        if len(na.ops) != len(nb.ops):
            out.add({"kind": "node_field", "node": [na.id, nb.id], "field": "ops",
                     "a": len(na.ops), "b": len(nb.ops),
                     "text": f"{label}: {len(na.ops)} vs {len(nb.ops)} operations"})
            return
        for j, (x, y) in enumerate(zip(na.ops, nb.ops)):
            same_addr = (x.addr is None and y.addr is None) or (
                x.addr is not None and y.addr is not None and
                self.regions.same(x.addr.region, y.addr.region) and x.addr.offset == y.addr.offset)
            if (x.op, x.value, x.flags) == (y.op, y.value, y.flags) and same_addr:
                continue
            ta, tb = text(a, x), text(b, y)
            out.add({"kind": "node_field", "node": [na.id, nb.id], "field": f"ops[{j}]",
                     "a": ta, "b": tb, "text": f"{label}: ops[{j}] {ta} vs {tb}"})

    def _compare_arguments(self, na, nb, layout, label: str, out: _List) -> None:
        a, b = self.a, self.b
        for i, (xa, xb) in enumerate(zip(na.arguments(layout), nb.arguments(layout))):
            ra, rb = dict(xa.refs), dict(xb.refs)
            masked = set()
            for o in sorted(set(ra) | set(rb)):
                masked.update(range(o, o + 8))
                pa, pb = ra.get(o), rb.get(o)
                if pa is not None and pb is not None:
                    if self.regions.same(pa.region, pb.region) and pa.offset == pb.offset:
                        continue
                    ta, tb, kind = a.ref(pa), b.ref(pb), "reference"
                else:
                    ta = a.ref(pa) if pa is not None else "literal " + _word_text(xa.data[o:o + 8])
                    tb = b.ref(pb) if pb is not None else "literal " + _word_text(xb.data[o:o + 8])
                    kind = "reference_vs_literal"
                out.add({"kind": kind, "node": [na.id, nb.id], "arg": i, "offset": o,
                         "a": ta, "b": tb, "text": f"{label}: arg{i}+{o:#x} {ta} vs {tb}"})
            da, db = xa.data, xb.data
            size = len(da)
            step = size if size <= 8 else 8
            for o in range(0, size, step):
                span = [k for k in range(o, min(o + step, size)) if k not in masked]
                if not span or all(da[k] == db[k] for k in span):
                    continue
                wa, wb = da[o:o + step], db[o:o + step]
                ta, tb = "literal " + _word_text(wa), "literal " + _word_text(wb)
                out.add({"kind": "literal", "node": [na.id, nb.id], "arg": i, "offset": o,
                         "a": wa.hex(), "b": wb.hex(),
                         "text": f"{label}: arg{i}+{o:#x} {ta} vs {tb}"})

    def compare_edges(self, ga, gb, pairs, out: _List) -> None:
        a2b = {na.id: nb.id for na, nb in pairs}
        pa: dict = {}
        pb: dict = {}
        for e in ga.edges:
            pa.setdefault(e.dst, []).append((e.src, (e.from_port, e.to_port, e.type)))
        for e in gb.edges:
            pb.setdefault(e.dst, []).append((e.src, (e.from_port, e.to_port, e.type)))
        for na, nb in pairs:
            mapped = sorted((a2b.get(s, ("A", s)), d) for s, d in pa.get(na.id, ()))
            theirs = sorted(pb.get(nb.id, ()))
            if mapped == theirs:
                continue
            ta = _deps(pa.get(na.id, ()))
            tb = _deps(pb.get(nb.id, ()))
            out.add({"kind": "edges", "node": [na.id, nb.id], "a": ta, "b": tb,
                     "text": f"{self._label(na, nb)} {self.a.node_name(na)}: runs after "
                             f"{ta} vs {tb}"})

    # ---- contents ---------------------------------------------------------------------------
    def compare_blobs(self, ia: int, ib: int, dtype: Optional[str]):
        """A :class:`~cgsnap.tools.compare.Comparison`, or None when equal without reading."""
        ea, eb = self.a.file.blobs[ia], self.b.file.blobs[ib]
        if ea.compression == eb.compression == Compression.NONE and \
                ea.checksum == eb.checksum and ea.raw_length == eb.raw_length:
            return None
        c = compare_streams(self.a.blob_chunks(ia), self.b.blob_chunks(ib), ea.raw_length,
                            eb.raw_length, dtype)
        return None if c.equal else c

    def compare_checks(self, ga, gb, out: _List) -> None:
        a, b = self.a, self.b
        for ra in sorted(ga.checks):
            rb = self.regions.a2b.get(ra)
            if rb is None or rb not in gb.checks:
                out.add({"kind": "check_only_a", "region": [ra, rb],
                         "text": f"only A records the output of {a.label(ra)}"})
                continue
            dtype = _common_dtype(a.snap.regions[ra], b.snap.regions[rb])
            c = self.compare_blobs(ga.checks[ra], gb.checks[rb], dtype)
            if c is not None:
                out.add({"kind": "check", "region": [ra, rb], "comparison": c.to_json(),
                         "text": f"recorded output of {a.label(ra)}: {c.summary()}"})
        for rb in sorted(gb.checks):
            ra = self.regions.b2a.get(rb)
            if ra is None or ra not in ga.checks:
                out.add({"kind": "check_only_b", "region": [ra, rb],
                         "text": f"only B records the output of {b.label(rb)}"})

    def compare_traces(self, ga, gb, pairs, out: _List) -> None:
        if ga.trace is None or gb.trace is None:
            if (ga.trace is None) != (gb.trace is None):
                which = "A" if ga.trace is not None else "B"
                out.add({"kind": "trace_only", "side": which,
                         "text": f"only {which} carries a per-node trace"})
            return
        a2b = {na.id: nb.id for na, nb in pairs}
        steps_b = {s.node: s for s in gb.trace}
        differing, first = 0, None
        for pos, sa in enumerate(ga.trace):
            idb = a2b.get(sa.node)
            if idb is None:
                continue
            eb = {e.region: e.digest for e in steps_b[idb].entries}
            for e in sa.entries:
                rb = self.regions.a2b.get(e.region)
                if rb is None or rb not in eb or eb[rb] == e.digest:
                    continue
                differing += 1
                if first is None:
                    first = (pos, sa.node, idb, e.region, rb)
                break
        if first is None:
            return
        pos, ida, idb, ra, rb = first
        na = next(n for n in ga.nodes if n.id == ida)
        label = f"node {ida}" if ida == idb else f"node {ida} (B: {idb})"
        out.add({"kind": "trace", "step": pos, "node": [ida, idb], "region": [ra, rb],
                 "differing_steps": differing,
                 "text": f"trace: the recorded results first differ after step {pos}, {label} "
                         f"{self.a.node_name(na)}, in {self.a.label(ra)} ({differing} matched "
                         "step(s) differ)"})


def _deps(items) -> str:
    if not items:
        return "nothing"
    return ", ".join(f"node {s}" + ("" if d == (0, 0, 0) else f" (ports/type {list(d)})")
                     for s, d in sorted(items))


def _plain(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in sorted(v.items())}
    return v


def _common_dtype(ra, rb) -> Optional[str]:
    return ra.dtype if ra.dtype == rb.dtype else None


def _env(sa, sb) -> list:
    out = []
    for section in ("device", "versions"):
        da, db = getattr(sa, section), getattr(sb, section)
        for key in sorted(set(da) | set(db)):
            if da.get(key) != db.get(key):
                out.append({"field": f"{section}.{key}", "a": da.get(key), "b": db.get(key)})
    return out


def _image_text(snap, h: str) -> str:
    im = next((im for im in snap.images if im.hash == h), None)
    if im is None:
        return h[:12]
    pruned = ", pruned" if "(pruned" in im.source else ""
    return f"{h[:12]} ({im.kind} sm_{im.arch}{pruned})"


def _compare_kernels(a: _Side, b: _Side, out: _List) -> None:
    by_a: dict = {}
    by_b: dict = {}
    for k in a.snap.kernels:
        by_a.setdefault(k.name, []).append(k)
    for k in b.snap.kernels:
        by_b.setdefault(k.name, []).append(k)
    for name in sorted(set(by_a) | set(by_b)):
        text = short(name, 80)
        if name not in by_b:
            out.add({"kind": "kernel_only_a", "name": name, "text": f"{text}: only in A"})
            continue
        if name not in by_a:
            out.add({"kind": "kernel_only_b", "name": name, "text": f"{text}: only in B"})
            continue
        ka, kb = by_a[name], by_b[name]
        ia, ib = sorted(k.image for k in ka), sorted(k.image for k in kb)
        if ia != ib:
            ta = ", ".join(_image_text(a.snap, h) for h in ia)
            tb = ", ".join(_image_text(b.snap, h) for h in ib)
            out.add({"kind": "kernel_image", "name": name, "a": ia, "b": ib,
                     "text": f"{text}: image {ta} vs {tb}"})
        for field_name in ("params", "attrs"):
            va = [_plain(getattr(k, field_name)) for k in ka]
            vb = [_plain(getattr(k, field_name)) for k in kb]
            if va != vb:
                sa_, sb_ = (va[0] if len(va) == 1 else va), (vb[0] if len(vb) == 1 else vb)
                out.add({"kind": f"kernel_{field_name}", "name": name, "a": sa_, "b": sb_,
                         "text": f"{text}: {field_name} {sa_} vs {sb_}"})
        pa, pb = [bool(k.ptx_image) for k in ka], [bool(k.ptx_image) for k in kb]
        if pa != pb:
            out.add({"kind": "kernel_ptx", "name": name, "a": pa, "b": pb,
                     "text": f"{text}: PTX carried {pa} vs {pb}"})


_REGION_FIELDS = ("kind", "size", "policy", "dtype", "shape", "name", "symbol", "parent_offset")


def _compare_regions(d: _Differ, out: _List) -> None:
    a, b = d.a, d.b
    for ra in range(len(a.snap.regions)):
        rb = d.regions.a2b.get(ra)
        x = a.snap.regions[ra]
        if rb is None:
            out.add({"kind": "region_only_a", "region": [ra, None],
                     "text": f"{a.label(ra)}: only in A ({x.size} bytes, {x.policy.value})"})
            continue
        y = b.snap.regions[rb]
        label = a.label(ra) + ("" if ra == rb else f" (B: region {rb})")
        for name in _REGION_FIELDS:
            va, vb = getattr(x, name), getattr(y, name)
            if isinstance(va, (RegionKind, Policy)):
                va, vb = va.value, vb.value
            if va != vb:
                out.add({"kind": "region_field", "region": [ra, rb], "field": name,
                         "a": _plain(va), "b": _plain(vb),
                         "text": f"{label}: {name} {_plain(va)} vs {_plain(vb)}"})
        if (x.parent is None) != (y.parent is None) or \
                (x.parent is not None and not d.regions.same(x.parent, y.parent)):
            ta = a.label(x.parent) if x.parent is not None else "none"
            tb = b.label(y.parent) if y.parent is not None else "none"
            out.add({"kind": "region_field", "region": [ra, rb], "field": "parent",
                     "a": x.parent, "b": y.parent, "text": f"{label}: parent {ta} vs {tb}"})
        if x.policy is Policy.SAVED and y.policy is Policy.SAVED:
            if x.content_hash and x.content_hash == y.content_hash:
                continue
            if x.extents is None and y.extents is None:
                c = d.compare_blobs(x.data, y.data, _common_dtype(x, y))
            else:
                c = compare_streams(a.region_chunks(x), b.region_chunks(y), x.size, y.size,
                                    _common_dtype(x, y))
                c = None if c.equal else c
            if c is not None:
                out.add({"kind": "contents", "region": [ra, rb], "comparison": c.to_json(),
                         "text": f"{label}: {c.summary()}"})
    for rb in range(len(b.snap.regions)):
        if rb not in d.regions.b2a:
            y = b.snap.regions[rb]
            out.add({"kind": "region_only_b", "region": [None, rb],
                     "text": f"{b.label(rb)}: only in B ({y.size} bytes, {y.policy.value})"})


def _summary(side: _Side) -> dict:
    s = side.snap
    dev = s.device
    return {"file": side.path, "graphs": len(s.graphs),
            "nodes": sum(len(g.nodes) for g in s.graphs), "kernels": len(s.kernels),
            "regions": len(s.regions), "device": dev.get("name"), "arch": dev.get("arch"),
            "driver": dev.get("driver")}


def diff_snapshots(a: _Side, b: _Side, limit: int = DEFAULT_LIMIT) -> dict:
    """The ``diff --json`` document (schema ``DIFF_SCHEMA``) of two open files."""
    d = _Differ(a, b, limit)
    named_b = {r.name: r.id for r in b.snap.regions if r.name is not None}
    for r in a.snap.regions:
        if r.name is not None and r.name in named_b:
            d.regions.pair(r.id, named_b[r.name])

    def globals_of(snap):
        found: dict = {}
        for r in snap.regions:
            if r.kind is RegionKind.MODULE_GLOBAL:
                found.setdefault(r.symbol, []).append(r)
        return found
    ga_, gb_ = globals_of(a.snap), globals_of(b.snap)
    for sym, rs in ga_.items():
        other = gb_.get(sym, [])
        if len(rs) == 1 and len(other) == 1:
            d.regions.pair(rs[0].id, other[0].id)
        else:
            for r in rs:
                for q in other:
                    if q.image == r.image:
                        d.regions.pair(r.id, q.id)
    graphs_b = {g.name: g for g in b.snap.graphs}
    matched = []
    for ga in a.snap.graphs:
        gb = graphs_b.get(ga.name)
        if gb is None:
            continue
        pairs, only_a, only_b = match_nodes(a.snap, ga, b.snap, gb)
        matched.append((ga, gb, pairs, only_a, only_b))
        for na, nb in pairs:          # what matched nodes point at is the same memory
            rb = dict(_node_refs(nb))
            for key, ref in _node_refs(na):
                if key in rb:
                    d.regions.pair(ref.region, rb[key].region)
    graphs_out = []
    for ga, gb, pairs, only_a, only_b in matched:
        out = _List(limit)
        for n in only_a:
            out.add({"kind": "node_only_a", "node": [n.id, None],
                     "text": f"node {n.id} {a.node_name(n)}: only in A"})
        for n in only_b:
            out.add({"kind": "node_only_b", "node": [None, n.id],
                     "text": f"node {n.id} {b.node_name(n)}: only in B"})
        for na, nb in pairs:
            d.compare_nodes(na, nb, out)
        d.compare_edges(ga, gb, pairs, out)
        d.compare_checks(ga, gb, out)
        d.compare_traces(ga, gb, pairs, out)
        graphs_out.append({"name": ga.name, "status": "different" if out.count else "same",
                           "nodes": [len(ga.nodes), len(gb.nodes)], "matched": len(pairs),
                           "differences": out.to_json()})
    names_a = {g.name for g in a.snap.graphs}
    for g in a.snap.graphs:
        if g.name not in graphs_b:
            graphs_out.append({"name": g.name, "status": "only_a", "nodes": [len(g.nodes), None],
                               "matched": 0, "differences": {"count": 1, "items": []}})
    for g in b.snap.graphs:
        if g.name not in names_a:
            graphs_out.append({"name": g.name, "status": "only_b", "nodes": [None, len(g.nodes)],
                               "matched": 0, "differences": {"count": 1, "items": []}})
    kernels, regions = _List(limit), _List(limit)
    _compare_kernels(a, b, kernels)
    _compare_regions(d, regions)
    counts = {"graphs": sum(g["differences"]["count"] for g in graphs_out),
              "kernels": kernels.count, "regions": regions.count}
    return {"schema": DIFF_SCHEMA, "a": _summary(a), "b": _summary(b),
            "same": not any(counts.values()), "counts": counts, "limit": limit,
            "environment": _env(a.snap, b.snap), "graphs": graphs_out,
            "kernels": kernels.to_json(), "regions": regions.to_json()}


def diff_files(path_a: str, path_b: str, limit: int = DEFAULT_LIMIT) -> dict:
    from ..format.snapfile import read
    snap_a, fa = read(path_a, load_images=False)
    try:
        snap_b, fb = read(path_b, load_images=False)
        try:
            return diff_snapshots(_Side(path_a, snap_a, fa), _Side(path_b, snap_b, fb), limit)
        finally:
            fb.close()
    finally:
        fa.close()


def _items_text(block: dict, indent: str) -> list:
    lines = [indent + item["text"] for item in block["items"]]
    if block["count"] > len(block["items"]):
        lines.append(f"{indent}... and {block['count'] - len(block['items'])} more "
                     "(--limit)")
    return lines


def _side_text(tag: str, s: dict) -> str:
    drv = s["driver"]
    drv = f"{drv // 1000}.{drv % 1000 // 10}" if isinstance(drv, int) and drv else "?"
    return (f"{tag}  {s['file']}: {s['graphs']} graph(s), {s['nodes']} nodes, {s['kernels']} "
            f"kernels, {s['regions']} regions; {s['device'] or '?'} sm_{s['arch'] or '?'}, "
            f"driver {drv}")


def diff_text(d: dict) -> str:
    out = [_side_text("A", d["a"]), _side_text("B", d["b"])]
    if d["environment"]:
        out.append("environment (not counted): " + "; ".join(
            f"{e['field']} {e['a']} vs {e['b']}" for e in d["environment"]))
    for g in d["graphs"]:
        na, nb = g["nodes"]
        if g["status"] == "only_a":
            out.append(f"graph {g['name']!r}: only in A ({na} nodes)")
            continue
        if g["status"] == "only_b":
            out.append(f"graph {g['name']!r}: only in B ({nb} nodes)")
            continue
        head = f"graph {g['name']!r}: {na} vs {nb} nodes, {g['matched']} matched"
        count = g["differences"]["count"]
        out.append(head + (f"; {count} difference(s)" if count else "; same"))
        out.extend(_items_text(g["differences"], "  "))
    for section in ("kernels", "regions"):
        block = d[section]
        if block["count"]:
            out.append(f"{section}: {block['count']} difference(s)")
            out.extend(_items_text(block, "  "))
    c = d["counts"]
    if d["same"]:
        out.append("same: no differences in graphs, kernels or regions")
    else:
        out.append(f"different: {sum(c.values())} difference(s) (graphs {c['graphs']}, kernels "
                   f"{c['kernels']}, regions {c['regions']})")
    return "\n".join(out) + "\n"
