"""Columnar tables for the bulk of a graph (schema 3): its kernel nodes and its edges.

A captured graph is thousands of kernel nodes and about as many edges; a serving engine's file
holds tens of such graphs. As one msgpack map per node they cost a few microseconds each to
decode, validate and plan; as columns they are a handful of byte strings per graph, validated
and planned with numpy in one pass. Other node types stay one map each (they are few).

Kernel table (``graph["kernels"]``), N nodes, little-endian:

- ``ids`` u32[N]: node ids (unique in the graph, shared with the other nodes' ids);
- ``kernel`` u32[N]: kernel index; ``dims`` u32[N*7]: grid x y z, block x y z, dynamic shared
  memory bytes;
- ``params``: every node's parameter buffer (its kernel's ``param_buffer_size``) in node order,
  each padded with zeros to a multiple of 8 bytes;
- ``nrefs`` u32[N] and ``refs`` u64[3*R]: each node's pointer table in node order, entries
  (byte position in the node's buffer, region, offset) as in schema 2's per-node ``refs``;
- ``attrs``: the distinct launch-attribute maps; ``attr`` i32[N]: index into ``attrs`` or -1;
- optional, together (written only when a node has one): ``nhandles`` u32[N] and ``handles``
  u64[2*H]: each node's conditional-handle table in node order, entries (byte position in the
  node's buffer, conditional handle id) as in ``KernelNode.handles``.

Edge table (``graph["edges"]``): u32[3*E]: source id, destination id, and
``from_port | to_port << 8 | type << 16``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .model import Edge, Ref
from .nodes import DIM_MAX, REF_DTYPE, KernelNode, check_pointer_rows, param_buffer_size

KERNEL_FIELDS = ("ids", "kernel", "dims", "params", "nrefs", "refs", "attrs", "attr")
HANDLE_FIELDS = ("nhandles", "handles")
MAX_NODES = 1 << 24
_ATTR_KEYS = ("cluster_dim", "priority", "cooperative")


def _pad8(n):
    return (n + 7) & ~7


@dataclass
class KernelTable:
    """A graph's kernel nodes as columns (see the module docstring); validated when parsed."""
    ids: np.ndarray            # int64[N]
    kernel: np.ndarray         # int64[N]
    dims: np.ndarray           # int64[N, 7]
    params: bytes              # concatenated, each buffer padded to 8 bytes
    starts: np.ndarray         # int64[N]: where each node's buffer starts in ``params``
    sizes: np.ndarray          # int64[N]: each node's buffer size (unpadded)
    nrefs: np.ndarray          # int64[N]
    refs: np.ndarray           # uint64[R, 3]: position in the node's buffer, region, offset
    attrs: list = field(default_factory=list)
    attr: Optional[np.ndarray] = None     # int64[N], -1 for none
    nhandles: Optional[np.ndarray] = None  # int64[N]; None: no node passes a handle
    handles: Optional[np.ndarray] = None   # uint64[H, 2]: position in the node's buffer, handle id

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_nodes(cls, nodes: list, layouts) -> "KernelTable":
        """The table of kernel nodes (``layouts[k]``: kernel k's params)."""
        n = len(nodes)
        sizes = np.array([param_buffer_size(layouts[x.kernel]) for x in nodes], dtype=np.int64)
        padded = _pad8(sizes)
        starts = np.zeros(n, dtype=np.int64)
        if n > 1:
            starts[1:] = np.cumsum(padded[:-1])
        params = b"".join(bytes(x.params).ljust(int(p), b"\0") for x, p in zip(nodes, padded))
        attrs, index = [], {}
        attr = np.full(n, -1, dtype=np.int64)
        for i, x in enumerate(nodes):
            if x.attrs:
                key = tuple(sorted(x.attrs.items()))
                if key not in index:
                    index[key] = len(attrs)
                    attrs.append(dict(x.attrs))
                attr[i] = index[key]
        dims = np.array([[*x.grid, *x.block, x.shared_mem] for x in nodes],
                        dtype=np.int64).reshape(n, 7)
        refs = np.frombuffer(b"".join(x.refs for x in nodes), dtype="<u8").reshape(-1, 3)
        nhandles = handles = None
        if any(x.handles for x in nodes):
            nhandles = np.array([len(x.handles) // 16 for x in nodes], dtype=np.int64)
            handles = np.frombuffer(b"".join(x.handles for x in nodes),
                                    dtype="<u8").reshape(-1, 2)
        return cls(np.array([x.id for x in nodes], dtype=np.int64),
                   np.array([x.kernel for x in nodes], dtype=np.int64), dims, params, starts,
                   sizes, np.array([len(x.refs) // 24 for x in nodes], dtype=np.int64), refs,
                   attrs, attr, nhandles, handles)

    def ref_starts(self) -> np.ndarray:
        return _starts(self.nrefs)

    def node(self, i: int, first_ref: Optional[int] = None,
             first_handle: Optional[int] = None) -> KernelNode:
        """Row ``i`` as a :class:`KernelNode` (tools; the restore works on the columns)."""
        if first_ref is None:
            first_ref = int(self.nrefs[:i].sum())
        start, size = int(self.starts[i]), int(self.sizes[i])
        refs = self.refs[first_ref:first_ref + int(self.nrefs[i])]
        a = int(self.attr[i]) if self.attr is not None else -1
        d = self.dims[i].tolist()
        handles = b""
        if self.nhandles is not None and self.nhandles[i]:
            if first_handle is None:
                first_handle = int(self.nhandles[:i].sum())
            handles = np.ascontiguousarray(
                self.handles[first_handle:first_handle + int(self.nhandles[i])],
                dtype="<u8").tobytes()
        return KernelNode(int(self.ids[i]), int(self.kernel[i]), tuple(d[0:3]), tuple(d[3:6]),
                          d[6], self.params[start:start + size],
                          np.ascontiguousarray(refs, dtype="<u8").tobytes(),
                          dict(self.attrs[a]) if a >= 0 else {}, handles)

    def nodes(self) -> list:
        firsts = self.ref_starts().tolist()
        hfirsts = _starts(self.nhandles).tolist() if self.nhandles is not None else None
        return [self.node(i, firsts[i], hfirsts[i] if hfirsts is not None else None)
                for i in range(len(self.ids))]

    def has_handles(self) -> bool:
        return self.handles is not None and len(self.handles) > 0

    def to_manifest(self) -> dict:
        attr = self.attr if self.attr is not None else np.full(len(self.ids), -1)
        out = {"ids": self.ids.astype("<u4").tobytes(),
                "kernel": self.kernel.astype("<u4").tobytes(),
                "dims": self.dims.astype("<u4").tobytes(), "params": bytes(self.params),
                "nrefs": self.nrefs.astype("<u4").tobytes(),
                "refs": np.ascontiguousarray(self.refs, dtype="<u8").tobytes(),
                "attrs": [{k: list(v) if isinstance(v, tuple) else v for k, v in a.items()}
                          for a in self.attrs],
                "attr": attr.astype("<i4").tobytes()}
        if self.has_handles():
            out["nhandles"] = self.nhandles.astype("<u4").tobytes()
            out["handles"] = np.ascontiguousarray(self.handles, dtype="<u8").tobytes()
        return out

    @classmethod
    def parse(cls, v, raw, where: str, ctx) -> "KernelTable":
        """Validate a kernel table completely (vectorised); errors name the column and row."""
        raw = v.map(raw, where, KERNEL_FIELDS, HANDLE_FIELDS)
        ids = _column(v, raw["ids"], f"{where}.ids", "<u4", 1)
        n = len(ids)
        if n > MAX_NODES:
            v.fail(f"{where}.ids", f"{n} kernel nodes, more than {MAX_NODES}")
        kernel = _column(v, raw["kernel"], f"{where}.kernel", "<u4", 1, n)
        dims = _column(v, raw["dims"], f"{where}.dims", "<u4", 7, n)
        nrefs = _column(v, raw["nrefs"], f"{where}.nrefs", "<u4", 1, n)
        attr = _column(v, raw["attr"], f"{where}.attr", "<i4", 1, n)
        bad = np.flatnonzero(kernel >= len(ctx.kernels))
        if bad.size:
            v.fail(f"{where}.kernel[{bad[0]}]", f"kernel {kernel[bad[0]]} does not exist "
                                                f"({len(ctx.kernels)} kernels)")
        launch = dims[:, :6]
        bad = np.flatnonzero(((launch < 1) | (launch > DIM_MAX)).any(axis=1))
        if bad.size:
            v.fail(f"{where}.dims[{bad[0]}]", "grid and block dimensions must be in "
                                             f"[1, {DIM_MAX}]")
        bad = np.flatnonzero(dims[:, 6] > 1 << 24)
        if bad.size:
            v.fail(f"{where}.dims[{bad[0]}]", f"{dims[bad[0], 6]} bytes of dynamic shared "
                                             "memory, more than 16 MiB")
        sizes = ctx.buffer_size_array[kernel] if n else np.zeros(0, dtype=np.int64)
        padded = _pad8(sizes)
        starts = np.zeros(n, dtype=np.int64)
        if n > 1:
            starts[1:] = np.cumsum(padded[:-1])
        params = raw["params"]
        if type(params) is not bytes:
            v.fail(f"{where}.params", f"expected bytes, found {type(params).__name__}")
        if len(params) != int(padded.sum()):
            v.fail(f"{where}.params", f"{len(params)} bytes; the nodes' kernels take "
                                      f"{int(padded.sum())} (each buffer padded to 8)")
        bad = np.flatnonzero(nrefs > sizes // 8)
        if bad.size:
            v.fail(f"{where}.nrefs[{bad[0]}]", f"{nrefs[bad[0]]} pointers in a "
                                              f"{sizes[bad[0]]}-byte parameter buffer")
        refs_raw = raw["refs"]
        if type(refs_raw) is not bytes or len(refs_raw) != 24 * int(nrefs.sum()):
            v.fail(f"{where}.refs", f"expected {24 * int(nrefs.sum())} bytes: one 24-byte entry "
                                    "per pointer that nrefs counts")
        refs = np.frombuffer(refs_raw, dtype="<u8").reshape(-1, 3)
        check_pointer_rows(v, refs, np.repeat(np.arange(len(nrefs)), nrefs), kernel, ctx,
                           lambda bad, row: f"{where}.refs[{bad}] (row {row})")
        attrs = []
        for i, a in enumerate(v.list(raw["attrs"], f"{where}.attrs", 4096)):
            attrs.append(_parse_attrs(v, a, f"{where}.attrs[{i}]"))
        bad = np.flatnonzero((attr < -1) | (attr >= len(attrs)))
        if bad.size:
            v.fail(f"{where}.attr[{bad[0]}]", f"attribute set {attr[bad[0]]} does not exist "
                                             f"({len(attrs)} sets)")
        nhandles = handles = None
        if "nhandles" in raw or "handles" in raw:
            nhandles, handles = _parse_handles(v, raw, where, kernel, sizes, refs, nrefs, ctx)
        return cls(ids, kernel, dims, params, starts, sizes, nrefs, refs, attrs, attr, nhandles,
                   handles)


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each row's entries start in a table of ``counts[i]`` entries per row."""
    out = np.zeros(len(counts), dtype=np.int64)
    if len(counts) > 1:
        out[1:] = np.cumsum(counts[:-1])
    return out


def _parse_handles(v, raw, where: str, kernel: np.ndarray, sizes: np.ndarray, refs: np.ndarray,
                   nrefs: np.ndarray, ctx) -> tuple:
    """``(nhandles, handles)``: every entry a whole 8-byte argument of its node's kernel (its
    start, 8-aligned), increasing within its node and no pointer of the node's pointer table.
    Handle ids are checked once every graph is read (``ConditionalNode.check_snapshot``)."""
    if "nhandles" not in raw or "handles" not in raw:
        v.fail(where, "nhandles and handles come together")
    n = len(kernel)
    nhandles = _column(v, raw["nhandles"], f"{where}.nhandles", "<u4", 1, n)
    bad = np.flatnonzero(nhandles > sizes // 8)
    if bad.size:
        v.fail(f"{where}.nhandles[{bad[0]}]", f"{nhandles[bad[0]]} handles in a "
                                             f"{sizes[bad[0]]}-byte parameter buffer")
    data = raw["handles"]
    total = int(nhandles.sum())
    if type(data) is not bytes or len(data) != 16 * total:
        v.fail(f"{where}.handles", f"expected {16 * total} bytes: one 16-byte entry per "
                                   "conditional handle that nhandles counts")
    handles = np.frombuffer(data, dtype="<u8").reshape(-1, 2)
    if not total:
        return nhandles, handles
    owner = np.repeat(np.arange(n), nhandles)
    kid = kernel[owner].astype(np.uint64)
    pos = handles[:, 0]
    ok = ((pos & np.uint64(7)) == 0) & (pos <= np.uint64(0xFFFFFFFF))
    ok[1:] &= (owner[1:] != owner[:-1]) | (pos[1:] > pos[:-1])
    key = (kid << np.uint64(32)) | np.minimum(pos, np.uint64(0xFFFFFFFF))
    eight = ctx.eight_byte_args
    at = np.minimum(np.searchsorted(eight, key), max(len(eight) - 1, 0))
    ok &= (eight[at] == key) if len(eight) else False
    if len(refs):
        ref_owner = np.repeat(np.arange(n), nrefs).astype(np.uint64)
        mask = np.uint64(0xFFFFFFFF)
        ok &= ~np.isin((owner.astype(np.uint64) << np.uint64(32)) | (key & mask),
                       (ref_owner << np.uint64(32)) | (refs[:, 0] & mask))
    ok &= handles[:, 1] < np.uint64(1 << 32)
    if not ok.all():
        bad = int(np.argmin(ok))
        row = int(owner[bad])
        p, hid = (int(x) for x in handles[bad].tolist())
        w = f"{where}.handles[{bad}] (row {row})"
        if hid >= 1 << 32:
            v.fail(w, f"handle id {hid} is out of range")
        v.fail(w, f"position {p} is not an 8-byte argument of kernel "
                  f"{ctx.kernels[int(kernel[row])].name} (in increasing order, not a pointer)")
    return nhandles, handles


def _column(v, raw, where: str, dtype: str, width: int, rows: Optional[int] = None) -> np.ndarray:
    if type(raw) is not bytes:
        v.fail(where, f"expected bytes, found {type(raw).__name__}")
    item = np.dtype(dtype).itemsize * width
    if len(raw) % item or (rows is not None and len(raw) != item * rows):
        v.fail(where, f"{len(raw)} bytes: expected {'a multiple of ' if rows is None else ''}"
                      f"{item if rows is None else item * rows}")
    arr = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    return arr.reshape(-1, width) if width > 1 else arr


def _parse_attrs(v, a, where: str) -> dict:
    a = v.map(a, where, optional=_ATTR_KEYS)
    out = {}
    if "cluster_dim" in a:
        out["cluster_dim"] = v.dims(a["cluster_dim"], f"{where}.cluster_dim")
    for key in ("priority", "cooperative"):
        if key in a:
            out[key] = v.int(a[key], f"{where}.{key}", -(1 << 31), (1 << 31) - 1)
    return out


# ---- edges ----------------------------------------------------------------------------------

def edges_to_array(edges) -> np.ndarray:
    """``int64[E, 5]``: src, dst, from_port, to_port, type."""
    return np.array([[e.src, e.dst, e.from_port, e.to_port, e.type] for e in edges],
                    dtype=np.int64).reshape(-1, 5)


def edges_to_manifest(arr: np.ndarray) -> bytes:
    packed = np.stack([arr[:, 0], arr[:, 1], arr[:, 2] | arr[:, 3] << 8 | arr[:, 4] << 16],
                      axis=1) if len(arr) else np.zeros((0, 3), dtype=np.int64)
    return packed.astype("<u4").tobytes()


def parse_edges(v, raw, where: str, ids: np.ndarray,
                sorted_ids: Optional[np.ndarray] = None) -> np.ndarray:
    """The edge table as ``int64[E, 5]``; both ends must be node ids, never the same node.
    ``sorted_ids``: ``ids`` sorted, when the caller has them."""
    rows = _column(v, raw, where, "<u4", 3)
    arr = np.empty((len(rows), 5), dtype=np.int64)
    arr[:, 0], arr[:, 1] = rows[:, 0], rows[:, 1]
    arr[:, 2], arr[:, 3], arr[:, 4] = rows[:, 2] & 0xFF, rows[:, 2] >> 8 & 0xFF, rows[:, 2] >> 16
    if sorted_ids is None:
        sorted_ids = np.sort(ids)
    for col, what in ((0, "source"), (1, "destination")):
        at = np.searchsorted(sorted_ids, arr[:, col])
        bad = np.flatnonzero((at >= len(sorted_ids)) |
                             (sorted_ids[np.minimum(at, max(len(sorted_ids) - 1, 0))] != arr[:, col])
                             if len(sorted_ids) else np.ones(len(arr), dtype=bool))
        if bad.size:
            v.fail(f"{where}[{bad[0]}]", f"edge {arr[bad[0], 0]}->{arr[bad[0], 1]}: its "
                                        f"{what} is no node of the graph")
    bad = np.flatnonzero((arr[:, 0] == arr[:, 1]) | (arr[:, 4] > 255))
    if bad.size:
        v.fail(f"{where}[{bad[0]}]", f"edge {arr[bad[0], 0]}->{arr[bad[0], 1]} is a self-loop "
                                    "or has an unknown type")
    dup = first_duplicate_edge(arr)
    if dup is not None:
        v.fail(f"{where}[{dup}]", f"edge {arr[dup, 0]}->{arr[dup, 1]} is given twice")
    return arr


def first_duplicate_edge(rows: np.ndarray) -> Optional[int]:
    """Index of the first of ``rows`` (``int64[E, 5]``: src, dst, ports, type) that repeats an
    earlier one, or None: the driver holds an edge once; a repeated dependency would be
    refused, or passed as a wrong run of consecutive handles."""
    if len(rows) < 2:
        return None
    pair = rows[:, 0].astype(np.uint64) << np.uint64(32) | rows[:, 1].astype(np.uint64)
    ordered = np.sort(pair)
    if not (ordered[1:] == ordered[:-1]).any():
        return None                      # (nearly always: one edge per pair of nodes)
    data = rows[:, 2] | rows[:, 3] << 8 | rows[:, 4] << 16
    order = np.lexsort((data, pair))     # stable: of two equal rows the earlier comes first
    same = (pair[order[1:]] == pair[order[:-1]]) & (data[order[1:]] == data[order[:-1]])
    return int(order[1:][same].min()) if same.any() else None


def array_to_edges(arr: np.ndarray) -> list:
    return [Edge(*row) for row in arr.tolist()]


def topological_positions(ids: np.ndarray, edges: np.ndarray,
                          order: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """When the nodes in id order already have every edge pointing forward (a stream capture
    records them that way), that order: indices sorting ``ids``. Else None. ``order``:
    ``np.argsort(ids, kind="stable")``, when the caller has it."""
    if order is None:
        order = np.argsort(ids, kind="stable")
    if not len(edges):
        return order
    sorted_ids = ids[order]          # an edge's rank in id order is where its id sorts
    src = np.searchsorted(sorted_ids, edges[:, 0])
    dst = np.searchsorted(sorted_ids, edges[:, 1])
    return order if bool((src < dst).all()) else None


def toposort_arrays(ids: np.ndarray, edges: np.ndarray, where: str) -> np.ndarray:
    """Kahn's algorithm over node indices, ties in id order; FormatError on a cycle."""
    import heapq

    from ..errors import FormatError
    n = len(ids)
    order_by_id = np.argsort(ids, kind="stable")
    sorted_ids = ids[order_by_id]
    src = order_by_id[np.searchsorted(sorted_ids, edges[:, 0])].tolist() if len(edges) else []
    dst = order_by_id[np.searchsorted(sorted_ids, edges[:, 1])].tolist() if len(edges) else []
    rank = np.empty(n, dtype=np.int64)
    rank[order_by_id] = np.arange(n)
    rank = rank.tolist()
    succ: list = [[] for _ in range(n)]
    indegree = [0] * n
    for a, b in zip(src, dst):
        succ[a].append(b)
        indegree[b] += 1
    ready = [(rank[i], i) for i in range(n) if indegree[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in succ[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, (rank[j], j))
    if len(order) != n:
        raise FormatError(f"{where}: the edges form a cycle")
    return np.array(order, dtype=np.int64)


def node_order(ids: np.ndarray, edges: np.ndarray, where: str) -> np.ndarray:
    """Indices into ``ids`` in a topological order, ties in id order."""
    fast = topological_positions(ids, edges)
    return fast if fast is not None else toposort_arrays(ids, edges, where)


__all__ = ["KernelTable", "Ref", "REF_DTYPE", "edges_to_array", "edges_to_manifest",
           "parse_edges", "array_to_edges", "topological_positions", "toposort_arrays",
           "node_order"]
