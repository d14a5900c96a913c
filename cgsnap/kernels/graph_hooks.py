"""Conditional nodes as the driver creates them, recorded through CUPTI driver-API callbacks.

No driver call reads a conditional node back on a CUDA 13.0 driver: ``cuGraphNodeGetParams``
needs a 13.2 driver, and even there a handle's default value and flags are never readable. So
cgsnap records them when they are made. The callbacks here see, at the exit of each successful
call:

- ``cuGraphConditionalHandleCreate`` (cbid 722): the graph, the handle's value, its context,
  default value and flags;
- ``cuGraphAddNode`` / ``cuGraphAddNode_v2`` (712 / 723) with ``CUgraphNodeParams.type ==
  CONDITIONAL``: the graph, the new node, its handle, type, size and the body graphs the driver
  made (``phGraph_out``, filled in by the call).

The runtime API (``cudaGraphConditionalHandleCreate``, ``cudaGraphAddNode``: torch, CuPy,
cuda.core) goes through the same driver entry points, and stream capture never makes a
conditional node by itself (the framework adds it with ``cudaGraphAddNode`` into the graph that
``cudaStreamGetCaptureInfo`` returned), so these two calls see every conditional node.
``cuGraphDestroy`` / ``cuGraphDestroyNode`` (517 / 522, at entry) forget what they destroy, so
that a later graph reusing a freed handle address is never taken for the old one.

This module is self-contained (ctypes only, no driver call): the CUPTI dispatcher of
:mod:`cgsnap.kernels.cupti` enables the cbids of :func:`handlers` in the driver-API domain and
calls ``on_enter(cbdata)`` at ``CUPTI_API_ENTER`` and ``on_exit(cbdata)`` at ``CUPTI_API_EXIT``,
``cbdata`` being the address of the ``CUpti_CallbackData``; it sets ``registry().enabled`` while
the callbacks are on, and on stop sets it back and calls ``registry().clear()``. The layouts below are those of the
CUDA 13.0 headers (``cupti_callbacks.h``, ``generated_cuda_meta.h``, ``cuda.h``); the parameter
structs of these entry points are fixed by their ABI.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Optional

CUPTI_CB_DOMAIN_DRIVER_API = 1
CUPTI_API_ENTER, CUPTI_API_EXIT = 0, 1

CBID_GRAPH_DESTROY = 517                  # cuGraphDestroy
CBID_GRAPH_DESTROY_NODE = 522             # cuGraphDestroyNode
CBID_GRAPH_ADD_NODE = 712                 # cuGraphAddNode (v1: no edge data)
CBID_GRAPH_CONDITIONAL_HANDLE_CREATE = 722
CBID_GRAPH_ADD_NODE_V2 = 723              # cuGraphAddNode_v2 (cuda.h maps cuGraphAddNode to it)

CU_GRAPH_NODE_TYPE_CONDITIONAL = 13
COND_TYPES = {0: "if", 1: "while", 2: "switch"}    # CUgraphConditionalNodeType
CU_GRAPH_COND_ASSIGN_DEFAULT = 1
MAX_BODIES = 1 << 16          # a SWITCH may have any size; more bodies than this are not read

_P = ctypes.c_void_p


class CallbackData(ctypes.Structure):        # CUpti_CallbackData
    _fields_ = [("callbackSite", ctypes.c_int), ("functionName", _P), ("functionParams", _P),
                ("functionReturnValue", _P), ("symbolName", _P), ("context", _P),
                ("contextUid", ctypes.c_uint32), ("correlationData", _P),
                ("correlationId", ctypes.c_uint32)]


class ConditionalHandleCreateParams(ctypes.Structure):   # cuGraphConditionalHandleCreate_params
    _fields_ = [("pHandle_out", _P), ("hGraph", _P), ("ctx", _P),
                ("defaultLaunchValue", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class AddNodeParams(ctypes.Structure):        # cuGraphAddNode_params
    _fields_ = [("phGraphNode", _P), ("hGraph", _P), ("dependencies", _P),
                ("numDependencies", ctypes.c_size_t), ("nodeParams", _P)]


class AddNodeV2Params(ctypes.Structure):      # cuGraphAddNode_v2_params
    _fields_ = [("phGraphNode", _P), ("hGraph", _P), ("dependencies", _P),
                ("dependencyData", _P), ("numDependencies", ctypes.c_size_t),
                ("nodeParams", _P)]


class GraphDestroyParams(ctypes.Structure):   # cuGraphDestroy_params
    _fields_ = [("hGraph", _P)]


class GraphDestroyNodeParams(ctypes.Structure):   # cuGraphDestroyNode_params
    _fields_ = [("hNode", _P)]


class ConditionalNodeParams(ctypes.Structure):    # CUDA_CONDITIONAL_NODE_PARAMS
    _fields_ = [("handle", ctypes.c_uint64), ("type", ctypes.c_uint32),
                ("size", ctypes.c_uint32), ("phGraph_out", _P), ("ctx", _P)]


class GraphNodeParams(ctypes.Structure):      # CUgraphNodeParams: type, reserved, 232-byte union
    _fields_ = [("type", ctypes.c_uint32), ("reserved0", ctypes.c_int * 3),
                ("union", ctypes.c_longlong * 29), ("reserved2", ctypes.c_longlong)]


UNION_OFFSET = GraphNodeParams.union.offset
for _struct, _offsets in (
        (CallbackData, {"functionParams": 16, "functionReturnValue": 24, "context": 40,
                        "correlationId": 64}),
        (ConditionalHandleCreateParams, {"defaultLaunchValue": 24, "flags": 28}),
        (AddNodeParams, {"nodeParams": 32}), (AddNodeV2Params, {"nodeParams": 40}),
        (ConditionalNodeParams, {"type": 8, "size": 12, "phGraph_out": 16, "ctx": 24})):
    for _name, _off in _offsets.items():
        assert getattr(_struct, _name).offset == _off, (_struct.__name__, _name)
assert ctypes.sizeof(GraphNodeParams) == 256 and UNION_OFFSET == 16


# ---- what a callback carries ------------------------------------------------------------------

def callback_result(cbdata: int) -> Optional[int]:
    """The CUresult of the call (at exit), or None when CUPTI gave no pointer."""
    ret = CallbackData.from_address(cbdata).functionReturnValue
    return ctypes.c_int.from_address(ret).value if ret else None


def function_params(cbdata: int) -> int:
    return CallbackData.from_address(cbdata).functionParams or 0


def handle_created(params: int) -> Optional[tuple]:
    """``(graph, handle value, context, default, flags)`` from a
    ``cuGraphConditionalHandleCreate_params`` at exit, or None when it holds no handle."""
    p = ConditionalHandleCreateParams.from_address(params)
    if not p.pHandle_out or not p.hGraph:
        return None
    value = ctypes.c_uint64.from_address(p.pHandle_out).value
    return p.hGraph, value, p.ctx or 0, p.defaultLaunchValue, p.flags


def node_added(params: int, v2: bool) -> Optional[tuple]:
    """``(graph, node, handle, type, size, bodies, context)`` from a ``cuGraphAddNode(_v2)_params``
    at exit when the node added is a conditional node, else None. ``bodies`` are the body
    graphs the driver created (``phGraph_out``, ``size`` entries)."""
    p = (AddNodeV2Params if v2 else AddNodeParams).from_address(params)
    if not p.nodeParams or not p.phGraphNode or not p.hGraph:
        return None
    np_ = GraphNodeParams.from_address(p.nodeParams)
    if np_.type != CU_GRAPH_NODE_TYPE_CONDITIONAL:
        return None
    cond = ConditionalNodeParams.from_address(p.nodeParams + UNION_OFFSET)
    node = ctypes.c_void_p.from_address(p.phGraphNode).value
    if not node:
        return None
    size = cond.size
    bodies: tuple = ()
    if cond.phGraph_out and 0 < size <= MAX_BODIES:
        bodies = tuple(int(b or 0) for b in (ctypes.c_void_p * size).from_address(cond.phGraph_out))
    return p.hGraph, node, cond.handle, cond.type, size, bodies, cond.ctx or 0


# ---- the registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class HandleInfo:
    graph: int          # the CUgraph it was created for
    value: int          # CUgraphConditionalHandle
    context: int
    default: int        # defaultLaunchValue
    flags: int          # CU_GRAPH_COND_ASSIGN_DEFAULT or 0
    seq: int            # creation order in this process


@dataclass(frozen=True)
class ConditionalInfo:
    graph: int          # the CUgraph holding the node
    node: int           # CUgraphNode
    handle: int         # the handle's value
    type: int           # CUgraphConditionalNodeType: 0 IF, 1 WHILE, 2 SWITCH
    size: int
    bodies: tuple       # body CUgraphs, ``size`` of them
    context: int

    @property
    def kind(self) -> str:
        return COND_TYPES.get(self.type, str(self.type))


class ConditionalRegistry:
    """What the callbacks saw, for the graphs and nodes still alive (thread-safe):
    ``(graph, node) -> ConditionalInfo`` and ``(graph, handle value) -> HandleInfo``, plus
    which conditional node owns each body graph."""

    def __init__(self):
        self._lock = threading.Lock()
        self._nodes: dict = {}         # (graph, node) -> ConditionalInfo
        self._by_node: dict = {}       # node -> graph
        self._handles: dict = {}       # (graph, value) -> HandleInfo
        self._parent: dict = {}        # body graph -> (graph, node, index)
        self._seq = 0
        self.enabled = False           # set by the dispatcher once the callbacks are enabled
        self.errors = 0                # callbacks that could not read their data (never raised)

    # -- recording (from the callbacks) --------------------------------------------------
    def add_handle(self, graph: int, value: int, context: int, default: int, flags: int) -> None:
        with self._lock:
            self._seq += 1
            self._handles[(graph, value)] = HandleInfo(graph, value, context, default, flags,
                                                       self._seq)

    def add_node(self, graph: int, node: int, handle: int, type_: int, size: int, bodies,
                 context: int) -> None:
        info = ConditionalInfo(graph, node, handle, type_, size, tuple(bodies), context)
        with self._lock:
            old = self._by_node.pop(node, None)
            if old is not None:
                self._drop_node(old, node)
            self._nodes[(graph, node)] = info
            self._by_node[node] = graph
            for i, body in enumerate(info.bodies):
                if body:
                    self._parent[body] = (graph, node, i)

    def forget_graph(self, graph: int) -> None:
        with self._lock:
            self._drop_graph(graph, 0)

    def forget_node(self, node: int) -> None:
        with self._lock:
            graph = self._by_node.pop(node, None)
            if graph is not None:
                self._drop_node(graph, node)

    def clear(self) -> None:
        """Forget everything (when the callbacks are disabled: destructions are no longer
        seen, so a later graph could reuse a recorded handle address)."""
        with self._lock:
            self._nodes.clear()
            self._by_node.clear()
            self._handles.clear()
            self._parent.clear()

    def _drop_graph(self, graph: int, depth: int) -> None:
        for key in [k for k in self._handles if k[0] == graph]:
            del self._handles[key]
        for key in [k for k in self._nodes if k[0] == graph]:
            self._by_node.pop(key[1], None)
            self._drop_node(graph, key[1], depth)
        self._parent.pop(graph, None)

    def _drop_node(self, graph: int, node: int, depth: int = 0) -> None:
        info = self._nodes.pop((graph, node), None)
        if info is not None and depth < 64:     # bodies nest; a loop would be a driver bug
            for body in info.bodies:
                if body:
                    self._drop_graph(body, depth + 1)

    # -- lookups (capture) ----------------------------------------------------------------
    def conditional(self, graph: int, node: int) -> Optional[ConditionalInfo]:
        with self._lock:
            return self._nodes.get((int(graph), int(node)))

    def handle(self, graph: int, value: int) -> Optional[HandleInfo]:
        with self._lock:
            return self._handles.get((int(graph), int(value)))

    def handles_of(self, graph: int) -> list:
        """Every handle created for ``graph``, in creation order."""
        with self._lock:
            return sorted((h for (g, _), h in self._handles.items() if g == int(graph)),
                          key=lambda h: h.seq)

    def body_parent(self, body: int) -> Optional[tuple]:
        """``(graph, node, index)`` of the conditional node whose body ``body`` is."""
        with self._lock:
            return self._parent.get(int(body))

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes) + len(self._handles)


_REGISTRY = ConditionalRegistry()


def registry() -> ConditionalRegistry:
    """The process-wide registry the callbacks fill."""
    return _REGISTRY


# ---- the callbacks ------------------------------------------------------------------------------

def _guarded(fn):
    def run(cbdata) -> None:
        try:
            fn(int(cbdata or 0))
        except Exception:      # never let an exception cross into the driver's thread
            _REGISTRY.errors += 1
    run.__name__ = fn.__name__
    return run


def _succeeded(cbdata: int) -> bool:
    return bool(cbdata) and callback_result(cbdata) == 0


@_guarded
def on_handle_create_exit(cbdata: int) -> None:
    if _succeeded(cbdata):
        got = handle_created(function_params(cbdata))
        if got is not None:
            _REGISTRY.add_handle(*got)


@_guarded
def on_add_node_exit(cbdata: int) -> None:
    if _succeeded(cbdata):
        got = node_added(function_params(cbdata), v2=False)
        if got is not None:
            _REGISTRY.add_node(*got)


@_guarded
def on_add_node_v2_exit(cbdata: int) -> None:
    if _succeeded(cbdata):
        got = node_added(function_params(cbdata), v2=True)
        if got is not None:
            _REGISTRY.add_node(*got)


@_guarded
def on_graph_destroy_enter(cbdata: int) -> None:
    params = function_params(cbdata)
    if params:
        graph = GraphDestroyParams.from_address(params).hGraph
        if graph:
            _REGISTRY.forget_graph(graph)


@_guarded
def on_node_destroy_enter(cbdata: int) -> None:
    params = function_params(cbdata)
    if params:
        node = GraphDestroyNodeParams.from_address(params).hNode
        if node:
            _REGISTRY.forget_node(node)


def handlers() -> dict:
    """``{cbid: (on_enter, on_exit)}`` for the driver-API domain (either may be None). Each is
    called with the address of the ``CUpti_CallbackData``; none raises."""
    return {
        CBID_GRAPH_CONDITIONAL_HANDLE_CREATE: (None, on_handle_create_exit),
        CBID_GRAPH_ADD_NODE: (None, on_add_node_exit),
        CBID_GRAPH_ADD_NODE_V2: (None, on_add_node_v2_exit),
        CBID_GRAPH_DESTROY: (on_graph_destroy_enter, None),
        CBID_GRAPH_DESTROY_NODE: (on_node_destroy_enter, None),
    }
