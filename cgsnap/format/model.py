"""The symbolic model of a CUDA graph snapshot.

Plain Python: nothing here touches the driver or holds a process-specific value (no raw pointer,
no handle, no CUfunction). A device address is a :class:`Ref` (region id + offset); a kernel is
its mangled name plus the hash of the image that holds it. The node types are specified one
class each in :mod:`cgsnap.format.nodes`.

``Snapshot.to_manifest()`` turns the model into the plain dict stored in the file (plus the list
of blobs the dict refers to by index); ``Snapshot.from_manifest()`` validates such a dict
completely (:mod:`cgsnap.format.schema`) -- every type, range and cross reference -- before
building the model, so that code working on a loaded model never meets a dangling id or an
out-of-range offset.
"""
from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np

from ..errors import FormatError

SCHEMA_VERSION = 3
# Schema 1 stored each kernel argument as its own map ({"d": bytes, "r": [[off, region, off]]});
# schema 2 stores a node's whole parameter buffer and one packed table of its pointers, which
# validates and restores without a Python object per argument; schema 3 stores a graph's kernel
# nodes and edges as columns (cgsnap.format.tables), without a map per node or edge, the
# pointers stored in saved region contents (Region.refs), strided named views
# (Region.strides, Region.view_offset), sparse region contents (Region.extents), identical
# contents sharing one blob, CUDA-array regions (Region.array), conditional and batch mem-op
# nodes and the kernel table's conditional-handle columns. All three are read.
READ_SCHEMAS = (1, 2, 3)
U64 = (1 << 64) - 1
REGION_REF_DTYPE = np.dtype([("offset", "<u8"), ("region", "<u8"), ("target_offset", "<u8")])
MAX_DECISIONS_KEPT = 64       # ambiguous-word decision lines kept in Snapshot.meta; the count stays exact

# Item sizes of the dtype names strided views may carry (torch / numpy names). A view's strides
# are in elements: validating its span needs the element size, so only these are accepted.
DTYPE_ITEMSIZE = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}


def view_span(shape, strides, view_offset: int = 0) -> tuple:
    """``(lowest, highest)`` element index, relative to the span start, that a view of
    ``shape`` / ``strides`` (elements) starting ``view_offset`` elements in touches; ``None``
    for a view without elements."""
    if any(n == 0 for n in shape):
        return None
    lo = hi = view_offset
    for n, s in zip(shape, strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi


def remap_region_refs(refs: bytes, rmap) -> bytes:
    """A region's stored-pointer table with its target regions renumbered (``rmap[old]``)."""
    if not refs:
        return refs
    table = np.frombuffer(refs, dtype=REGION_REF_DTYPE).copy()
    table["region"] = [rmap[t] for t in table["region"].tolist()]
    return table.tobytes()


class RegionKind(str, enum.Enum):
    ALLOCATION = "allocation"      # a driver allocation found with cuMemGetAddressRange
    NAMED = "named"                # a buffer the user named at save time
    MODULE_GLOBAL = "module_global"  # a __device__ / __constant__ variable of a kernel's module
    GRAPH_ALLOC = "graph_alloc"    # memory a mem-alloc node of the graph allocates itself
    HOST = "host"                  # host memory a memcpy node reads or writes
    ARRAY = "array"                # a CUDA array a memcpy node reads or writes (Region.array)


class Policy(str, enum.Enum):
    SAVED = "saved"      # contents are in the file and written into fresh memory at restore
    BOUND = "bound"      # no contents; the caller supplies memory at restore (load(bind=...))
    SCRATCH = "scratch"  # no contents; fresh memory


# CUarray_format -> bytes of one channel (the formats whose elements are plain words).
ARRAY_FORMATS = {0x01: 1, 0x02: 2, 0x03: 4, 0x08: 1, 0x09: 2, 0x0A: 4, 0x10: 2, 0x20: 4}
ARRAY_FORMAT_NAMES = {0x01: "u8", 0x02: "u16", 0x03: "u32", 0x08: "s8", 0x09: "s16",
                      0x0A: "s32", 0x10: "f16", 0x20: "f32"}
# CUDA_ARRAY3D_* flags an array may carry: LAYERED, SURFACE_LDST, CUBEMAP, TEXTURE_GATHER.
# (Depth textures, color attachments, sparse, deferred-mapping and video arrays are refused.)
ARRAY_FLAGS = 0x0F
ARRAY_DIM_MAX = 1 << 20


@dataclass(frozen=True, slots=True)
class ArrayDesc:
    """A CUDA array's shape (``CUDA_ARRAY3D_DESCRIPTOR``): ``height`` 0 for a 1D array, ``depth``
    0 for 1D and 2D ones (layered and cubemap arrays: the layer count). Its contents are stored
    packed: ``slices`` slices of ``rows`` rows of ``row_bytes``."""
    format: int
    channels: int
    width: int
    height: int = 0
    depth: int = 0
    flags: int = 0

    @property
    def element_bytes(self) -> int:
        return ARRAY_FORMATS[self.format] * self.channels

    @property
    def row_bytes(self) -> int:
        return self.width * self.element_bytes

    @property
    def rows(self) -> int:
        return max(self.height, 1)

    @property
    def slices(self) -> int:
        return max(self.depth, 1)

    @property
    def size(self) -> int:
        return self.row_bytes * self.rows * self.slices

    def position(self, offset: int) -> tuple:
        """``(x in bytes, y, z)`` of a byte offset into the packed contents."""
        row, x = divmod(offset, self.row_bytes) if self.row_bytes else (0, offset)
        z, y = divmod(row, self.rows)
        return x, y, z

    def offset(self, x: int, y: int, z: int) -> int:
        return (z * self.rows + y) * self.row_bytes + x

    def describe(self) -> str:
        dims = "x".join(str(d) for d in (self.width, self.height, self.depth) if d) or "0"
        return f"{dims} {ARRAY_FORMAT_NAMES.get(self.format, hex(self.format))}x{self.channels}" \
            + (f" flags {self.flags:#x}" if self.flags else "")


@dataclass(frozen=True, slots=True)
class Ref:
    """A device (or host) address as a position inside a region."""
    region: int
    offset: int


@dataclass(slots=True)
class Extent:
    """Saved bytes inside a region: ``length`` bytes at ``offset`` (schema 3)."""
    offset: int
    length: int
    data: Any = None               # bytes-like, a contents.Contents, or a blob index when read


@dataclass(slots=True)
class Region:
    id: int
    kind: RegionKind
    size: int
    policy: Policy = Policy.SAVED
    name: Optional[str] = None
    dtype: Optional[str] = None
    shape: Optional[tuple] = None
    content_hash: Optional[str] = None
    alignment: int = 256
    image: Optional[str] = None    # MODULE_GLOBAL: hash of the image defining the symbol
    symbol: Optional[str] = None   # MODULE_GLOBAL: the variable's symbol name
    pool: Optional[str] = None     # the memory pool it came from (torch graph pools), for tools
    # A named buffer inside a larger allocation is placed at the same offset of that allocation
    # at restore, so memory that graphs share (torch's graph pool) stays shared exactly.
    parent: Optional[int] = None
    parent_offset: int = 0
    array: Optional[ArrayDesc] = None   # ARRAY: the array's format and extent
    data: Any = None               # SAVED: contents (bytes-like, a contents.Contents, or a blob index)
    origin: Optional[int] = None   # address in the capturing process (never saved; merges snapshots)
    # Schema 3. Pointers stored in the saved contents: packed little-endian u64 triples (offset
    # in this region, target region, offset in the target), offsets increasing, words inside the
    # region; restore writes base(target) + offset over each word after the contents.
    refs: bytes = b""
    # A named strided view (schema 3): the region is the span of memory the view covers; the
    # view's first element is ``view_offset`` elements into it and dimension i steps
    # ``strides[i]`` elements (negative allowed: __cuda_array_interface__). None: C-contiguous.
    strides: Optional[tuple] = None
    view_offset: int = 0

    def pointer_table(self) -> np.ndarray:
        """``refs`` as a structured array (fields offset, region, target_offset)."""
        return np.frombuffer(self.refs, dtype=REGION_REF_DTYPE)
    # SAVED, sparse (schema 3): only these bytes are stored; the rest of the region is zero at
    # restore. Sorted by offset, non-overlapping. None: the whole region is in ``data``.
    extents: Optional[list] = None
    # In memory only (never saved): the part ``(lo, hi)`` of the region that the graphs use,
    # when an allocator map says so. A save keeps only that part (snapfile.trim_regions).
    span: Optional[tuple] = None

    def saved_bytes(self) -> int:
        """Bytes of contents this region stores (its extents', or its size)."""
        if self.policy is not Policy.SAVED:
            return 0
        return self.size if self.extents is None else sum(e.length for e in self.extents)


@dataclass(slots=True)
class KernelImage:
    hash: str
    kind: str                      # "cubin" | "fatbin" | "ptx"
    arch: int                      # e.g. 90 for sm_90 (for ptx: the compute_XX it targets)
    names: tuple                   # kernel names it holds
    data: Any = None               # the image bytes
    source: str = ""               # where it was found (recorder, scan:/path, triton, ...)


@dataclass(slots=True)
class Kernel:
    id: int
    name: str                      # mangled name
    image: str                     # hash of the image to load it from
    params: tuple                  # ((offset, size), ...) as cuFuncGetParamInfo reports
    attrs: dict = field(default_factory=dict)   # launch-relevant function attributes to set
    ptx_image: Optional[str] = None  # hash of a PTX image a newer arch can JIT


@dataclass(slots=True)
class Arg:
    """One kernel argument: its bytes, with the 8-byte words at ``refs`` offsets being pointers."""
    data: bytes
    refs: tuple = ()               # ((offset_in_arg, Ref), ...), offsets 8-byte aligned


@dataclass(frozen=True, slots=True)
class Edge:
    src: int
    dst: int
    from_port: int = 0
    to_port: int = 0
    type: int = 0


@dataclass(frozen=True, slots=True)
class RngState:
    """The random-number state a graph's kernels read at launch (PyTorch's Philox RNG).

    A captured ATen RNG kernel takes its seed and base offset from two 8-byte device words
    (``seed``, ``offset``); torch's replay writes the generator's seed and offset there before
    each launch and then advances the generator's offset by ``increment``. ``device`` and
    ``generator`` name the generator (``generator`` None: the device's default generator;
    otherwise a name the caller passes a ``torch.Generator`` under); ``saved_seed`` and
    ``saved_offset`` are its state when the graph was saved."""
    seed: Ref
    offset: Ref
    increment: int
    device: int
    saved_seed: int
    saved_offset: int
    generator: Optional[str] = None

    def remap(self, regions: dict) -> "RngState":
        return replace(self, seed=Ref(regions[self.seed.region], self.seed.offset),
                       offset=Ref(regions[self.offset.region], self.offset.offset))


class Graph:
    """One graph: its nodes and edges, either as objects (``nodes``, ``edges``) or, for a graph
    read from a file, as the validated columns of :mod:`cgsnap.format.tables` -- a restore
    plans straight from those and never makes an object per node; tools asking for ``nodes``
    or ``edges`` get them made (once) from the columns."""

    __slots__ = ("name", "top_level", "checks", "rng", "trace", "_nodes", "_edges", "_ktable",
                 "_others", "_edge_array", "_order", "_table_order")

    def __init__(self, name: str, nodes: Optional[list] = None, edges: Optional[list] = None,
                 top_level: bool = True, checks: Optional[dict] = None,
                 rng: Optional[list] = None, trace: Optional[tuple] = None):
        self.name = name
        self.top_level = top_level       # False for graphs only reachable as a child graph
        # region id -> its contents after one launch from the saved state (replay --check)
        self.checks = {} if checks is None else checks
        self.rng = [] if rng is None else rng    # RngState per generator the graph draws from
        # The per-node trace (cgsnap.format.trace): a TraceStep per node in the order they
        # ran, or None
        self.trace = trace
        self._nodes = [] if nodes is None else nodes
        self._edges = [] if edges is None else edges
        self._ktable = self._others = self._edge_array = None
        # The order the validator found, with the node and edge lists it was found for: a
        # graph read from a file is not ordered again by the restore's plan.
        self._order = None
        # The same for a graph held as columns: indices into its node ids (kernel table rows,
        # then the other nodes) in topological order (tables.node_order), or None.
        self._table_order = None

    @classmethod
    def from_tables(cls, name: str, ktable, others: list, edge_array, top_level: bool,
                    checks: dict, rng: Optional[list] = None,
                    order: Optional[np.ndarray] = None) -> "Graph":
        """A graph held as validated columns; ``order``: its topological order as
        :func:`cgsnap.format.tables.node_order` gives it, when already known."""
        g = cls(name, None, None, top_level, checks, rng)
        g._nodes = g._edges = None
        g._ktable, g._others, g._edge_array = ktable, others, edge_array
        g._table_order = order
        return g

    def table_order(self) -> Optional[np.ndarray]:
        """The topological order the validator found for the columns (``node_order`` of the
        kernel table's ids, then the other nodes'), while they are what the graph holds;
        else None."""
        if self._ktable is None or self._edge_array is None:
            return None
        return self._table_order

    # nodes and edges, as objects
    @property
    def nodes(self) -> list:
        if self._nodes is None:
            self._nodes = sorted(self._ktable.nodes() + self._others, key=lambda n: n.id)
        return self._nodes

    @nodes.setter
    def nodes(self, value: list) -> None:
        self._nodes, self._ktable, self._others, self._order = value, None, None, None
        self._table_order = None
        if self._edges is None:
            self._edges = self.edges

    @property
    def edges(self) -> list:
        if self._edges is None:
            from .tables import array_to_edges
            self._edges = array_to_edges(self._edge_array)
        return self._edges

    @edges.setter
    def edges(self, value: list) -> None:
        self._edges, self._edge_array, self._order = value, None, None
        self._table_order = None

    # the same as columns (what the restore and the writer use)
    def kernel_table(self, layouts):
        """The kernel nodes as a :class:`cgsnap.format.tables.KernelTable`."""
        if self._ktable is not None:
            return self._ktable
        from .tables import KernelTable
        return KernelTable.from_nodes([n for n in self._nodes if n.TYPE == "kernel"], layouts)

    def other_nodes(self) -> list:
        """Every node but the kernel nodes."""
        if self._others is not None:
            return self._others
        return [n for n in self._nodes if n.TYPE != "kernel"]

    def edge_array(self):
        """``int64[E, 5]``: src, dst, from_port, to_port, type."""
        if self._edge_array is not None:
            return self._edge_array
        from .tables import edges_to_array
        return edges_to_array(self._edges)

    def node_count(self) -> int:
        if self._nodes is not None:
            return len(self._nodes)
        return len(self._ktable) + len(self._others)

    def topological_order(self) -> list:
        """Nodes ordered so that every edge points forward (ties keep recorded order)."""
        cached = self._order
        nodes = self.nodes
        if cached is not None and cached[0] is nodes and cached[1] is self.edges:
            return [nodes[i] for i in cached[2]]
        return [nodes[i] for i in toposort(self, where=f"graph {self.name!r}")]

    def counts(self) -> dict:
        out: dict = {}
        if self._nodes is None:
            if len(self._ktable):
                out["kernel"] = len(self._ktable)
            nodes = self._others
        else:
            nodes = self._nodes
        for n in nodes:
            out[n.TYPE] = out.get(n.TYPE, 0) + 1
        return out

    def __eq__(self, other) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return (self.name, self.top_level, self.checks, self.rng, self.trace, self.nodes,
                self.edges) == (other.name, other.top_level, other.checks, other.rng,
                                other.trace, other.nodes, other.edges)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {self.node_count()} nodes)"


@dataclass(slots=True)
class Snapshot:
    graphs: list
    regions: list
    images: list
    kernels: list
    events: int = 0
    device: dict = field(default_factory=dict)     # name, arch, cc, driver, total_memory
    versions: dict = field(default_factory=dict)   # cgsnap, cuda-bindings, torch, ...
    meta: dict = field(default_factory=dict)       # created, host, name, ...

    # ---- lookups -------------------------------------------------------------------------
    def graph(self, name: str) -> Graph:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(name)

    def region_by_name(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def arch(self) -> int:
        return int(self.device.get("arch", 0))

    def save(self, path, *, compress="auto", prune: bool = True) -> None:
        """Write this snapshot to ``path`` (see :func:`cgsnap.save`)."""
        from .snapfile import save
        save(path, self, compress=compress, prune=prune)

    # ---- to and from the manifest ---------------------------------------------------------
    def to_manifest(self, table: Optional["BlobTable"] = None) -> tuple:
        """Return ``(manifest, blobs)``: the plain dict and the blob payloads it indexes.
        Identical region contents and checks (byte for byte) share one blob; pass a
        :class:`BlobTable` to keep what it learnt about each blob (checksums, samples)."""
        table = table if table is not None else BlobTable(self)
        add_blob = table.add_shared

        from .nodes import node_to_manifest
        regions = [_region_out(r, add_blob) for r in self.regions]
        images = [_image_out(im, table.add) for im in self.images]
        manifest = {
            "schema": SCHEMA_VERSION,
            "device": dict(self.device),
            "versions": dict(self.versions),
            "meta": dict(self.meta),
            "events": self.events,
            "regions": regions,
            "images": images,
            "kernels": [_kernel_out(k) for k in self.kernels],
            "graphs": [_graph_out(g, add_blob, [k.params for k in self.kernels], node_to_manifest)
                       for g in self.graphs],
        }
        return manifest, table.items

    @classmethod
    def from_manifest(cls, manifest: Any, blob_sizes: list, path: str = "",
                      blob_getter: Optional[Callable[[int], Any]] = None) -> "Snapshot":
        """Validate ``manifest`` completely and build the model.

        ``blob_sizes[i]`` is the raw length of blob ``i`` (checked against region and image
        sizes); ``blob_getter(i)`` returns its contents (called lazily only for images, which
        are small; region contents stay in the file until restore reads them)."""
        from .schema import Validator
        return Validator(path, blob_sizes, blob_getter).snapshot(manifest)


# ---- serialisation helpers ----------------------------------------------------------------

def _ref_out(ref: Ref) -> list:
    return [ref.region, ref.offset]


def _region_out(r: Region, add_blob) -> dict:
    out = {"id": r.id, "kind": r.kind.value, "size": r.size, "policy": r.policy.value,
           "alignment": r.alignment}
    for key in ("name", "dtype", "content_hash", "image", "symbol", "pool", "parent"):
        value = getattr(r, key)
        if value is not None:
            out[key] = value
    if r.parent is not None:
        out["parent_offset"] = r.parent_offset
    if r.shape is not None:
        out["shape"] = list(r.shape)
    if r.strides is not None:
        out["strides"] = list(r.strides)
        if r.view_offset:
            out["view_offset"] = r.view_offset
    if r.refs:
        out["refs"] = bytes(r.refs)
    if r.array is not None:
        a = r.array
        out["array"] = {"format": a.format, "channels": a.channels, "width": a.width,
                        "height": a.height, "depth": a.depth, "flags": a.flags}
    if r.policy is Policy.SAVED:
        if r.extents is not None:
            out["extents"] = [[e.offset, e.length, add_blob(e.data)] for e in r.extents]
        else:
            out["blob"] = add_blob(r.data)
    return out


class BlobTable:
    """The blobs of a manifest being written. Region contents and checks whose bytes are equal
    share one blob (schema 3): candidates by length and blob checksum, confirmed byte for
    byte. Image blobs are never shared. ``items[i]`` is blob ``i``'s payload as the model holds
    it; ``contents[i]`` its :class:`~cgsnap.format.contents.Contents` (None for images)."""

    def __init__(self, snap: Optional["Snapshot"] = None):
        self.items: list = []
        self.contents: list = []
        self._by_key: dict = {}
        self._wrapped: dict = {}      # id(payload) -> (payload, Contents): wrapped once
        if snap is not None:   # checksums of every shareable payload, one batch per reader
            from .contents import scan_all
            scan_all([c for c in map(self._contents, _payloads(snap)) if c is not None])

    def _contents(self, data):
        if data is None or isinstance(data, int):      # a blob index of a file: not shareable
            return None
        hit = self._wrapped.get(id(data))
        if hit is None:
            from .contents import as_contents
            hit = self._wrapped[id(data)] = (data, as_contents(data))
        return hit[1]

    def add(self, data, contents=None) -> int:
        self.items.append(data)
        self.contents.append(contents)
        return len(self.items) - 1

    def add_shared(self, data) -> int:
        c = self._contents(data)
        if c is None:
            return self.add(data)
        from .contents import same_bytes, scan_all
        if c.digest is None:
            scan_all([c])
        key = (c.nbytes, c.digest)
        for i in self._by_key.get(key, ()):
            if same_bytes(self.contents[i], c):
                return i
        i = self.add(data, c)
        self._by_key.setdefault(key, []).append(i)
        return i


def _payloads(snap: "Snapshot"):
    for r in snap.regions:
        if r.policy is Policy.SAVED:
            if r.extents is not None:
                yield from (e.data for e in r.extents)
            else:
                yield r.data
    for g in snap.graphs:
        yield from g.checks.values()


def _image_out(im: KernelImage, add_blob) -> dict:
    return {"hash": im.hash, "kind": im.kind, "arch": im.arch, "names": list(im.names),
            "source": im.source, "blob": add_blob(im.data)}


def _kernel_out(k: Kernel) -> dict:
    out = {"id": k.id, "name": k.name, "image": k.image,
           "params": [list(p) for p in k.params], "attrs": dict(k.attrs)}
    if k.ptx_image:
        out["ptx_image"] = k.ptx_image
    return out


def _graph_out(g: Graph, add_blob, layouts, node_to_manifest) -> dict:
    from .tables import edges_to_manifest
    out = {"name": g.name, "top_level": g.top_level,
           "kernels": g.kernel_table(layouts).to_manifest(),
           "nodes": [node_to_manifest(n, layouts) for n in g.other_nodes()],
           "edges": edges_to_manifest(g.edge_array()),
           "checks": [[rid, add_blob(data)] for rid, data in sorted(g.checks.items())]}
    if g.rng:
        out["rng"] = [_rng_out(e) for e in g.rng]
    if g.trace is not None:
        from .trace import trace_to_manifest
        out["trace"] = trace_to_manifest(g.trace, add_blob)
    return out


def _rng_out(e: RngState) -> dict:
    gen = {"device": e.device, "seed": e.saved_seed, "offset": e.saved_offset}
    if e.generator is not None:
        gen["name"] = e.generator
    return {"seed": _ref_out(e.seed), "offset": _ref_out(e.offset), "increment": e.increment,
            "generator": gen}


def toposort(g: Graph, where: str) -> list:
    """Kahn's algorithm over node indices; raises FormatError on a cycle."""
    index = {n.id: i for i, n in enumerate(g.nodes)}
    indegree = [0] * len(g.nodes)
    succ: list = [[] for _ in g.nodes]
    for e in g.edges:
        succ[index[e.src]].append(index[e.dst])
        indegree[index[e.dst]] += 1
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in succ[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(g.nodes):
        raise FormatError(f"{where}: the edges form a cycle")
    return order


# The node types, specified in cgsnap.format.nodes, are part of the model's namespace.
from .nodes import (NODE_TYPES, BatchMemOpNode, ChildGraphNode,  # noqa: E402,F401 (re-exported)
                    ConditionalNode, EmptyNode, EventRecordNode, EventWaitNode, HostNode,
                    KernelNode, MemAllocNode, MemcpyNode, MemFreeNode, MemOp, MemsetNode,
                    node_regions, pack_args, param_buffer_size, unpack_args)
