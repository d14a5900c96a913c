"""The thin layer over the CUDA driver (``cuda.bindings.driver``).

Every driver call of cgsnap goes through :func:`call`, which turns cuda-bindings' ``(err, *values)``
tuples into a value or a :class:`~cgsnap.errors.DriverError` naming the call. Importing this module
does not initialise CUDA; :func:`init` does, once per process.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
from cuda.bindings import driver as cu

from ..errors import CompatibilityError, DriverError

SUCCESS = cu.CUresult.CUDA_SUCCESS
NodeType = cu.CUgraphNodeType
MemType = cu.CUmemorytype


def error_name(err) -> str:
    res = cu.cuGetErrorName(err)
    return res[1].decode() if res[0] == SUCCESS and res[1] else str(int(err))


def call(fn, *args):
    """Call a driver function; return its value (a tuple if several) or raise DriverError."""
    res = fn(*args)
    err = res[0]
    if err != SUCCESS:
        name = getattr(fn, "__name__", str(fn))
        msg = cu.cuGetErrorString(err)
        raise DriverError(name, int(err), error_name(err),
                          msg[1].decode() if msg[0] == SUCCESS and msg[1] else "")
    if len(res) == 1:
        return None
    return res[1] if len(res) == 2 else res[1:]


def attempt(fn, *args):
    """Like :func:`call` but return ``None`` instead of raising (for probing calls)."""
    res = fn(*args)
    if res[0] != SUCCESS:
        return None
    return True if len(res) == 1 else (res[1] if len(res) == 2 else res[1:])


@dataclass(frozen=True)
class Device:
    ordinal: int
    handle: object
    context: object
    name: str
    arch: int              # compute capability as major*10 + minor (90 for sm_90)
    driver_version: int    # e.g. 13000
    total_memory: int

    def describe(self) -> dict:
        return {"name": self.name, "arch": self.arch, "cc": [self.arch // 10, self.arch % 10],
                "driver": self.driver_version, "total_memory": self.total_memory}


_devices: dict = {}


def init(ordinal: int = 0) -> Device:
    """Initialise the driver and make ``ordinal``'s primary context current (the one torch and
    CuPy use, so cgsnap shares memory and modules with them)."""
    dev = _devices.get(ordinal)
    if dev is not None:
        call(cu.cuCtxSetCurrent, dev.context)
        return dev
    try:
        call(cu.cuInit, 0)
    except DriverError as exc:
        raise CompatibilityError(f"no usable CUDA driver or GPU: {exc}") from None
    except Exception as exc:  # the driver library itself is missing
        raise CompatibilityError(f"no CUDA driver found: {exc}") from None
    count = call(cu.cuDeviceGetCount)
    if not 0 <= ordinal < count:
        raise CompatibilityError(f"device {ordinal} requested, this machine has {count}")
    handle = call(cu.cuDeviceGet, ordinal)
    ctx = call(cu.cuDevicePrimaryCtxRetain, handle)
    call(cu.cuCtxSetCurrent, ctx)
    attr = cu.CUdevice_attribute
    major = call(cu.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle)
    minor = call(cu.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle)
    name = call(cu.cuDeviceGetName, 256, handle).split(b"\0", 1)[0].decode(errors="replace")
    dev = Device(ordinal, handle, ctx, name, major * 10 + minor, call(cu.cuDriverGetVersion),
                 call(cu.cuDeviceTotalMem, handle))
    _devices[ordinal] = dev
    return dev


def set_current(context) -> None:
    """Make ``context`` current on this thread (pool threads start with none)."""
    call(cu.cuCtxSetCurrent, context)


def current_device() -> Device:
    """The device of the current context (initialising device 0 if there is none)."""
    try:
        res = cu.cuCtxGetDevice()
    except Exception as exc:  # the driver library itself is missing
        raise CompatibilityError(f"no CUDA driver found: {exc}") from None
    if res[0] != SUCCESS:
        return init(0)
    return init(int(res[1]))


def driver_version() -> int:
    return call(cu.cuDriverGetVersion)


_DRIVER_VERSION: list = []


def driver_version_cached() -> int:
    """:func:`driver_version`, asked once per process."""
    if not _DRIVER_VERSION:
        _DRIVER_VERSION.append(driver_version())
    return _DRIVER_VERSION[0]


def version_text(v: int) -> str:
    """``13000`` -> ``"13.0"``."""
    return f"{v // 1000}.{v % 1000 // 10}"


def bindings_version() -> str:
    import cuda.bindings
    return getattr(cuda.bindings, "__version__", "?")


# ---- memory -------------------------------------------------------------------------------

def address_range(ptr: int) -> Optional[tuple]:
    """``(base, size)`` of the device allocation holding ``ptr``, or None if it holds none."""
    res = cu.cuMemGetAddressRange(ptr)
    if res[0] != SUCCESS:
        return None
    return int(res[1]), int(res[2])


def memory_type(ptr: int) -> Optional[int]:
    """CU_MEMORYTYPE_* of a pointer the driver knows (device, host-pinned, managed), else None."""
    res = cu.cuPointerGetAttribute(cu.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr)
    return int(res[1]) if res[0] == SUCCESS else None


def mem_alloc(size: int) -> int:
    return int(call(cu.cuMemAlloc, max(size, 1)))


def mem_free(ptr: int) -> None:
    call(cu.cuMemFree, ptr)


def host_alloc(size: int) -> int:
    """Page-locked host memory (portable), for staging copies at full bus speed."""
    return int(call(cu.cuMemHostAlloc, max(size, 1), cu.CU_MEMHOSTALLOC_PORTABLE))


def host_free(ptr: int) -> None:
    call(cu.cuMemFreeHost, ptr)


def host_view(ptr: int, size: int) -> memoryview:
    """A writable memoryview over host memory at ``ptr`` (pinned buffers we own)."""
    return memoryview((ctypes.c_char * size).from_address(ptr)).cast("B")


def buffer_address(buf) -> int:
    """Address of a contiguous, writable-or-not bytes-like object without copying it."""
    mv = memoryview(buf)
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    if mv.readonly:
        # ctypes refuses read-only buffers; numpy reads the address of any buffer.
        return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data) if mv.nbytes else 0
    return ctypes.addressof(ctypes.c_char.from_buffer(mv)) if mv.nbytes else 0


def htod(dst: int, src, size: int, stream=None) -> None:
    src_ptr = src if isinstance(src, int) else buffer_address(src)
    if stream is None:
        call(cu.cuMemcpyHtoD, dst, src_ptr, size)
    else:
        call(cu.cuMemcpyHtoDAsync, dst, src_ptr, size, stream)


def dtoh(dst, src: int, size: int, stream=None) -> None:
    dst_ptr = dst if isinstance(dst, int) else buffer_address(dst)
    if stream is None:
        call(cu.cuMemcpyDtoH, dst_ptr, src, size)
    else:
        call(cu.cuMemcpyDtoHAsync, dst_ptr, src, size, stream)


def memset_d8(dst: int, value: int, size: int) -> None:
    call(cu.cuMemsetD8, dst, value, size)


def dtod(dst: int, src: int, size: int, stream) -> None:
    call(cu.cuMemcpyDtoDAsync, dst, src, size, stream)


def current_context():
    """The current context (None if there is none)."""
    res = cu.cuCtxGetCurrent()
    return res[1] if res[0] == SUCCESS and int(res[1]) else None


class in_context:
    """``with in_context(ctx):`` makes ``ctx`` current for the block and puts the thread's
    previous context back afterwards (a finaliser or a pool thread must not change it)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        call(cu.cuCtxPushCurrent, self.ctx)
        return self

    def __exit__(self, *exc):
        call(cu.cuCtxPopCurrent)


def free_in_context(ptr: int, ctx) -> None:
    """``cuMemFree`` from any thread (finalisers run wherever the collector does)."""
    with in_context(ctx):
        mem_free(ptr)


def write_u64_async(dst: int, value: int, stream) -> None:
    """Write the little-endian 8-byte word ``value`` at ``dst`` (4-aligned), ordered on
    ``stream``: two 32-bit memsets, whose values travel in the call itself, so no host buffer
    has to outlive the copy however many writes are queued."""
    call(cu.cuMemsetD32Async, dst, value & 0xFFFF_FFFF, 1, stream)
    call(cu.cuMemsetD32Async, dst + 4, (value >> 32) & 0xFFFF_FFFF, 1, stream)


def mem_get_info() -> tuple:
    """``(free, total)`` bytes of the current device."""
    free, total = call(cu.cuMemGetInfo)
    return int(free), int(total)


# ---- CUDA arrays and texture objects --------------------------------------------------------

def array_descriptor(array) -> tuple:
    """``(format, channels, width, height, depth, flags)`` of a CUarray (cuArray3DGetDescriptor:
    a 2D array reports depth 0, a 1D one height 0 too)."""
    d = call(cu.cuArray3DGetDescriptor, cu.CUarray(int(array)))
    return (int(d.Format), int(d.NumChannels), int(d.Width), int(d.Height), int(d.Depth),
            int(d.Flags))


def array_create(fmt: int, channels: int, width: int, height: int, depth: int, flags: int):
    d = cu.CUDA_ARRAY3D_DESCRIPTOR()
    d.Width, d.Height, d.Depth = width, height, depth
    d.Format = cu.CUarray_format(fmt)
    d.NumChannels, d.Flags = channels, flags
    return call(cu.cuArray3DCreate, d)


def array_destroy(array) -> None:
    call(cu.cuArrayDestroy, array)


def array_copy(array, host: int, row_bytes: int, rows: int, slices: int, to_host: bool) -> None:
    """Copy a whole array to (``to_host``) or from packed host memory at ``host``
    (``slices`` x ``rows`` x ``row_bytes``), synchronously."""
    if not row_bytes:
        return
    p = cu.CUDA_MEMCPY3D()
    a, h = ("src", "dst") if to_host else ("dst", "src")
    setattr(p, f"{a}MemoryType", MemType.CU_MEMORYTYPE_ARRAY)
    setattr(p, f"{a}Array", cu.CUarray(int(array)))
    setattr(p, f"{h}MemoryType", MemType.CU_MEMORYTYPE_HOST)
    setattr(p, f"{h}Host", host)
    setattr(p, f"{h}Pitch", row_bytes)
    setattr(p, f"{h}Height", rows)
    p.WidthInBytes, p.Height, p.Depth = row_bytes, rows, slices
    call(cu.cuMemcpy3D, p)


def texture_object_resource(value: int) -> Optional[str]:
    """What a live texture or surface object ``value`` of this process reads (``"array"``,
    ``"linear"``, ...), or None when ``value`` is neither (the driver keeps both as small
    indices: a kernel argument holding one is indistinguishable from an integer by value)."""
    for getter, handle in ((cu.cuTexObjectGetResourceDesc, cu.CUtexObject),
                           (cu.cuSurfObjectGetResourceDesc, cu.CUsurfObject)):
        res = getter(handle(value))
        if res[0] == SUCCESS:
            kind = str(getattr(res[1].resType, "name", res[1].resType))
            what = "texture" if getter is cu.cuTexObjectGetResourceDesc else "surface"
            return f"{what} object over {kind.replace('CU_RESOURCE_TYPE_', '').lower()} memory"
    return None


# ---- streams, events, sync --------------------------------------------------------------

def stream_create() -> object:
    return call(cu.cuStreamCreate, cu.CUstream_flags.CU_STREAM_NON_BLOCKING)


def stream_destroy(stream) -> None:
    call(cu.cuStreamDestroy, stream)


def stream_sync(stream) -> None:
    call(cu.cuStreamSynchronize, stream)


def ctx_sync() -> None:
    call(cu.cuCtxSynchronize)


def as_stream(stream) -> object:
    """A CUstream from an int handle, a CUstream, a torch stream or a CuPy stream (duck-typed:
    neither framework is imported)."""
    if stream is None:
        return cu.CUstream(0)
    if isinstance(stream, cu.CUstream):
        return stream
    if isinstance(stream, int):
        return cu.CUstream(stream)
    for attr in ("cuda_stream", "ptr", "handle"):   # torch, CuPy, cuda.core
        value = getattr(stream, attr, None)
        if value is not None:
            return cu.CUstream(int(value))
    raise TypeError(f"cannot use {type(stream).__name__} as a CUDA stream")


def as_graph(graph) -> object:
    if isinstance(graph, cu.CUgraph):
        return graph
    if isinstance(graph, int):
        return cu.CUgraph(graph)
    raise TypeError(f"cannot use {type(graph).__name__} as a CUgraph")


def launch_kernel(func, grid: tuple, block: tuple, shared_mem: int, stream, args) -> None:
    """``cuLaunchKernel`` with ``args`` given as ctypes values (one per parameter)."""
    import ctypes as _ct
    ptrs = (_ct.c_void_p * len(args))(*[_ct.addressof(a) for a in args])
    call(cu.cuLaunchKernel, func, *grid, *block, shared_mem, as_stream(stream),
         _ct.addressof(ptrs), 0)


# ---- host callbacks -------------------------------------------------------------------------

HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def address_of_function(fn) -> int:
    """The address of a host function: an int, a ctypes function pointer, or a CUhostFn."""
    if isinstance(fn, int):
        return fn
    if isinstance(fn, ctypes._CFuncPtr):
        return ctypes.cast(fn, ctypes.c_void_p).value or 0
    try:
        return int(fn)
    except TypeError:
        return ctypes.c_void_p.from_address(fn.getPtr()).value or 0


def host_node_params(callback):
    """CUDA_HOST_NODE_PARAMS calling the Python ``callback()``; returns ``(params, keepalive)``
    -- the ctypes trampoline must outlive the graph."""
    trampoline = HOST_FN(lambda _user_data: callback())
    p = cu.CUDA_HOST_NODE_PARAMS()
    p.fn = cu.CUhostFn(ctypes.cast(trampoline, ctypes.c_void_p).value)
    p.userData = 0
    return p, trampoline


# ---- functions and modules ----------------------------------------------------------------

def func_name(func) -> str:
    return call(cu.cuFuncGetName, func).decode()


def func_params(func) -> tuple:
    """``((offset, size), ...)`` of a kernel's parameters."""
    params = []
    while True:
        res = cu.cuFuncGetParamInfo(func, len(params))
        if res[0] != SUCCESS:
            # The driver reports the end of the list as CUDA_ERROR_INVALID_VALUE.
            if res[0] == cu.CUresult.CUDA_ERROR_INVALID_VALUE:
                return tuple(params)
            call(cu.cuFuncGetParamInfo, func, len(params))
        params.append((int(res[1]), int(res[2])))


FUNC_ATTRS = {   # recorded name -> attribute; those a launch may need set on a fresh function
    "max_dynamic_shared_size_bytes":
        cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
    "preferred_shared_memory_carveout":
        cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
    "non_portable_cluster_size_allowed":
        cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
    "cluster_scheduling_policy_preference":
        cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE,
}
def func_attrs(func, names=FUNC_ATTRS) -> dict:
    out = {}
    for key, attr in names.items():
        value = attempt(cu.cuFuncGetAttribute, attr, func)
        if value is not None:
            out[key] = int(value)
    return out


# Attributes fixed by the image (what a pruned image must reproduce exactly).
IMAGE_FUNC_ATTRS = {name.lower(): getattr(cu.CUfunction_attribute, "CU_FUNC_ATTRIBUTE_" + name)
                    for name in ("MAX_THREADS_PER_BLOCK", "SHARED_SIZE_BYTES", "CONST_SIZE_BYTES",
                                 "LOCAL_SIZE_BYTES", "NUM_REGS", "PTX_VERSION", "BINARY_VERSION",
                                 "CACHE_MODE_CA", "MAX_DYNAMIC_SHARED_SIZE_BYTES",
                                 "REQUIRED_CLUSTER_WIDTH", "REQUIRED_CLUSTER_HEIGHT",
                                 "REQUIRED_CLUSTER_DEPTH", "CLUSTER_SIZE_MUST_BE_SET")
                    if hasattr(cu.CUfunction_attribute, "CU_FUNC_ATTRIBUTE_" + name)}


# Of those, the ones nothing can change after load: what tells two same-named kernels apart
# (cgsnap.kernels.identity). REQUIRED_CLUSTER_* and MAX_DYNAMIC_SHARED_SIZE_BYTES can be set at
# run time; a JIT-compiled function's PTX_VERSION need not be its cubin's.
IDENTITY_FUNC_ATTRS = {name: IMAGE_FUNC_ATTRS[name]
                       for name in ("num_regs", "shared_size_bytes", "const_size_bytes",
                                    "local_size_bytes", "max_threads_per_block", "binary_version",
                                    "cache_mode_ca", "cluster_size_must_be_set")
                       if name in IMAGE_FUNC_ATTRS}


def function_identity(func) -> dict:
    """The :data:`IDENTITY_FUNC_ATTRS` of a function, and its parameter layout as ``params``."""
    out = func_attrs(func, IDENTITY_FUNC_ATTRS)
    out["params"] = func_params(func)
    return out


def func_set_attrs(func, attrs: dict) -> None:
    for key, value in attrs.items():
        attr = FUNC_ATTRS.get(key)
        if attr is not None:
            call(cu.cuFuncSetAttribute, func, attr, int(value))
        elif key == "cache_config":        # cuFuncSetCacheConfig: no attribute, no getter
            call(cu.cuFuncSetCacheConfig, func, cu.CUfunc_cache(int(value)))


def func_module(func):
    return attempt(cu.cuFuncGetModule, func)


def module_function_names(module) -> frozenset:
    """Names of every function of a loaded module (used to tell same-named kernels apart)."""
    count = attempt(cu.cuModuleGetFunctionCount, module)
    if not count:
        return frozenset()
    funcs = call(cu.cuModuleEnumerateFunctions, count, module)
    return frozenset(func_name(f) for f in funcs)


def module_global(module, name: str) -> Optional[tuple]:
    res = cu.cuModuleGetGlobal(module, name.encode())
    if res[0] != SUCCESS:
        return None
    return int(res[1]), int(res[2])


def kernel_library(kern) -> Optional[int]:
    """``cuKernelGetLibrary``: the library handle of a CUkernel (an int or a CUkernel)."""
    kern = kern if isinstance(kern, cu.CUkernel) else cu.CUkernel(int(kern))
    lib = attempt(cu.cuKernelGetLibrary, kern)
    return int(lib) if lib is not None else None


def library_module(lib) -> Optional[int]:
    """``cuLibraryGetModule``: the module handle of a library in the current context."""
    lib = lib if isinstance(lib, cu.CUlibrary) else cu.CUlibrary(int(lib))
    mod = attempt(cu.cuLibraryGetModule, lib)
    return int(mod) if mod is not None else None


def library_load(image: bytes, allow_jit: bool = True):
    return call(cu.cuLibraryLoadData, image, None, None, 0, None, None, 0)


def library_unload(lib) -> None:
    call(cu.cuLibraryUnload, lib)


def library_function(lib, name: str):
    kernel = call(cu.cuLibraryGetKernel, lib, name.encode())
    return call(cu.cuKernelGetFunction, kernel)


def library_global(lib, name: str) -> Optional[tuple]:
    res = cu.cuLibraryGetGlobal(lib, name.encode())
    if res[0] != SUCCESS:
        return None
    return int(res[1]), int(res[2])


def context_current() -> bool:
    """Is a CUDA context current on this thread (without creating one)?"""
    try:
        res = cu.cuCtxGetCurrent()
    except Exception:       # no libcuda on this machine
        return False
    return res[0] == SUCCESS and res[1] is not None and int(res[1]) != 0


def images_agree(original: bytes, pruned: bytes, kernels, variables) -> Optional[str]:
    """None when, loaded side by side, ``pruned`` gives every kernel in ``kernels`` the same
    parameters and image-fixed attributes as ``original``, and every variable the same size;
    otherwise what differs."""
    libs = []
    try:
        libs.append(library_load(original))
        libs.append(library_load(pruned))
        a, b = libs
        for name in kernels:
            fa, fb = library_function(a, name), library_function(b, name)
            if func_params(fa) != func_params(fb):
                return f"kernel {name}: parameters differ"
            ours, theirs = func_attrs(fa, IMAGE_FUNC_ATTRS), func_attrs(fb, IMAGE_FUNC_ATTRS)
            if ours != theirs:
                diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
                return f"kernel {name}: attributes differ: {diff}"
        for name in variables:
            want = library_global(a, name)
            if want is not None:
                got = library_global(b, name)
                if got is None or got[1] != want[1]:
                    return f"variable {name}: missing or of another size"
    except DriverError as exc:
        return str(exc)
    finally:
        for lib in libs:
            attempt(cu.cuLibraryUnload, lib)
    return None


# ---- the hot path of graph rebuilding -------------------------------------------------------
# cuda-bindings builds a Python object per call (several microseconds a node). Adding thousands
# of kernel nodes goes straight to libcuda through ctypes instead, with every node's
# CUDA_KERNEL_NODE_PARAMS prebuilt in one numpy array (layout from cuda.h, CUDA 12+ "_v2").

KERNEL_NODE_PARAMS = np.dtype([
    ("func", "<u8"), ("grid", "<u4", (3,)), ("block", "<u4", (3,)), ("shared_mem", "<u4"),
    ("_pad", "<u4"), ("kernel_params", "<u8"), ("extra", "<u8"), ("kern", "<u8"), ("ctx", "<u8"),
])
assert KERNEL_NODE_PARAMS.itemsize == 72


# CUlaunchAttributeID values (cuda.h) of the kernel-node attributes a snapshot records; each
# value is a 64-byte CUlaunchAttributeValue union.
_LAUNCH_ATTRIBUTE_IDS = {"cooperative": 2, "cluster_dim": 4, "priority": 8}
_ATTR_VALUE_BYTES = 64


def launch_attribute_block(attrs: dict) -> bytes:
    """A kernel node's attributes as nodeloop.c reads them: a u64 count, then per attribute a u64
    CUlaunchAttributeID and its 64-byte value (clusterDim: 3 x u32; priority, cooperative: i32)."""
    out = [struct.pack("<Q", len(attrs))]
    for name, value in attrs.items():
        raw = struct.pack("<3I", *value) if name == "cluster_dim" else struct.pack("<i", value)
        out.append(struct.pack("<Q", _LAUNCH_ATTRIBUTE_IDS[name]) + raw.ljust(_ATTR_VALUE_BYTES,
                                                                          b"\0"))
    return b"".join(out)


class GraphBuilder:
    """``cuGraphAddKernelNode_v2`` through ctypes."""

    _lib = None
    _set_attribute = None

    def __init__(self):
        if GraphBuilder._lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            add = lib.cuGraphAddKernelNode_v2
            add.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p]
            add.restype = ctypes.c_int
            GraphBuilder._lib = add
            setter = lib.cuGraphKernelNodeSetAttribute
            setter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            setter.restype = ctypes.c_int
            GraphBuilder._set_attribute = setter
        self.add_kernel = GraphBuilder._lib
        # The entry points' addresses, for the native node loop (cgsnap/nodeloop.c).
        self.add_kernel_address = ctypes.cast(self.add_kernel, ctypes.c_void_p).value
        self.set_attribute_address = ctypes.cast(GraphBuilder._set_attribute,
                                                 ctypes.c_void_p).value

    def set_attributes(self, node: int, blob, offset: int, where: str) -> None:
        """Set the launch attributes of the block at ``blob[offset:]`` (see
        :func:`launch_attribute_block`) on kernel node ``node``: what nodeloop.c does, in Python."""
        base = blob.ctypes.data + offset
        count = int.from_bytes(bytes(blob[offset:offset + 8]), "little")
        setter = GraphBuilder._set_attribute
        for a in range(count):
            item = base + 8 + a * (8 + _ATTR_VALUE_BYTES)
            attr = ctypes.c_uint64.from_address(item).value
            code = setter(ctypes.c_void_p(node), ctypes.c_int(attr), ctypes.c_void_p(item + 8))
            if code:
                self.raise_for(code, f"cuGraphKernelNodeSetAttribute ({where})")

    @staticmethod
    def raise_for(code: int, what: str) -> None:
        if code:
            err = cu.CUresult(code)
            raise DriverError(what, code, error_name(err))
