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
from typing import Optional

import numpy as np

from .._version import __version__
from ..binary import elf
from ..cuda import driver, transfer
from ..cuda.driver import NodeType, call, cu
from ..errors import BinaryFormatError, CaptureError, UnsupportedNodeError
from ..format.hashing import region_hash
from ..format.model import (Arg, ChildGraphNode, Edge, EmptyNode, EventRecordNode, EventWaitNode,
                            Graph, HostNode, Kernel, KernelImage, KernelNode, MemAllocNode,
                            MemcpyNode, MemFreeNode, MemsetNode, Policy, Ref, Region, RegionKind,
                            Snapshot, node_regions, pack_args)
from ..format.snapfile import remap_node
from . import classify
from .buffers import BufferSpec, expand_buffers
from .classify import (ALLOCATION, MAX_DECISIONS_KEPT, NAMED, SPECIAL, Candidate, RangeTable,
                       ambiguous, classify_words, decide, dtype_alignment, make_lookup)

_LAUNCH_PARAM_END, _LAUNCH_PARAM_BUFFER_POINTER, _LAUNCH_PARAM_BUFFER_SIZE = 0, 1, 2
_MAX_ALIGNMENT = 4096


def _alignment(addr: int) -> int:
    return min(addr & -addr, _MAX_ALIGNMENT) if addr else _MAX_ALIGNMENT


def _node_type_name(t) -> str:
    return str(getattr(t, "name", t)).replace("CU_GRAPH_NODE_TYPE_", "").lower()


class _Recording:
    """State of one snapshot: regions, kernels, images and events found so far."""

    def __init__(self, device: driver.Device, resolver, host_callbacks: Optional[dict],
                 allocation_policy=None):
        self.device = device
        self.resolver = resolver
        # {name: function} (ctypes function objects are unhashable) -> {address: name}
        self.host_callbacks = {driver.address_of_function(fn): name
                               for name, fn in (host_callbacks or {}).items()}
        # (base, size) -> (Policy, pool name) or None: lets an integration mark allocations it
        # knows (torch's graph memory pool becomes shared scratch).
        self.allocation_policy = allocation_policy
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
        # Ambiguous argument words (see cgsnap.capture.classify), decided once the whole graph is known:
        # (node, argument index, offset in argument, Ref, word, where)
        self.pending: list = []
        self.decisions: list = []     # one line per decided word, for Snapshot.meta

    # ---- regions --------------------------------------------------------------------------
    def add_region(self, kind: RegionKind, base: int, size: int, priority: Optional[int],
                   **fields) -> Region:
        region = Region(id=len(self.regions), kind=kind, size=size, alignment=_alignment(base),
                        origin=base, **fields)
        self.regions.append(region)
        if priority is not None:
            self.table.add(base, size, region.id, priority)
        return region

    def add_named(self, spec: BufferSpec) -> Region:
        parent = None
        if spec.policy is not Policy.BOUND:
            # A named buffer carved out of a larger allocation (a caching allocator's segment)
            # is restored as a view of that allocation: other graphs may use the same memory.
            rng = driver.address_range(spec.ptr)
            if rng is not None and rng != (spec.ptr, spec.nbytes):
                parent = self._allocation_region(*rng)
        region = self.add_region(RegionKind.NAMED, spec.ptr, spec.nbytes, NAMED, name=spec.name,
                                 dtype=spec.dtype, shape=spec.shape, policy=spec.policy)
        if parent is not None:
            region.parent, region.parent_offset = parent.id, spec.ptr - parent.origin
        return region

    def _allocation_region(self, base: int, size: int) -> Region:
        for r in self.regions:
            if r.kind is RegionKind.ALLOCATION and r.origin == base:
                return r
        policy, pool = Policy.SAVED, None
        if self.allocation_policy is not None:
            policy, pool = self.allocation_policy(base, size) or (policy, pool)
        return self.add_region(RegionKind.ALLOCATION, base, size, ALLOCATION, policy=policy,
                               pool=pool)

    def _find_allocation(self, addr: int) -> Optional[Ref]:
        rng = driver.address_range(addr)
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
    def kernel_for(self, func) -> int:
        key = int(func)
        kid = self.kernel_by_func.get(key)
        if kid is not None:
            return kid
        name = driver.func_name(func)
        module = driver.func_module(func)
        cand = self.resolver.resolve(
            name, lambda: driver.module_function_names(module) if module is not None else frozenset())
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
        nodes = _graph_nodes(graph)
        ids = {int(n): i for i, n in enumerate(nodes)}
        types = [call(cu.cuGraphNodeGetType, n) for n in nodes]
        # Graph allocations first: other nodes' pointers into them must resolve to them.
        alloc_region = {}
        for i, (n, t) in enumerate(zip(nodes, types)):
            if t == NodeType.CU_GRAPH_NODE_TYPE_MEM_ALLOC:
                p = call(cu.cuGraphMemAllocNodeGetParams, n)
                alloc_region[i] = self.add_region(RegionKind.GRAPH_ALLOC, int(p.dptr),
                                                  int(p.bytesize), SPECIAL,
                                                  policy=Policy.SCRATCH).id
        out = []
        for i, (n, t) in enumerate(zip(nodes, types)):
            where = f"graph {name!r} node {i} ({_node_type_name(t)})"
            out.append(self.node(i, n, t, where, name, alloc_region))
        edges = [Edge(ids[int(a)], ids[int(b)], *data) for a, b, data in _graph_edges(graph)]
        g = Graph(name=name, nodes=out, edges=edges, top_level=top_level)
        self.graphs[slot] = g
        return g

    def node(self, i, n, t, where, graph_name, alloc_region):
        if t == NodeType.CU_GRAPH_NODE_TYPE_KERNEL:
            return self.kernel_node(i, n, where)
        if t == NodeType.CU_GRAPH_NODE_TYPE_MEMCPY:
            return self.memcpy_node(i, call(cu.cuGraphMemcpyNodeGetParams, n), where)
        if t == NodeType.CU_GRAPH_NODE_TYPE_MEMSET:
            p = call(cu.cuGraphMemsetNodeGetParams, n)
            row = int(p.width) * int(p.elementSize)
            span = (int(p.height) - 1) * (int(p.pitch) or row) + row if int(p.height) else 0
            return MemsetNode(i, self.device_ref(int(p.dst), where, span), int(p.value),
                              int(p.elementSize), int(p.width), int(p.height), int(p.pitch))
        if t == NodeType.CU_GRAPH_NODE_TYPE_EMPTY:
            return EmptyNode(i)
        if t == NodeType.CU_GRAPH_NODE_TYPE_GRAPH:
            child = call(cu.cuGraphChildGraphNodeGetGraph, n)
            child_name = f"{graph_name}/child{i}"
            self.walk(child, child_name, top_level=False)
            return ChildGraphNode(i, child_name)
        if t in (NodeType.CU_GRAPH_NODE_TYPE_EVENT_RECORD, NodeType.CU_GRAPH_NODE_TYPE_WAIT_EVENT):
            record = t == NodeType.CU_GRAPH_NODE_TYPE_EVENT_RECORD
            ev = call(cu.cuGraphEventRecordNodeGetEvent if record else
                      cu.cuGraphEventWaitNodeGetEvent, n)
            index = self.events.setdefault(int(ev), len(self.events))
            return (EventRecordNode if record else EventWaitNode)(i, index)
        if t == NodeType.CU_GRAPH_NODE_TYPE_MEM_ALLOC:
            return MemAllocNode(i, alloc_region[i])
        if t == NodeType.CU_GRAPH_NODE_TYPE_MEM_FREE:
            return MemFreeNode(i, self.device_ref(int(call(cu.cuGraphMemFreeNodeGetParams, n)),
                                                  where))
        if t == NodeType.CU_GRAPH_NODE_TYPE_HOST:
            p = call(cu.cuGraphHostNodeGetParams, n)
            name = self.host_callbacks.get(driver.address_of_function(p.fn))
            if name is None:
                raise UnsupportedNodeError(
                    f"{where}: a host callback cannot be carried to another process; register it "
                    "by name: snapshot(..., host_callbacks={'name': function}), then "
                    "load(..., host_callbacks={'name': python_callable})")
            return HostNode(i, name)
        raise UnsupportedNodeError(f"{where}: nodes of type {_node_type_name(t)} cannot be carried")

    def kernel_node(self, i, n, where) -> KernelNode:
        p = call(cu.cuGraphKernelNodeGetParams, n)
        func = p.func
        if not int(func) and int(p.kern):
            func = call(cu.cuKernelGetFunction, p.kern)
        kid = self.kernel_for(func)
        kernel = self.kernels[kid]
        raw = _read_params(p, kernel.params, where)
        return self.classified_node(
            KernelNode(i, kid, (int(p.gridDimX), int(p.gridDimY), int(p.gridDimZ)),
                       (int(p.blockDimX), int(p.blockDimY), int(p.blockDimZ)),
                       int(p.sharedMemBytes), None, _kernel_node_attrs(n)), raw, where)

    def classified_node(self, node: KernelNode, raw: list, where: str) -> KernelNode:
        """``node`` with its arguments (``raw``: the bytes of each) classified: sure pointers
        become Refs now, ambiguous words wait for :meth:`decide_ambiguous`."""
        args = []
        for j, (data, (off, size)) in enumerate(zip(raw, self.kernels[node.kernel].params)):
            refs = classify_words(data, off, self.lookup)
            if refs:
                sure = []
                for o, ref in refs:
                    word = int.from_bytes(data[o:o + 8], "little")
                    if ambiguous(word, size == 8):
                        self.pending.append((node, j, o, ref, word, where))
                    else:
                        sure.append((o, ref))
                refs = tuple(sure)
            args.append(Arg(data, refs))
        node.args = tuple(args)
        return node

    def decide_ambiguous(self) -> None:
        """Settle every ambiguous word (:func:`cgsnap.capture.classify.decide`) from what the rest of the
        graph shows. Words kept literal leave their Ref out; every decision is logged."""
        if not self.pending:
            return
        layouts = {k.id: k.params for k in self.kernels}
        candidates = [Candidate(id(node), node.kernel, layouts[node.kernel][j][0] + o, word,
                                ref.offset, dtype_alignment(self.regions[ref.region].dtype))
                      for node, j, o, ref, word, _ in self.pending]

        def kernel_nodes():
            for g in self.graphs:
                for n in g.nodes:
                    if n.TYPE == "kernel":
                        layout = layouts[n.kernel]
                        yield (id(n), n.kernel, pack_args(n.args, layout)[0],
                               [off + o for (off, _), a in zip(layout, n.args) for o, _ in a.refs])
        keep = decide(candidates, kernel_nodes(), layouts)
        for (node, j, o, ref, word, where), c, kept in zip(self.pending, candidates, keep):
            if kept:
                args = list(node.args)
                a = args[j]
                args[j] = Arg(a.data, tuple(sorted(a.refs + ((o, ref),), key=lambda r: r[0])))
                node.args = tuple(args)
            self.decisions.append(f"{where}: word {word:#x} at parameter byte {c.pos} of "
                                  f"{self.kernels[node.kernel].name}: "
                                  f"{'pointer' if kept else 'literal'}")
        self.pending = []

    def memcpy_node(self, i, p, where) -> MemcpyNode:
        width, height, depth = int(p.WidthInBytes), int(p.Height) or 1, int(p.Depth) or 1
        ends = []
        for side in ("src", "dst"):
            mtype = getattr(p, f"{side}MemoryType")
            pitch = int(getattr(p, f"{side}Pitch")) or width
            slice_h = int(getattr(p, f"{side}Height")) or height
            offset = (int(getattr(p, f"{side}Z")) * slice_h + int(getattr(p, f"{side}Y"))) * pitch \
                + int(getattr(p, f"{side}XInBytes"))
            span = (depth - 1) * pitch * slice_h + (height - 1) * pitch + width
            if mtype == driver.MemType.CU_MEMORYTYPE_HOST:
                addr = int(getattr(p, f"{side}Host")) + offset
                ref = self.host_ref(addr, span, side == "src")
            elif mtype in (driver.MemType.CU_MEMORYTYPE_DEVICE, driver.MemType.CU_MEMORYTYPE_UNIFIED):
                addr = int(getattr(p, f"{side}Device")) + offset
                if mtype == driver.MemType.CU_MEMORYTYPE_UNIFIED and driver.memory_type(addr) in (
                        None, int(driver.MemType.CU_MEMORYTYPE_HOST)):
                    ref = self.host_ref(addr, span, side == "src")
                else:
                    ref = self.device_ref(addr, f"{where} {side}", span)
            else:
                raise UnsupportedNodeError(f"{where}: copies to or from CUDA arrays are not supported")
            ends.append((ref, pitch if height > 1 or depth > 1 else 0,
                         slice_h if depth > 1 else 0))
        (src, sp, sh), (dst, dp, dh) = ends
        return MemcpyNode(i, src, dst, width, height, depth, sp, sh, dp, dh)

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


def _graph_nodes(graph) -> list:
    count = call(cu.cuGraphGetNodes, graph, 0)[1]
    if not count:
        return []
    return list(call(cu.cuGraphGetNodes, graph, count)[0])


def _graph_edges(graph) -> list:
    """``[(from, to, (from_port, to_port, type)), ...]``."""
    res = call(cu.cuGraphGetEdges, graph, 0)
    count = res[-1]
    if not count:
        return []
    res = call(cu.cuGraphGetEdges, graph, count)
    if len(res) == 4:       # CUDA 13: from, to, edge data, count
        froms, tos, data = res[0], res[1], res[2]
    else:
        froms, tos, data = res[0], res[1], [None] * len(res[0])
    out = []
    for a, b, d in zip(froms, tos, data):
        info = (0, 0, 0) if d is None else (int(d.from_port), int(d.to_port), int(d.type))
        out.append((a, b, info))
    return out


def _read_params(p, params: tuple, where: str) -> list:
    """The bytes of each kernel argument, from ``kernelParams`` (void**) or ``extra``."""
    kp = int(p.kernelParams) if p.kernelParams is not None else 0
    if kp:
        ptrs = (ctypes.c_void_p * len(params)).from_address(kp)
        return [ctypes.string_at(ptrs[j], size) if size else b"" for j, (_, size) in enumerate(params)]
    extra = int(p.extra) if p.extra is not None else 0
    if extra:
        buf, buf_size = None, None
        words = (ctypes.c_void_p * 16).from_address(extra)
        for k in range(0, 16, 2):
            key = words[k] or 0
            if key == _LAUNCH_PARAM_END:
                break
            if key == _LAUNCH_PARAM_BUFFER_POINTER:
                buf = words[k + 1]
            elif key == _LAUNCH_PARAM_BUFFER_SIZE:
                buf_size = ctypes.c_size_t.from_address(words[k + 1]).value
        if buf and buf_size is not None:
            blob = ctypes.string_at(buf, buf_size)
            return [blob[off:off + size] for off, size in params]
    if not params:
        return []
    raise CaptureError(f"{where}: the driver returned neither kernelParams nor extra")


_ATTR = cu.CUkernelNodeAttrID if hasattr(cu, "CUkernelNodeAttrID") else cu.CUlaunchAttributeID


def _kernel_node_attrs(node) -> dict:
    out = {}
    val = driver.attempt(cu.cuGraphKernelNodeGetAttribute, node,
                         _ATTR.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION)
    if val is not None:
        dims = (int(val.clusterDim.x), int(val.clusterDim.y), int(val.clusterDim.z))
        if dims not in ((0, 0, 0), (1, 1, 1)):
            out["cluster_dim"] = dims
    val = driver.attempt(cu.cuGraphKernelNodeGetAttribute, node, _ATTR.CU_LAUNCH_ATTRIBUTE_PRIORITY)
    if val is not None and int(val.priority):
        out["priority"] = int(val.priority)
    val = driver.attempt(cu.cuGraphKernelNodeGetAttribute, node,
                         _ATTR.CU_LAUNCH_ATTRIBUTE_COOPERATIVE)
    if val is not None and int(val.cooperative):
        out["cooperative"] = int(val.cooperative)
    return out


# ---- contents ---------------------------------------------------------------------------------

def _used_regions(rec: _Recording) -> set:
    used = {r.parent for r in rec.regions if r.parent is not None}
    for g in rec.graphs:
        used.update(g.checks)
        for n in g.nodes:
            used.update(node_regions(n))
    return used


def _keep_regions(rec: _Recording, keep: list) -> None:
    """Keep only ``keep`` (a sub-list of ``rec.regions``), renumbering every reference."""
    if len(keep) == len(rec.regions):
        return
    rmap = {r.id: i for i, r in enumerate(keep)}
    rec.regions = [dataclasses.replace(r, id=rmap[r.id],
                                       parent=None if r.parent is None else rmap[r.parent])
                   for r in keep]
    for g in rec.graphs:
        g.nodes = [remap_node(n, rmap) for n in g.nodes]
        g.checks = {rmap[rid]: data for rid, data in g.checks.items()}


def _drop_unused_allocations(rec: _Recording) -> None:
    """An allocation found only through a word later kept literal is not the graph's memory:
    neither its contents nor its size belong in the file."""
    used = _used_regions(rec)
    _keep_regions(rec, [r for r in rec.regions
                        if r.kind is not RegionKind.ALLOCATION or r.id in used])


def _drop_unchanged_globals(rec: _Recording) -> None:
    """Module globals that no node points at and that still hold what loading their image
    gives them need not travel: the restore's library load recreates them. Library modules
    (cuBLAS) define hundreds of such tables; carrying them made the file, its validation and
    the restore's per-region driver calls several times larger than the graphs themselves."""
    initial: dict = {}
    used = _used_regions(rec)
    keep = []
    for r in rec.regions:
        if r.kind is RegionKind.MODULE_GLOBAL and r.policy is Policy.SAVED and r.id not in used:
            if r.image not in initial:
                try:
                    initial[r.image] = elf.global_initial_values(rec.images[r.image].data)
                except BinaryFormatError:
                    initial[r.image] = {}
            value = initial[r.image].get(r.symbol)
            if value is not None and len(value) == r.size and \
                    np.asarray(r.data, dtype=np.uint8).tobytes() == value:
                continue
        keep.append(r)
    _keep_regions(rec, keep)


def _read_region(region: Region, stager=None) -> np.ndarray:
    out = transfer.host_array(region.size, stager)
    if region.size:
        if region.kind is RegionKind.HOST:
            ctypes.memmove(out.ctypes.data, region.origin, region.size)
        elif stager is not None and region.size >= transfer.THRESHOLD:
            stager.download(out, region.origin, region.size)
        else:
            driver.dtoh(int(out.ctypes.data), region.origin, region.size)
    return out


def _write_region(region: Region, data: np.ndarray) -> None:
    if region.size:
        if region.kind is RegionKind.HOST:
            ctypes.memmove(region.origin, data.ctypes.data, region.size)
        else:
            driver.htod(region.origin, int(data.ctypes.data), region.size)


def _record_checks(rec: _Recording, graph, g: Graph) -> Optional[str]:
    """Launch the original graph once, keep the named regions' contents as the expected output
    of `replay --check`, then put every region back as it was (the original is left untouched).
    Returns a reason when the graph cannot be launched a second time (e.g. it holds memory nodes
    and the caller already instantiated it)."""
    named = [r for r in rec.regions if r.kind is RegionKind.NAMED]
    if not named:
        return None
    backups = {r.id: _read_region(r) for r in rec.regions if r.kind is not RegionKind.GRAPH_ALLOC}
    try:
        exe = call(cu.cuGraphInstantiate, graph, 0)
    except Exception as exc:   # DriverError: report, snapshot without checks
        return f"the graph could not be instantiated again for the check: {exc}"
    stream = driver.stream_create()
    try:
        call(cu.cuGraphLaunch, exe, stream)
        driver.stream_sync(stream)
        for r in named:
            g.checks[r.id] = _read_region(r)
    finally:
        call(cu.cuGraphExecDestroy, exe)
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


SUSPECT_REGION_CHOICES = ("keep", "error")


def check_suspect_choice(value: str) -> None:
    """CaptureError unless ``value`` is a ``suspect_regions`` setting."""
    if value not in SUSPECT_REGION_CHOICES:
        raise CaptureError(f"suspect_regions={value!r}: expected one of "
                           f"{', '.join(SUSPECT_REGION_CHOICES)}")


def _refuse_suspect_regions(rec: _Recording, name: str) -> None:
    """CaptureError when a saved allocation of 1 MiB or more is reached only by words inside
    struct arguments (likely stale addresses in padding: docs/RELIABILITY.md, "Known
    problems"), before anything is read from the device."""
    probe = Snapshot(graphs=rec.graphs, regions=rec.regions, images=[], kernels=rec.kernels)
    weak = classify.weak_region_words(probe)
    if not weak:
        return
    lines = []
    for rid, words in list(weak.items())[:3]:
        r = rec.regions[rid]
        where = ", ".join(f"graph {g!r} node {n} argument {a} byte {o}" for g, n, a, o in words[:2])
        lines.append(f"region {rid}: {r.size} bytes of device memory at {r.origin:#x}, reached "
                     f"only by {len(words)} word(s) inside struct arguments ({where}"
                     f"{', ...' if len(words) > 2 else ''})")
    raise CaptureError(f"snapshot {name!r}: {len(weak)} allocation(s) would be saved only because "
                       "struct arguments hold their addresses, usually stale bytes in padding: "
                       + "; ".join(lines) + ". Name or bind the memory if the graph uses it, or "
                       "pass suspect_regions='keep' to save it.")


def snapshot_graph(graph, *, name: str = "graph", buffers: Optional[dict] = None,
                   record_outputs: Optional[bool] = None, host_callbacks: Optional[dict] = None,
                   resolver=None, meta: Optional[dict] = None,
                   allocation_policy=None, bound_hashes: Optional[dict] = None,
                   suspect_regions: str = "keep") -> Snapshot:
    """Record a live CUgraph (see :func:`cgsnap.snapshot` for the user-facing form)."""
    check_suspect_choice(suspect_regions)
    device = driver.current_device()
    if resolver is None:
        from ..kernels.registry import default_resolver
        resolver = default_resolver(device.arch)
    rec = _Recording(device, resolver, host_callbacks, allocation_policy)
    for spec in expand_buffers(buffers or {}):
        rec.add_named(spec)
    driver.ctx_sync()      # contents must be read after the work that produced them
    g = rec.walk(graph, name)       # rec.graphs[0]; the steps below edit it in place
    rec.decide_ambiguous()
    _drop_unused_allocations(rec)
    if suspect_regions == "error":
        _refuse_suspect_regions(rec, name)
    big = any(r.size >= transfer.THRESHOLD for r in rec.regions if r.policy is not Policy.SCRATCH)
    with (transfer.Stager() if big else contextlib.nullcontext()) as stager:
        for r in rec.regions:     # contents as they are now, before any check launch
            if r.policy is Policy.SAVED:
                r.data = _read_region(r, stager)
                r.content_hash = region_hash(r.data, stager.pool if stager else None)
            elif r.policy is Policy.BOUND and r.kind is RegionKind.NAMED:
                # For load(verify_bound=True). ``bound_hashes`` lets the snapshots of several
                # graphs over the same weights read and hash them once.
                cache = bound_hashes if bound_hashes is not None else {}
                key = (r.origin, r.size)
                if key not in cache:
                    cache[key] = region_hash(_read_region(r, stager),
                                             stager.pool if stager else None)
                r.content_hash = cache[key]
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
    snap_meta.update(meta or {})
    return Snapshot(graphs=rec.graphs, regions=rec.regions, images=list(rec.images.values()),
                    kernels=rec.kernels, events=len(rec.events), device=device.describe(),
                    versions=_versions(), meta=snap_meta)
