"""Graph driver calls: walking a live graph, reading each node's raw parameters, adding nodes.

The raw parameter dicts are the ones specified per node type in :mod:`cgsnap.format.nodes`
(plain ints: addresses, sizes, handles). Readers take a live ``CUgraphNode``; adders take the
graph, the dependency handles and a raw dict, and return ``(handle, result)``. Adding a node type
is one reader and one adder here plus its spec class there.
"""
from __future__ import annotations

import contextlib
import ctypes

from ..errors import CaptureError, UnsupportedNodeError
from . import driver
from .driver import MemType, NodeType, attempt, call, cu

_LAUNCH_PARAM_END, _LAUNCH_PARAM_BUFFER_POINTER, _LAUNCH_PARAM_BUFFER_SIZE = 0, 1, 2

# Driver node type -> the model's type name (cgsnap.format.nodes.NODE_TYPES).
_TYPE_NAMES = {
    NodeType.CU_GRAPH_NODE_TYPE_KERNEL: "kernel",
    NodeType.CU_GRAPH_NODE_TYPE_MEMCPY: "memcpy",
    NodeType.CU_GRAPH_NODE_TYPE_MEMSET: "memset",
    NodeType.CU_GRAPH_NODE_TYPE_EMPTY: "empty",
    NodeType.CU_GRAPH_NODE_TYPE_GRAPH: "graph",
    NodeType.CU_GRAPH_NODE_TYPE_EVENT_RECORD: "event_record",
    NodeType.CU_GRAPH_NODE_TYPE_WAIT_EVENT: "event_wait",
    NodeType.CU_GRAPH_NODE_TYPE_MEM_ALLOC: "mem_alloc",
    NodeType.CU_GRAPH_NODE_TYPE_MEM_FREE: "mem_free",
    NodeType.CU_GRAPH_NODE_TYPE_HOST: "host",
}


def node_type(node) -> str:
    """The model's type name of a live node, or the driver's name in lower case
    (``conditional``, ``ext_semas_signal``, ...) for a type no spec covers."""
    t = call(cu.cuGraphNodeGetType, node)
    name = _TYPE_NAMES.get(t)
    if name is not None:
        return name
    return str(getattr(t, "name", t)).replace("CU_GRAPH_NODE_TYPE_", "").lower()


# ---- walking ----------------------------------------------------------------------------------

def graph_nodes(graph) -> list:
    count = call(cu.cuGraphGetNodes, graph, 0)[1]
    if not count:
        return []
    return list(call(cu.cuGraphGetNodes, graph, count)[0])


def graph_edges(graph) -> list:
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


# ---- kernel nodes -------------------------------------------------------------------------------

class KernelParams:
    """A live kernel node's launch: the function (a CUfunction, from the node's CUkernel when it
    has no function), grid, block, dynamic shared memory, and the driver's parameter struct."""

    __slots__ = ("func", "kern", "grid", "block", "shared_mem", "_p")

    def __init__(self, p):
        self._p = p
        func = p.func
        kern = int(p.kern) if getattr(p, "kern", None) is not None else 0
        if not int(func) and kern:
            func = call(cu.cuKernelGetFunction, p.kern)
        self.func, self.kern = func, kern
        self.grid = (int(p.gridDimX), int(p.gridDimY), int(p.gridDimZ))
        self.block = (int(p.blockDimX), int(p.blockDimY), int(p.blockDimZ))
        self.shared_mem = int(p.sharedMemBytes)

    def argument_bytes(self, layout: tuple, where: str) -> list:
        """The bytes of each argument (``layout``: the kernel's ``((offset, size), ...)``),
        from ``kernelParams`` (void**) or ``extra``."""
        p = self._p
        kp = int(p.kernelParams) if p.kernelParams is not None else 0
        if kp:
            ptrs = (ctypes.c_void_p * len(layout)).from_address(kp)
            return [ctypes.string_at(ptrs[j], size) if size else b""
                    for j, (_, size) in enumerate(layout)]
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
                return [blob[off:off + size] for off, size in layout]
        if not layout:
            return []
        raise CaptureError(f"{where}: the driver returned neither kernelParams nor extra")


def read_kernel(node) -> KernelParams:
    return KernelParams(call(cu.cuGraphKernelNodeGetParams, node))


_ATTR = cu.CUkernelNodeAttrID if hasattr(cu, "CUkernelNodeAttrID") else cu.CUlaunchAttributeID


def kernel_node_attrs(node) -> dict:
    """The launch attributes of a kernel node that a rebuilt node must carry."""
    out = {}
    val = attempt(cu.cuGraphKernelNodeGetAttribute, node, _ATTR.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION)
    if val is not None:
        dims = (int(val.clusterDim.x), int(val.clusterDim.y), int(val.clusterDim.z))
        if dims not in ((0, 0, 0), (1, 1, 1)):
            out["cluster_dim"] = dims
    val = attempt(cu.cuGraphKernelNodeGetAttribute, node, _ATTR.CU_LAUNCH_ATTRIBUTE_PRIORITY)
    if val is not None and int(val.priority):
        out["priority"] = int(val.priority)
    val = attempt(cu.cuGraphKernelNodeGetAttribute, node, _ATTR.CU_LAUNCH_ATTRIBUTE_COOPERATIVE)
    if val is not None and int(val.cooperative):
        out["cooperative"] = int(val.cooperative)
    return out


# ---- readers of the other node types -----------------------------------------------------------

def _read_memcpy(node) -> dict:
    p = call(cu.cuGraphMemcpyNodeGetParams, node)
    width, height, depth = int(p.WidthInBytes), int(p.Height) or 1, int(p.Depth) or 1
    raw = {"width": width, "height": height, "depth": depth}
    for side in ("src", "dst"):
        mtype = getattr(p, f"{side}MemoryType")
        pitch = int(getattr(p, f"{side}Pitch")) or width
        slice_h = int(getattr(p, f"{side}Height")) or height
        offset = (int(getattr(p, f"{side}Z")) * slice_h + int(getattr(p, f"{side}Y"))) * pitch \
            + int(getattr(p, f"{side}XInBytes"))
        if mtype == MemType.CU_MEMORYTYPE_HOST:
            kind, addr = "host", int(getattr(p, f"{side}Host")) + offset
        elif mtype in (MemType.CU_MEMORYTYPE_DEVICE, MemType.CU_MEMORYTYPE_UNIFIED):
            addr = int(getattr(p, f"{side}Device")) + offset
            kind = "device"
            if mtype == MemType.CU_MEMORYTYPE_UNIFIED and driver.memory_type(addr) in (
                    None, int(MemType.CU_MEMORYTYPE_HOST)):
                kind = "host"
        else:
            kind, addr = "array", 0
        raw[side] = {"kind": kind, "addr": addr, "pitch": pitch, "height": slice_h}
    return raw


def _read_memset(node) -> dict:
    p = call(cu.cuGraphMemsetNodeGetParams, node)
    return {"dst": int(p.dst), "value": int(p.value), "element_size": int(p.elementSize),
            "width": int(p.width), "height": int(p.height), "pitch": int(p.pitch)}


def _read_child(node) -> dict:
    return {"graph": call(cu.cuGraphChildGraphNodeGetGraph, node)}


def _read_event_record(node) -> dict:
    return {"event": int(call(cu.cuGraphEventRecordNodeGetEvent, node))}


def _read_event_wait(node) -> dict:
    return {"event": int(call(cu.cuGraphEventWaitNodeGetEvent, node))}


def _read_mem_alloc(node) -> dict:
    p = call(cu.cuGraphMemAllocNodeGetParams, node)
    return {"dptr": int(p.dptr), "bytesize": int(p.bytesize)}


def _read_mem_free(node) -> dict:
    return {"dptr": int(call(cu.cuGraphMemFreeNodeGetParams, node))}


def _read_host(node) -> dict:
    p = call(cu.cuGraphHostNodeGetParams, node)
    return {"fn": driver.address_of_function(p.fn)}


READERS = {
    "memcpy": _read_memcpy, "memset": _read_memset, "empty": lambda node: {},
    "graph": _read_child, "event_record": _read_event_record, "event_wait": _read_event_wait,
    "mem_alloc": _read_mem_alloc, "mem_free": _read_mem_free, "host": _read_host,
}


def read_node(node, type_name: str, where: str) -> dict:
    reader = READERS.get(type_name)
    if reader is None:
        raise UnsupportedNodeError(f"{where}: nodes of type {type_name} cannot be carried")
    return reader(node)


# ---- adders ---------------------------------------------------------------------------------

class AddEnv:
    """What adders need besides the raw parameters: the context and device, and a list that
    keeps alive what the driver holds pointers to (host-callback trampolines)."""

    __slots__ = ("context", "ordinal", "keepalive")

    def __init__(self, context, ordinal: int, keepalive: list):
        self.context, self.ordinal, self.keepalive = context, ordinal, keepalive


def _nodes(deps) -> list:
    return [cu.CUgraphNode(int(d)) for d in deps]


def _add_memcpy(graph, deps, raw, env):
    p = cu.CUDA_MEMCPY3D()
    for side in ("src", "dst"):
        s = raw[side]
        if s["kind"] == "host":
            setattr(p, f"{side}MemoryType", MemType.CU_MEMORYTYPE_HOST)
            setattr(p, f"{side}Host", s["addr"])
        else:
            setattr(p, f"{side}MemoryType", MemType.CU_MEMORYTYPE_DEVICE)
            setattr(p, f"{side}Device", s["addr"])
        setattr(p, f"{side}Pitch", s["pitch"])
        setattr(p, f"{side}Height", s["height"])
    p.WidthInBytes, p.Height, p.Depth = raw["width"], raw["height"], raw["depth"]
    d = _nodes(deps)
    return call(cu.cuGraphAddMemcpyNode, graph, d, len(d), p, env.context), None


def _add_memset(graph, deps, raw, env):
    p = cu.CUDA_MEMSET_NODE_PARAMS()
    p.dst = raw["dst"]
    p.value, p.elementSize = raw["value"], raw["element_size"]
    p.width, p.height, p.pitch = raw["width"], raw["height"], raw["pitch"]
    d = _nodes(deps)
    return call(cu.cuGraphAddMemsetNode, graph, d, len(d), p, env.context), None


def _add_empty(graph, deps, raw, env):
    d = _nodes(deps)
    return call(cu.cuGraphAddEmptyNode, graph, d, len(d)), None


def _add_child(graph, deps, raw, env):
    d = _nodes(deps)
    return call(cu.cuGraphAddChildGraphNode, graph, d, len(d), raw["graph"]), None


def _add_event_record(graph, deps, raw, env):
    d = _nodes(deps)
    return call(cu.cuGraphAddEventRecordNode, graph, d, len(d), raw["event"]), None


def _add_event_wait(graph, deps, raw, env):
    d = _nodes(deps)
    return call(cu.cuGraphAddEventWaitNode, graph, d, len(d), raw["event"]), None


def _add_mem_alloc(graph, deps, raw, env):
    p = cu.CUDA_MEM_ALLOC_NODE_PARAMS()
    p.poolProps.allocType = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    p.poolProps.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    p.poolProps.location.id = env.ordinal
    p.bytesize = raw["bytesize"]
    d = _nodes(deps)
    h = call(cu.cuGraphAddMemAllocNode, graph, d, len(d), p)
    return h, {"dptr": int(call(cu.cuGraphMemAllocNodeGetParams, h).dptr)}


def _add_mem_free(graph, deps, raw, env):
    d = _nodes(deps)
    return call(cu.cuGraphAddMemFreeNode, graph, d, len(d), raw["dptr"]), None


def _add_host(graph, deps, raw, env):
    p, trampoline = driver.host_node_params(raw["callback"])
    env.keepalive.append(trampoline)
    d = _nodes(deps)
    return call(cu.cuGraphAddHostNode, graph, d, len(d), p), None


ADDERS = {
    "memcpy": _add_memcpy, "memset": _add_memset, "empty": _add_empty, "graph": _add_child,
    "event_record": _add_event_record, "event_wait": _add_event_wait,
    "mem_alloc": _add_mem_alloc, "mem_free": _add_mem_free, "host": _add_host,
}


def add_node(graph, type_name: str, deps, raw: dict, env: AddEnv) -> tuple:
    """Add a node of ``type_name`` (any but kernel nodes, which restore adds in bulk)."""
    return ADDERS[type_name](graph, deps, raw, env)


def add_dependencies(graph, edges) -> None:
    """``edges``: ``[(from handle, to handle, (from_port, to_port, type)), ...]``."""
    if not edges:
        return
    data = []
    for _, _, (fp, tp, et) in edges:
        d = cu.CUgraphEdgeData()
        d.from_port, d.to_port, d.type = fp, tp, et
        data.append(d)
    call(cu.cuGraphAddDependencies, graph, _nodes(a for a, _, _ in edges),
         _nodes(b for _, b, _ in edges), data, len(data))


# ---- whole graphs -------------------------------------------------------------------------------

def graph_create():
    return call(cu.cuGraphCreate, 0)


def graph_destroy(graph) -> None:
    call(cu.cuGraphDestroy, graph)


def instantiate(graph):
    return call(cu.cuGraphInstantiate, graph, 0)


def exec_destroy(exe) -> None:
    call(cu.cuGraphExecDestroy, exe)


def launch(exe, stream) -> None:
    call(cu.cuGraphLaunch, exe, stream)


# The node types cuGraphNodeSetEnabled can switch off, and those whose launch changes no memory.
DISABLEABLE = frozenset({"kernel", "memset", "memcpy"})
INERT = frozenset({"empty", "event_record", "event_wait", "mem_alloc", "mem_free"})


@contextlib.contextmanager
def nodes_disabled(exe, nodes):
    """Every node of ``nodes`` (of the graph ``exe`` was instantiated from; kernel, memset or
    memcpy nodes) disabled in ``exe`` for the duration: a launch meanwhile runs none of them.
    Those that were enabled are enabled again afterwards, whatever happened; each is
    attempted, and the first that fails is then raised."""
    exe = cu.CUgraphExec(int(exe)) if isinstance(exe, int) else exe
    off = []
    try:
        for n in nodes:
            if call(cu.cuGraphNodeGetEnabled, exe, n):
                call(cu.cuGraphNodeSetEnabled, exe, n, 0)
                off.append(n)
        yield
    finally:
        failed = [n for n in off if attempt(cu.cuGraphNodeSetEnabled, exe, n, 1) is None]
        if failed:
            call(cu.cuGraphNodeSetEnabled, exe, failed[0], 1)


# ---- stream capture -------------------------------------------------------------------------------

CAPTURE_MODES = {
    "global": cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL,
    "thread_local": cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
    "relaxed": cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED,
}


def begin_capture(stream, mode: str) -> None:
    call(cu.cuStreamBeginCapture, stream, CAPTURE_MODES[mode])


def end_capture(stream) -> tuple:
    """``(graph or None, error name or None)``: the capture ends whatever happened in it."""
    res = cu.cuStreamEndCapture(stream)
    if res[0] != driver.SUCCESS:
        graph = res[1] if len(res) > 1 and res[1] is not None and int(res[1]) else None
        return graph, driver.error_name(res[0])
    return res[1], None


# ---- events ---------------------------------------------------------------------------------------

def event_create():
    return call(cu.cuEventCreate, 0)


def event_destroy(event) -> None:
    call(cu.cuEventDestroy, event)
