"""The symbolic model of a CUDA graph snapshot.

Plain Python: nothing here touches the driver or holds a process-specific value (no raw pointer,
no handle, no CUfunction). A device address is a :class:`Ref` (region id + offset); a kernel is
its mangled name plus the hash of the image that holds it.

``Snapshot.to_manifest()`` turns the model into the plain dict stored in the file (plus the list
of blobs the dict refers to by index); ``Snapshot.from_manifest()`` validates such a dict
completely -- every type, range and cross reference -- before building the model, so that code
working on a loaded model never meets a dangling id or an out-of-range offset.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import FormatError
from .hashing import is_hash

SCHEMA_VERSION = 2
# Schema 1 stored each kernel argument as its own map ({"d": bytes, "r": [[off, region, off]]});
# schema 2 stores a node's whole parameter buffer and one packed table of its pointers, which
# validates and restores without a Python object per argument. Both are read.
READ_SCHEMAS = (1, 2)
_REF = np.dtype([("pos", "<u8"), ("region", "<u8"), ("offset", "<u8")])
U64 = (1 << 64) - 1
MAX_DECISIONS_KEPT = 64       # ambiguous-word decision lines kept in Snapshot.meta; the count stays exact


class RegionKind(str, enum.Enum):
    ALLOCATION = "allocation"      # a driver allocation found with cuMemGetAddressRange
    NAMED = "named"                # a buffer the user named at save time
    MODULE_GLOBAL = "module_global"  # a __device__ / __constant__ variable of a kernel's module
    GRAPH_ALLOC = "graph_alloc"    # memory a mem-alloc node of the graph allocates itself
    HOST = "host"                  # host memory a memcpy node reads or writes


class Policy(str, enum.Enum):
    SAVED = "saved"      # contents are in the file and written into fresh memory at restore
    BOUND = "bound"      # no contents; the caller supplies memory at restore (load(bind=...))
    SCRATCH = "scratch"  # no contents; fresh memory


@dataclass(frozen=True, slots=True)
class Ref:
    """A device (or host) address as a position inside a region."""
    region: int
    offset: int


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
    data: Any = None               # SAVED: contents (bytes-like, a BlobSource, or a blob index)
    origin: Optional[int] = None   # address in the capturing process (never saved; merges snapshots)


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


@dataclass(slots=True)
class KernelNode:
    id: int
    kernel: int
    grid: tuple
    block: tuple
    shared_mem: int
    args: Optional[tuple]          # of Arg; None when only ``packed`` is kept (see below)
    attrs: dict = field(default_factory=dict)   # cluster_dim (x,y,z), priority, cooperative
    # ``(params, refs)`` as stored in a file: the kernel's whole parameter buffer, and the
    # pointer table (little-endian u64 triples: byte position in params, region, offset).
    # Set on nodes read from a file; the restore uses it directly, tools get ``args`` too.
    packed: Optional[tuple] = None
    TYPE = "kernel"


def param_buffer_size(layout) -> int:
    """Bytes of a kernel's parameter buffer: ``layout`` is ``Kernel.params``."""
    return max((off + size for off, size in layout), default=0)


def pack_args(args, layout) -> tuple:
    """``(params, refs)``: the schema-2 form of a node's arguments (see ``KernelNode.packed``)."""
    buf = bytearray(param_buffer_size(layout))
    refs = []
    for (off, _), a in zip(layout, args):
        buf[off:off + len(a.data)] = a.data
        refs.extend((off + o, r.region, r.offset) for o, r in a.refs)
    return bytes(buf), np.array(refs, dtype="<u8").reshape(-1, 3).tobytes()


def unpack_args(params: bytes, refs: bytes, layout) -> tuple:
    """The per-argument form of a packed node (refs must lie inside arguments: validated)."""
    table = np.frombuffer(refs, dtype="<u8").reshape(-1, 3).tolist()
    out, j = [], 0
    for off, size in layout:
        mine = []
        while j < len(table) and table[j][0] < off + size:
            pos, region, offset = table[j]
            mine.append((pos - off, Ref(region, offset)))
            j += 1
        out.append(Arg(bytes(params[off:off + size]), tuple(mine)))
    return tuple(out)


@dataclass(slots=True)
class MemcpyNode:
    """A copy of a ``width`` x ``height`` x ``depth`` box; pitches are the row strides, the
    heights the number of rows per slice. A 1D copy has height = depth = 1."""
    id: int
    src: Ref
    dst: Ref
    width: int
    height: int = 1
    depth: int = 1
    src_pitch: int = 0
    src_height: int = 0
    dst_pitch: int = 0
    dst_height: int = 0
    TYPE = "memcpy"


@dataclass(slots=True)
class MemsetNode:
    id: int
    dst: Ref
    value: int
    element_size: int              # 1, 2 or 4
    width: int                     # in elements
    height: int = 1
    pitch: int = 0
    TYPE = "memset"


@dataclass(slots=True)
class EmptyNode:
    id: int
    TYPE = "empty"


@dataclass(slots=True)
class ChildGraphNode:
    id: int
    graph: str                     # name of a graph of the snapshot
    TYPE = "graph"


@dataclass(slots=True)
class EventRecordNode:
    id: int
    event: int                     # index into Snapshot.events
    TYPE = "event_record"


@dataclass(slots=True)
class EventWaitNode:
    id: int
    event: int
    TYPE = "event_wait"


@dataclass(slots=True)
class MemAllocNode:
    id: int
    region: int                    # the GRAPH_ALLOC region it creates
    TYPE = "mem_alloc"


@dataclass(slots=True)
class MemFreeNode:
    id: int
    ptr: Ref
    TYPE = "mem_free"


@dataclass(slots=True)
class HostNode:
    id: int
    callback: str                  # name registered with cgsnap.register_host_callback
    TYPE = "host"


Node = Union[KernelNode, MemcpyNode, MemsetNode, EmptyNode, ChildGraphNode, EventRecordNode,
             EventWaitNode, MemAllocNode, MemFreeNode, HostNode]
NODE_TYPES = {cls.TYPE: cls for cls in (KernelNode, MemcpyNode, MemsetNode, EmptyNode,
                                         ChildGraphNode, EventRecordNode, EventWaitNode,
                                         MemAllocNode, MemFreeNode, HostNode)}


def node_regions(n) -> list:
    """The ids of the regions node ``n`` refers to (a kernel node: through its arguments'
    pointers, which must be unpacked)."""
    t = n.TYPE
    if t == "kernel":
        return [ref.region for a in n.args for _, ref in a.refs]
    if t == "memcpy":
        return [n.src.region, n.dst.region]
    if t == "memset":
        return [n.dst.region]
    if t == "mem_alloc":
        return [n.region]
    if t == "mem_free":
        return [n.ptr.region]
    return []


@dataclass(frozen=True, slots=True)
class Edge:
    src: int
    dst: int
    from_port: int = 0
    to_port: int = 0
    type: int = 0


@dataclass(slots=True)
class Graph:
    name: str
    nodes: list
    edges: list
    top_level: bool = True         # False for graphs only reachable as a child graph
    # region id -> its contents after one launch from the saved state (for `replay --check`)
    checks: dict = field(default_factory=dict)
    # The order the validator found, with the node and edge lists it was found for: a graph
    # read from a file is sorted once, not again by the restore's plan.
    _order: Optional[tuple] = field(default=None, repr=False, compare=False)

    def topological_order(self) -> list:
        """Nodes ordered so that every edge points forward (ties keep recorded order)."""
        cached = self._order
        if cached is not None and cached[0] is self.nodes and cached[1] is self.edges:
            return [self.nodes[i] for i in cached[2]]
        return [self.nodes[i] for i in _toposort(self, where=f"graph {self.name!r}")]

    def counts(self) -> dict:
        out: dict = {}
        for n in self.nodes:
            out[n.TYPE] = out.get(n.TYPE, 0) + 1
        return out


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

    def save(self, path, *, compress: bool = False, prune: bool = True) -> None:
        """Write this snapshot to ``path`` (see :func:`cgsnap.save`)."""
        from .snapfile import save
        save(path, self, compress=compress, prune=prune)

    # ---- to and from the manifest ---------------------------------------------------------
    def to_manifest(self) -> tuple:
        """Return ``(manifest, blobs)``: the plain dict and the blob payloads it indexes."""
        blobs: list = []

        def add_blob(data) -> int:
            blobs.append(data)
            return len(blobs) - 1

        regions = [_region_out(r, add_blob) for r in self.regions]
        images = [_image_out(im, add_blob) for im in self.images]
        manifest = {
            "schema": SCHEMA_VERSION,
            "device": dict(self.device),
            "versions": dict(self.versions),
            "meta": dict(self.meta),
            "events": self.events,
            "regions": regions,
            "images": images,
            "kernels": [_kernel_out(k) for k in self.kernels],
            "graphs": [_graph_out(g, add_blob, [k.params for k in self.kernels])
                       for g in self.graphs],
        }
        return manifest, blobs

    @classmethod
    def from_manifest(cls, manifest: Any, blob_sizes: list, path: str = "",
                      blob_getter: Optional[Callable[[int], Any]] = None,
                      unpack: bool = True) -> "Snapshot":
        """Validate ``manifest`` completely and build the model.

        ``blob_sizes[i]`` is the raw length of blob ``i`` (checked against region and image
        sizes); ``blob_getter(i)`` returns its contents (called lazily only for images, which
        are small; region contents stay in the file until restore reads them). With
        ``unpack=False`` kernel nodes of a schema-2 manifest keep only ``packed`` (``args`` is
        None): what the restore needs, without an object per argument."""
        return _Validator(path, blob_sizes, blob_getter, unpack).snapshot(manifest)


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
    if r.policy is Policy.SAVED:
        out["blob"] = add_blob(r.data)
    return out


def _image_out(im: KernelImage, add_blob) -> dict:
    return {"hash": im.hash, "kind": im.kind, "arch": im.arch, "names": list(im.names),
            "source": im.source, "blob": add_blob(im.data)}


def _kernel_out(k: Kernel) -> dict:
    out = {"id": k.id, "name": k.name, "image": k.image,
           "params": [list(p) for p in k.params], "attrs": dict(k.attrs)}
    if k.ptx_image:
        out["ptx_image"] = k.ptx_image
    return out


def _node_out(n, layouts) -> dict:
    t = n.TYPE
    out: dict = {"id": n.id, "t": t}
    if t == "kernel":
        params, refs = n.packed if n.args is None else pack_args(n.args, layouts[n.kernel])
        out.update(kernel=n.kernel, grid=list(n.grid), block=list(n.block), smem=n.shared_mem,
                   params=params, refs=refs)
        if n.attrs:
            out["attrs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in n.attrs.items()}
    elif t == "memcpy":
        out.update(src=_ref_out(n.src), dst=_ref_out(n.dst), width=n.width, height=n.height,
                   depth=n.depth, src_pitch=n.src_pitch, src_height=n.src_height,
                   dst_pitch=n.dst_pitch, dst_height=n.dst_height)
    elif t == "memset":
        out.update(dst=_ref_out(n.dst), value=n.value, element_size=n.element_size,
                   width=n.width, height=n.height, pitch=n.pitch)
    elif t == "graph":
        out["graph"] = n.graph
    elif t in ("event_record", "event_wait"):
        out["event"] = n.event
    elif t == "mem_alloc":
        out["region"] = n.region
    elif t == "mem_free":
        out["ptr"] = _ref_out(n.ptr)
    elif t == "host":
        out["callback"] = n.callback
    return out


def _graph_out(g: Graph, add_blob, layouts) -> dict:
    return {"name": g.name, "top_level": g.top_level,
            "nodes": [_node_out(n, layouts) for n in g.nodes],
            "edges": [[e.src, e.dst, e.from_port, e.to_port, e.type] for e in g.edges],
            "checks": [[rid, add_blob(data)] for rid, data in sorted(g.checks.items())]}


def _toposort(g: Graph, where: str) -> list:
    """Kahn's algorithm over node indices; raises FormatError on a cycle."""
    index = {n.id: i for i, n in enumerate(g.nodes)}
    indegree = [0] * len(g.nodes)
    succ: list = [[] for _ in g.nodes]
    for e in g.edges:
        succ[index[e.src]].append(index[e.dst])
        indegree[index[e.dst]] += 1
    import heapq
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


# ---- validation ---------------------------------------------------------------------------

_IDENT_MAX = 4096          # longest name / string field accepted
_KEYSETS: dict = {}        # (required, optional) -> (required set, allowed set)
_DIM_MAX = (1 << 31) - 1


class _Validator:
    """Checks a manifest dict field by field, naming the exact place of any problem."""

    def __init__(self, path: str, blob_sizes: list, blob_getter, unpack: bool = True):
        self.path = path
        self.unpack = unpack
        self.blob_sizes = blob_sizes
        self.blob_getter = blob_getter
        self.used_blobs: set = set()

    # primitive checks -------------------------------------------------------------------
    def fail(self, where: str, msg: str):
        raise FormatError(f"manifest {where}: {msg}", path=self.path or None)

    def map(self, v, where, required=(), optional=()) -> dict:
        if type(v) is not dict:
            self.fail(where, f"expected a map, found {type(v).__name__}")
        key = (required, optional)
        sets = _KEYSETS.get(key)
        if sets is None:
            sets = _KEYSETS[key] = (frozenset(required), frozenset(required) | frozenset(optional))
        keys = v.keys()
        if sets[0] <= keys and keys <= sets[1]:
            return v            # the common case, checked with two set operations
        missing = [k for k in required if k not in v]
        if missing:
            self.fail(where, f"missing field(s) {', '.join(missing)}")
        extra = [k for k in v if k not in sets[1]]
        self.fail(where, f"unknown field(s) {', '.join(map(str, extra))}")

    def int(self, v, where, lo=0, hi=U64) -> int:
        if type(v) is int and lo <= v <= hi:
            return v
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(where, f"expected an integer, found {type(v).__name__}")
        self.fail(where, f"{v} is out of range [{lo}, {hi}]")

    def str(self, v, where, choices=None) -> str:
        if not isinstance(v, str) or len(v) > _IDENT_MAX:
            self.fail(where, "expected a string" if not isinstance(v, str) else "string too long")
        if choices is not None and v not in choices:
            self.fail(where, f"{v!r} is not one of {', '.join(sorted(choices))}")
        return v

    def opt_str(self, v, where) -> Optional[str]:
        return None if v is None else self.str(v, where)

    def bool(self, v, where) -> bool:
        if not isinstance(v, bool):
            self.fail(where, "expected a boolean")
        return v

    def list(self, v, where, max_len=1 << 24) -> list:
        if not isinstance(v, list):
            self.fail(where, f"expected a list, found {type(v).__name__}")
        if len(v) > max_len:
            self.fail(where, f"list of {len(v)} entries is too long")
        return v

    def bytes(self, v, where) -> bytes:
        if not isinstance(v, (bytes, bytearray)):
            self.fail(where, f"expected bytes, found {type(v).__name__}")
        return bytes(v)

    def hash(self, v, where) -> str:
        if not is_hash(v):
            self.fail(where, "expected a 32-digit hex content hash")
        return v

    def dims(self, v, where, lo=1) -> tuple:
        if type(v) is list and len(v) == 3:           # the common case, checked inline
            x, y, z = v
            if type(x) is int and type(y) is int and type(z) is int and \
                    lo <= x <= _DIM_MAX and lo <= y <= _DIM_MAX and lo <= z <= _DIM_MAX:
                return (x, y, z)
        v = self.list(v, where, 3)
        if len(v) != 3:
            self.fail(where, "expected 3 dimensions")
        return tuple(self.int(x, f"{where}[{i}]", lo, _DIM_MAX) for i, x in enumerate(v))

    def plain(self, v, where, depth=0):
        """Free-form metadata: str keys, scalar / list / map values, bounded nesting."""
        if depth > 8:
            self.fail(where, "nested too deeply")
        if isinstance(v, dict):
            for k, x in v.items():
                self.str(k, where)
                self.plain(x, f"{where}.{k}", depth + 1)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                self.plain(x, f"{where}[{i}]", depth + 1)
        elif not (v is None or isinstance(v, (bool, int, float, str, bytes))):
            self.fail(where, f"unsupported value of type {type(v).__name__}")
        return v

    def free_map(self, v, where) -> dict:
        """A map whose keys are not fixed (metadata, attributes): str keys, plain values."""
        if not isinstance(v, dict):
            self.fail(where, f"expected a map, found {type(v).__name__}")
        return self.plain(v, where)

    def blob(self, v, where, size: Optional[int] = None) -> int:
        i = self.int(v, where, 0, len(self.blob_sizes) - 1 if self.blob_sizes else -1)
        if i in self.used_blobs:
            self.fail(where, f"blob {i} is used twice")
        self.used_blobs.add(i)
        if size is not None and self.blob_sizes[i] != size:
            self.fail(where, f"blob {i} holds {self.blob_sizes[i]} bytes, expected {size}")
        return i

    # the snapshot -----------------------------------------------------------------------
    def snapshot(self, m) -> Snapshot:
        m = self.map(m, "", ("schema", "device", "versions", "meta", "events", "regions",
                             "images", "kernels", "graphs"))
        schema = self.int(m["schema"], "schema", 0, 1 << 16)
        if schema not in READ_SCHEMAS:
            self.fail("schema", f"manifest schema {schema} is not supported (this cgsnap reads "
                                f"{', '.join(map(str, READ_SCHEMAS))})")
        self.schema = schema
        device = self.free_map(m["device"], "device")
        if "arch" in device:
            self.int(device["arch"], "device.arch", 0, 10_000)
        versions = self.free_map(m["versions"], "versions")
        meta = self.free_map(m["meta"], "meta")
        events = self.int(m["events"], "events", 0, 1 << 20)
        self.regions: list = []
        for i, r in enumerate(self.list(m["regions"], "regions")):
            self.regions.append(self.region(r, f"regions[{i}]", i))
        regions = self.regions
        images = [self.image(im, f"images[{i}]")
                  for i, im in enumerate(self.list(m["images"], "images"))]
        hashes = {im.hash for im in images}
        if len(hashes) != len(images):
            self.fail("images", "duplicate image hash")
        for r in regions:
            if r.image is not None and r.image not in hashes:
                self.fail(f"regions[{r.id}].image", f"unknown image {r.image}")
        self.names_unique(regions)
        kernels = [self.kernel(k, f"kernels[{i}]", i, hashes)
                   for i, k in enumerate(self.list(m["kernels"], "kernels"))]
        raw_graphs = self.list(m["graphs"], "graphs")
        graph_names = []
        for i, g in enumerate(raw_graphs):
            self.map(g, f"graphs[{i}]", ("name", "top_level", "nodes", "edges", "checks"))
            graph_names.append(self.str(g["name"], f"graphs[{i}].name"))
        if len(set(graph_names)) != len(graph_names):
            self.fail("graphs", "duplicate graph name")
        ctx = _GraphContext(regions, kernels, events, set(graph_names))
        graphs = [self.graph(g, f"graphs[{i}]", ctx) for i, g in enumerate(raw_graphs)]
        self.child_graphs_acyclic(graphs)
        return Snapshot(graphs=graphs, regions=regions, images=images, kernels=kernels,
                        events=events, device=device, versions=versions, meta=meta)

    def names_unique(self, regions):
        seen = set()
        for r in regions:
            if r.name is not None:
                if r.name in seen:
                    self.fail(f"regions[{r.id}].name", f"duplicate region name {r.name!r}")
                seen.add(r.name)

    def region(self, r, where, index) -> Region:
        r = self.map(r, where, ("id", "kind", "size", "policy", "alignment"),
                     ("name", "dtype", "shape", "content_hash", "image", "symbol", "pool",
                      "blob", "parent", "parent_offset"))
        if self.int(r["id"], f"{where}.id") != index:
            self.fail(f"{where}.id", f"region ids must be 0..n-1 in order (found {r['id']})")
        kind = RegionKind(self.str(r["kind"], f"{where}.kind", {k.value for k in RegionKind}))
        policy = Policy(self.str(r["policy"], f"{where}.policy", {p.value for p in Policy}))
        size = self.int(r["size"], f"{where}.size", 0, 1 << 48)
        alignment = self.int(r["alignment"], f"{where}.alignment", 1, 1 << 30)
        if alignment & (alignment - 1):
            self.fail(f"{where}.alignment", "must be a power of two")
        shape = None
        if "shape" in r:
            shape = tuple(self.int(x, f"{where}.shape[{i}]", 0, 1 << 48)
                          for i, x in enumerate(self.list(r["shape"], f"{where}.shape", 64)))
        content_hash = (self.hash(r["content_hash"], f"{where}.content_hash")
                        if "content_hash" in r else None)
        if policy is Policy.SAVED:
            if "blob" not in r:
                self.fail(where, "a saved region needs a blob")
            self.blob(r["blob"], f"{where}.blob", size)
        elif "blob" in r:
            self.fail(f"{where}.blob", f"a {policy.value} region carries no contents")
        if kind is RegionKind.MODULE_GLOBAL and ("image" not in r or "symbol" not in r):
            self.fail(where, "a module_global region needs image and symbol")
        region = Region(id=index, kind=kind, size=size, policy=policy,
                        name=self.opt_str(r.get("name"), f"{where}.name"),
                        dtype=self.opt_str(r.get("dtype"), f"{where}.dtype"), shape=shape,
                        content_hash=content_hash, alignment=alignment,
                        image=self.hash(r["image"], f"{where}.image") if "image" in r else None,
                        symbol=self.opt_str(r.get("symbol"), f"{where}.symbol"),
                        pool=self.opt_str(r.get("pool"), f"{where}.pool"))
        region.data = r.get("blob")          # blob index; the loader reads it lazily
        if "parent" in r:
            # Parents come first (ids are in order), so the parent is already validated.
            region.parent = self.int(r["parent"], f"{where}.parent", 0, index - 1)
            region.parent_offset = self.int(r.get("parent_offset"), f"{where}.parent_offset")
            parent = self.regions[region.parent]
            if parent.kind is not RegionKind.ALLOCATION or parent.parent is not None:
                self.fail(f"{where}.parent", "a parent must be an allocation without a parent")
            if region.parent_offset + size > parent.size:
                self.fail(f"{where}.parent_offset", f"{size} bytes at offset "
                          f"{region.parent_offset} overrun parent region {region.parent}")
            if policy is Policy.BOUND:
                self.fail(f"{where}.parent", "a bound region is the caller's memory, not a view")
        elif "parent_offset" in r:
            self.fail(f"{where}.parent_offset", "given without a parent")
        return region

    def image(self, im, where) -> KernelImage:
        im = self.map(im, where, ("hash", "kind", "arch", "names", "source", "blob"))
        names = tuple(self.str(n, f"{where}.names[{i}]")
                      for i, n in enumerate(self.list(im["names"], f"{where}.names")))
        blob = self.blob(im["blob"], f"{where}.blob")
        image = KernelImage(hash=self.hash(im["hash"], f"{where}.hash"),
                            kind=self.str(im["kind"], f"{where}.kind", {"cubin", "fatbin", "ptx"}),
                            arch=self.int(im["arch"], f"{where}.arch", 0, 10_000), names=names,
                            source=self.str(im["source"], f"{where}.source"))
        image.data = self.blob_getter(blob) if self.blob_getter else blob
        return image

    def kernel(self, k, where, index, hashes) -> Kernel:
        k = self.map(k, where, ("id", "name", "image", "params", "attrs"), ("ptx_image",))
        if self.int(k["id"], f"{where}.id") != index:
            self.fail(f"{where}.id", f"kernel ids must be 0..n-1 in order (found {k['id']})")
        image = self.hash(k["image"], f"{where}.image")
        if image not in hashes:
            self.fail(f"{where}.image", f"unknown image {image}")
        ptx = k.get("ptx_image")
        if ptx is not None and self.hash(ptx, f"{where}.ptx_image") not in hashes:
            self.fail(f"{where}.ptx_image", f"unknown image {ptx}")
        params = []
        end = 0
        for i, p in enumerate(self.list(k["params"], f"{where}.params", 4096)):
            p = self.list(p, f"{where}.params[{i}]", 2)
            if len(p) != 2:
                self.fail(f"{where}.params[{i}]", "expected [offset, size]")
            off = self.int(p[0], f"{where}.params[{i}][0]", 0, 1 << 20)
            size = self.int(p[1], f"{where}.params[{i}][1]", 0, 1 << 20)
            if off < end:
                self.fail(f"{where}.params[{i}]", "parameters overlap or are out of order")
            end = off + size
            params.append((off, size))
        attrs = self.free_map(k["attrs"], f"{where}.attrs")
        for name, value in attrs.items():
            self.int(value, f"{where}.attrs.{name}", -(1 << 31), (1 << 31) - 1)
        return Kernel(id=index, name=self.str(k["name"], f"{where}.name"), image=image,
                      params=tuple(params), attrs=dict(attrs), ptx_image=ptx)

    def ref_problem(self, where, off, rid, roff, last, size, ctx):
        """Raise the precise error for a pointer entry the fast check refused."""
        self.int(off, f"{where}[0]", 0, max(size - 8, 0))
        if off % 8 or off < last + 8 or size < 8:
            self.fail(where, "pointer offsets must be 8-aligned, increasing and inside the "
                             "argument")
        self.ref([rid, roff], where, ctx)
        self.fail(where, "invalid pointer entry")

    def ref(self, v, where, ctx) -> Ref:
        v = self.list(v, where, 2)
        if len(v) != 2:
            self.fail(where, "expected [region, offset]")
        region = self.int(v[0], f"{where}[0]", 0, len(ctx.regions) - 1)
        # One past the end is a valid pointer value (end iterators, empty tensors).
        offset = self.int(v[1], f"{where}[1]", 0, ctx.regions[region].size)
        return Ref(region, offset)

    def graph(self, g, where, ctx) -> Graph:
        ctx.packed = []
        nodes = []
        fast = self._kernel_node_fast if self.schema >= 2 else None
        for i, n in enumerate(self.list(g["nodes"], f"{where}.nodes")):
            node = fast(n, ctx, where, i) if fast is not None else None
            nodes.append(node if node is not None else self.node(n, f"{where}.nodes[{i}]", ctx))
        if ctx.packed:
            self.packed_refs(ctx)
            if self.unpack:
                for node, _ in ctx.packed:
                    node.args = unpack_args(*node.packed, ctx.kernels[node.kernel].params)
        ids = {n.id for n in nodes}
        if len(ids) != len(nodes):
            self.fail(f"{where}.nodes", "duplicate node id")
        edges = []
        for i, e in enumerate(self.list(g["edges"], f"{where}.edges")):
            if type(e) is list and len(e) == 5:       # the common case, checked inline
                src, dst, a, b, c = e
                if type(src) is int and type(dst) is int and src in ids and dst in ids and \
                        src != dst and type(a) is int and type(b) is int and type(c) is int and \
                        0 <= a <= 255 and 0 <= b <= 255 and 0 <= c <= 255:
                    edges.append(Edge(src, dst, a, b, c))
                    continue
            e = self.list(e, f"{where}.edges[{i}]", 5)
            if len(e) != 5:
                self.fail(f"{where}.edges[{i}]", "expected [src, dst, from_port, to_port, type]")
            src, dst = (self.int(x, f"{where}.edges[{i}]") for x in e[:2])
            if src not in ids or dst not in ids or src == dst:
                self.fail(f"{where}.edges[{i}]", f"edge {src}->{dst} names no pair of nodes")
            edges.append(Edge(src, dst, *(self.int(x, f"{where}.edges[{i}]", 0, 255)
                                          for x in e[2:])))
        checks = {}
        for i, c in enumerate(self.list(g["checks"], f"{where}.checks")):
            c = self.list(c, f"{where}.checks[{i}]", 2)
            if len(c) != 2:
                self.fail(f"{where}.checks[{i}]", "expected [region, blob]")
            rid = self.int(c[0], f"{where}.checks[{i}][0]", 0, len(ctx.regions) - 1)
            if rid in checks:
                self.fail(f"{where}.checks[{i}]", f"region {rid} checked twice")
            checks[rid] = self.blob(c[1], f"{where}.checks[{i}][1]", ctx.regions[rid].size)
        graph = Graph(name=g["name"], nodes=nodes, edges=edges,
                      top_level=self.bool(g["top_level"], f"{where}.top_level"), checks=checks)
        graph._order = (graph.nodes, graph.edges, _toposort(graph, f"manifest {where}"))
        return graph

    def node(self, n, where, ctx):
        if not isinstance(n, dict):
            self.fail(where, "expected a map")
        t = self.str(n.get("t"), f"{where}.t", set(NODE_TYPES))
        spec = _KERNEL_FIELDS_V1 if t == "kernel" and self.schema == 1 else _NODE_FIELDS[t]
        self.map(n, where, ("id", "t") + spec[0], spec[1])
        nid = self.int(n["id"], f"{where}.id", 0, 1 << 32)
        if t == "kernel":
            return self.kernel_node(n, where, nid, ctx)
        if t == "memcpy":
            geo = {k: self.int(n[k], f"{where}.{k}", 0, 1 << 48)
                   for k in ("width", "height", "depth", "src_pitch", "src_height", "dst_pitch",
                             "dst_height")}
            node = MemcpyNode(nid, self.ref(n["src"], f"{where}.src", ctx),
                              self.ref(n["dst"], f"{where}.dst", ctx), **geo)
            self.span_fits(ctx, node.src, _span(node.width, node.height, node.depth,
                                                node.src_pitch, node.src_height), f"{where}.src")
            self.span_fits(ctx, node.dst, _span(node.width, node.height, node.depth,
                                                node.dst_pitch, node.dst_height), f"{where}.dst")
            return node
        if t == "memset":
            node = MemsetNode(nid, self.ref(n["dst"], f"{where}.dst", ctx),
                              self.int(n["value"], f"{where}.value", 0, (1 << 32) - 1),
                              self.int(n["element_size"], f"{where}.element_size", 1, 4),
                              self.int(n["width"], f"{where}.width", 0, 1 << 48),
                              self.int(n["height"], f"{where}.height", 0, 1 << 48),
                              self.int(n["pitch"], f"{where}.pitch", 0, 1 << 48))
            if node.element_size not in (1, 2, 4):
                self.fail(f"{where}.element_size", "must be 1, 2 or 4")
            row = node.width * node.element_size
            self.span_fits(ctx, node.dst, _span(row, node.height, 1, node.pitch or row, 0),
                           f"{where}.dst")
            return node
        if t == "empty":
            return EmptyNode(nid)
        if t == "graph":
            name = self.str(n["graph"], f"{where}.graph")
            if name not in ctx.graph_names:
                self.fail(f"{where}.graph", f"unknown graph {name!r}")
            return ChildGraphNode(nid, name)
        if t in ("event_record", "event_wait"):
            ev = self.int(n["event"], f"{where}.event", 0, ctx.events - 1)
            return (EventRecordNode if t == "event_record" else EventWaitNode)(nid, ev)
        if t == "mem_alloc":
            rid = self.int(n["region"], f"{where}.region", 0, len(ctx.regions) - 1)
            if ctx.regions[rid].kind is not RegionKind.GRAPH_ALLOC:
                self.fail(f"{where}.region", "a mem_alloc node must create a graph_alloc region")
            return MemAllocNode(nid, rid)
        if t == "mem_free":
            return MemFreeNode(nid, self.ref(n["ptr"], f"{where}.ptr", ctx))
        return HostNode(nid, self.str(n["callback"], f"{where}.callback"))

    def _kernel_node_fast(self, n, ctx, graph_where: str, index: int) -> Optional[KernelNode]:
        """The common kernel node (schema 2) with every check inline and no message built; None
        sends the node to :meth:`node`, whose checks name any problem exactly. Accepts exactly
        what :meth:`kernel_node` accepts, minus attributes other than ``cluster_dim``."""
        if type(n) is not dict or n.get("t") != "kernel":
            return None
        keys = n.keys()
        if not (_KERNEL_REQUIRED <= keys and keys <= _KERNEL_ALLOWED):
            return None
        nid, kid, smem, params, refs = n["id"], n["kernel"], n["smem"], n["params"], n["refs"]
        if type(nid) is not int or not 0 <= nid <= 1 << 32 or type(kid) is not int or \
                not 0 <= kid < len(ctx.kernels) or type(smem) is not int or \
                not 0 <= smem <= 1 << 24:
            return None
        if type(params) is not bytes or len(params) != ctx.buffer_sizes[kid] or \
                type(refs) is not bytes or len(refs) % 24 or len(refs) // 24 > len(params) // 8:
            return None
        grid, block = _dims3(n["grid"]), _dims3(n["block"])
        if grid is None or block is None:
            return None
        raw = n.get("attrs", _ABSENT)
        if raw is _ABSENT or (type(raw) is dict and not raw):
            attrs = {}
        elif type(raw) is dict and len(raw) == 1 and "cluster_dim" in raw:
            cluster = _dims3(raw["cluster_dim"])
            if cluster is None:
                return None
            attrs = {"cluster_dim": cluster}
        else:
            return None
        node = KernelNode(nid, kid, grid, block, smem, None, attrs, (params, refs))
        ctx.packed.append((node, (graph_where, index)))
        return node

    def kernel_node(self, n, where, nid, ctx) -> KernelNode:
        kid = self.int(n["kernel"], f"{where}.kernel", 0, len(ctx.kernels) - 1)
        kernel = ctx.kernels[kid]
        if self.schema == 1:
            args, packed = self.kernel_args_v1(n, where, kernel, ctx), None
        else:
            params, refs = n["params"], n["refs"]
            if type(params) is not bytes or len(params) != ctx.buffer_sizes[kid]:
                params = self.bytes(params, f"{where}.params")
                self.fail(f"{where}.params", f"{len(params)} bytes, kernel {kernel.name} takes "
                                             f"{ctx.buffer_sizes[kid]}")
            if type(refs) is not bytes or len(refs) % 24 or len(refs) // 24 > len(params) // 8:
                refs = self.bytes(refs, f"{where}.refs")
                self.fail(f"{where}.refs", f"{len(refs)} bytes: expected up to one 24-byte entry "
                                           "per 8 bytes of parameters")
            args, packed = None, (params, refs)
        attrs = {}
        raw_attrs = n.get("attrs", {})
        self.map(raw_attrs, f"{where}.attrs", optional=("cluster_dim", "priority", "cooperative"))
        if "cluster_dim" in raw_attrs:
            attrs["cluster_dim"] = self.dims(raw_attrs["cluster_dim"], f"{where}.attrs.cluster_dim")
        for key in ("priority", "cooperative"):
            if key in raw_attrs:
                attrs[key] = self.int(raw_attrs[key], f"{where}.attrs.{key}", -(1 << 31),
                                      (1 << 31) - 1)
        node = KernelNode(nid, kid, self.dims(n["grid"], f"{where}.grid"),
                          self.dims(n["block"], f"{where}.block"),
                          self.int(n["smem"], f"{where}.smem", 0, 1 << 24), args, attrs, packed)
        if packed is not None:
            ctx.packed.append((node, where))
        return node

    def packed_refs(self, ctx) -> None:
        """Check the pointer tables of one graph's packed kernel nodes in one vectorised pass:
        each entry 8-aligned, inside one argument of its kernel, increasing within its node,
        naming an existing region and an offset inside it (one past the end allowed)."""
        items = ctx.packed
        table = np.frombuffer(b"".join(node.packed[1] for node, _ in items), dtype=_REF)
        if not len(table):
            return
        counts = [len(node.packed[1]) // 24 for node, _ in items]
        owner = np.repeat(np.arange(len(items)), counts)
        kid = np.array([node.kernel for node, _ in items], dtype=np.uint64)[owner]
        pos, region, offset = table["pos"], table["region"], table["offset"]
        ok = (pos & np.uint64(7)) == 0
        ok[1:] &= (owner[1:] != owner[:-1]) | (pos[1:] > pos[:-1])
        ok &= region < np.uint64(len(ctx.region_sizes))
        sizes = np.array(ctx.region_sizes, dtype=np.uint64)
        ok &= offset <= sizes[np.minimum(region, np.uint64(max(len(sizes) - 1, 0)))] \
            if len(sizes) else False
        # Inside an argument: the last argument starting at or before pos must reach pos + 8.
        starts, ends, arg_kid = ctx.arg_table
        key = (kid << np.uint64(32)) | np.minimum(pos, np.uint64(0xFFFFFFFF))
        at = np.searchsorted(starts, key, side="right") - 1
        safe = np.maximum(at, 0)
        ok &= (at >= 0) & (arg_kid[safe] == kid) & (pos <= np.uint64(0xFFFFFFF0))
        ok &= (pos & np.uint64(0xFFFFFFFF)) + np.uint64(8) <= ends[safe]
        if ok.all():
            return
        bad = int(np.argmin(ok))
        node, where = items[owner[bad]]
        if type(where) is tuple:          # (graph's where, node index): built only for errors
            where = f"{where[0]}.nodes[{where[1]}]"
        j = bad - int(np.searchsorted(owner, owner[bad]))
        p, r, o = (int(x) for x in table[bad].tolist())
        w = f"{where}.refs[{j}]"
        if p % 8 or (j and p <= int(pos[bad - 1])):
            self.fail(w, "pointer positions must be 8-aligned and increasing")
        if r >= len(ctx.region_sizes):
            self.fail(w, f"region {r} does not exist ({len(ctx.region_sizes)} regions)")
        if o > ctx.region_sizes[r]:
            self.fail(w, f"offset {o} is beyond the end of region {r} "
                         f"({ctx.region_sizes[r]} bytes)")
        self.fail(w, f"position {p} is not an 8-byte word inside one argument of "
                     f"kernel {ctx.kernels[node.kernel].name}")

    def kernel_args_v1(self, n, where, kernel, ctx) -> tuple:
        raw_args = self.list(n["args"], f"{where}.args", 4096)
        if len(raw_args) != len(kernel.params):
            self.fail(f"{where}.args", f"{len(raw_args)} arguments, kernel {kernel.name} takes "
                                       f"{len(kernel.params)}")
        args = []
        sizes = ctx.region_sizes
        nregions = len(sizes)
        for i, (a, (_, size)) in enumerate(zip(raw_args, kernel.params)):
            # The fast path: every check inline, no per-entry calls (a captured graph has
            # thousands of arguments); anything it refuses goes to the slow path, which names
            # the exact problem.
            if type(a) is dict and len(a) == 2 and type(a.get("d")) is bytes and \
                    len(a["d"]) == size and type(a.get("r")) is list:
                data, raw_refs = a["d"], a["r"]
            else:
                aw = f"{where}.args[{i}]"
                a = self.map(a, aw, ("d", "r"))
                data = self.bytes(a["d"], f"{aw}.d")
                if len(data) != size:
                    self.fail(f"{aw}.d", f"{len(data)} bytes, the parameter has {size}")
                raw_refs = self.list(a["r"], f"{aw}.r", size // 8 + 1)
            if not raw_refs:
                args.append(Arg(data, ()))
                continue
            refs = []
            last = -8
            for r in raw_refs:
                if type(r) is list and len(r) == 3:
                    off, rid, roff = r
                    if type(off) is int and type(rid) is int and type(roff) is int and \
                            last + 8 <= off <= size - 8 and not off & 7 and \
                            0 <= rid < nregions and 0 <= roff <= sizes[rid]:
                        last = off
                        refs.append((off, Ref(rid, roff)))
                        continue
                j = len(refs)
                rw = f"{where}.args[{i}].r[{j}]"
                if len(self.list(r, rw, 3)) != 3:
                    self.fail(rw, "expected [offset, region, offset]")
                self.ref_problem(rw, r[0], r[1], r[2], last, size, ctx)
            args.append(Arg(data, tuple(refs)))
        return tuple(args)

    def span_fits(self, ctx, ref: Ref, span: int, where):
        if ref.offset + span > ctx.regions[ref.region].size:
            self.fail(where, f"{span} bytes at offset {ref.offset} overrun region {ref.region} "
                             f"of {ctx.regions[ref.region].size} bytes")

    def child_graphs_acyclic(self, graphs):
        children = {g.name: [n.graph for n in g.nodes if n.TYPE == "graph"] for g in graphs}
        state: dict = {}

        def visit(name, depth=0):
            if state.get(name) == 1 or depth > 64:
                self.fail("graphs", f"child graph {name!r} contains itself or nests too deeply")
            if state.get(name) == 2:
                return
            state[name] = 1
            for c in children[name]:
                visit(c, depth + 1)
            state[name] = 2

        for name in children:
            visit(name)


@dataclass
class _GraphContext:
    regions: list
    kernels: list
    events: int
    graph_names: set

    def __post_init__(self):
        self.region_sizes = [r.size for r in self.regions]
        self.buffer_sizes = [param_buffer_size(k.params) for k in self.kernels]
        # Every kernel argument as a sorted key (kernel << 32 | start) with its end: where a
        # pointer table entry may lie (see _Validator.packed_refs).
        rows = sorted((k.id << 32 | off, off + size, k.id)
                      for k in self.kernels for off, size in k.params)
        self.arg_table = tuple(np.array([r[i] for r in rows], dtype=np.uint64) for i in range(3))
        self.packed: list = []


def _dims3(v) -> Optional[tuple]:
    """``(x, y, z)`` of a well-formed dims list, else None (the caller takes the strict path)."""
    if type(v) is list and len(v) == 3:
        x, y, z = v
        if type(x) is int and type(y) is int and type(z) is int and \
                1 <= x <= _DIM_MAX and 1 <= y <= _DIM_MAX and 1 <= z <= _DIM_MAX:
            return (x, y, z)
    return None


_ABSENT = object()

_NODE_FIELDS = {   # type -> (required fields, optional fields), besides id and t
    "kernel": (("kernel", "grid", "block", "smem", "params", "refs"), ("attrs",)),
    "memcpy": (("src", "dst", "width", "height", "depth", "src_pitch", "src_height", "dst_pitch",
                "dst_height"), ()),
    "memset": (("dst", "value", "element_size", "width", "height", "pitch"), ()),
    "empty": ((), ()),
    "graph": (("graph",), ()),
    "event_record": (("event",), ()),
    "event_wait": (("event",), ()),
    "mem_alloc": (("region",), ()),
    "mem_free": (("ptr",), ()),
    "host": (("callback",), ()),
}
_KERNEL_REQUIRED = frozenset(("id", "t") + _NODE_FIELDS["kernel"][0])
_KERNEL_ALLOWED = _KERNEL_REQUIRED | frozenset(_NODE_FIELDS["kernel"][1])


_KERNEL_FIELDS_V1 = (("kernel", "grid", "block", "smem", "args"), ("attrs",))


def _span(width: int, height: int, depth: int, pitch: int, slice_height: int) -> int:
    """Bytes from the first to one past the last byte a pitched box touches."""
    if width == 0 or height == 0 or depth == 0:
        return 0
    pitch = pitch or width
    slice_height = slice_height or height
    return (depth - 1) * pitch * slice_height + (height - 1) * pitch + width
