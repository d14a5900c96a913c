"""Live CUDA graph -> symbolic :class:`~cgsnap.format.model.Snapshot`.

Walks every node (recursively through child graphs), turns each kernel into its name + image,
every pointer into a :class:`~cgsnap.format.model.Ref`, and copies the contents of every region the graph
references (see :mod:`cgsnap.capture.classify` for how words are classified).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import platform
import sys
import warnings
from typing import Optional

import numpy as np

from .._version import __version__
from ..binary import calls, elf
from ..cuda import driver, graphs, transfer
from ..errors import (BinaryFormatError, CaptureError, CgsnapWarning, DriverError,
                      UnsupportedNodeError)
from ..format.contents import Contents, checksum, is_zero
from ..format.hashing import extents_hash, region_hash
from ..format.model import (ARRAY_FLAGS, ARRAY_FORMATS, MAX_DECISIONS_KEPT, ArrayDesc, Edge,
                            Extent, Graph, Kernel, KernelImage, Policy, Ref, Region, RegionKind,
                            Snapshot, remap_region_refs)
from ..format.nodes import COND_KINDS, NODE_TYPES, KernelNode, Renumbering
from ..kernels import graph_hooks
from ..limits import env_count
from . import classify
from .blocks import AllocatorMap, reached_extents, reached_free_blocks, reached_span
from .buffers import expand_buffers
from .contents import DeviceContents, hold_contents, reader_for
from .classify import (ALLOCATION, NAMED, SPECIAL, Candidate, RangeTable,
                       ambiguous, classify_words, decide, dtype_alignment, make_lookup)

_MAX_ALIGNMENT = 4096


def _alignment(addr: int) -> int:
    return min(addr & -addr, _MAX_ALIGNMENT) if addr else _MAX_ALIGNMENT


class Recording:
    """State of one snapshot: regions, kernels, images and events found so far. Node specs
    (:mod:`cgsnap.format.nodes`) call back into it to turn addresses and handles into refs."""

    def __init__(self, device: driver.Device, resolver, host_callbacks: Optional[dict],
                 allocation_policy=None, allocator_map: Optional[AllocatorMap] = None):
        self.device = device
        self.resolver = resolver
        # {name: function} (ctypes function objects are unhashable) -> {address: name}
        self.host_callbacks = {driver.address_of_function(fn): name
                               for name, fn in (host_callbacks or {}).items()}
        # (base, size) -> (Policy, pool name) or None: lets an integration mark allocations it
        # knows (torch's graph memory pool becomes shared scratch).
        self.allocation_policy = allocation_policy
        # An allocator's own records (cgsnap.capture.blocks): segment bounds (expandable
        # segments span several driver handles), policies, and which blocks are live.
        self.allocator_map = allocator_map
        self.segments: dict = {}          # ALLOCATION region id -> its blocks.Segment
        # Extra (region, offset, span) accesses for the reach of blocks: in-memory pointers
        # (pointer tables in device memory) belong here -- span 0 for a pointer.
        self.extra_accesses: list = []
        self.planned: dict = {}           # region id -> extents planned (zero ones included)
        self.freed: dict = {}             # region id -> [(address, size, saved)] free blocks reached
        self.freed_seen: dict = {}        # address -> (size, saved): each decided once; may be
                                          # shared by the snapshots of one save (one budget)
        self.table = RangeTable()
        self.lookup = make_lookup(self.table, self._find_allocation)
        self.regions: list = []
        self.kernels: list = []
        self.kernel_by_func: dict = {}
        self.images: dict = {}
        self.module_globals_done: set = set()
        self.events: dict = {}
        self.graphs: list = []
        self.graph_names: set = set()
        self._walking: list = []          # names of the graphs being walked (child naming)
        self._walking_graphs: list = []   # and their CUgraph handles (conditional lookups)
        self._graph_names: dict = {}      # CUgraph handle -> name of its graph
        self._alloc_region: dict = {}     # (graph name, node index) -> GRAPH_ALLOC region id
        self._arrays: dict = {}           # CUarray handle -> ARRAY region id
        self._handles_seen: set = set()   # (CUgraph, handle value) of the conditional nodes
        self._handle_count = 0
        self._sets_conditional: dict = {}  # kernel id -> calls.sets_conditionals()
        # Ambiguous argument words (see cgsnap.capture.classify), decided once the whole graph is
        # known: (node, position in params, Ref, word, where)
        self.pending: list = []
        self.decisions: list = []     # one line per decided word, for Snapshot.meta
        self.initial_values: dict = {}    # image hash -> {symbol: bytes loading gives it}

    # ---- regions --------------------------------------------------------------------------
    def add_region(self, kind: RegionKind, base: int, size: int, priority: Optional[int],
                   **fields) -> Region:
        region = Region(id=len(self.regions), kind=kind, size=size, alignment=_alignment(base),
                        origin=base, **fields)
        self.regions.append(region)
        if priority is not None:
            self.table.add(base, size, region.id, priority)
        return region

    def add_named(self, specs: list) -> None:
        """Regions for the named buffers. A buffer carved out of a larger allocation (a caching
        allocator's segment) is restored as a view of that allocation, so that memory graphs
        share stays shared; so are several buffers of one allocation (two views of one
        storage), also when one of them spans all of it. A bound buffer is the caller's memory:
        one that overlaps a buffer that is not bound cannot keep sharing it and is refused."""
        _refuse_bound_overlaps(specs)
        ranges = {}
        for spec in specs:
            if spec.policy is not Policy.BOUND:
                rng = self._allocation_range(spec.ptr)
                if rng is not None and not (rng[0] <= spec.ptr and
                                            spec.ptr + spec.nbytes <= rng[0] + rng[1]):
                    rng = None      # (a view straddling two mappings: not one allocation)
                ranges[spec.name] = rng
        members: dict = {}
        for spec in specs:
            rng = ranges.get(spec.name)
            if rng is not None:
                members.setdefault(rng, []).append(spec)
        _refuse_unshared_overlaps([s for s in specs if s.policy is not Policy.BOUND and
                                   ranges.get(s.name) is None])
        for spec in specs:
            parent = None
            rng = ranges.get(spec.name)
            if rng is not None and (rng != (spec.ptr, spec.nbytes) or len(members[rng]) > 1):
                # A buffer spanning the whole allocation carries all of its bytes: the
                # allocation itself then needs none of its own.
                whole = any((s.ptr, s.nbytes) == rng for s in members[rng])
                parent = self._allocation_region(*rng, Policy.SCRATCH if whole else Policy.SAVED)
            region = self.add_region(RegionKind.NAMED, spec.ptr, spec.nbytes, NAMED,
                                     name=spec.name, dtype=spec.dtype, shape=spec.shape,
                                     policy=spec.policy, strides=spec.strides,
                                     view_offset=spec.view_offset)
            if parent is not None:
                region.parent, region.parent_offset = parent.id, spec.ptr - parent.origin

    def _allocation_range(self, addr: int) -> Optional[tuple]:
        """``(base, size)`` of the allocation holding ``addr``: the allocator map's segment
        where there is one (with expandable segments the driver reports only the 2 or 20 MiB
        handle holding ``addr``), else the driver's allocation."""
        if self.allocator_map is not None:
            seg = self.allocator_map.segment_at(addr)
            if seg is not None:
                return seg.address, seg.size
        return driver.address_range(addr)

    def _allocation_region(self, base: int, size: int, policy: Policy = Policy.SAVED) -> Region:
        for r in self.regions:
            if r.kind is RegionKind.ALLOCATION and r.origin == base:
                return r
        pool = None
        seg = self.allocator_map.segment_at(base) if self.allocator_map is not None else None
        if seg is not None and (seg.address, seg.size) != (base, size):
            seg = None
        if seg is not None:
            policy, pool = seg.policy or policy, seg.pool
        elif self.allocation_policy is not None:
            policy, pool = self.allocation_policy(base, size) or (policy, pool)
        region = self.add_region(RegionKind.ALLOCATION, base, size, ALLOCATION, policy=policy,
                                 pool=pool)
        if seg is not None and seg.blocks:
            self.segments[region.id] = seg
        return region

    def _find_allocation(self, addr: int) -> Optional[Ref]:
        rng = self._allocation_range(addr)
        if rng is None:
            return None
        region = self._allocation_region(*rng)
        return Ref(region.id, addr - region.origin)

    def device_ref(self, addr: int, what: str, span: int = 0) -> Ref:
        """The Ref for ``addr``; when the access of ``span`` bytes runs past a named buffer that
        is a view of an allocation, the Ref goes to the allocation (the memory is the same)."""
        ref = self.lookup(addr)
        if ref is None:
            raise CaptureError(f"{what}: address {addr:#x} is in no device allocation, named "
                               "buffer or module global")
        region = self.regions[ref.region]
        if ref.offset + span > region.size:
            if region.parent is not None:
                ref = Ref(region.parent, region.parent_offset + ref.offset)
                region = self.regions[ref.region]
            if ref.offset + span > region.size:
                raise CaptureError(f"{what}: {span} bytes at {addr:#x} run past the end of "
                                   f"region {ref.region} ({region.size} bytes)")
        return ref

    # ---- kernels --------------------------------------------------------------------------
    def kernel_for(self, func, kern=None) -> int:
        key = int(func)
        kid = self.kernel_by_func.get(key)
        if kid is not None:
            return kid
        name = driver.func_name(func)
        module = driver.func_module(func)
        if hasattr(self.resolver, "resolve_function"):   # the exact identity of this function
            cand = self.resolver.resolve_function(name, func, kern=kern, module=module)
        else:                                            # a resolver by name only
            cand = self.resolver.resolve(name, lambda: driver.module_function_names(module)
                                         if module is not None else frozenset())
        self._add_image(cand)
        ptx_hash = None
        if cand.ptx is not None:
            self._add_image(cand.ptx)
            ptx_hash = cand.ptx.hash
        attrs = driver.func_attrs(func)
        # Record only attributes whose value a fresh function would not already have.
        for key_name, default in (("preferred_shared_memory_carveout", -1),
                                  ("non_portable_cluster_size_allowed", 0),
                                  ("cluster_scheduling_policy_preference", 0)):
            if attrs.get(key_name) == default:
                attrs.pop(key_name, None)
        # A cache preference (L1 / shared split) has no getter: the recorder saw it set.
        cache = getattr(self.resolver, "cache_config", None)
        handle = getattr(self.device, "handle", None)      # a CUdevice, as CUPTI reports it
        config = cache(func, kern, None if handle is None else int(handle)) \
            if cache is not None else None
        if config:                          # 0 = CU_FUNC_CACHE_PREFER_NONE, a fresh function's
            attrs["cache_config"] = int(config)
        kernel = Kernel(id=len(self.kernels), name=name, image=cand.hash,
                        params=driver.func_params(func), attrs=attrs, ptx_image=ptx_hash)
        self.kernels.append(kernel)
        self.kernel_by_func[key] = kernel.id
        if module is not None and (cand.hash, int(module)) not in self.module_globals_done:
            self.module_globals_done.add((cand.hash, int(module)))
            self._add_module_globals(cand, module)
        return kernel.id

    def _add_image(self, cand) -> None:
        if cand.hash not in self.images:
            self.images[cand.hash] = KernelImage(hash=cand.hash, kind=cand.kind, arch=cand.arch,
                                                 names=tuple(sorted(cand.kernels)), data=cand.data,
                                                 source=cand.source)

    def _add_module_globals(self, cand, module) -> None:
        """``__device__`` / ``__constant__`` variables become regions: kernels read them without
        any pointer in their arguments, so their contents must travel with the image."""
        for symbol, _size in cand.globals:
            found = driver.module_global(module, symbol)
            if found is None:
                continue
            addr, size = found
            self.add_region(RegionKind.MODULE_GLOBAL, addr, size, SPECIAL, image=cand.hash,
                            symbol=symbol)

    # ---- graphs ---------------------------------------------------------------------------
    def walk(self, graph, name: str, top_level: bool = True) -> Graph:
        if name in self.graph_names:
            raise CaptureError(f"two graphs are named {name!r}")
        self.graph_names.add(name)
        slot = len(self.graphs)      # parents before their children in the snapshot
        self.graphs.append(None)
        nodes = graphs.graph_nodes(graph)
        ids = {int(n): i for i, n in enumerate(nodes)}
        types = [graphs.node_type(n) for n in nodes]
        # Graph allocations first: other nodes' pointers into them must resolve to them.
        for i, (n, t) in enumerate(zip(nodes, types)):
            if t == "mem_alloc":
                raw = graphs.read_node(n, t, f"graph {name!r} node {i} (mem_alloc)")
                self._alloc_region[(name, i)] = self.add_region(
                    RegionKind.GRAPH_ALLOC, raw["dptr"], raw["bytesize"], SPECIAL,
                    policy=Policy.SCRATCH).id
        out = []
        self._walking.append(name)
        self._walking_graphs.append(int(graph))
        self._graph_names[int(graph)] = name
        try:
            for i, (n, t) in enumerate(zip(nodes, types)):
                where = f"graph {name!r} node {i} ({t})"
                if t == "kernel":
                    out.append(self.kernel_node(i, n, where))
                    continue
                spec = NODE_TYPES.get(t)
                if spec is None:
                    why = graphs.REFUSED.get(t, "cgsnap does not know this node type")
                    raise UnsupportedNodeError(f"{where}: nodes of type {t} cannot be carried: "
                                               f"{why}")
                out.append(spec.from_live(i, graphs.read_node(n, t, where), self, where))
        finally:
            self._walking.pop()
            self._walking_graphs.pop()
        edges = [Edge(ids[int(a)], ids[int(b)], *data) for a, b, data in graphs.graph_edges(graph)]
        g = Graph(name=name, nodes=out, edges=edges, top_level=top_level)
        self.graphs[slot] = g
        return g

    # what node specs ask while converting raw parameters (cgsnap.format.nodes.from_live)
    def child_graph(self, child, index: int) -> str:
        name = f"{self._walking[-1]}/child{index}"
        self.walk(child, name, top_level=False)
        return name

    def conditional(self, raw: dict, index: int, where: str) -> dict:
        """The fields of a conditional node (:class:`cgsnap.format.nodes.ConditionalNode`)
        from the recorder's registry, or from what a 13.2+ driver reads back; its bodies are
        walked as graphs of the snapshot. Refused when neither source knows the node."""
        reg = graph_hooks.registry()
        info = reg.conditional(self._walking_graphs[-1], raw["node"])
        version = driver.version_text(raw["driver"])
        if info is not None:
            value, type_, size, bodies = info.handle, info.type, info.size, list(info.bodies)
        elif "handle" in raw:
            value, type_, size, bodies = raw["handle"], raw["type"], raw["size"], raw["bodies"]
        else:
            raise UnsupportedNodeError(
                f"{where}: conditional nodes can be read back only when the cgsnap recorder saw "
                "them created (cgsnap.start_recorder() before the graph is built/captured) or, "
                "for type/size/bodies, on a CUDA 13.2+ driver; this driver is "
                f"{version}" + ("" if reg.enabled else " and the recorder is not running"))
        # The handle was made for this graph or one whose body holds it: the innermost that
        # the recorder saw make a handle of this value.
        found = [(g, h) for g in reversed(self._walking_graphs)
                 for h in (reg.handle(g, value),) if h is not None]
        if not found:
            raise UnsupportedNodeError(
                f"{where}: the default value and flags of conditional handle {value:#x} cannot "
                "be read back on any driver, and the cgsnap recorder did not see the handle "
                "created: call cgsnap.start_recorder() before the graph is built or captured "
                f"(driver {version})")
        graph, handle = found[0]
        if (graph, value) in self._handles_seen:
            raise UnsupportedNodeError(f"{where}: conditional handle {value:#x} is used by two "
                                       "conditional nodes")
        self._handles_seen.add((graph, value))
        if type_ >= len(COND_KINDS) or not 1 <= size == len(bodies) or not all(bodies):
            raise UnsupportedNodeError(f"{where}: conditional type {type_} with {size} bodies "
                                       f"({len(bodies)} known) cannot be carried")
        hid = self._handle_count
        self._handle_count += 1
        parent = self._walking[-1]
        names = []
        for i, body in enumerate(bodies):
            name = f"{parent}/cond{index}.{i}"
            self.walk(driver.as_graph(int(body)), name, top_level=False)
            names.append(name)
        return {"kind": COND_KINDS[type_], "bodies": tuple(names), "handle": hid,
                "handle_graph": self._graph_names[graph], "default": handle.default,
                "flags": handle.flags, "value": value, "exact": False}

    def array_ref(self, array: int, x: int, y: int, z: int, what: str) -> tuple:
        """``(Ref, ArrayDesc)`` of the point (x bytes, y, z) of CUDA array ``array``, which
        becomes an ARRAY region (its contents saved) the first time it is met."""
        rid = self._arrays.get(int(array))
        if rid is None:
            fmt, channels, width, height, depth, flags = driver.array_descriptor(array)
            if fmt not in ARRAY_FORMATS or channels not in (1, 2, 4) or flags & ~ARRAY_FLAGS:
                raise UnsupportedNodeError(
                    f"{what}: a CUDA array of format {fmt:#x}, {channels} channels and flags "
                    f"{flags:#x} cannot be carried (plain 8/16/32-bit integer, half and float "
                    "elements of 1, 2 or 4 channels; layered, cubemap, surface and gather flags)")
            desc = ArrayDesc(fmt, channels, width, height, depth, flags)
            region = self.add_region(RegionKind.ARRAY, int(array), desc.size, None, array=desc)
            region.alignment = 1
            rid = self._arrays[int(array)] = region.id
        desc = self.regions[rid].array
        if x % desc.element_bytes or x >= desc.row_bytes or y >= desc.rows or \
                z >= desc.slices:
            raise CaptureError(f"{what}: point (x {x} B, y {y}, z {z}) is not an element of "
                               f"the CUDA array ({desc.describe()})")
        return Ref(rid, desc.offset(x, y, z)), desc

    def event_index(self, event: int) -> int:
        return self.events.setdefault(int(event), len(self.events))

    def graph_alloc_region(self, index: int) -> int:
        return self._alloc_region[(self._walking[-1], index)]

    def host_callback_name(self, fn: int, where: str) -> str:
        name = self.host_callbacks.get(fn)
        if name is None:
            raise UnsupportedNodeError(
                f"{where}: a host callback cannot be carried to another process; register it "
                "by name: snapshot(..., host_callbacks={'name': function}), then "
                "load(..., host_callbacks={'name': python_callable})")
        return name

    def kernel_node(self, i, n, where) -> KernelNode:
        try:
            kp = graphs.read_kernel(n)
        except DriverError as exc:
            raise CaptureError(f"{where}: the driver could not read this kernel node ({exc}); "
                               "its kernel's module may have been unloaded after capture") from exc
        if int(kp.func) not in self.kernel_by_func:
            # The first use of the handle: an invalid one means its module is gone.
            try:
                driver.func_name(kp.func)
            except DriverError as exc:
                if exc.name != "CUDA_ERROR_INVALID_HANDLE":
                    raise
                raise CaptureError(
                    f"{where}: the kernel's function handle {int(kp.func):#x} is no longer "
                    "valid: its module was unloaded after capture (a library object freed -- a "
                    "cuFFT plan, a cuDNN or cuBLAS handle, a JIT-compiled kernel -- while the "
                    "graph still names it), so the graph itself can no longer run; keep what "
                    "launched it alive until the graph is snapshot") from exc
        kid = self.kernel_for(kp.func, kp.kern)
        kernel = self.kernels[kid]
        raw = kp.argument_bytes(kernel.params, where)
        return self.classified_node(
            KernelNode(i, kid, kp.grid, kp.block, kp.shared_mem, b"", b"",
                       graphs.kernel_node_attrs(n)), raw, where)

    def classified_node(self, node: KernelNode, raw: list, where: str) -> KernelNode:
        """``node`` with its parameter buffer built from ``raw`` (the bytes of each argument) and
        its pointers classified: sure pointers enter the pointer table now, ambiguous words wait
        for :meth:`decide_ambiguous`."""
        layout = self.kernels[node.kernel].params
        buf = bytearray(max((off + size for off, size in layout), default=0))
        table = []
        for data, (off, size) in zip(raw, layout):
            buf[off:off + len(data)] = data
            for o, ref in classify_words(data, off, self.lookup):
                word = int.from_bytes(data[o:o + 8], "little")
                if ambiguous(word, size == 8):
                    self.pending.append((node, off + o, ref, word, where))
                else:
                    table.append((off + o, ref.region, ref.offset))
        node.params = bytes(buf)
        node.refs = _table_bytes(table)
        return node

    def decide_ambiguous(self) -> None:
        """Settle every ambiguous word (:func:`cgsnap.capture.classify.decide`) from what the
        rest of the graph shows. Words kept literal stay out of the pointer table; every
        decision is logged."""
        if not self.pending:
            return
        layouts = {k.id: k.params for k in self.kernels}
        candidates = [Candidate(id(node), node.kernel, pos, word, ref.offset,
                                dtype_alignment(self.regions[ref.region].dtype))
                      for node, pos, ref, word, _ in self.pending]

        def kernel_nodes():
            for g in self.graphs:
                for n in g.nodes:
                    if n.TYPE == "kernel":
                        yield id(n), n.kernel, n.params, n.pointer_table()["pos"].tolist()
        keep = decide(candidates, kernel_nodes(), layouts)
        added: dict = {}
        for (node, pos, ref, word, where), kept in zip(self.pending, keep):
            if kept:
                added.setdefault(id(node), (node, []))[1].append((pos, ref.region, ref.offset))
            self.decisions.append(f"{where}: word {word:#x} at parameter byte {pos} of "
                                  f"{self.kernels[node.kernel].name}: "
                                  f"{'pointer' if kept else 'literal'}")
        for node, rows in added.values():
            table = np.frombuffer(node.refs, dtype="<u8").reshape(-1, 3).tolist() + rows
            node.refs = _table_bytes(sorted(tuple(r) for r in table))
        self.pending = []

    # ---- conditional handles in kernel arguments -----------------------------------------
    def _kernel_sets_conditionals(self, kid: int):
        """True / False / None (cannot tell): can kernel ``kid`` call cudaGraphSetConditional?"""
        if kid not in self._sets_conditional:
            k = self.kernels[kid]
            im = self.images.get(k.image)
            self._sets_conditional[kid] = None if im is None else \
                calls.sets_conditionals(im.kind, im.data, k.name)
        return self._sets_conditional[kid]

    def assign_handle_refs(self) -> None:
        """Enter the kernel arguments that pass a conditional handle in the nodes' handle
        tables (``KernelNode.handles``), and mark ``exact`` every handle whose uses are not all
        proven (docs/RELIABILITY.md, "Conditional handles"). Evidence, all required for a
        handle reference: the kernel's code calls cudaGraphSetConditional (its image says so),
        the kernel lies in a graph the handle was made for or a body nested in it, the word is
        a whole 8-byte argument that is no pointer, and it equals the value of exactly one
        handle visible there. A handle becomes exact when a setter kernel holds its value
        anywhere else (inside a larger argument, twice, or besides another handle of that
        value), when a setter kernel holds no handle at all (it may read one from memory), when
        the image cannot tell whether a kernel is a setter, and for setter kernels in child
        graphs nested in its bodies (their arguments are built before the handle exists)."""
        conds = [n for g in self.graphs for n in g.nodes if n.TYPE == "conditional"]
        if not conds:
            return
        owner = {b: g.name for g in self.graphs for n in g.nodes if n.TYPE == "conditional"
                 for b in n.bodies}
        made: dict = {}                       # graph name -> {value: ConditionalNode}
        for n in conds:
            made.setdefault(n.handle_graph, {})[n.value] = n
        by_name = {g.name: g for g in self.graphs}

        def visible(name: str) -> dict:
            out: dict = {}
            while True:
                for value, n in made.get(name, {}).items():
                    out.setdefault(value, []).append(n)
                if name not in owner:
                    return out
                name = owner[name]
        for g in self.graphs:
            seen = visible(g.name)
            if not seen:
                continue
            for n in g.nodes:
                if n.TYPE == "kernel":
                    self._handle_words(n, seen)
                elif n.TYPE == "graph":
                    self._child_setters(by_name, n.graph, seen, 0)

    def _handle_words(self, node: KernelNode, seen: dict) -> None:
        sets = self._kernel_sets_conditionals(node.kernel)
        if sets is False:
            return
        pointers = set(node.pointer_table()["pos"].tolist())
        found, doubtful = [], []
        for off, size in self.kernels[node.kernel].params:
            for pos in range(off + (-off) % 8, off + size - 7, 8):
                if pos in pointers:
                    continue
                handles = seen.get(int.from_bytes(node.params[pos:pos + 8], "little"))
                if handles is None:
                    continue
                if size == 8 and len(handles) == 1:
                    found.append((pos, handles[0]))
                else:
                    doubtful.extend(handles)
        values = [h.value for _, h in found]
        doubtful.extend(h for _, h in found if values.count(h.value) > 1 or sets is None)
        if not found:
            doubtful.extend(h for hs in seen.values() for h in hs)
        for h in doubtful:
            h.exact = True
        node.handles = np.array([(pos, h.handle) for pos, h in found],
                                dtype="<u8").reshape(-1, 2).tobytes()

    def _child_setters(self, by_name: dict, name: str, seen: dict, depth: int) -> None:
        g = by_name.get(name)
        if g is None or depth > 64:
            return
        for n in g.nodes:
            if n.TYPE == "kernel" and self._kernel_sets_conditionals(n.kernel) is not False:
                for hs in seen.values():
                    for h in hs:
                        h.exact = True
            elif n.TYPE == "graph":
                self._child_setters(by_name, n.graph, seen, depth + 1)

    def refuse_texture_objects(self) -> None:
        """UnsupportedNodeError when a kernel argument holds the value of a live texture or
        surface object of this process: such objects are process-local indices that cgsnap
        cannot recreate yet, and by value they look like any integer (docs/RELIABILITY.md)."""
        known: dict = {}
        for g in self.graphs:
            for n in g.nodes:
                if n.TYPE != "kernel":
                    continue
                skip = set(n.pointer_table()["pos"].tolist()) | {p for p, _ in n.handle_refs()}
                k = self.kernels[n.kernel]
                for i, (off, size) in enumerate(k.params):
                    if size != 8 or off in skip:
                        continue
                    value = int.from_bytes(n.params[off:off + 8], "little")
                    if not 0 < value < 1 << 32:
                        continue
                    if value not in known:
                        known[value] = driver.texture_object_resource(value)
                    if known[value]:
                        raise UnsupportedNodeError(
                            f"graph {g.name!r} node {n.id} (kernel {k.name}): argument {i} holds "
                            f"{value:#x}, the value of a live {known[value]} in this process; "
                            "texture and surface objects cannot be carried to another process "
                            "(destroy the object if the argument is a plain integer)")

    def host_ref(self, addr: int, span: int, is_source: bool) -> Ref:
        """Host memory a copy reads or writes becomes a HOST region spanning exactly the copy;
        a source's bytes are saved (the host program that filled them is not carried)."""
        ref = self.table.find(addr)
        if ref is not None and self.regions[ref.region].kind is RegionKind.HOST and \
                ref.offset + span <= self.regions[ref.region].size:
            return ref
        region = self.add_region(RegionKind.HOST, addr, span, SPECIAL,
                                 policy=Policy.SAVED if is_source else Policy.SCRATCH)
        return Ref(region.id, 0)


def _overlapping_pairs(specs: list):
    """Pairs of buffers whose bytes overlap (each pair once)."""
    spans = sorted((s.ptr, s.ptr + s.nbytes, i) for i, s in enumerate(specs) if s.nbytes)
    active: list = []
    for start, end, i in spans:
        active = [(e, j) for e, j in active if e > start]
        for _, j in active:
            yield specs[j], specs[i]
        active.append((end, i))


def _refuse_bound_overlaps(specs: list) -> None:
    for a, b in _overlapping_pairs(specs):
        if (a.policy is Policy.BOUND) != (b.policy is Policy.BOUND):
            bound, other = (a, b) if a.policy is Policy.BOUND else (b, a)
            raise CaptureError(f"named buffer {other.name!r} overlaps bound buffer "
                               f"{bound.name!r}: bound memory is the restoring process's, so a "
                               "view of it must be bound too (bind both), or name neither")


def _refuse_unshared_overlaps(specs: list) -> None:
    for a, b in _overlapping_pairs(specs):
        raise CaptureError(f"named buffers {a.name!r} and {b.name!r} overlap but lie in no "
                           "device allocation the driver knows: they cannot share memory "
                           "after restore")


def _table_bytes(rows) -> bytes:
    """A pointer table (rows of position, region, offset) as stored: u64 triples."""
    return np.array(rows, dtype="<u8").reshape(-1, 3).tobytes()


# ---- contents ---------------------------------------------------------------------------------

def _used_regions(rec: Recording) -> set:
    used = {r.parent for r in rec.regions if r.parent is not None}
    for r in rec.regions:
        if r.refs:
            used.update(r.pointer_table()["region"].tolist())
    for g in rec.graphs:
        used.update(g.checks)
        for n in g.nodes:
            used.update(n.regions())
    return used


def _keep_regions(rec: Recording, keep: list) -> None:
    """Keep only ``keep`` (a sub-list of ``rec.regions``), renumbering every reference."""
    if len(keep) == len(rec.regions):
        return
    rmap = {r.id: i for i, r in enumerate(keep)}
    rec.regions = [dataclasses.replace(r, id=rmap[r.id],
                                       parent=None if r.parent is None else rmap[r.parent],
                                       refs=remap_region_refs(r.refs, rmap))
                   for r in keep]
    rec.segments = {rmap[rid]: seg for rid, seg in rec.segments.items() if rid in rmap}
    rec.extra_accesses = [(rmap[a[0]],) + tuple(a[1:]) for a in rec.extra_accesses
                          if a[0] in rmap]
    rec.planned = {rmap[rid]: p for rid, p in rec.planned.items() if rid in rmap}
    rec.freed = {rmap[rid]: f for rid, f in rec.freed.items() if rid in rmap}
    rec.table.renumber(rmap)     # what is looked up after this (stored pointers) sees the new ids
    for g in rec.graphs:
        renumber = Renumbering(rmap)
        g.nodes = [n.remap(renumber) for n in g.nodes]
        g.checks = {rmap[rid]: data for rid, data in g.checks.items()}
        g.rng = [e.remap(rmap) for e in g.rng]


def _drop_unused_allocations(rec: Recording) -> None:
    """An allocation found only through a word later kept literal is not the graph's memory:
    neither its contents nor its size belong in the file."""
    used = _used_regions(rec)
    _keep_regions(rec, [r for r in rec.regions
                        if r.kind is not RegionKind.ALLOCATION or r.id in used])


def _unchanged_global(rec: Recording, r: Region) -> bool:
    """Whether module global ``r`` still holds what loading its image gives it."""
    cache = rec.initial_values
    if r.image not in cache:
        try:
            cache[r.image] = elf.global_initial_values(rec.images[r.image].data)
        except BinaryFormatError:
            cache[r.image] = {}
    value = cache[r.image].get(r.symbol)
    return value is not None and len(value) == r.size and \
        np.asarray(r.data, dtype=np.uint8).tobytes() == value


def _drop_unchanged_globals(rec: Recording) -> None:
    """Module globals that no node or stored pointer points at and that still hold what
    loading their image gives them need not travel: the restore's library load recreates them.
    Library modules (cuBLAS) define hundreds of such tables; carrying them made the file, its
    validation and the restore's per-region driver calls several times larger than the graphs
    themselves."""
    used = _used_regions(rec)
    _keep_regions(rec, [r for r in rec.regions
                        if not (r.kind is RegionKind.MODULE_GLOBAL and r.policy is Policy.SAVED
                                and r.id not in used and _unchanged_global(rec, r))])


# ---- pointers stored in device memory ----------------------------------------------------------

MEMORY_POINTER_CHOICES = ("follow", "off")


def check_memory_pointers(value: str, budget: int) -> None:
    """CaptureError unless ``value`` is a ``memory_pointers`` setting and ``budget`` a size."""
    if value not in MEMORY_POINTER_CHOICES:
        raise CaptureError(f"memory_pointers={value!r}: expected one of "
                           f"{', '.join(MEMORY_POINTER_CHOICES)}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise CaptureError(f"pointer_budget={budget!r}: expected a number of bytes")


def _region_label(r: Region) -> str:
    if r.kind is RegionKind.NAMED:
        return f"buffer {r.name!r}"
    if r.kind is RegionKind.MODULE_GLOBAL:
        return f"module global {r.symbol}"
    where = f" at {r.origin:#x}" if r.origin is not None else ""
    return f"region {r.id} ({r.kind.value}{where})"


def _scannable(rec: Recording, r: Region) -> bool:
    """What is scanned for stored pointers: saved contents of allocations, of named buffers of
    an integer (or no) dtype, of host memory copies read, and of module globals that no longer
    hold their image's initial value (what still does cannot hold an address of this
    process)."""
    if r.policy is not Policy.SAVED or r.size < 8:
        return False
    if r.kind is RegionKind.NAMED:
        return classify.holds_pointers(r.dtype)
    if r.kind is RegionKind.MODULE_GLOBAL:
        return not _unchanged_global(rec, r)
    return r.kind in (RegionKind.ALLOCATION, RegionKind.HOST)


def _strong_argument_values(rec: Recording) -> set:
    """The values of the kernel arguments' strong pointers: evidence for ambiguous words."""
    values = set()
    for g in rec.graphs:
        for n in g.nodes:
            if n.TYPE != "kernel" or not n.refs:
                continue
            whole = {off for off, size in rec.kernels[n.kernel].params if size == 8}
            for pos in n.pointer_table()["pos"].tolist():
                word = int.from_bytes(n.params[pos:pos + 8], "little")
                if classify.strong(word, pos in whole):
                    values.add(word)
    return values


MAX_POINTER_ROUNDS = 64


def _follow_memory_pointers(rec: Recording, name: str, budget: int, hold: str,
                            contents_cache: Optional[dict]) -> None:
    """Scan what is saved for stored pointers (classify.MemoryPointers), bring in the
    allocations they reach (contents read now, like the others'), record each word in its
    region's ``refs``.

    Saved contents are scanned as a restore will write them: a whole region's bytes, or a
    segment's extents with zeros between them. A stored pointer reaches the block it lands in
    like any other ref (``Recording.extra_accesses``): where that adds blocks to a segment's
    extents, their contents are read, and everything is scanned again, until no pointer adds
    a block (their bytes may hold pointers too)."""
    views: dict = {}

    def read(region: Region):
        """Contents of a region, read once it is within the budgets."""
        if region.policy is Policy.SAVED and region.data is None and region.extents is None:
            if region.id in rec.segments:          # a segment brought in: planned by block
                _replan(rec, [region.id], hold, contents_cache)
            else:
                _read_whole(region, hold, contents_cache)
        key = (region.id, len(region.extents) if region.extents is not None else -1)
        hit = views.get(region.id)
        if hit is None or hit[0] != key:
            hit = views[region.id] = (key, _scan_bytes(region))
        return hit[1]

    for _ in range(MAX_POINTER_ROUNDS):
        scan = classify.MemoryPointers(
            rec.regions, rec.table, rec._allocation_range, rec._allocation_region, read,
            lambda r: _scannable(rec, r), lambda rid: _region_label(rec.regions[rid]),
            _strong_argument_values(rec), budget=budget, what=f"snapshot {name!r}")
        result = scan.run()
        for rid in result.added:
            if rec.regions[rid].policy is Policy.SAVED:
                read(rec.regions[rid])
        touched = set()
        rec.extra_accesses = [a for a in rec.extra_accesses if a[3:] != ("stored",)]
        for rid, table in result.refs.items():
            rec.regions[rid].refs = table.astype("<u8").tobytes()
            for target, offset in table[:, 1:].tolist():
                if target in rec.segments:
                    rec.extra_accesses.append((target, offset, 0, "stored"))
                    touched.add(target)
        if not _replan(rec, sorted(touched), hold, contents_cache):
            break
    else:
        raise CaptureError(f"snapshot {name!r}: pointers stored in device memory kept reaching "
                           f"new blocks after {MAX_POINTER_ROUNDS} rounds")
    rec.decisions.extend(result.decisions)


def _scan_bytes(r: Region) -> np.ndarray:
    """A saved region's bytes as a restore writes them (extents, zeros between them)."""
    if r.extents is None:
        return _host_bytes(r.data)
    out = np.zeros(r.size, dtype=np.uint8)
    for e in r.extents:
        out[e.offset:e.offset + e.length] = _host_bytes(e.data)
    return out


def _host_bytes(data) -> np.ndarray:
    if isinstance(data, Contents):
        return np.asarray(data)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


# Regions whose contents are read into host memory by _read_region, not as device address
# ranges: host memory, module globals, and CUDA arrays (their origin is a CUarray, no address).
_READ_TO_HOST = (RegionKind.HOST, RegionKind.MODULE_GLOBAL, RegionKind.ARRAY)


def _read_whole(r: Region, hold: str, contents_cache: Optional[dict]) -> None:
    """The whole contents of a saved region that was brought in late (held as ``hold``)."""
    if r.kind in _READ_TO_HOST:
        r.data = _read_region(r)
        r.content_hash = region_hash(r.data)
        return
    key = (r.origin, r.size)
    cache = contents_cache if contents_cache is not None else {}
    if key not in cache:
        cache[key] = hold_contents([key], hold)[0][0]
    r.data = cache[key]
    if isinstance(r.data, Contents):
        r.data.reader.scan([r.data])
    r.content_hash = _digest(r.data).hex()


def _replan(rec: Recording, rids: list, hold: str, contents_cache: Optional[dict]) -> bool:
    """Extents and spans of segments ``rids`` again, now that more refs reach them; the new
    extents' contents read and scanned (all-zero ones left out). Whether any extent was
    added."""
    if not rids:
        return False
    accesses, direct = _accesses_both(rec)
    views = _views_by_parent(rec)
    grew = False
    for rid in rids:
        r = rec.regions[rid]
        reached = _plan_segment(rec, rid, accesses, direct, views)
        if reached is None:
            continue
        planned = rec.planned.setdefault(rid, set())
        new = [(o, n) for o, n in reached if (o, n) not in planned]
        if r.extents is None:
            r.extents = []
        if not new:
            continue
        planned.update(new)
        extents = [Extent(o, n) for o, n in new]
        _hold_extents(rec, r, extents, hold, contents_cache)
        kept = [e for e in extents if not _zero(e.data)]
        if kept:
            grew = True
            r.extents = sorted(r.extents + kept, key=lambda e: e.offset)
        r.content_hash = extents_hash((e.offset, e.length, _digest(e.data)) for e in r.extents)
    return grew


def _hold_extents(rec: Recording, r: Region, extents: list, hold: str,
                  contents_cache: Optional[dict]) -> None:
    cache = contents_cache if contents_cache is not None else {}
    spans = [(r.origin + e.offset, e.length) for e in extents]
    todo = [sp for sp in dict.fromkeys(spans) if sp not in cache]
    if todo:
        for sp, c in zip(todo, hold_contents(todo, hold)[0]):
            cache[sp] = c
    device = [cache[sp] for sp in spans if isinstance(cache[sp], Contents)]
    if device:
        device[0].reader.scan(device)
    for e, sp in zip(extents, spans):
        e.data = cache[sp]


def _read_region(region: Region, stager=None) -> np.ndarray:
    out = transfer.host_array(region.size, stager)
    if region.size:
        if region.kind is RegionKind.ARRAY:
            a = region.array
            driver.array_copy(region.origin, int(out.ctypes.data), a.row_bytes, a.rows,
                              a.slices, to_host=True)
        elif region.kind is RegionKind.HOST:
            ctypes.memmove(out.ctypes.data, region.origin, region.size)
        elif stager is not None and region.size >= transfer.THRESHOLD:
            stager.download(out, region.origin, region.size)
        else:
            driver.dtoh(int(out.ctypes.data), region.origin, region.size)
    return out


# ---- which blocks of a segment the graphs reach -----------------------------------------------

def _accesses_both(rec: Recording) -> tuple:
    """``(every access, the accesses without stored words)``: :func:`_accesses` both ways,
    the graphs walked once."""
    direct = _accesses(rec, stored=False)
    full = {rid: (list(p), list(s)) for rid, (p, s) in direct.items()}
    _add_accesses(rec, full, [a for a in rec.extra_accesses if a[3:] == ("stored",)])
    return full, direct


def _add_accesses(rec: Recording, out: dict, accesses) -> None:
    """``(region, offset, span[, why])`` accesses into ``out`` as :func:`_accesses` counts
    them (a view's in its parent too)."""
    for rid, offset, span, *_ in accesses:
        while True:
            ptrs, spans = out.setdefault(rid, ([], []))
            if span is None:
                spans.append((0, rec.regions[rid].size))
            elif span == 0:
                ptrs.append(offset)
            else:
                spans.append((offset, span))
            parent = rec.regions[rid].parent
            if parent is None:
                break
            offset += rec.regions[rid].parent_offset
            rid = parent


def _accesses(rec: Recording, stored: bool = True) -> dict:
    """``{region id: ([pointer offsets], [(offset, length)] spans)}`` of every place the
    graphs address; an access to a view counts in its parent too (same memory). A node type
    that says only which regions it uses reaches all of them. ``stored=False``: without the
    pointers found stored in saved memory (what may pull in a free block: a stale stored
    address mostly points at freed memory, and reaches no free block)."""
    acc: list = []          # (region, offset, span): span 0 a pointer, None the whole region
    for g in rec.graphs:
        for n in g.nodes:
            if n.TYPE == "kernel":
                acc.extend((rid, off, 0) for _, rid, off in
                           np.frombuffer(n.refs, dtype="<u8").reshape(-1, 3).tolist())
            elif n.TYPE == "memcpy":
                acc.append((n.src.region, n.src.offset, n.span("src")))
                acc.append((n.dst.region, n.dst.offset, n.span("dst")))
            elif n.TYPE == "memset":
                acc.append((n.dst.region, n.dst.offset, n.span()))
            elif n.TYPE == "mem_free":
                acc.append((n.ptr.region, n.ptr.offset, 0))
            elif n.TYPE == "batch_mem_op":
                acc.extend((op.addr.region, op.addr.offset, 0) for op in n.ops
                           if op.addr is not None)
            else:
                acc.extend((rid, 0, None) for rid in n.regions())
    # a named view reaches the blocks it overlaps
    acc.extend((r.parent, r.parent_offset, r.size) for r in rec.regions if r.parent is not None)
    acc.extend(a for a in rec.extra_accesses if stored or a[3:] != ("stored",))
    out: dict = {}
    _add_accesses(rec, out, acc)
    return out


def _views_by_parent(rec: Recording) -> dict:
    """``{parent id: [(offset, size)]}`` of the views that are saved or scratch on their own."""
    views: dict = {}
    for r in rec.regions:
        if r.parent is not None and r.policy in (Policy.SAVED, Policy.SCRATCH):
            views.setdefault(r.parent, []).append((r.parent_offset, r.size))
    return views


# Bytes of freed allocator blocks one snapshot saves at most (CGSNAP_FREED_BUDGET overrides):
# a stale argument word can land in a large coalesced free block, and a graph that really reads
# freed memory is a bug the warning names either way.
FREED_BUDGET = 256 << 20


def freed_budget() -> int:
    forced = env_count("CGSNAP_FREED_BUDGET")
    return FREED_BUDGET if forced is None else forced


def _note_free(rec: Recording, rid: int, seg, free_reach, exclude) -> set:
    """The free allocator blocks of region ``rid`` that the graph reaches directly
    (``free_reach``: its ``(pointers, spans)`` without stored words), less what views saved
    on their own cover: each decided once, saved while the snapshot's freed bytes stay within
    :func:`freed_budget`, and remembered by device address for the report (region ids change
    later). Returns the offsets of the blocks to save, for
    :func:`~cgsnap.capture.blocks.reached_extents`."""
    ok = set()
    free = reached_free_blocks(seg, *free_reach, exclude=exclude)
    if not free:
        return ok
    rows = rec.freed.setdefault(rid, [])
    for off, n in free:
        addr = seg.address + off
        if addr not in rec.freed_seen:
            used = sum(size for size, saved in rec.freed_seen.values() if saved)
            rec.freed_seen[addr] = (n, used + n <= freed_budget())
        saved = rec.freed_seen[addr][1]
        if (addr, n, saved) not in rows:
            rows.append((addr, n, saved))
        if saved:
            ok.add(off)
    return ok


def freed_report(rec: Recording) -> Optional[dict]:
    """The snapshot meta entry for free blocks the graph reads, or None: how many, their
    bytes, those left unsaved over the budget, and the first few as
    ``{region, address, size, saved}``."""
    rows = sorted({(rid, addr, n, saved) for rid, blocks in rec.freed.items()
                   for addr, n, saved in blocks})
    if not rows:
        return None
    out = {"count": len(rows), "bytes": sum(r[2] for r in rows),
           "blocks": [{"region": rid, "address": addr, "size": n, "saved": saved}
                      for rid, addr, n, saved in rows[:MAX_DECISIONS_KEPT]]}
    skipped = [r for r in rows if not r[3]]
    if skipped:
        out["not_saved"] = {"count": len(skipped), "bytes": sum(r[2] for r in skipped)}
    return out


def report_freed(rec: Recording, name: str, snap_meta: dict, warn: bool = True) -> None:
    """Put :func:`freed_report` into ``snap_meta`` and (``warn``) say so with a
    :class:`cgsnap.CgsnapWarning` (:func:`warn_freed`)."""
    freed = freed_report(rec)
    if freed is None:
        return
    snap_meta["freed_blocks_read"] = freed
    if warn:
        warn_freed(f"graph {name!r}", freed, stacklevel=5)


def warn_freed(graphs: str, freed: dict, stacklevel: int = 2) -> None:
    """The :class:`cgsnap.CgsnapWarning` for a ``meta.freed_blocks_read`` report;
    ``graphs``: ``"graph 'a'"`` or ``"graphs 'a', 'b'"``."""
    first = freed["blocks"][0]
    skipped = freed.get("not_saved")
    what = ("They are saved as they are now" if skipped is None else
            f"{skipped['bytes']} bytes of them, past the freed-block budget "
            f"({freed_budget()} bytes, CGSNAP_FREED_BUDGET), are not saved: a graph that really "
            "reads them restores zeros there; the rest are saved as they are now")
    warnings.warn(CgsnapWarning(
        f"{graphs} reach{'es' if graphs.startswith('graph ') else ''} {freed['count']} block(s) "
        "the allocator has freed "
        f"({freed['bytes']} bytes; the first at {first['address']:#x}, region "
        f"{first['region']}): probably a tensor the graph uses was freed while the graph lives, "
        f"and the original reads whatever the allocator puts there next. {what}; keep the "
        "tensors (the model) alive while the graph is used"), stacklevel=stacklevel)


def _plan_extents(rec: Recording) -> None:
    """Saved allocations of the allocator map get ``extents``: the blocks the graphs
    reach, less the views inside them that are saved or scratch on their own; and every
    allocation of the map its ``span``, the part of it the graphs use."""
    if not rec.segments:
        return
    accesses, direct = _accesses_both(rec)
    views = _views_by_parent(rec)
    for rid in rec.segments:
        planned = _plan_segment(rec, rid, accesses, direct, views)
        if planned is None:
            continue
        rec.planned[rid] = set(planned)
        rec.regions[rid].extents = [Extent(o, n) for o, n in planned]


def _plan_segment(rec: Recording, rid: int, accesses: dict, direct: dict,
                  views: dict) -> Optional[list]:
    """Allocator segment ``rid``: its ``span`` set from what reaches it (``accesses``, from
    :func:`_accesses_both` with ``direct``), and, when it is saved, the extents the graphs
    reach (:func:`~cgsnap.capture.blocks.reached_extents`; free blocks as
    :func:`_note_free` decides); None when it is not saved."""
    r, seg = rec.regions[rid], rec.segments[rid]
    ptrs, spans = accesses.get(rid, ((), ()))
    used = reached_span(seg, ptrs, spans)
    if used[1] > used[0]:
        r.span = used
    if r.policy is not Policy.SAVED:
        return None
    free_ok = _note_free(rec, rid, seg, direct.get(rid, ((), ())), views.get(rid, ()))
    return reached_extents(seg, ptrs, spans, views.get(rid, ()), free_blocks=free_ok)


# ---- reading the contents -----------------------------------------------------------------------

def _read_contents(rec: Recording, hold: str, contents_cache: Optional[dict]) -> str:
    """Every saved region's (and extent's) contents as they are now: device ranges held as
    ``hold`` says (:func:`cgsnap.capture.contents.hold_contents`), then scanned; host and
    module-global regions read into host memory. Sets content hashes and drops all-zero
    extents (zero is what the restore leaves there). Returns the hold used."""
    targets, spans = [], []
    for r in rec.regions:
        if r.policy is not Policy.SAVED:
            continue
        if r.kind in _READ_TO_HOST:
            r.data = _read_region(r)
            r.content_hash = region_hash(r.data)
        elif r.extents is not None:
            for e in r.extents:
                targets.append(e)
                spans.append((r.origin + e.offset, e.length))
        else:
            targets.append(r)
            spans.append((r.origin, r.size))
    cache = contents_cache if contents_cache is not None else {}
    todo = [i for i, sp in enumerate(spans) if sp not in cache]
    how = "none"
    if todo:
        big = sum(spans[i][1] for i in todo) >= transfer.THRESHOLD
        with (transfer.Stager() if big else contextlib.nullcontext()) as st:
            held, how = hold_contents([spans[i] for i in todo], hold, st)
        for i, c in zip(todo, held):
            cache[spans[i]] = c
    data = [cache[sp] for sp in spans]
    device = [c for c in data if isinstance(c, Contents)]
    if device:
        device[0].reader.scan(device)
    for t, c in zip(targets, data):
        t.data = c
    for r in rec.regions:
        if r.policy is not Policy.SAVED or r.kind in _READ_TO_HOST:
            continue
        if r.extents is None:
            r.content_hash = _digest(r.data).hex()
            continue
        r.extents = [e for e in r.extents if not _zero(e.data)]
        r.content_hash = extents_hash((e.offset, e.length, _digest(e.data)) for e in r.extents)
    return how


def _digest(data) -> bytes:
    if isinstance(data, Contents):
        if data.digest is None:
            data.reader.scan([data])
        return data.digest
    return checksum(memoryview(data).cast("B"))


def _zero(data) -> bool:
    return data.zero if isinstance(data, Contents) else is_zero(memoryview(data).cast("B"))


def patch_saved_bytes(r: Region, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` into the saved contents of region ``r`` -- its whole
    contents, or the extent holding those bytes (a new extent where none does and ``data`` is
    not all zero: an all-zero block is left out at snapshot time). What is patched is kept in
    host memory from then on (no longer read from the device at save time); ``content_hash``
    follows."""
    n = len(data)
    patch = np.frombuffer(data, dtype=np.uint8)
    if r.extents is None:
        r.data = _writable(r.data)
        r.data[offset:offset + n] = patch
        r.content_hash = region_hash(r.data)
        return
    for e in r.extents:
        if e.offset <= offset and offset + n <= e.offset + e.length:
            e.data = _writable(e.data)
            e.data[offset - e.offset:offset - e.offset + n] = patch
            break
        if e.offset < offset + n and offset < e.offset + e.length:
            raise CaptureError(f"bytes {offset}..{offset + n} of region {r.id} straddle the "
                               f"saved extent at {e.offset} ({e.length} bytes)")
    else:
        if not patch.any():
            return
        r.extents = sorted(r.extents + [Extent(offset, n, patch.copy())], key=lambda e: e.offset)
    r.content_hash = extents_hash((e.offset, e.length, _digest(e.data)) for e in r.extents)


def _writable(data) -> np.ndarray:
    if isinstance(data, np.ndarray) and data.flags.writeable and data.dtype == np.uint8:
        return data
    if isinstance(data, Contents):
        return np.array(np.asarray(data), dtype=np.uint8)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8).copy()


def _bound_hashes(rec: Recording, bound_hashes: Optional[dict]) -> None:
    """``content_hash`` of bound named regions, for load(verify_bound=True): read and hashed
    through the staging pipeline, once per range for all the graphs of a file."""
    cache = bound_hashes if bound_hashes is not None else {}
    bound = [r for r in rec.regions if r.policy is Policy.BOUND and r.kind is RegionKind.NAMED]
    todo = [r for r in bound if (r.origin, r.size) not in cache]
    if todo:
        reader = reader_for(driver.current_context())
        live = [DeviceContents(r.origin, r.size, reader) for r in todo]
        reader.scan(live)
        for r, c in zip(todo, live):
            cache[(r.origin, r.size)] = c.digest.hex()
    for r in bound:
        r.content_hash = cache[(r.origin, r.size)]


def _write_region(region: Region, data: np.ndarray) -> None:
    if region.size:
        if region.kind is RegionKind.ARRAY:
            a = region.array
            driver.array_copy(region.origin, int(data.ctypes.data), a.row_bytes, a.rows,
                              a.slices, to_host=False)
        elif region.kind is RegionKind.HOST:
            ctypes.memmove(region.origin, data.ctypes.data, region.size)
        else:
            driver.htod(region.origin, int(data.ctypes.data), region.size)


def _record_checks(rec: Recording, graph, g: Graph) -> Optional[str]:
    """Launch the original graph once, keep the named regions' contents as the expected output
    of `replay --check`, then put every region back as it was (the original is left untouched).
    Returns a reason when the graph cannot be launched a second time (e.g. it holds memory nodes
    and the caller already instantiated it)."""
    named = [r for r in rec.regions if r.kind is RegionKind.NAMED]
    if not named:
        return None
    backups = {r.id: _read_region(r) for r in rec.regions if r.kind is not RegionKind.GRAPH_ALLOC}
    try:
        exe = graphs.instantiate(graph)
    except Exception as exc:   # DriverError: report, snapshot without checks
        return f"the graph could not be instantiated again for the check: {exc}"
    stream = driver.stream_create()
    try:
        graphs.launch(exe, stream)
        driver.stream_sync(stream)
        for r in named:
            g.checks[r.id] = _read_region(r)
    finally:
        graphs.exec_destroy(exe)
        driver.stream_destroy(stream)
        for rid, data in backups.items():
            _write_region(rec.regions[rid], data)
        driver.ctx_sync()
    return None


def _versions() -> dict:
    out = {"cgsnap": __version__, "cuda-bindings": driver.bindings_version(),
           "python": platform.python_version()}
    for mod in ("torch", "cupy", "triton"):   # only what the process already imported
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = str(m.__version__)
    return out


def snapshot_graph(graph, *, name: str = "graph", buffers: Optional[dict] = None,
                   record_outputs: Optional[bool] = None, host_callbacks: Optional[dict] = None,
                   resolver=None, meta: Optional[dict] = None,
                   allocation_policy=None, bound_hashes: Optional[dict] = None,
                   memory_pointers: str = "follow",
                   pointer_budget: int = classify.DEFAULT_POINTER_BUDGET,
                   allocator_map: Optional[AllocatorMap] = None, hold: str = "copy",
                   contents_cache: Optional[dict] = None, freed_seen: Optional[dict] = None,
                   warn_freed: bool = True) -> Snapshot:
    """Record a live CUgraph (see :func:`cgsnap.snapshot` for the user-facing form).
    ``allocator_map``: the allocator's segments and blocks (only reached blocks are
    saved); ``hold``: where saved contents wait for the save
    (:func:`cgsnap.capture.contents.hold_contents`); ``bound_hashes`` / ``contents_cache``
    let the snapshots of several graphs read shared memory once; ``freed_seen`` lets them
    share one freed-block budget (:func:`freed_budget`), and ``warn_freed=False`` leaves the
    warning about freed blocks to the caller (the report stays in the meta)."""
    check_memory_pointers(memory_pointers, pointer_budget)
    from .contents import HOLD_CHOICES
    if hold not in HOLD_CHOICES:
        raise CaptureError(f"hold={hold!r}: expected one of {', '.join(HOLD_CHOICES)}")
    device = driver.current_device()
    if resolver is None:
        from ..kernels.registry import default_resolver
        resolver = default_resolver(device.arch)
    rec = Recording(device, resolver, host_callbacks, allocation_policy, allocator_map)
    if freed_seen is not None:
        rec.freed_seen = freed_seen
    rec.add_named(expand_buffers(buffers or {}))
    driver.ctx_sync()      # contents must be read after the work that produced them
    g = rec.walk(graph, name)       # rec.graphs[0]; the steps below edit it in place
    rec.decide_ambiguous()
    rec.assign_handle_refs()
    rec.refuse_texture_objects()
    _drop_unused_allocations(rec)
    _plan_extents(rec)
    _read_contents(rec, hold, contents_cache)    # as they are now, before any check launch
    _bound_hashes(rec, bound_hashes)
    if memory_pointers == "follow":
        _follow_memory_pointers(rec, name, pointer_budget, hold, contents_cache)
    note = None
    # By default outputs are recorded when buffers are named and nothing is bound: a bound
    # region's contents are not in the file, so `replay --check` could not use them anyway.
    strict = record_outputs is True
    if record_outputs is None:
        record_outputs = not any(r.policy is Policy.BOUND for r in rec.regions)
    if record_outputs:
        note = _record_checks(rec, graph, g)
        if note and strict:
            raise CaptureError(note)
    snap_meta = {"name": name, "created": datetime.datetime.now(datetime.timezone.utc)
                 .isoformat(timespec="seconds"), "host": platform.node()}
    _drop_unchanged_globals(rec)
    if rec.decisions:
        snap_meta["ambiguous_words"] = rec.decisions[:MAX_DECISIONS_KEPT]
        snap_meta["ambiguous_word_count"] = len(rec.decisions)
    if note:
        snap_meta["checks_skipped"] = note
    report_freed(rec, name, snap_meta, warn=warn_freed)
    snap_meta.update(meta or {})
    return Snapshot(graphs=rec.graphs, regions=rec.regions, images=list(rec.images.values()),
                    kernels=rec.kernels, events=len(rec.events), device=device.describe(),
                    versions=_versions(), meta=snap_meta)
