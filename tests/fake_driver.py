"""A CUDA driver in Python, for running the restore path end to end on a machine without a GPU.

:class:`FakeDriver` replaces, for one test, every ``cuda.bindings.driver`` function cgsnap calls,
the two entry points cgsnap calls through ctypes (``cuGraphAddKernelNode_v2``,
``cuGraphKernelNodeSetAttribute``: :class:`cgsnap.cuda.driver.GraphBuilder`, also as the
addresses the native node loop calls) and records what cgsnap asks of it. What it checks is
what a driver would refuse or what would fault on the card, not GPU results:

- every call's arguments first go through the real cuda-bindings function, which converts and
  type-checks them and then fails to find libcuda (on a machine without a driver): an argument
  of the wrong type or out of range raises there, as it would on the card;
- device memory is bytes in Python: copies, memsets and uploads must stay inside live
  allocations (a write outside one is an error, as it is an illegal address on the card);
- a kernel node's ``CUDA_KERNEL_NODE_PARAMS`` is read from the address given, its function must
  be a loaded one, its ``kernelParams`` are read (one pointer per parameter of the function's
  layout, each parameter's bytes copied as the driver copies them) at the time of the call;
- dependencies must be nodes of the same graph, added before.

The graphs it builds are kept (:attr:`FakeDriver.graphs`) for tests to compare with the
snapshot: node types, dependencies, kernel functions, launch configurations, argument bytes.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from cuda.bindings import driver as cu

from cgsnap.cuda import driver as cg_driver
from cgsnap.cuda.driver import KERNEL_NODE_PARAMS

OK = cu.CUresult.CUDA_SUCCESS
INVALID = cu.CUresult.CUDA_ERROR_INVALID_VALUE
NOT_FOUND = cu.CUresult.CUDA_ERROR_NOT_FOUND

ADD_KERNEL = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.c_void_p)
SET_ATTRIBUTE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)

DEVICE_BASE = 0x7A00_0000_0000        # fake device addresses (never dereferenced on the host)


class FakeFault(AssertionError):
    """What would be an illegal address or a refused call on the card."""


def _loader_error():
    """The exception cuda-bindings raises when it cannot load libcuda (None: it can)."""
    try:
        cu.cuDriverGetVersion()
    except Exception as exc:        # DynamicLibNotFoundError / RuntimeError("Failed to dlopen")
        return type(exc), str(exc)
    return None


@dataclass
class Node:
    handle: int
    type: str
    deps: list
    params: dict = field(default_factory=dict)


@dataclass
class FakeGraph:
    handle: int
    nodes: list = field(default_factory=list)
    extra_edges: list = field(default_factory=list)     # (from, to, (from_port, to_port, type))
    destroyed: bool = False

    def node(self, handle: int) -> Node:
        return next(n for n in self.nodes if n.handle == handle)


class FakeDriver:
    """Install with :meth:`install` (a pytest ``monkeypatch``); see the module docstring.

    ``kernels``: ``{name: ((offset, size), ...)}`` -- what every loaded library defines (the
    parameter layout ``cuFuncGetParamInfo`` reports); ``globals_``: ``{name: size}``."""

    def __init__(self, kernels: dict, globals_: Optional[dict] = None, *, arch: int = 90,
                 name: bytes = b"NVIDIA H200", driver_version: int = 13000):
        self.kernels = {k: tuple(tuple(p) for p in v) for k, v in kernels.items()}
        self.globals = dict(globals_ or {})
        self.arch, self.name, self.driver_version = arch, name, driver_version
        self.lock = threading.RLock()
        self.calls: list = []              # (function name, args)
        self.memory: dict = {}             # device base -> bytearray
        self.freed: list = []
        self.host: dict = {}               # pinned host address -> ctypes buffer
        self.registered: dict = {}         # page-locked host address -> size
        self.libraries: dict = {}          # handle -> image bytes
        self.functions: dict = {}          # handle -> kernel name
        self.graphs: dict = {}             # handle -> FakeGraph
        self.execs: dict = {}              # handle -> FakeGraph (as instantiated)
        self.launches: list = []           # (exec handle, stream handle)
        self.func_attrs: list = []         # (function name, attribute, value)
        self.enabled: dict = {}            # (exec, node) -> 0 / 1
        self.events: set = set()
        self.streams: set = set()
        self._next = 0x1000
        self._next_dev = DEVICE_BASE
        self.faults: list = []             # what the ctypes entry points refused
        self._global_addrs: dict = {}
        self._validate = _loader_error()
        self._keep = []

    # ---- installation ------------------------------------------------------------------------
    def install(self, monkeypatch) -> "FakeDriver":
        for attr in dir(self):
            if attr.startswith("cu") and attr[2:3].isupper():
                real = getattr(cu, attr)
                monkeypatch.setattr(cu, attr, self._wrap(attr, real, getattr(self, attr)))
        monkeypatch.setattr(cg_driver, "_devices", {})
        add, set_attr = ADD_KERNEL(self._add_kernel_node), SET_ATTRIBUTE(self._set_attribute)
        self._keep += [add, set_attr]
        monkeypatch.setattr(cg_driver.GraphBuilder, "_lib", add)
        monkeypatch.setattr(cg_driver.GraphBuilder, "_set_attribute", set_attr)
        return self

    def _wrap(self, name, real, fake):
        validate = self._validate

        def call(*args):
            if validate is not None:        # the real binding converts and checks the arguments
                try:
                    real(*args)
                except Exception as exc:
                    if (type(exc), str(exc)) != validate:
                        raise
                else:
                    raise AssertionError(f"{name} reached a real driver")
            with self.lock:
                self.calls.append((name, args))
                return fake(*args)
        call.__name__ = name
        return call

    def _handle(self) -> int:
        self._next += 0x10
        return self._next

    def names(self) -> list:
        return [name for name, _ in self.calls]

    # ---- memory ------------------------------------------------------------------------------
    def _alloc(self, size: int) -> int:
        base = self._next_dev
        self._next_dev += (max(size, 1) + 0xFFFF) & ~0xFFFF     # a gap after every allocation
        self.memory[base] = bytearray(size)
        return base

    def find(self, addr: int, size: int) -> tuple:
        """``(bytearray, offset)`` of a live allocation holding ``[addr, addr + size)``."""
        addr = int(addr)
        for base, mem in self.memory.items():
            if base <= addr and addr + size <= base + len(mem):
                return mem, addr - base
        raise FakeFault(f"{size} bytes at {addr:#x} are in no live device allocation")

    def read(self, addr: int, size: int) -> bytes:
        mem, off = self.find(addr, size)
        return bytes(mem[off:off + size])

    def write(self, addr: int, data: bytes) -> None:
        mem, off = self.find(addr, len(data))
        mem[off:off + len(data)] = data

    def is_host(self, addr: int, size: int) -> bool:
        for base, buf in self.host.items():
            if base <= addr and addr + size <= base + ctypes.sizeof(buf):
                return True
        return False

    def cuMemAlloc(self, size):
        return OK, cu.CUdeviceptr(self._alloc(size))

    def cuMemFree(self, ptr):
        base = int(ptr)
        if base not in self.memory:
            return (INVALID,)
        del self.memory[base]
        self.freed.append(base)
        return (OK,)

    def cuMemHostAlloc(self, size, flags):
        buf = ctypes.create_string_buffer(size)
        self.host[ctypes.addressof(buf)] = buf
        return OK, ctypes.addressof(buf)

    def cuMemFreeHost(self, ptr):
        if self.host.pop(int(ptr), None) is None:
            return (INVALID,)
        return (OK,)

    def cuMemcpyHtoD(self, dst, src, size):
        self.write(int(dst), ctypes.string_at(int(src), size))
        return (OK,)

    def cuMemcpyHtoDAsync(self, dst, src, size, stream):
        return self.cuMemcpyHtoD(dst, src, size)

    def cuMemcpyDtoH(self, dst, src, size):
        data = self.read(int(src), size)
        ctypes.memmove(int(dst), data, size)
        return (OK,)

    def cuMemcpyDtoHAsync(self, dst, src, size, stream):
        return self.cuMemcpyDtoH(dst, src, size)

    def cuMemsetD8(self, dst, value, size):
        self.write(int(dst), bytes([value]) * size)
        return (OK,)

    def cuMemsetD32Async(self, dst, value, count, stream):
        if int(dst) % 4:
            return (INVALID,)
        self.write(int(dst), int(value).to_bytes(4, "little") * count)
        return (OK,)

    def cuMemHostRegister(self, ptr, size, flags):
        self.registered[int(ptr)] = size
        return (OK,)

    def cuMemHostUnregister(self, ptr):
        if self.registered.pop(int(ptr), None) is None:
            return (INVALID,)
        return (OK,)

    def cuMemGetInfo(self):
        return OK, 100 << 30, 141 << 30

    # ---- device, context, streams, events ----------------------------------------------------
    def cuInit(self, flags):
        return (OK,)

    def cuDeviceGetCount(self):
        return OK, 1

    def cuDeviceGet(self, ordinal):
        return (OK, cu.CUdevice(ordinal)) if ordinal == 0 else (cu.CUresult.CUDA_ERROR_INVALID_DEVICE,)

    def cuDevicePrimaryCtxRetain(self, dev):
        return OK, cu.CUcontext(0xC0)

    def cuCtxSetCurrent(self, ctx):
        return (OK,)

    def cuCtxGetCurrent(self):
        return OK, cu.CUcontext(0xC0)

    def cuCtxGetDevice(self):
        return OK, cu.CUdevice(0)

    def cuCtxSynchronize(self):
        return (OK,)

    def cuDeviceGetAttribute(self, attr, dev):
        a = cu.CUdevice_attribute
        if attr == a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR:
            return OK, self.arch // 10
        if attr == a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR:
            return OK, self.arch % 10
        return OK, 0

    def cuDeviceGetName(self, length, dev):
        return OK, self.name.ljust(length, b"\0")

    def cuDriverGetVersion(self):
        return OK, self.driver_version

    def cuDeviceTotalMem(self, dev):
        return OK, 141 << 30

    def cuStreamCreate(self, flags):
        h = self._handle()
        self.streams.add(h)
        return OK, cu.CUstream(h)

    def cuStreamDestroy(self, stream):
        self.streams.discard(int(stream))
        return (OK,)

    def cuStreamSynchronize(self, stream):
        return (OK,)

    def cuEventCreate(self, flags):
        h = self._handle()
        self.events.add(h)
        return OK, cu.CUevent(h)

    def cuEventDestroy(self, event):
        if int(event) not in self.events:
            return (INVALID,)
        self.events.discard(int(event))
        return (OK,)

    def cuEventRecord(self, event, stream):
        return (OK,)

    def cuEventSynchronize(self, event):
        return (OK,)

    def cuGetErrorName(self, err):
        return OK, cu.CUresult(err).name.encode()

    def cuGetErrorString(self, err):
        return OK, b"(fake driver)"

    def cuPointerGetAttribute(self, attr, ptr):
        return (INVALID,)

    # ---- libraries and functions -------------------------------------------------------------
    def cuLibraryLoadData(self, code, *options):
        h = self._handle()
        self.libraries[h] = bytes(code)
        return OK, cu.CUlibrary(h)

    def cuLibraryUnload(self, lib):
        if self.libraries.pop(int(lib), None) is None:
            return (INVALID,)
        return (OK,)

    def cuLibraryGetKernel(self, lib, name):
        if int(lib) not in self.libraries or name.decode() not in self.kernels:
            return (NOT_FOUND,)
        h = self._handle()
        self.functions[h] = name.decode()
        return OK, cu.CUkernel(h)

    def cuKernelGetFunction(self, kernel):
        return OK, cu.CUfunction(int(kernel))

    def cuFuncGetParamInfo(self, func, index):
        layout = self.kernels[self.functions[int(func)]]
        if index >= len(layout):
            return (INVALID,)
        return OK, layout[index][0], layout[index][1]

    def cuFuncSetAttribute(self, func, attr, value):
        self.func_attrs.append((self.functions[int(func)], attr, value))
        return (OK,)

    def cuLibraryGetGlobal(self, lib, name):
        size = self.globals.get(name.decode())
        if size is None:
            return (NOT_FOUND,)
        key = (int(lib), name)
        if key not in self._global_addrs:
            self._global_addrs[key] = self._alloc(size)
        return OK, cu.CUdeviceptr(self._global_addrs[key]), size

    # ---- graphs ------------------------------------------------------------------------------
    def cuGraphCreate(self, flags):
        g = FakeGraph(self._handle())
        self.graphs[g.handle] = g
        return OK, cu.CUgraph(g.handle)

    def cuGraphDestroy(self, graph):
        g = self.graphs.get(int(graph))
        if g is None or g.destroyed:
            return (INVALID,)
        g.destroyed = True
        return (OK,)

    def _graph(self, graph) -> FakeGraph:
        g = self.graphs.get(int(graph))
        if g is None or g.destroyed:
            raise FakeFault(f"graph {int(graph):#x} does not exist")
        return g

    def _add(self, graph, deps, count, type_: str, /, **params):
        g = self._graph(graph)
        deps = [int(d) for d in (deps or [])]
        if len(deps) != count:
            raise FakeFault(f"{type_} node: {count} dependencies stated, {len(deps)} given")
        self._check_deps(g, deps)
        node = Node(self._handle(), type_, deps, params)
        g.nodes.append(node)
        return OK, cu.CUgraphNode(node.handle)

    @staticmethod
    def _check_deps(g: FakeGraph, deps: list) -> None:
        have = {n.handle for n in g.nodes}
        missing = [d for d in deps if d not in have]
        if missing or len(set(deps)) != len(deps):
            raise FakeFault(f"dependencies {deps}: not earlier nodes of graph {g.handle:#x} "
                            f"(unknown: {missing}) or repeated")

    def cuGraphAddEmptyNode(self, graph, deps, count):
        return self._add(graph, deps, count, "empty")

    def cuGraphAddMemsetNode(self, graph, deps, count, p, ctx):
        row = int(p.width) * int(p.elementSize)
        span = (int(p.height) - 1) * int(p.pitch) + row if int(p.height) else 0
        self.find(int(p.dst), span)
        return self._add(graph, deps, count, "memset", dst=int(p.dst), value=int(p.value),
                         element_size=int(p.elementSize), width=int(p.width),
                         height=int(p.height), pitch=int(p.pitch))

    def cuGraphAddMemcpyNode(self, graph, deps, count, p, ctx):
        sides = {}
        for side in ("src", "dst"):
            mtype = getattr(p, f"{side}MemoryType")
            pitch, height = int(getattr(p, f"{side}Pitch")), int(getattr(p, f"{side}Height"))
            span = ((int(p.Depth) - 1) * height + int(p.Height) - 1) * pitch + int(p.WidthInBytes)
            if mtype == cu.CUmemorytype.CU_MEMORYTYPE_HOST:
                addr = int(getattr(p, f"{side}Host"))
                if not self.is_host(addr, span):
                    raise FakeFault(f"memcpy {side}: {span} bytes at {addr:#x} not pinned memory")
                kind = "host"
            elif mtype == cu.CUmemorytype.CU_MEMORYTYPE_DEVICE:
                addr = int(getattr(p, f"{side}Device"))
                self.find(addr, span)
                kind = "device"
            else:
                raise FakeFault(f"memcpy {side}: memory type {mtype}")
            sides[side] = {"kind": kind, "addr": addr, "pitch": pitch, "height": height}
        return self._add(graph, deps, count, "memcpy", width=int(p.WidthInBytes),
                         height=int(p.Height), depth=int(p.Depth), **sides)

    def cuGraphAddChildGraphNode(self, graph, deps, count, child):
        c = self._graph(child)
        return self._add(graph, deps, count, "graph", graph=c.handle)

    def cuGraphAddEventRecordNode(self, graph, deps, count, event):
        if int(event) not in self.events:
            raise FakeFault(f"event {int(event):#x} does not exist")
        return self._add(graph, deps, count, "event_record", event=int(event))

    def cuGraphAddEventWaitNode(self, graph, deps, count, event):
        if int(event) not in self.events:
            raise FakeFault(f"event {int(event):#x} does not exist")
        return self._add(graph, deps, count, "event_wait", event=int(event))

    def cuGraphAddMemAllocNode(self, graph, deps, count, p):
        if p.poolProps.location.type != cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE or \
                p.poolProps.allocType != cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED:
            raise FakeFault("mem_alloc node: pool properties")
        dptr = self._alloc(int(p.bytesize))
        p.dptr = dptr
        res = self._add(graph, deps, count, "mem_alloc", dptr=dptr, bytesize=int(p.bytesize))
        return res

    def cuGraphMemAllocNodeGetParams(self, node):
        for g in self.graphs.values():
            for n in g.nodes:
                if n.handle == int(node) and n.type == "mem_alloc":
                    p = cu.CUDA_MEM_ALLOC_NODE_PARAMS()
                    p.dptr = n.params["dptr"]
                    p.bytesize = n.params["bytesize"]
                    return OK, p
        return (INVALID,)

    def cuGraphAddMemFreeNode(self, graph, deps, count, dptr):
        self.find(int(dptr), 1)
        return self._add(graph, deps, count, "mem_free", dptr=int(dptr))

    def cuGraphAddHostNode(self, graph, deps, count, p):
        fn = cg_driver.address_of_function(p.fn)
        if not fn:
            raise FakeFault("host node without a function")
        return self._add(graph, deps, count, "host", fn=fn, user_data=int(p.userData or 0))

    def cuGraphAddDependencies(self, graph, froms, tos, data, count):
        g = self._graph(graph)
        if not len(froms) == len(tos) == len(data) == count:
            raise FakeFault("cuGraphAddDependencies: lengths differ")
        have = {n.handle for n in g.nodes}
        for a, b, d in zip(froms, tos, data):
            if int(a) not in have or int(b) not in have:
                raise FakeFault("cuGraphAddDependencies: not nodes of the graph")
            g.extra_edges.append((int(a), int(b), (int(d.from_port), int(d.to_port),
                                                   int(d.type))))
        return (OK,)

    def cuGraphInstantiate(self, graph, flags):
        g = self._graph(graph)
        h = self._handle()
        self.execs[h] = g
        return OK, cu.CUgraphExec(h)

    def cuGraphExecDestroy(self, exe):
        if self.execs.pop(int(exe), None) is None:
            return (INVALID,)
        return (OK,)

    def cuGraphLaunch(self, exe, stream):
        if int(exe) not in self.execs:
            return (INVALID,)
        self.launches.append((int(exe), int(stream)))
        return (OK,)

    def cuGraphNodeGetEnabled(self, exe, node):
        return OK, self.enabled.get((int(exe), int(node)), 1)

    def cuGraphNodeSetEnabled(self, exe, node, on):
        self.enabled[(int(exe), int(node))] = int(on)
        return (OK,)

    # ---- the ctypes entry points -------------------------------------------------------------
    def _add_kernel_node(self, node_out, graph, deps, ndeps, params) -> int:
        """``cuGraphAddKernelNode_v2``: everything read from the addresses given, now."""
        with self.lock:
            try:
                g = self._graph(graph)
                dep_list = list(np.frombuffer(ctypes.string_at(deps, 8 * ndeps), dtype="<u8")
                                .tolist()) if ndeps else []
                if ndeps and not deps:
                    raise FakeFault("kernel node: dependencies counted but no array given")
                self._check_deps(g, dep_list)
                p = np.frombuffer(ctypes.string_at(params, KERNEL_NODE_PARAMS.itemsize),
                                  dtype=KERNEL_NODE_PARAMS)[0]
                name = self.functions.get(int(p["func"]))
                if name is None:
                    raise FakeFault(f"kernel node: function {int(p['func']):#x} not loaded")
                layout = self.kernels[name]
                kp = int(p["kernel_params"])
                if int(p["extra"]):
                    raise FakeFault("kernel node: extra given")
                if layout and not kp:
                    raise FakeFault(f"kernel node {name}: no kernelParams for {len(layout)} "
                                    "parameters")
                ptrs = (ctypes.c_void_p * len(layout)).from_address(kp) if layout else []
                args = [ctypes.string_at(ptrs[j], size) for j, (_, size) in enumerate(layout)]
                node = Node(self._handle(), "kernel", dep_list,
                            {"kernel": name, "grid": tuple(int(x) for x in p["grid"]),
                             "block": tuple(int(x) for x in p["block"]),
                             "shared_mem": int(p["shared_mem"]), "args": args, "attrs": {}})
                g.nodes.append(node)
                ctypes.c_uint64.from_address(node_out).value = node.handle
                self.calls.append(("cuGraphAddKernelNode_v2", (name,)))
                return 0
            except FakeFault as exc:
                self.faults.append(str(exc))
                return int(INVALID)

    def _set_attribute(self, node, attr, value) -> int:
        with self.lock:
            for g in self.graphs.values():
                for n in g.nodes:
                    if n.handle == node and n.type == "kernel":
                        n.params["attrs"][attr] = ctypes.string_at(value, 64)
                        self.calls.append(("cuGraphKernelNodeSetAttribute", (node, attr)))
                        return 0
            self.faults.append(f"attribute {attr} set on {node}, no kernel node")
            return int(INVALID)



class DeviceArray:
    """Something to ``bind``: ``__cuda_array_interface__`` over fake device memory."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr,
                                         "data": (ptr, False), "version": 3, "strides": None}
