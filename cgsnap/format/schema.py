"""Validation of a manifest: every type, range and cross reference, with errors that name the
place (``manifest graphs[0].nodes[3].refs[2]: ...``).

The snapshot-level structure (regions, images, kernels, graphs, edges) is checked here; each
node type checks its own fields (``parse`` in :mod:`cgsnap.format.nodes`). Kernel nodes, the
bulk of every graph, take a fast path (``KernelNode.parse_fast``) that accepts exactly what the
strict path accepts and sends anything else to it, and their pointer tables are checked per
graph in one vectorised pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import FormatError
from .hashing import is_hash
from .model import (ARRAY_DIM_MAX, ARRAY_FLAGS, ARRAY_FORMATS, DTYPE_ITEMSIZE, READ_SCHEMAS,
                    REGION_REF_DTYPE, U64, ArrayDesc, Edge, Extent, Graph, Kernel, KernelImage,
                    Policy, Ref, Region, RegionKind, RngState, Snapshot, toposort, view_span)
from .nodes import (DIM_MAX, FIELDS_SINCE, NODE_TYPES, NODE_TYPES_SINCE, ConditionalNode,
                    KernelNode, param_buffer_size)
from .tables import (KernelTable, first_duplicate_edge, parse_edges, topological_positions,
                     toposort_arrays)
from .trace import parse_trace

_IDENT_MAX = 4096          # longest name / string field accepted
_REGION_REQUIRED = ("id", "kind", "size", "policy", "alignment")
_REGION_OPTIONAL = ("name", "dtype", "shape", "content_hash", "image", "symbol", "pool", "blob",
                    "parent", "parent_offset")
# Schema 3: pointers stored in the contents, strided views, sparse contents, CUDA arrays.
_REGION_OPTIONAL_3 = _REGION_OPTIONAL + ("refs", "strides", "view_offset", "extents", "array")
_STRIDE_MAX = 1 << 48
_KEYSETS: dict = {}        # (required, optional) -> (required set, allowed set)
# A region's kind and policy by their stored value (looked up once per file, not per region).
_KINDS = {k.value: k for k in RegionKind}
_POLICIES = {p.value: p for p in Policy}


class Validator:
    """Checks a manifest dict field by field, naming the exact place of any problem."""

    def __init__(self, path: str, blob_sizes: list, blob_getter):
        self.path = path
        self.blob_sizes = blob_sizes
        self.blob_getter = blob_getter
        self.used_blobs: dict = {}        # blob index -> "image" | "contents"
        self.schema = 0

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
                    lo <= x <= DIM_MAX and lo <= y <= DIM_MAX and lo <= z <= DIM_MAX:
                return (x, y, z)
        v = self.list(v, where, 3)
        if len(v) != 3:
            self.fail(where, "expected 3 dimensions")
        return tuple(self.int(x, f"{where}[{i}]", lo, DIM_MAX) for i, x in enumerate(v))

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

    def blob(self, v, where, size: Optional[int] = None, use: str = "contents") -> int:
        """A blob index. From schema 3 on, region contents, extents and checks may share a
        blob (identical bytes stored once; the sizes checked here make every use exact); an
        image's blob is its own. Before schema 3 every blob had one use."""
        i = self.int(v, where, 0, len(self.blob_sizes) - 1 if self.blob_sizes else -1)
        before = self.used_blobs.get(i)
        if before is not None and (self.schema < 3 or use == "image" or before == "image"):
            self.fail(where, f"blob {i} is used twice")
        self.used_blobs[i] = use
        if size is not None and self.blob_sizes[i] != size:
            self.fail(where, f"blob {i} holds {self.blob_sizes[i]} bytes, expected {size}")
        return i

    def extents(self, v, where, region_size: int) -> list:
        """A region's sparse contents (schema 3): ``[[offset, length, blob], ...]``, sorted,
        non-overlapping (adjacent allowed), each at least one byte and inside the region, each
        blob holding exactly its length."""
        out = []
        end = 0
        for j, e in enumerate(self.list(v, where)):
            ew = f"{where}[{j}]"
            if type(e) is not list or len(e) != 3:
                self.fail(ew, "expected [offset, length, blob]")
            offset = self.int(e[0], f"{ew}[0]", 0, region_size)
            length = self.int(e[1], f"{ew}[1]", 1, region_size)
            if offset < end:
                self.fail(ew, f"starts at {offset}, inside the previous extent (ends at {end}): "
                              "extents must be sorted and must not overlap")
            if offset + length > region_size:
                self.fail(ew, f"{length} bytes at offset {offset} overrun the region "
                              f"({region_size} bytes)")
            end = offset + length
            out.append(Extent(offset, length, self.blob(e[2], f"{ew}[2]", length)))
        return out

    def all_blobs_used(self) -> None:
        """Schema 3: every blob is some field's (a file holds no dead bytes)."""
        if self.schema >= 3 and len(self.used_blobs) != len(self.blob_sizes):
            unused = next(i for i in range(len(self.blob_sizes)) if i not in self.used_blobs)
            self.fail("", f"blob {unused} is used by no region, extent, check or image")

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
        self.region_pointer_tables(regions)
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
            self.map(g, f"graphs[{i}]", ("name", "top_level", "nodes", "edges", "checks")
                     + (("kernels",) if self.schema >= 3 else ()), ("rng", "trace"))
            graph_names.append(self.str(g["name"], f"graphs[{i}].name"))
        if len(set(graph_names)) != len(graph_names):
            self.fail("graphs", "duplicate graph name")
        ctx = GraphContext(regions, kernels, events, set(graph_names))
        graphs = [self.graph(g, f"graphs[{i}]", ctx) for i, g in enumerate(raw_graphs)]
        self.child_graphs_acyclic(graphs)
        ConditionalNode.check_snapshot(self, graphs, ctx)
        self.all_blobs_used()
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
        since = FIELDS_SINCE["region.array"]
        if self.schema < since and type(r) is dict and \
                ("array" in r or r.get("kind") == RegionKind.ARRAY.value):
            self.fail(where, f"CUDA array regions need schema {since} (this manifest is schema "
                             f"{self.schema})")
        r = self.map(r, where, _REGION_REQUIRED,
                     _REGION_OPTIONAL_3 if self.schema >= 3 else _REGION_OPTIONAL)
        if self.int(r["id"], f"{where}.id") != index:
            self.fail(f"{where}.id", f"region ids must be 0..n-1 in order (found {r['id']})")
        kind = _KINDS[self.str(r["kind"], f"{where}.kind", _KINDS.keys())]
        policy = _POLICIES[self.str(r["policy"], f"{where}.policy", _POLICIES.keys())]
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
        extents = None
        if "extents" in r:
            if policy is not Policy.SAVED:
                self.fail(f"{where}.extents", f"a {policy.value} region carries no contents")
            if kind not in (RegionKind.ALLOCATION, RegionKind.NAMED):
                self.fail(f"{where}.extents", f"a {kind.value} region is saved whole (extents "
                                              "are for allocation and named regions)")
            if "blob" in r:
                self.fail(where, "a region has a blob or extents, not both")
            extents = self.extents(r["extents"], f"{where}.extents", size)
        elif policy is Policy.SAVED:
            if "blob" not in r:
                self.fail(where, "a saved region needs a blob" +
                          (" or extents" if self.schema >= 3 else ""))
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
        if kind is RegionKind.ARRAY or "array" in r:
            region.array = self.array(r, where, kind, policy, size)
        region.data = r.get("blob")          # blob index; the loader reads it lazily
        region.extents = extents
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
        if "strides" in r or "view_offset" in r:
            self.view(r, where, region)
        if "refs" in r:
            refs = self.bytes(r["refs"], f"{where}.refs")
            if len(refs) % 24 or len(refs) // 24 > size // 8:
                self.fail(f"{where}.refs", f"{len(refs)} bytes: expected up to one 24-byte entry "
                                           f"per 8 bytes of the region's {size}")
            if refs and policy is not Policy.SAVED:
                self.fail(f"{where}.refs", f"a {policy.value} region has no saved contents "
                                           "whose pointers restore could rewrite")
            region.refs = refs
        return region

    def view(self, r, where, region: Region) -> None:
        """A strided view: ``strides`` (elements, one per dimension of ``shape``) and
        ``view_offset`` (elements from the region's start to the view's first element); every
        element must lie inside the region."""
        if "strides" not in r:
            self.fail(f"{where}.view_offset", "given without strides")
        if region.shape is None:
            self.fail(f"{where}.strides", "a strided view needs a shape")
        itemsize = DTYPE_ITEMSIZE.get(region.dtype)
        if itemsize is None:
            self.fail(f"{where}.strides", f"a strided view needs a dtype of known item size "
                                          f"(found {region.dtype!r})")
        raw = self.list(r["strides"], f"{where}.strides", 64)
        if len(raw) != len(region.shape):
            self.fail(f"{where}.strides", f"{len(raw)} strides for {len(region.shape)} "
                                          "dimensions")
        strides = tuple(self.int(x, f"{where}.strides[{i}]", -_STRIDE_MAX, _STRIDE_MAX)
                        for i, x in enumerate(raw))
        offset = self.int(r.get("view_offset", 0), f"{where}.view_offset", 0, _STRIDE_MAX)
        span = view_span(region.shape, strides, offset)
        if span is not None and (span[0] < 0 or (span[1] + 1) * itemsize > region.size):
            self.fail(f"{where}.strides", f"the view's elements {span[0]}..{span[1]} of "
                                          f"{itemsize} bytes do not lie inside the region's "
                                          f"{region.size} bytes")
        region.strides, region.view_offset = strides, offset

    def region_pointer_tables(self, regions) -> None:
        """Each region's stored-pointer table: words increasing, not overlapping, inside the
        region; targets existing regions, offsets inside them (one past the end allowed), and
        no graph_alloc target (its address exists only once its graph is built)."""
        sizes = np.array([r.size for r in regions], dtype=np.uint64)
        late = np.array([r.kind is RegionKind.GRAPH_ALLOC for r in regions], dtype=bool)
        no_address = np.array([r.kind is RegionKind.ARRAY for r in regions], dtype=bool)
        for r in regions:
            if not r.refs:
                continue
            table = np.frombuffer(r.refs, dtype=REGION_REF_DTYPE)
            off, target, toff = table["offset"], table["region"], table["target_offset"]
            ok = off <= np.uint64(max(r.size - 8, 0)) if r.size >= 8 else \
                np.zeros(len(table), dtype=bool)
            ok[1:] &= off[1:] >= off[:-1] + np.uint64(8)
            ok[1:] &= off[1:] > off[:-1]          # no wrap-around of the sum above
            exists = target < np.uint64(len(regions))
            ok &= exists
            safe = np.where(exists, target, 0).astype(np.int64)
            ok &= toff <= sizes[safe]
            ok &= ~late[safe] & ~no_address[safe]
            if ok.all():
                continue
            j = int(np.argmin(ok))
            w = f"regions[{r.id}].refs[{j}]"
            o, t, to = (int(x) for x in table[j].tolist())
            if o + 8 > r.size:
                self.fail(w, f"the word at offset {o} runs past the region's {r.size} bytes")
            if j and o < int(off[j - 1]) + 8:
                self.fail(w, "stored pointer offsets must be increasing, 8 bytes or more apart")
            if t >= len(regions):
                self.fail(w, f"region {t} does not exist ({len(regions)} regions)")
            if to > regions[t].size:
                self.fail(w, f"offset {to} is beyond the end of region {t} "
                             f"({regions[t].size} bytes)")
            if no_address[t]:
                self.fail(w, f"region {t} is a CUDA array, which has no address to point at")
            self.fail(w, f"region {t} is a graph_alloc region: its address is known only once "
                         "its graph is built")

    def array(self, r, where, kind, policy, size) -> ArrayDesc:
        if kind is not RegionKind.ARRAY or "array" not in r:
            self.fail(where, "an array region needs its array descriptor, and only it has one")
        aw = f"{where}.array"
        a = self.map(r["array"], aw, ("format", "channels", "width", "height", "depth", "flags"))
        fmt = self.int(a["format"], f"{aw}.format", 0, 0xFFFF)
        if fmt not in ARRAY_FORMATS:
            self.fail(f"{aw}.format", f"array format {fmt:#x} is not one cgsnap carries")
        channels = self.int(a["channels"], f"{aw}.channels", 1, 4)
        if channels == 3:
            self.fail(f"{aw}.channels", "an array element has 1, 2 or 4 channels")
        dims = [self.int(a[k], f"{aw}.{k}", 0, ARRAY_DIM_MAX) for k in ("width", "height",
                                                                          "depth")]
        if dims[0] == 0 or (dims[2] and not dims[1]):
            self.fail(aw, f"width x height x depth {dims} is not a 1D, 2D or 3D extent")
        flags = self.int(a["flags"], f"{aw}.flags", 0, (1 << 32) - 1)
        if flags & ~ARRAY_FLAGS:
            self.fail(f"{aw}.flags", f"array flags {flags:#x} are not ones cgsnap carries")
        desc = ArrayDesc(fmt, channels, *dims, flags)
        if desc.size != size:
            self.fail(f"{where}.size", f"{size} bytes, the array holds {desc.size}")
        if policy is Policy.BOUND or "parent" in r or "name" in r or "strides" in r or \
                "refs" in r:
            self.fail(where, "an array region is neither bound, named nor a view, and holds no "
                             "stored pointers")
        return desc

    def image(self, im, where) -> KernelImage:
        im = self.map(im, where, ("hash", "kind", "arch", "names", "source", "blob"))
        names = tuple(self.str(n, f"{where}.names[{i}]")
                      for i, n in enumerate(self.list(im["names"], f"{where}.names")))
        blob = self.blob(im["blob"], f"{where}.blob", use="image")
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
        if "cache_config" in attrs:       # a CUfunc_cache: PREFER_NONE..PREFER_EQUAL
            self.int(attrs["cache_config"], f"{where}.attrs.cache_config", 0, 3)
        return Kernel(id=index, name=self.str(k["name"], f"{where}.name"), image=image,
                      params=tuple(params), attrs=dict(attrs), ptx_image=ptx)

    def ref(self, v, where, ctx) -> Ref:
        v = self.list(v, where, 2)
        if len(v) != 2:
            self.fail(where, "expected [region, offset]")
        region = self.int(v[0], f"{where}[0]", 0, len(ctx.regions) - 1)
        # One past the end is a valid pointer value (end iterators, empty tensors).
        offset = self.int(v[1], f"{where}[1]", 0, ctx.regions[region].size)
        return Ref(region, offset)

    def graph(self, g, where, ctx) -> Graph:
        if self.schema >= 3:
            return self.graph_tables(g, where, ctx)
        ctx.tables = []
        ctx.graph_name = g["name"]
        nodes = []
        fast = KernelNode.parse_fast if self.schema >= 2 else None
        for i, n in enumerate(self.list(g["nodes"], f"{where}.nodes")):
            node = fast(n, ctx, where, i) if fast is not None else None
            nodes.append(node if node is not None else self.node(n, f"{where}.nodes[{i}]", ctx))
        if ctx.tables:
            KernelNode.check_tables(self, ctx)
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
        dup = first_duplicate_edge(np.array([[e.src, e.dst, e.from_port, e.to_port, e.type]
                                             for e in edges], dtype=np.int64).reshape(-1, 5))
        if dup is not None:
            self.fail(f"{where}.edges[{dup}]", f"edge {edges[dup].src}->{edges[dup].dst} is "
                                               "given twice")
        checks = self.checks(g["checks"], where, ctx)
        top_level = self.bool(g["top_level"], f"{where}.top_level")
        graph = Graph(name=g["name"], nodes=nodes, edges=edges, top_level=top_level,
                      checks=checks, rng=self.graph_rng(g, where, ctx, top_level))
        graph._order = (graph.nodes, graph.edges, toposort(graph, f"manifest {where}"))
        return self.graph_trace(g, graph, where, ctx)

    def graph_trace(self, g, graph, where, ctx) -> Graph:
        if "trace" in g:
            graph.trace = parse_trace(self, g["trace"], graph, ctx, f"{where}.trace")
        return graph

    def graph_rng(self, g, where, ctx, top_level) -> list:
        return parse_rng(self, g["rng"], f"{where}.rng", ctx, top_level) if "rng" in g else []

    def graph_tables(self, g, where, ctx) -> Graph:
        """A schema-3 graph: kernel nodes and edges as columns (cgsnap.format.tables), every
        other node a map of its own."""
        ctx.graph_name = g["name"]
        ktable = KernelTable.parse(self, g["kernels"], f"{where}.kernels", ctx)
        if ktable.has_handles():
            ctx.handle_users.append((g["name"], f"{where}.kernels", ktable))
        others = []
        for i, n in enumerate(self.list(g["nodes"], f"{where}.nodes")):
            if isinstance(n, dict) and n.get("t") == "kernel":
                self.fail(f"{where}.nodes[{i}]", "kernel nodes belong in the kernel table")
            others.append(self.node(n, f"{where}.nodes[{i}]", ctx))
        ids = np.concatenate([ktable.ids, np.array([n.id for n in others], dtype=np.int64)])
        # The ids sorted once: for the duplicate check, the edges' ends and the node order.
        by_id = np.argsort(ids, kind="stable")
        sorted_ids = ids[by_id]
        if len(ids) > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            self.fail(f"{where}.nodes", "duplicate node id")
        edges = parse_edges(self, g["edges"], f"{where}.edges", ids, sorted_ids)
        # Kept for the restore's plan (Graph.table_order): its topological order is not redone.
        order = topological_positions(ids, edges, by_id)
        if order is None:
            order = toposort_arrays(ids, edges, f"manifest {where}")   # FormatError on a cycle
        top_level = self.bool(g["top_level"], f"{where}.top_level")
        return self.graph_trace(g, Graph.from_tables(g["name"], ktable, others, edges, top_level,
                                                     self.checks(g["checks"], where, ctx),
                                                     self.graph_rng(g, where, ctx, top_level),
                                                     order),
                                where, ctx)

    def checks(self, raw, where, ctx) -> dict:
        checks = {}
        for i, c in enumerate(self.list(raw, f"{where}.checks")):
            c = self.list(c, f"{where}.checks[{i}]", 2)
            if len(c) != 2:
                self.fail(f"{where}.checks[{i}]", "expected [region, blob]")
            rid = self.int(c[0], f"{where}.checks[{i}][0]", 0, len(ctx.regions) - 1)
            if rid in checks:
                self.fail(f"{where}.checks[{i}]", f"region {rid} checked twice")
            checks[rid] = self.blob(c[1], f"{where}.checks[{i}][1]", ctx.regions[rid].size)
        return checks

    def node(self, n, where, ctx):
        if not isinstance(n, dict):
            self.fail(where, "expected a map")
        t = self.str(n.get("t"), f"{where}.t", NODE_TYPES.keys())
        spec = NODE_TYPES[t]
        since = NODE_TYPES_SINCE.get(t, 1)
        if self.schema < since:
            self.fail(f"{where}.t", f"{t} nodes need schema {since} (this manifest is schema "
                                    f"{self.schema})")
        if t == "kernel" and self.schema == 1:
            self.map(n, where, ("id", "t", "kernel", "grid", "block", "smem", "args"), ("attrs",))
        else:
            self.map(n, where, ("id", "t") + spec.REQUIRED, spec.OPTIONAL)
        nid = self.int(n["id"], f"{where}.id", 0, (1 << 32) - 1)
        return spec.parse(self, n, where, ctx, nid)

    def span_fits(self, ctx, ref: Ref, span: int, where):
        if ref.offset + span > ctx.regions[ref.region].size:
            self.fail(where, f"{span} bytes at offset {ref.offset} overrun region {ref.region} "
                             f"of {ctx.regions[ref.region].size} bytes")

    def child_graphs_acyclic(self, graphs):
        # Child graphs and conditional bodies: both are built inside their parent at restore.
        children = {g.name: [n.graph for n in g.other_nodes() if n.TYPE == "graph"] +
                    [b for n in g.other_nodes() if n.TYPE == "conditional" for b in n.bodies]
                    for g in graphs}
        state: dict = {}

        def visit(name, depth=0):
            if state.get(name) == 1 or depth > 64:
                self.fail("graphs", f"child or body graph {name!r} contains itself or nests too "
                                    "deeply")
            if state.get(name) == 2:
                return
            state[name] = 1
            for c in children[name]:
                visit(c, depth + 1)
            state[name] = 2

        for name in children:
            visit(name)


# ---- a graph's RNG state (optional field ``rng``) -------------------------------------------

RNG_MAX = 16                 # entries per graph: one per generator the graph draws from
_I64 = (1 << 63) - 1         # torch keeps the Philox offset as an int64
_RNG_WORD_KINDS = (RegionKind.ALLOCATION, RegionKind.NAMED)


def parse_rng(v: Validator, raw, where: str, ctx, top_level: bool) -> list:
    """The :class:`RngState` list of a graph: two distinct 8-aligned 8-byte words in ordinary
    device memory per entry (written before each launch), offsets and increments multiples of
    4 (torch's rule), one entry per generator, on top-level graphs only (a child graph is never
    launched by itself)."""
    entries = v.list(raw, where, RNG_MAX)
    if entries and not top_level:
        v.fail(where, "only a top-level graph is launched, so only it carries RNG state")
    out, words, generators = [], set(), set()
    for i, e in enumerate(entries):
        w = f"{where}[{i}]"
        e = v.map(e, w, ("seed", "offset", "increment", "generator"))
        refs = {}
        for key in ("seed", "offset"):
            ref = v.ref(e[key], f"{w}.{key}", ctx)
            region = ctx.regions[ref.region]
            if region.kind not in _RNG_WORD_KINDS:
                v.fail(f"{w}.{key}", f"region {ref.region} is a {region.kind.value} region; the "
                                     "word is written before each launch, so it must be an "
                                     "allocation or a named buffer")
            if ref.offset % 8:
                v.fail(f"{w}.{key}", f"offset {ref.offset} is not 8-aligned")
            v.span_fits(ctx, ref, 8, f"{w}.{key}")
            if (ref.region, ref.offset) in words:
                v.fail(f"{w}.{key}", f"the word at region {ref.region} + {ref.offset} is "
                                     "already another RNG word")
            words.add((ref.region, ref.offset))
            refs[key] = ref
        increment = v.int(e["increment"], f"{w}.increment", 0, _I64)
        if increment % 4:
            v.fail(f"{w}.increment", f"{increment} is not a multiple of 4")
        gen = v.map(e["generator"], f"{w}.generator", ("device", "seed", "offset"), ("name",))
        device = v.int(gen["device"], f"{w}.generator.device", 0, 1 << 16)
        name = v.str(gen["name"], f"{w}.generator.name") if "name" in gen else None
        if (device, name) in generators:
            v.fail(f"{w}.generator", "two entries for the same generator")
        generators.add((device, name))
        seed = v.int(gen["seed"], f"{w}.generator.seed")
        offset = v.int(gen["offset"], f"{w}.generator.offset", 0, _I64)
        if offset % 4:
            v.fail(f"{w}.generator.offset", f"{offset} is not a multiple of 4")
        out.append(RngState(seed=refs["seed"], offset=refs["offset"], increment=increment,
                            device=device, saved_seed=seed, saved_offset=offset,
                            generator=name))
    return out


@dataclass
class GraphContext:
    """What node parsers check references against (see :mod:`cgsnap.format.nodes`)."""
    regions: list
    kernels: list
    events: int
    graph_names: set

    def __post_init__(self):
        # Per file, shared by every graph's checks: region sizes and kernel parameter buffer
        # sizes as lists (node parsers) and arrays (the kernel tables' vectorised checks).
        self.region_sizes = [r.size for r in self.regions]
        self.region_size_array = np.array(self.region_sizes, dtype=np.uint64)
        # Regions without a device address (CUDA arrays): no pointer may target one.
        self.no_address = np.array([r.kind is RegionKind.ARRAY for r in self.regions], dtype=bool)
        self.buffer_sizes = [param_buffer_size(k.params) for k in self.kernels]
        self.buffer_size_array = np.array(self.buffer_sizes, dtype=np.int64)
        # Every kernel argument as a sorted key (kernel << 32 | start) with its end: where a
        # pointer table entry may lie (KernelNode.check_tables).
        rows = sorted((k.id << 32 | off, off + size, k.id)
                      for k in self.kernels for off, size in k.params)
        self.arg_table = tuple(np.array([r[i] for r in rows], dtype=np.uint64) for i in range(3))
        # The 8-byte arguments (kernel << 32 | start), sorted: where a conditional handle may lie.
        self.eight_byte_args = np.array(sorted(k.id << 32 | off for k in self.kernels
                                               for off, size in k.params if size == 8),
                                        dtype=np.uint64)
        self.tables: list = []
        # Met while parsing, checked once every graph is read (ConditionalNode.check_snapshot):
        # (node, where, graph name) of conditional nodes, and (graph name, where, kernel table)
        # of the kernel tables with conditional-handle columns.
        self.conditionals: list = []
        self.handle_users: list = []
        self.graph_name = ""
