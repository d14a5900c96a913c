"""One specification per graph node type.

Each node type is one class: its fields (the dataclass), its manifest form (``to_manifest`` /
``parse``), the regions it refers to, renumbering (``remap``), the lines that describe it
(``describe``), and its conversion from and to the *raw* parameters that the driver layer reads
and writes (``from_live`` / ``to_live``; the driver calls themselves are in
:mod:`cgsnap.cuda.graphs`). The validator, capture, restore and the tools dispatch on
:data:`NODE_TYPES`; only what nests graphs (child graphs, conditional bodies) is named where
graphs are walked as a tree. Adding a node type is one class here plus its driver calls.

Raw parameters are plain dicts of ints, the same shape in both directions (see each class).
``from_live(index, raw, rec)`` turns addresses into :class:`Ref` through the recording context
``rec`` (:class:`cgsnap.capture.record.Recording`); ``to_live(ctx)`` turns refs back into this
process's addresses through the restore context ``ctx``.

Kernel nodes are the bulk of every graph and take their own paths in capture (pointer
classification) and restore (a planned, vectorised node loop); their canonical form is the
packed one stored in the file: the whole parameter buffer plus one table of pointer words.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Optional

import numpy as np

from ..errors import UnsupportedNodeError
from .model import Arg, Ref, RegionKind

REF_DTYPE = np.dtype([("pos", "<u8"), ("region", "<u8"), ("offset", "<u8")])

# The schema version from which each node type, and each field added to an older node type or
# region, is read; a manifest of an older schema that carries one is refused.
NODE_TYPES_SINCE = {"conditional": 3, "batch_mem_op": 3}
FIELDS_SINCE = {"kernel.handles": 3, "region.array": 3}
DIM_MAX = (1 << 31) - 1
SIZE_MAX = 1 << 48


def pitched_span(width: int, height: int, depth: int, pitch: int, slice_height: int) -> int:
    """Bytes from the first to one past the last byte a pitched box touches (pitch 0: rows are
    ``width`` apart; slice height 0: slices are ``height`` rows apart)."""
    if width == 0 or height == 0 or depth == 0:
        return 0
    pitch = pitch or width
    slice_height = slice_height or height
    return (depth - 1) * pitch * slice_height + (height - 1) * pitch + width


def _ref_out(ref: Ref) -> list:
    return [ref.region, ref.offset]


class Renumbering:
    """Old -> new ids for :meth:`remap` (missing maps keep ids as they are)."""

    __slots__ = ("regions", "kernels", "event_offset", "graphs", "handle_offset")

    def __init__(self, regions=None, kernels=None, event_offset: int = 0, graphs=None,
                 handle_offset: int = 0):
        self.regions, self.kernels, self.graphs = regions, kernels, graphs
        self.event_offset, self.handle_offset = event_offset, handle_offset

    def region(self, rid: int) -> int:
        return rid if self.regions is None else self.regions[rid]

    def ref(self, ref: Ref) -> Ref:
        return ref if self.regions is None else Ref(self.regions[ref.region], ref.offset)

    def kernel(self, kid: int) -> int:
        return kid if self.kernels is None else self.kernels[kid]

    def graph(self, name: str) -> str:
        return name if self.graphs is None else self.graphs.get(name, name)


class _Spec:
    """What every node type provides (defaults for nodes without references)."""
    TYPE: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple] = ()     # manifest fields besides "id" and "t"
    OPTIONAL: ClassVar[tuple] = ()

    def regions(self) -> list:
        return []

    def remap(self, m: Renumbering):
        return self

    def to_manifest(self, out: dict, layouts) -> None:
        pass

    def describe(self, d) -> list:
        return []

    def to_live(self, ctx) -> dict:
        return {}

    def on_added(self, ctx, result) -> None:
        """Called by the restore with what the driver returned when the node was added."""


# ---- kernel -------------------------------------------------------------------------------

@dataclass(slots=True)
class KernelNode(_Spec):
    """A kernel launch. ``params`` is the kernel's whole parameter buffer (arguments at the
    offsets of ``Kernel.params``); ``refs`` the pointer table: little-endian u64 triples (byte
    position in ``params``, region, offset), positions 8-aligned and increasing, each inside one
    argument. Restore writes ``base(region) + offset`` at each position. ``handles``: u64 pairs
    (position, conditional handle id), each the whole of an 8-byte argument: restore writes
    the value of the handle it created there (:class:`ConditionalNode`)."""
    id: int
    kernel: int
    grid: tuple
    block: tuple
    shared_mem: int
    params: bytes
    refs: bytes = b""
    attrs: dict = field(default_factory=dict)   # cluster_dim (x,y,z), priority, cooperative
    handles: bytes = b""
    TYPE: ClassVar[str] = "kernel"
    REQUIRED: ClassVar[tuple] = ("kernel", "grid", "block", "smem", "params", "refs")
    OPTIONAL: ClassVar[tuple] = ("attrs", "handles")

    @classmethod
    def from_args(cls, id: int, kernel: int, grid: tuple, block: tuple, shared_mem: int, args,
                  layout, attrs=None) -> "KernelNode":
        """A node from per-argument :class:`Arg` values (``layout``: the kernel's params)."""
        params, refs = pack_args(args, layout)
        return cls(id, kernel, grid, block, shared_mem, params, refs, dict(attrs or {}))

    def pointer_table(self) -> np.ndarray:
        """The pointer table as a structured array (fields pos, region, offset)."""
        return np.frombuffer(self.refs, dtype=REF_DTYPE)

    def pointers(self) -> list:
        """``[(position in params, Ref), ...]``."""
        return [(p, Ref(r, o)) for p, r, o in
                np.frombuffer(self.refs, dtype="<u8").reshape(-1, 3).tolist()]

    def arguments(self, layout) -> tuple:
        """The per-argument view (:class:`Arg`) for tools: ``layout`` is ``Kernel.params``."""
        return unpack_args(self.params, self.refs, layout)

    def handle_refs(self) -> list:
        """``[(position in params, conditional handle id), ...]``."""
        return [tuple(r) for r in np.frombuffer(self.handles, dtype="<u8").reshape(-1, 2).tolist()]

    def regions(self) -> list:
        return np.frombuffer(self.refs, dtype="<u8")[1::3].tolist()

    def remap(self, m: Renumbering):
        refs = self.refs
        if m.regions is not None and refs:
            table = np.frombuffer(refs, dtype="<u8").reshape(-1, 3).copy()
            table[:, 1] = [m.regions[r] for r in table[:, 1].tolist()]
            refs = table.tobytes()
        handles = self.handles
        if m.handle_offset and handles:
            table = np.frombuffer(handles, dtype="<u8").reshape(-1, 2).copy()
            table[:, 1] += np.uint64(m.handle_offset)
            handles = table.tobytes()
        return replace(self, kernel=m.kernel(self.kernel), refs=refs, handles=handles)

    def to_manifest(self, out: dict, layouts) -> None:
        out.update(kernel=self.kernel, grid=list(self.grid), block=list(self.block),
                   smem=self.shared_mem, params=bytes(self.params), refs=bytes(self.refs))
        if self.attrs:
            out["attrs"] = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in self.attrs.items()}
        if self.handles:
            out["handles"] = bytes(self.handles)

    def describe(self, d) -> list:
        k = d.snap.kernels[self.kernel]
        lines = [d.kernel_name(k.name),
                 f"<<<({', '.join(map(str, self.grid))}), ({', '.join(map(str, self.block))}), "
                 f"{self.shared_mem}>>>"]
        for i, a in enumerate(self.arguments(k.params)):
            for off, ref in a.refs:
                lines.append(f"arg{i}+{off:#x} → {d.ref(ref)}")
        starts = {off: i for i, (off, _) in enumerate(k.params)}
        for pos, hid in self.handle_refs():
            lines.append(f"arg{starts.get(pos, '?')} → conditional handle {hid}")
        for key, value in sorted(self.attrs.items()):
            lines.append(f"{key} = {value}")
        return lines

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        kid = v.int(n["kernel"], f"{where}.kernel", 0, len(ctx.kernels) - 1)
        kernel = ctx.kernels[kid]
        if v.schema == 1:
            params, refs = cls._parse_args_v1(v, n, where, kernel, ctx)
        else:
            params, refs = n["params"], n["refs"]
            if type(params) is not bytes or len(params) != ctx.buffer_sizes[kid]:
                params = v.bytes(params, f"{where}.params")
                v.fail(f"{where}.params", f"{len(params)} bytes, kernel {kernel.name} takes "
                                          f"{ctx.buffer_sizes[kid]}")
            if type(refs) is not bytes or len(refs) % 24 or len(refs) // 24 > len(params) // 8:
                refs = v.bytes(refs, f"{where}.refs")
                v.fail(f"{where}.refs", f"{len(refs)} bytes: expected up to one 24-byte entry "
                                        "per 8 bytes of parameters")
        attrs = {}
        raw_attrs = n.get("attrs", {})
        v.map(raw_attrs, f"{where}.attrs", optional=("cluster_dim", "priority", "cooperative"))
        if "cluster_dim" in raw_attrs:
            attrs["cluster_dim"] = v.dims(raw_attrs["cluster_dim"], f"{where}.attrs.cluster_dim")
        for key in ("priority", "cooperative"):
            if key in raw_attrs:
                attrs[key] = v.int(raw_attrs[key], f"{where}.attrs.{key}", -(1 << 31),
                                   (1 << 31) - 1)
        if "handles" in n:
            # Kernel nodes of schema 3 live in the kernel table (cgsnap.format.tables), whose
            # nhandles / handles columns carry these; a node map never does.
            since = FIELDS_SINCE["kernel.handles"]
            v.fail(f"{where}.handles", f"conditional handle arguments need schema {since} (this "
                                       f"manifest is schema {v.schema})")
        node = cls(nid, kid, v.dims(n["grid"], f"{where}.grid"), v.dims(n["block"], f"{where}.block"),
                   v.int(n["smem"], f"{where}.smem", 0, 1 << 24), params, refs, attrs)
        if v.schema != 1:
            ctx.tables.append((node, where))   # pointer tables: checked per graph, vectorised
        return node

    @classmethod
    def parse_fast(cls, n, ctx, graph_where: str, index: int):
        """The common kernel node (schema >= 2) with every check inline and no message built;
        None sends the node to the strict :meth:`parse`, whose checks name any problem exactly.
        Accepts exactly what :meth:`parse` accepts, minus attributes other than cluster_dim
        (a property test holds the two together)."""
        if type(n) is not dict or n.get("t") != "kernel":
            return None
        keys = n.keys()
        if not (_KERNEL_REQUIRED <= keys and keys <= _KERNEL_ALLOWED):
            return None
        nid, kid, smem, params, refs = n["id"], n["kernel"], n["smem"], n["params"], n["refs"]
        if type(nid) is not int or not 0 <= nid < 1 << 32 or type(kid) is not int or \
                not 0 <= kid < len(ctx.kernels) or type(smem) is not int or \
                not 0 <= smem <= 1 << 24:
            return None
        if type(params) is not bytes or len(params) != ctx.buffer_sizes[kid] or \
                type(refs) is not bytes or len(refs) % 24 or len(refs) // 24 > len(params) // 8:
            return None
        grid, block = dims3(n["grid"]), dims3(n["block"])
        if grid is None or block is None:
            return None
        raw = n.get("attrs", _ABSENT)
        if raw is _ABSENT or (type(raw) is dict and not raw):
            attrs = {}
        elif type(raw) is dict and len(raw) == 1 and "cluster_dim" in raw:
            cluster = dims3(raw["cluster_dim"])
            if cluster is None:
                return None
            attrs = {"cluster_dim": cluster}
        else:
            return None
        node = cls(nid, kid, grid, block, smem, params, refs, attrs)
        ctx.tables.append((node, (graph_where, index)))
        return node

    @staticmethod
    def check_tables(v, ctx) -> None:
        """Check the pointer tables of one graph's kernel nodes (schema 1-2: one per node) in
        one vectorised pass (:func:`check_pointer_rows`)."""
        items = ctx.tables
        table = np.frombuffer(b"".join(node.refs for node, _ in items), dtype="<u8").reshape(-1, 3)
        counts = [len(node.refs) // 24 for node, _ in items]
        owner = np.repeat(np.arange(len(items)), counts)
        kernel = np.array([node.kernel for node, _ in items], dtype=np.int64)

        def where(bad: int, row: int) -> str:
            node_where = items[row][1]
            if type(node_where) is tuple:     # (graph's where, node index): built for errors
                node_where = f"{node_where[0]}.nodes[{node_where[1]}]"
            return f"{node_where}.refs[{bad - int(np.searchsorted(owner, row))}]"
        check_pointer_rows(v, table, owner, kernel, ctx, where)

    @staticmethod
    def _parse_args_v1(v, n, where, kernel, ctx) -> tuple:
        """Schema 1 stored each argument as its own map ({"d": bytes, "r": [[off, region,
        off]]}): read it into the packed form."""
        raw_args = v.list(n["args"], f"{where}.args", 4096)
        if len(raw_args) != len(kernel.params):
            v.fail(f"{where}.args", f"{len(raw_args)} arguments, kernel {kernel.name} takes "
                                    f"{len(kernel.params)}")
        args = []
        sizes = ctx.region_sizes
        for i, (a, (_, size)) in enumerate(zip(raw_args, kernel.params)):
            aw = f"{where}.args[{i}]"
            a = v.map(a, aw, ("d", "r"))
            data = v.bytes(a["d"], f"{aw}.d")
            if len(data) != size:
                v.fail(f"{aw}.d", f"{len(data)} bytes, the parameter has {size}")
            raw_refs = v.list(a["r"], f"{aw}.r", size // 8 + 1)
            refs = []
            last = -8
            for j, r in enumerate(raw_refs):
                rw = f"{aw}.r[{j}]"
                if len(v.list(r, rw, 3)) != 3:
                    v.fail(rw, "expected [offset, region, offset]")
                off = v.int(r[0], f"{rw}[0]", 0, max(size - 8, 0))
                if off % 8 or off < last + 8 or size < 8:
                    v.fail(rw, "pointer offsets must be 8-aligned, increasing and inside the "
                               "argument")
                rid = v.int(r[1], f"{rw}[1]", 0, len(sizes) - 1)
                roff = v.int(r[2], f"{rw}[2]", 0, sizes[rid])
                last = off
                refs.append((off, Ref(rid, roff)))
            args.append(Arg(data, tuple(refs)))
        return pack_args(args, kernel.params)


def check_pointer_rows(v, refs: np.ndarray, owner: np.ndarray, kernel: np.ndarray, ctx,
                       where) -> None:
    """Every pointer entry (``refs``: u64 rows position, region, offset; ``owner``: the row of
    the node each belongs to; ``kernel``: each node's kernel) is 8-aligned, increasing within its
    node, an 8-byte word inside one argument of its node's kernel, and names an existing region
    with an address (not a CUDA array) and an offset inside it (one past the end allowed).
    ``where(entry, row)`` names a bad entry for the error."""
    if not len(refs):
        return
    kid = kernel[owner].astype(np.uint64)
    pos, region, offset = refs[:, 0], refs[:, 1], refs[:, 2]
    ok = (pos & np.uint64(7)) == 0
    ok[1:] &= (owner[1:] != owner[:-1]) | (pos[1:] > pos[:-1])
    nregions = len(ctx.region_sizes)
    ok &= region < np.uint64(nregions)
    sizes = ctx.region_size_array
    safe_region = np.minimum(region, np.uint64(max(nregions - 1, 0)))
    ok &= offset <= sizes[safe_region] if nregions else False
    if nregions:
        ok &= ~ctx.no_address[safe_region]          # a CUDA array: no address to point at
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
    row = int(owner[bad])
    p, r, o = (int(x) for x in refs[bad].tolist())
    w = where(bad, row)
    if p % 8 or (bad and owner[bad - 1] == row and p <= int(pos[bad - 1])):
        v.fail(w, "pointer positions must be 8-aligned and increasing")
    if r >= nregions:
        v.fail(w, f"region {r} does not exist ({nregions} regions)")
    if o > ctx.region_sizes[r]:
        v.fail(w, f"offset {o} is beyond the end of region {r} ({ctx.region_sizes[r]} bytes)")
    if ctx.no_address[r]:
        v.fail(w, f"region {r} is a CUDA array, which has no address to point at")
    v.fail(w, f"position {p} is not an 8-byte word inside one argument of kernel "
              f"{ctx.kernels[int(kernel[row])].name}")


def param_buffer_size(layout) -> int:
    """Bytes of a kernel's parameter buffer: ``layout`` is ``Kernel.params``."""
    return max((off + size for off, size in layout), default=0)


def pack_args(args, layout) -> tuple:
    """``(params, refs)``, the packed form of per-argument :class:`Arg` values."""
    buf = bytearray(param_buffer_size(layout))
    refs = []
    for (off, _), a in zip(layout, args):
        buf[off:off + len(a.data)] = a.data
        refs.extend((off + o, r.region, r.offset) for o, r in a.refs)
    return bytes(buf), np.array(refs, dtype="<u8").reshape(-1, 3).tobytes()


def unpack_args(params: bytes, refs: bytes, layout) -> tuple:
    """The per-argument form of a packed node (refs lie inside arguments: validated)."""
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


# ---- copies and sets ------------------------------------------------------------------------

@dataclass(slots=True)
class MemcpyNode(_Spec):
    """A copy of a ``width`` x ``height`` x ``depth`` box; pitches are the row strides, the
    heights the number of rows per slice (0: tightly packed). A 1D copy has height = depth = 1.

    A side in an ARRAY region (a CUDA array) addresses the array's packed contents: its offset
    is ``(z * rows + y) * row_bytes + x``, its pitch and height are the array's row bytes and
    rows, and the box must lie inside the array.

    Raw form: ``{"width", "height", "depth", "src": side, "dst": side}`` with ``side`` =
    ``{"kind": "device" | "host", "addr", "pitch", "height"}`` (``addr`` already includes the
    x/y/z offsets of the box) or ``{"kind": "array", "array": CUarray, "x", "y", "z"}`` (``x``
    in bytes; when read, also ``"lod"``)."""
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
    TYPE: ClassVar[str] = "memcpy"
    REQUIRED: ClassVar[tuple] = ("src", "dst", "width", "height", "depth", "src_pitch",
                                 "src_height", "dst_pitch", "dst_height")

    def span(self, side: str) -> int:
        return pitched_span(self.width, self.height, self.depth, getattr(self, f"{side}_pitch"),
                            getattr(self, f"{side}_height"))

    def regions(self) -> list:
        return [self.src.region, self.dst.region]

    def remap(self, m: Renumbering):
        return replace(self, src=m.ref(self.src), dst=m.ref(self.dst))

    def to_manifest(self, out: dict, layouts) -> None:
        out.update(src=_ref_out(self.src), dst=_ref_out(self.dst), width=self.width,
                   height=self.height, depth=self.depth, src_pitch=self.src_pitch,
                   src_height=self.src_height, dst_pitch=self.dst_pitch,
                   dst_height=self.dst_height)

    def describe(self, d) -> list:
        shape = f"{self.width} B" if self.height == 1 and self.depth == 1 else \
            f"{self.width} B x {self.height} x {self.depth}"
        return [f"copy {shape}", f"src → {d.ref(self.src)}", f"dst → {d.ref(self.dst)}"]

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        geo = {k: v.int(n[k], f"{where}.{k}", 0, SIZE_MAX)
               for k in ("width", "height", "depth", "src_pitch", "src_height", "dst_pitch",
                         "dst_height")}
        node = cls(nid, v.ref(n["src"], f"{where}.src", ctx), v.ref(n["dst"], f"{where}.dst", ctx),
                   **geo)
        for side in ("src", "dst"):
            ref = getattr(node, side)
            v.span_fits(ctx, ref, node.span(side), f"{where}.{side}")
            array = ctx.regions[ref.region].array
            if array is not None:
                node._check_array_side(v, side, ref, array, f"{where}.{side}")
        return node

    def _check_array_side(self, v, side: str, ref: Ref, a, where: str) -> None:
        pitch, height = getattr(self, f"{side}_pitch"), getattr(self, f"{side}_height")
        if pitch != a.row_bytes or height != a.rows:
            v.fail(where, f"a side in CUDA array region {ref.region} must have the array's pitch "
                          f"{a.row_bytes} and height {a.rows} (found {pitch}, {height})")
        x, y, z = a.position(ref.offset)
        if x + self.width > a.row_bytes or y + self.height > a.rows or \
                z + self.depth > a.slices or x % a.element_bytes or self.width % a.element_bytes:
            v.fail(where, f"the box {self.width} B x {self.height} x {self.depth} at (x {x} B, "
                          f"y {y}, z {z}) is not whole elements inside CUDA array region "
                          f"{ref.region} ({a.describe()})")

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        width, height, depth = raw["width"], raw["height"] or 1, raw["depth"] or 1
        ends = []
        for side in ("src", "dst"):
            s = raw[side]
            if s["kind"] == "array":
                if s.get("lod"):
                    raise UnsupportedNodeError(f"{where}: a copy to or from mipmap level "
                                               f"{s['lod']} of a CUDA array cannot be carried")
                ref, a = rec.array_ref(s["array"], s["x"], s["y"], s["z"], f"{where} {side}")
                ends.append((ref, a.row_bytes, a.rows))
                continue
            pitch, slice_h = s["pitch"] or width, s["height"] or height
            span = pitched_span(width, height, depth, pitch, slice_h)
            if s["kind"] == "host":
                ref = rec.host_ref(s["addr"], span, side == "src")
            else:
                ref = rec.device_ref(s["addr"], f"{where} {side}", span)
            ends.append((ref, pitch if height > 1 or depth > 1 else 0,
                         slice_h if depth > 1 else 0))
        (src, sp, sh), (dst, dp, dh) = ends
        return cls(index, src, dst, width, height, depth, sp, sh, dp, dh)

    def to_live(self, ctx) -> dict:
        raw = {"width": self.width, "height": self.height, "depth": self.depth}
        for side, ref, pitch, height in (("src", self.src, self.src_pitch, self.src_height),
                                         ("dst", self.dst, self.dst_pitch, self.dst_height)):
            found = ctx.array(ref.region)       # (CUarray, ArrayDesc) of an ARRAY region
            if found is not None:
                x, y, z = found[1].position(ref.offset)
                raw[side] = {"kind": "array", "array": found[0], "x": x, "y": y, "z": z}
                continue
            raw[side] = {"kind": "host" if ctx.is_host(ref.region) else "device",
                         "addr": ctx.addr(ref), "pitch": pitch or self.width,
                         "height": height or self.height}
        return raw


@dataclass(slots=True)
class MemsetNode(_Spec):
    """Sets ``height`` rows of ``width`` elements of ``element_size`` bytes (1, 2 or 4), rows
    ``pitch`` bytes apart (0: tightly packed). Raw form: the same fields, ``dst`` an address."""
    id: int
    dst: Ref
    value: int
    element_size: int
    width: int
    height: int = 1
    pitch: int = 0
    TYPE: ClassVar[str] = "memset"
    REQUIRED: ClassVar[tuple] = ("dst", "value", "element_size", "width", "height", "pitch")

    def span(self) -> int:
        row = self.width * self.element_size
        return pitched_span(row, self.height, 1, self.pitch or row, 0)

    def regions(self) -> list:
        return [self.dst.region]

    def remap(self, m: Renumbering):
        return replace(self, dst=m.ref(self.dst))

    def to_manifest(self, out: dict, layouts) -> None:
        out.update(dst=_ref_out(self.dst), value=self.value, element_size=self.element_size,
                   width=self.width, height=self.height, pitch=self.pitch)

    def describe(self, d) -> list:
        return [f"set {self.width} x {self.height} elements of {self.element_size} B to "
                f"{self.value:#x}", f"dst → {d.ref(self.dst)}"]

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        node = cls(nid, v.ref(n["dst"], f"{where}.dst", ctx),
                   v.int(n["value"], f"{where}.value", 0, (1 << 32) - 1),
                   v.int(n["element_size"], f"{where}.element_size", 1, 4),
                   v.int(n["width"], f"{where}.width", 0, SIZE_MAX),
                   v.int(n["height"], f"{where}.height", 0, SIZE_MAX),
                   v.int(n["pitch"], f"{where}.pitch", 0, SIZE_MAX))
        if node.element_size not in (1, 2, 4):
            v.fail(f"{where}.element_size", "must be 1, 2 or 4")
        v.span_fits(ctx, node.dst, node.span(), f"{where}.dst")
        if ctx.regions[node.dst.region].kind is RegionKind.ARRAY:
            v.fail(f"{where}.dst", "a memset writes device memory, not a CUDA array")
        return node

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        probe = cls(index, Ref(0, 0), raw["value"], raw["element_size"], raw["width"],
                    raw["height"], raw["pitch"])
        return replace(probe, dst=rec.device_ref(raw["dst"], where, probe.span()))

    def to_live(self, ctx) -> dict:
        return {"dst": ctx.addr(self.dst), "value": self.value,
                "element_size": self.element_size, "width": self.width, "height": self.height,
                "pitch": self.pitch or self.width * self.element_size}


# ---- structure: empty, child graphs, events ---------------------------------------------------

@dataclass(slots=True)
class EmptyNode(_Spec):
    id: int
    TYPE: ClassVar[str] = "empty"

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        return cls(nid)

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        return cls(index)


@dataclass(slots=True)
class ChildGraphNode(_Spec):
    """Runs graph ``graph`` of the snapshot. Raw form: ``{"graph": CUgraph}`` when read;
    ``{"graph": the rebuilt CUgraph}`` when added."""
    id: int
    graph: str
    TYPE: ClassVar[str] = "graph"
    REQUIRED: ClassVar[tuple] = ("graph",)

    def remap(self, m: Renumbering):
        return replace(self, graph=m.graph(self.graph))

    def to_manifest(self, out: dict, layouts) -> None:
        out["graph"] = self.graph

    def describe(self, d) -> list:
        return [f"child graph {self.graph!r}"]

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        name = v.str(n["graph"], f"{where}.graph")
        if name not in ctx.graph_names:
            v.fail(f"{where}.graph", f"unknown graph {name!r}")
        return cls(nid, name)

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        return cls(index, rec.child_graph(raw["graph"], index))

    def to_live(self, ctx) -> dict:
        return {"graph": ctx.child_graph(self.graph)}


@dataclass(slots=True)
class EventRecordNode(_Spec):
    """Records event ``event`` (an index into the snapshot's events). Raw: ``{"event": CUevent}``."""
    id: int
    event: int
    TYPE: ClassVar[str] = "event_record"
    REQUIRED: ClassVar[tuple] = ("event",)

    def remap(self, m: Renumbering):
        return replace(self, event=self.event + m.event_offset)

    def to_manifest(self, out: dict, layouts) -> None:
        out["event"] = self.event

    def describe(self, d) -> list:
        return [f"event {self.event}"]

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        return cls(nid, v.int(n["event"], f"{where}.event", 0, ctx.events - 1))

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        return cls(index, rec.event_index(raw["event"]))

    def to_live(self, ctx) -> dict:
        return {"event": ctx.event(self.event)}


@dataclass(slots=True)
class EventWaitNode(EventRecordNode):
    """Waits for event ``event``."""
    TYPE: ClassVar[str] = "event_wait"


# ---- graph memory -------------------------------------------------------------------------------

@dataclass(slots=True)
class MemAllocNode(_Spec):
    """Allocates graph memory: the GRAPH_ALLOC region ``region``. Raw: ``{"dptr", "bytesize"}``
    when read; ``{"bytesize"}`` to add, and the driver reports the new ``dptr``."""
    id: int
    region: int
    TYPE: ClassVar[str] = "mem_alloc"
    REQUIRED: ClassVar[tuple] = ("region",)

    def regions(self) -> list:
        return [self.region]

    def remap(self, m: Renumbering):
        return replace(self, region=m.region(self.region))

    def to_manifest(self, out: dict, layouts) -> None:
        out["region"] = self.region

    def describe(self, d) -> list:
        return [f"allocates {d.region(self.region)} ({d.size(d.snap.regions[self.region].size)})"]

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        rid = v.int(n["region"], f"{where}.region", 0, len(ctx.regions) - 1)
        if ctx.regions[rid].kind is not RegionKind.GRAPH_ALLOC:
            v.fail(f"{where}.region", "a mem_alloc node must create a graph_alloc region")
        return cls(nid, rid)

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        return cls(index, rec.graph_alloc_region(index))

    def to_live(self, ctx) -> dict:
        return {"bytesize": ctx.region_size(self.region)}

    def on_added(self, ctx, result) -> None:
        ctx.set_base(self.region, result["dptr"])


@dataclass(slots=True)
class MemFreeNode(_Spec):
    """Frees graph memory at ``ptr``. Raw: ``{"dptr"}``."""
    id: int
    ptr: Ref
    TYPE: ClassVar[str] = "mem_free"
    REQUIRED: ClassVar[tuple] = ("ptr",)

    def regions(self) -> list:
        return [self.ptr.region]

    def remap(self, m: Renumbering):
        return replace(self, ptr=m.ref(self.ptr))

    def to_manifest(self, out: dict, layouts) -> None:
        out["ptr"] = _ref_out(self.ptr)

    def describe(self, d) -> list:
        return [f"frees {d.ref(self.ptr)}"]

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        ptr = v.ref(n["ptr"], f"{where}.ptr", ctx)
        if ctx.regions[ptr.region].kind is not RegionKind.GRAPH_ALLOC:
            v.fail(f"{where}.ptr", "a mem_free node frees graph memory: a graph_alloc region")
        return cls(nid, ptr)

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        ref = rec.device_ref(raw["dptr"], where)
        if rec.regions[ref.region].kind is not RegionKind.GRAPH_ALLOC:
            raise UnsupportedNodeError(
                f"{where}: frees memory this graph did not allocate (cudaMallocAsync memory or "
                "another graph's): a restore cannot recreate it as graph memory")
        return cls(index, ref)

    def to_live(self, ctx) -> dict:
        return {"dptr": ctx.addr(self.ptr)}


# ---- host callbacks -----------------------------------------------------------------------------

@dataclass(slots=True)
class HostNode(_Spec):
    """Calls the host callback registered under ``callback`` (``snapshot(host_callbacks=)`` /
    ``load(host_callbacks=)``). Raw: ``{"fn": address}`` when read; ``{"callback": callable}``
    to add."""
    id: int
    callback: str
    TYPE: ClassVar[str] = "host"
    REQUIRED: ClassVar[tuple] = ("callback",)

    def to_manifest(self, out: dict, layouts) -> None:
        out["callback"] = self.callback

    def describe(self, d) -> list:
        return [f"host callback {self.callback!r}"]

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        return cls(nid, v.str(n["callback"], f"{where}.callback"))

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        return cls(index, rec.host_callback_name(raw["fn"], where))

    def to_live(self, ctx) -> dict:
        return {"callback": ctx.host_callback(self.callback)}


# ---- stream memory operations --------------------------------------------------------------------

# CUstreamBatchMemOpType -> name, and back.
MEMOP_NAMES = {1: "wait32", 2: "write32", 3: "flush", 4: "wait64", 5: "write64", 6: "barrier"}
MEMOP_CODES = {name: code for code, name in MEMOP_NAMES.items()}
MEMOP_WIDTH = {"wait32": 4, "write32": 4, "wait64": 8, "write64": 8}
# Flags each operation may carry: waits GEQ 0 / EQ 1 / AND 2 / NOR 3, optionally with FLUSH
# (1 << 30); writes DEFAULT 0 / NO_MEMORY_BARRIER 1; barriers SYS 0 / GPU 1; flushes 0.
_WAIT_FLAGS = frozenset(f | x for f in range(4) for x in (0, 1 << 30))
MEMOP_FLAGS = {"wait32": _WAIT_FLAGS, "wait64": _WAIT_FLAGS, "write32": frozenset((0, 1)),
               "write64": frozenset((0, 1)), "barrier": frozenset((0, 1)),
               "flush": frozenset((0,))}
MAX_MEMOPS = 4096
_WAIT_TESTS = {0: ">=", 1: "==", 2: "&", 3: "nor"}


@dataclass(frozen=True, slots=True)
class MemOp:
    """One stream memory operation: ``op`` a :data:`MEMOP_NAMES` value; ``addr`` the word waited
    on or written (None for flush and barrier); ``value`` the value compared or written."""
    op: str
    addr: Optional[Ref] = None
    value: int = 0
    flags: int = 0


@dataclass(slots=True)
class BatchMemOpNode(_Spec):
    """Stream memory operations (``cuStreamWaitValue32/64``, ``cuStreamWriteValue32/64``,
    ``cuStreamBatchMemOp``): waits on and writes of device words, barriers, flushes. Raw form:
    ``{"ops": [{"operation", "addr", "value", "flags"}, ...], "flags"}`` (CUstreamBatchMemOpType
    codes; ``addr`` 0 for flush and barrier)."""
    id: int
    ops: tuple
    flags: int = 0
    TYPE: ClassVar[str] = "batch_mem_op"
    REQUIRED: ClassVar[tuple] = ("ops", "flags")

    def regions(self) -> list:
        return [op.addr.region for op in self.ops if op.addr is not None]

    def remap(self, m: Renumbering):
        return replace(self, ops=tuple(replace(op, addr=m.ref(op.addr)) if op.addr is not None
                                       else op for op in self.ops))

    def to_manifest(self, out: dict, layouts) -> None:
        ops = []
        for op in self.ops:
            o = {"op": op.op, "value": op.value, "flags": op.flags}
            if op.addr is not None:
                o["addr"] = _ref_out(op.addr)
            ops.append(o)
        out.update(ops=ops, flags=self.flags)

    def describe(self, d) -> list:
        lines = []
        for op in self.ops:
            if op.op.startswith("wait"):
                test = _WAIT_TESTS[op.flags & 3]
                lines.append(f"{op.op} until {test} {op.value:#x}"
                             + (" (flush)" if op.flags & (1 << 30) else "")
                             + f" at {d.ref(op.addr)}")
            elif op.op.startswith("write"):
                lines.append(f"{op.op} {op.value:#x} → {d.ref(op.addr)}")
            else:
                lines.append(f"{op.op}" + (f" flags {op.flags:#x}" if op.flags else ""))
        return lines

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        raw = v.list(n["ops"], f"{where}.ops", MAX_MEMOPS)
        if not raw:
            v.fail(f"{where}.ops", "a batch_mem_op node holds at least one operation")
        ops = []
        for j, o in enumerate(raw):
            ow = f"{where}.ops[{j}]"
            name = v.str(v.map(o, ow, ("op", "value", "flags"), ("addr",))["op"], f"{ow}.op",
                         MEMOP_CODES)
            width = MEMOP_WIDTH.get(name)
            value = v.int(o["value"], f"{ow}.value", 0,
                          (1 << (8 * width)) - 1 if width else 0)
            flags = v.int(o["flags"], f"{ow}.flags", 0, (1 << 32) - 1)
            if flags not in MEMOP_FLAGS[name]:
                v.fail(f"{ow}.flags", f"{flags:#x} is not a flag set of a {name} operation")
            addr = None
            if width:
                if "addr" not in o:
                    v.fail(ow, f"a {name} operation needs addr")
                addr = v.ref(o["addr"], f"{ow}.addr", ctx)
                v.span_fits(ctx, addr, width, f"{ow}.addr")
                if addr.offset % width or ctx.regions[addr.region].kind is RegionKind.ARRAY:
                    v.fail(f"{ow}.addr", f"a {name} operation needs a {width}-byte aligned word "
                                         "of device memory")
            elif "addr" in o:
                v.fail(f"{ow}.addr", f"a {name} operation takes no address")
            ops.append(MemOp(name, addr, value, flags))
        return cls(nid, tuple(ops), v.int(n["flags"], f"{where}.flags", 0, (1 << 32) - 1))

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        ops = []
        for j, o in enumerate(raw["ops"]):
            name = MEMOP_NAMES.get(o["operation"])
            if name is None:
                raise UnsupportedNodeError(f"{where}: memory operation {j} has type "
                                           f"{o['operation']}, which cgsnap does not know")
            width = MEMOP_WIDTH.get(name)
            if width:
                ref = rec.device_ref(o["addr"], f"{where} operation {j} ({name})", width)
                ops.append(MemOp(name, ref, o["value"] & ((1 << (8 * width)) - 1), o["flags"]))
            else:
                ops.append(MemOp(name, None, 0, o["flags"]))
        return cls(index, tuple(ops), raw["flags"])

    def to_live(self, ctx) -> dict:
        return {"flags": self.flags,
                "ops": [{"operation": MEMOP_CODES[op.op],
                         "addr": ctx.addr(op.addr) if op.addr is not None else 0,
                         "value": op.value, "flags": op.flags} for op in self.ops]}


# ---- conditional nodes ------------------------------------------------------------------------------

COND_KINDS = ("if", "while", "switch")          # CUgraphConditionalNodeType 0, 1, 2
COND_ASSIGN_DEFAULT = 1                          # CU_GRAPH_COND_ASSIGN_DEFAULT
MAX_BODIES = 1 << 12
MAX_NESTING = 64


@dataclass(slots=True)
class ConditionalNode(_Spec):
    """An IF (1 or 2 bodies: then, else), WHILE (1 body) or SWITCH (body ``n`` runs when the
    condition is ``n``) node. Its condition is a *conditional handle*: ``handle`` is its id in
    the snapshot (one handle per conditional node, ids 0..H-1 over the whole snapshot), made
    for graph ``handle_graph`` (this node's graph or one whose body holds it, transitively) with
    ``default`` and ``flags`` (1: the default is assigned at each launch). Kernels set the
    condition through the handle passed as an 8-byte argument (``KernelNode.handles``).
    ``value`` is the handle's value at save time; ``exact``: the restore must obtain that same
    value, because the capture could not prove where every use of it lies.

    Each body is a graph of the snapshot (not top-level) that only this node runs: at restore
    it is built into the body graph the driver creates with the node.

    Raw form: ``{"type", "size", "handle"}`` to add, the driver returning ``{"bodies": [CUgraph]}``;
    when read, whatever the driver could give (:func:`cgsnap.cuda.graphs.read_node`)."""
    id: int
    kind: str
    bodies: tuple
    handle: int
    handle_graph: str
    default: int = 0
    flags: int = 0
    value: int = 0
    exact: bool = False
    TYPE: ClassVar[str] = "conditional"
    REQUIRED: ClassVar[tuple] = ("kind", "bodies", "handle", "handle_graph", "default", "flags",
                                 "value", "exact")

    def body_labels(self) -> list:
        if self.kind == "if":
            return ["then", "else"][:len(self.bodies)]
        if self.kind == "while":
            return ["body"]
        return [f"case {i}" for i in range(len(self.bodies))]

    def remap(self, m: Renumbering):
        return replace(self, bodies=tuple(m.graph(b) for b in self.bodies),
                       handle=self.handle + m.handle_offset, handle_graph=m.graph(self.handle_graph))

    def to_manifest(self, out: dict, layouts) -> None:
        out.update(kind=self.kind, bodies=list(self.bodies), handle=self.handle,
                   handle_graph=self.handle_graph, default=self.default, flags=self.flags,
                   value=self.value, exact=self.exact)

    def describe(self, d) -> list:
        lines = [f"{self.kind} on handle {self.handle} (of graph {self.handle_graph!r}, default "
                 f"{self.default}{', assigned at each launch' if self.flags else ''})"]
        lines += [f"{label} → graph {body!r}" for label, body in zip(self.body_labels(),
                                                                       self.bodies)]
        return lines

    @classmethod
    def parse(cls, v, n: dict, where: str, ctx, nid: int):
        kind = v.str(n["kind"], f"{where}.kind", COND_KINDS)
        bodies = tuple(v.str(b, f"{where}.bodies[{i}]")
                       for i, b in enumerate(v.list(n["bodies"], f"{where}.bodies", MAX_BODIES)))
        most = {"if": 2, "while": 1, "switch": MAX_BODIES}[kind]
        if not 1 <= len(bodies) <= most:
            v.fail(f"{where}.bodies", f"an {kind} node has 1 to {most} bodies, not {len(bodies)}")
        for i, b in enumerate(bodies):
            if b not in ctx.graph_names:
                v.fail(f"{where}.bodies[{i}]", f"unknown graph {b!r}")
        handle_graph = v.str(n["handle_graph"], f"{where}.handle_graph")
        if handle_graph not in ctx.graph_names:
            v.fail(f"{where}.handle_graph", f"unknown graph {handle_graph!r}")
        flags = v.int(n["flags"], f"{where}.flags", 0, COND_ASSIGN_DEFAULT)
        node = cls(nid, kind, bodies, v.int(n["handle"], f"{where}.handle", 0, (1 << 32) - 1),
                   handle_graph, v.int(n["default"], f"{where}.default", 0, (1 << 32) - 1),
                   flags, v.int(n["value"], f"{where}.value"), v.bool(n["exact"], f"{where}.exact"))
        ctx.conditionals.append((node, where, ctx.graph_name))
        return node

    @staticmethod
    def check_snapshot(v, graphs: list, ctx) -> None:
        """What needs every graph (``ctx``: the conditional nodes and the kernel tables with
        handle columns that the parsers met): handle ids 0..H-1, each once; each body run by
        exactly one conditional node, not top-level and no child graph; a graph holding
        conditional nodes is no child graph (the driver refuses one); bodies nest without a
        cycle; each handle made for the node's graph or one it nests in; and kernels pass a
        handle only inside the graphs it was made for (``handle_graph`` and the bodies nested
        in it)."""
        conds, users = ctx.conditionals, ctx.handle_users
        if not conds and not users:
            return
        by_name = {g.name: g for g in graphs}
        children = {n.graph for g in graphs for n in g.other_nodes() if n.TYPE == "graph"}
        seen: dict = {}
        owner: dict = {}
        for n, w, graph in conds:
            if n.handle >= len(conds) or n.handle in seen:
                v.fail(f"{w}.handle", f"handle ids must be 0..{len(conds) - 1}, each used by one "
                                      f"conditional node (found {n.handle})")
            seen[n.handle] = n
            if graph in children:
                v.fail(w, f"graph {graph!r} holds a conditional node and is used as a child "
                          "graph, which CUDA does not allow")
            for i, b in enumerate(n.bodies):
                bw = f"{w}.bodies[{i}]"
                if b in owner or b == graph:
                    v.fail(bw, f"graph {b!r} is the body of more than one conditional node")
                if by_name[b].top_level or b in children:
                    v.fail(bw, f"body graph {b!r} must be run only by its conditional node (not "
                               "top-level, no child graph)")
                owner[b] = graph

        def ancestry(name: str, w: str) -> list:
            """``name`` and the graphs whose bodies hold it, innermost first."""
            chain = [name]
            while chain[-1] in owner:
                chain.append(owner[chain[-1]])
                if len(chain) > MAX_NESTING:
                    v.fail(w, "conditional bodies contain themselves or nest too deeply")
            return chain
        for n, w, graph in conds:
            if n.handle_graph not in ancestry(graph, w):
                v.fail(f"{w}.handle_graph", f"graph {n.handle_graph!r} neither is nor holds the "
                                            f"graph of this node ({graph!r})")
        for graph, w, table in users:         # kernel tables: one vectorised check each
            chain = ancestry(graph, w)
            allowed = np.array(sorted(h for h, n in seen.items() if n.handle_graph in chain),
                               dtype=np.uint64)
            ids = table.handles[:, 1]
            ok = np.isin(ids, allowed)
            if ok.all():
                continue
            j = int(np.argmin(ok))
            hid = int(ids[j])
            hw = f"{w}.handles[{j}]"
            if hid not in seen:
                v.fail(hw, f"handle {hid} does not exist ({len(conds)} handles)")
            v.fail(hw, f"handle {hid} belongs to graph {seen[hid].handle_graph!r}, which does "
                       f"not hold graph {graph!r}")

    @classmethod
    def from_live(cls, index: int, raw: dict, rec, where: str):
        return cls(index, **rec.conditional(raw, index, where))

    def to_live(self, ctx) -> dict:
        return {"type": COND_KINDS.index(self.kind), "size": len(self.bodies),
                "handle": ctx.handle(self.handle)}

    def on_added(self, ctx, result) -> None:
        ctx.fill_bodies(self, result["bodies"])


# ---- the registry ---------------------------------------------------------------------------------

NODE_CLASSES = (KernelNode, MemcpyNode, MemsetNode, EmptyNode, ChildGraphNode, EventRecordNode,
                EventWaitNode, MemAllocNode, MemFreeNode, HostNode, BatchMemOpNode,
                ConditionalNode)
NODE_TYPES = {cls.TYPE: cls for cls in NODE_CLASSES}
_KERNEL_REQUIRED = frozenset(("id", "t") + KernelNode.REQUIRED)
# The inline path takes no handle table: a node map carrying one (refused: handle tables exist
# from schema 3 on, in the kernel table) goes to the strict path, which names the problem.
_KERNEL_ALLOWED = _KERNEL_REQUIRED | frozenset(("attrs",))
_ABSENT = object()


def node_to_manifest(n, layouts) -> dict:
    out: dict = {"id": n.id, "t": n.TYPE}
    n.to_manifest(out, layouts)
    return out


def node_regions(n) -> list:
    """The ids of the regions node ``n`` refers to."""
    return n.regions()


def dims3(v) -> Optional[tuple]:
    """``(x, y, z)`` of a well-formed dims list, else None (the caller takes the strict path)."""
    if type(v) is list and len(v) == 3:
        x, y, z = v
        if type(x) is int and type(y) is int and type(z) is int and \
                1 <= x <= DIM_MAX and 1 <= y <= DIM_MAX and 1 <= z <= DIM_MAX:
            return (x, y, z)
    return None
