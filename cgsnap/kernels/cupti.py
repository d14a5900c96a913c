"""The module recorder: keeps the cubin of every module the driver loads, and which handle each
load returned, through CUPTI.

There is no driver call that returns the binary of a loaded module. CUPTI's resource callback
(domain RESOURCE, id MODULE_LOADED) hands over ``CUpti_ModuleResourceData{moduleId, cubinSize,
pCubin}`` for every module loaded after it is enabled -- also kernels no ``.nv_fatbin`` holds
(cuBLAS keeps some in its own resource section) and modules JIT-compiled from PTX or NVRTC output.
It does not say which module handle the cubin became. For that the same subscriber (CUPTI allows
one) takes driver-API callbacks, at entry and exit, of a few rare calls (:data:`TRACKED_CALLS`):
the ``cuModuleLoad*`` / ``cuLibraryLoad*`` family (the handle each returned, the image it was
given), their unloads, and the calls that name a module, library or kernel (``cuModuleGetFunction``,
``cuLibraryGetKernel``, ``cuLibraryGetModule``, ``cuKernelGetFunction``), and the two that set
a kernel's cache preference, which no getter reads back (``cuFuncSetCacheConfig``,
``cuKernelSetCacheConfig``). A cubin delivered on a
thread while one of them is in flight there belongs to it: inside a load, to the handle the load
returns; inside the others (lazy loading: cuDNN's libraries load their module at first use), to the
handle the call names. Launches are not tracked unless asked for (``start(launches=True)`` or
``CGSNAP_RECORD_LAUNCHES=1``): a Python callback on every launch would double the cost of eager
launches. :mod:`cgsnap.kernels.identity` turns the events into handle associations.

The same subscriber takes the five driver-API calls that make and destroy conditional nodes and
handles (:data:`GRAPH_CALLS`: ``cuGraphConditionalHandleCreate``, ``cuGraphAddNode(_v2)``,
``cuGraphDestroy``, ``cuGraphDestroyNode``), handed to :mod:`cgsnap.kernels.graph_hooks` on any
thread -- also inside cgsnap's own suppressed work, so that no destruction is missed.

We call libcupti through ctypes: the structures we read have had this layout since CUPTI 4 (the
``*_params`` structs are generated_cuda_meta.h's) and the callback signature is part of the
stable C API, so any libcupti of API version >= 13 (CUDA 13; the version we check) is binary-safe
for this use. The callback copies what it needs and returns; hashing and parsing happen later, in
:meth:`ModuleRecorder.sync`, off the driver's loading path.

Residual risk, stated plainly: the callback is Python, so it takes the GIL inside a driver call.
A thread that holds the GIL while it waits for a driver lock held by a thread inside a module
load's MODULE_LOADED callback would deadlock both (this was already so before handle tracking;
the enter/exit callbacks run at the edges of a call, where the driver is not expected to hold
its loader lock -- not verified). Native
extensions that call the driver while holding the GIL, from several threads, while modules load
on another thread are the pattern that could meet it; none of torch, Triton or CuPy's documented
use does. A C callback that never takes the GIL would remove it.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import itertools
import logging
import os
import site
import sys
import threading
from typing import Optional

from ..errors import RecorderError
from ..format.hashing import content_hash
from . import graph_hooks
from .identity import ImageInput, LoadTable, image_extent

log = logging.getLogger("cgsnap")

CUPTI_CB_DOMAIN_DRIVER_API = 1
CUPTI_CB_DOMAIN_RESOURCE = 3
CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING = 2
CUPTI_CBID_RESOURCE_MODULE_LOADED = 6
CUPTI_API_ENTER, CUPTI_API_EXIT = 0, 1
CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED = 39
MIN_CUPTI_API_VERSION = 130000   # CUDA 13.0's CUPTI
CU_LIBRARY_BINARY_IS_PRESERVED = 1

# CUPTI_DRIVER_TRACE_CBID_* of the calls the recorder follows (cupti_driver_cbid.h), and the byte
# offsets of the fields it reads in each call's *_params struct (generated_cuda_meta.h); both are
# checked against the CUDA headers by tests/test_kernel_identity.py.
CBIDS = {"cuModuleLoad": 18, "cuModuleLoadData": 19, "cuModuleLoadDataEx": 20,
         "cuModuleLoadFatBinary": 21, "cuModuleUnload": 22, "cuModuleGetFunction": 23,
         "cuLibraryLoadData": 678, "cuLibraryLoadFromFile": 679, "cuLibraryUnload": 680,
         "cuLibraryGetKernel": 681, "cuLibraryGetModule": 682, "cuKernelGetFunction": 683,
         "cuLaunchKernel": 307, "cuLaunchKernel_ptsz": 442, "cuLaunchCooperativeKernel": 477,
         "cuLaunchCooperativeKernel_ptsz": 478, "cuLaunchKernelEx": 652,
         "cuLaunchKernelEx_ptsz": 653, "cuFuncSetCacheConfig": 86, "cuKernelSetCacheConfig": 688}
PARAMS = {
    "cuModuleLoad": {"module": 0, "fname": 8},
    "cuModuleLoadData": {"module": 0, "image": 8},
    "cuModuleLoadDataEx": {"module": 0, "image": 8},
    "cuModuleLoadFatBinary": {"module": 0, "fatCubin": 8},
    "cuModuleUnload": {"hmod": 0},
    "cuModuleGetFunction": {"hfunc": 0, "hmod": 8, "name": 16},
    "cuLibraryLoadData": {"library": 0, "code": 8, "libraryOptions": 40,
                          "libraryOptionValues": 48, "numLibraryOptions": 56},
    "cuLibraryLoadFromFile": {"library": 0, "fileName": 8},
    "cuLibraryUnload": {"library": 0},
    "cuLibraryGetKernel": {"pKernel": 0, "library": 8, "name": 16},
    "cuLibraryGetModule": {"pMod": 0, "library": 8},
    "cuKernelGetFunction": {"pFunc": 0, "kernel": 8},
    "cuLaunchKernel": {"f": 0}, "cuLaunchKernel_ptsz": {"f": 0},
    "cuLaunchCooperativeKernel": {"f": 0}, "cuLaunchCooperativeKernel_ptsz": {"f": 0},
    "cuLaunchKernelEx": {"f": 8}, "cuLaunchKernelEx_ptsz": {"f": 8},
    "cuFuncSetCacheConfig": {"hfunc": 0, "config": 8},
    "cuKernelSetCacheConfig": {"kernel": 0, "config": 8, "dev": 12},
}
NAMES = {cbid: name for name, cbid in CBIDS.items()}
# load call -> (its output handle's field, its input's field, what it returns)
LOADS = {"cuModuleLoad": ("module", "fname", "module"),
         "cuModuleLoadData": ("module", "image", "module"),
         "cuModuleLoadDataEx": ("module", "image", "module"),
         "cuModuleLoadFatBinary": ("module", "fatCubin", "module"),
         "cuLibraryLoadData": ("library", "code", "library"),
         "cuLibraryLoadFromFile": ("library", "fileName", "library")}
UNLOADS = {"cuModuleUnload": ("hmod", "module"), "cuLibraryUnload": ("library", "library")}
# naming call -> (the field naming a handle, what kind of handle)
NAMING = {"cuModuleGetFunction": ("hmod", "module"), "cuLibraryGetKernel": ("library", "library"),
          "cuLibraryGetModule": ("library", "library"), "cuKernelGetFunction": ("kernel", "kernel")}
# Settings no getter reads back (the driver has no cuFuncGetCacheConfig): call -> (the field
# naming the handle, its kind). Triton sets CU_FUNC_CACHE_PREFER_SHARED on kernels that use
# more than 48 KiB of shared memory; a reloaded function without it gets another L1 / shared
# split and runs at another speed.
SETTINGS = {"cuFuncSetCacheConfig": ("hfunc", "function"),
            "cuKernelSetCacheConfig": ("kernel", "kernel")}
LAUNCHES = tuple(n for n in CBIDS if n.startswith("cuLaunch"))
LOAD_CALLS = {CBIDS[n] for n in LOADS}
TRACKED_CALLS = tuple(CBIDS[n] for n in (*LOADS, *UNLOADS, *NAMING, *SETTINGS))
LAUNCH_CALLS = tuple(CBIDS[n] for n in LAUNCHES)
# The calls that make and destroy conditional nodes and handles (cgsnap.kernels.graph_hooks):
# dispatched to its handlers, on every thread, also inside cgsnap's own (suppressed) work.
GRAPH_CALLS = tuple(sorted(graph_hooks.handlers()))
assert not set(GRAPH_CALLS) & set(NAMES)

MAX_DEPTH = 8                 # tracked calls in flight on one thread
MAX_NAME = 1 << 16            # a kernel name read from a call's parameters
DEFAULT_COPY_BUDGET = 256 << 20

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)


class _ResourceData(ctypes.Structure):      # CUpti_ResourceData
    _fields_ = [("context", ctypes.c_void_p), ("resourceHandle", ctypes.c_void_p),
                ("resourceDescriptor", ctypes.c_void_p)]


class _ModuleResourceData(ctypes.Structure):  # CUpti_ModuleResourceData
    _fields_ = [("moduleId", ctypes.c_uint32), ("cubinSize", ctypes.c_size_t),
                ("pCubin", ctypes.c_void_p)]


class _CallbackData(ctypes.Structure):       # CUpti_CallbackData
    _fields_ = [("callbackSite", ctypes.c_int), ("functionName", ctypes.c_void_p),
                ("functionParams", ctypes.c_void_p), ("functionReturnValue", ctypes.c_void_p),
                ("symbolName", ctypes.c_void_p), ("context", ctypes.c_void_p),
                ("contextUid", ctypes.c_uint32), ("correlationData", ctypes.c_void_p),
                ("correlationId", ctypes.c_uint32)]


_libc = ctypes.CDLL(None)
_strnlen = _libc.strnlen
_strnlen.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_strnlen.restype = ctypes.c_size_t


def _word(address: int, offset: int) -> int:
    """The pointer-sized word at ``address + offset`` (a handle or a pointer), 0 for NULL."""
    return ctypes.c_void_p.from_address(address + offset).value or 0


def _deref(pointer: int) -> int:
    """``*pointer`` for an output handle argument (0 when the pointer is NULL)."""
    return _word(pointer, 0) if pointer else 0


def _cstr(pointer: int) -> Optional[str]:
    if not pointer:
        return None
    n = _strnlen(pointer, MAX_NAME)
    return ctypes.string_at(pointer, n).decode(errors="replace") if n < MAX_NAME else None


def _open_library(path: str):
    return ctypes.CDLL(path)


def _mapped_libcupti() -> list:
    """libcupti files already mapped into this process (torch's profiler links one): the
    recorder uses the same copy, never a second CUPTI beside it."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6]
    except OSError:
        return []
    return [p for p in dict.fromkeys(paths)
            if p.startswith("/") and os.path.basename(p).startswith("libcupti.so")]


def find_libcupti() -> list:
    """Candidate libcupti paths: $CGSNAP_LIBCUPTI, one already loaded in the process, the
    nvidia-cuda-cupti wheel, the CUDA install."""
    out = []
    if os.environ.get("CGSNAP_LIBCUPTI"):
        out.append(os.environ["CGSNAP_LIBCUPTI"])
    out += _mapped_libcupti()
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for root in dict.fromkeys(roots):
        out += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcupti.so*")))
        out += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_cupti", "lib", "libcupti.so*")))
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for sub in ("lib64", "lib", "extras/CUPTI/lib64"):
        out += sorted(glob.glob(os.path.join(cuda_home, sub, "libcupti.so*")))
    return list(dict.fromkeys(out))


class _Frame:
    """A tracked call in flight on one thread."""
    __slots__ = ("cbid", "owner", "cubins")

    def __init__(self, cbid: int, owner):
        self.cbid, self.owner, self.cubins = cbid, owner, []


class ModuleRecorder:
    """Records loaded cubins and load handles. Use :func:`start` / :func:`recorder` rather than
    instantiating (tests drive :meth:`_on_event` directly with ctypes-built structures)."""

    def __init__(self, copy_budget: Optional[int] = None):
        self._lib = None
        self._subscriber = ctypes.c_void_p()
        self._callback = _CALLBACK(self._on_event)   # kept alive as long as the recorder
        self._lock = threading.Lock()          # the journal
        self._sync_lock = threading.Lock()     # images, loads
        self._journal: list = []               # raw events, in the order they happened
        self._inflight: dict = {}              # thread id -> [_Frame]
        self._suppressed: dict = {}            # thread id -> depth (cgsnap's own loads)
        self._new: list = []                   # hashes take_new() has not returned yet
        self.images: dict = {}                 # content hash -> bytes (every delivered cubin)
        self.loads = LoadTable()
        self.copy_budget = DEFAULT_COPY_BUDGET if copy_budget is None else copy_budget
        self.copied_bytes = 0                  # load inputs copied so far
        self.callback_errors = 0
        self.calls: dict = {}                  # call name -> tracked calls seen (entries)
        self.library_path: Optional[str] = None
        self.active = False
        self.tracking = False                  # driver-API callbacks enabled
        self.track_launches = False
        self.graph_hooks = False               # conditional-node callbacks enabled
        self._graph_handlers = graph_hooks.handlers()   # cbid -> (on_enter, on_exit)
        self._atexit = False

    # ---- the callback (any thread, inside driver calls: never raises, never blocks long) ------
    def _on_event(self, _userdata, domain, cbid, cbdata):
        try:
            if domain == CUPTI_CB_DOMAIN_DRIVER_API:
                h = self._graph_handlers.get(cbid)
                if h is not None:       # conditional nodes and handles (graph_hooks)
                    site = _CallbackData.from_address(cbdata).callbackSite
                    fn = h[0] if site == CUPTI_API_ENTER else h[1]
                    if fn is not None:
                        fn(cbdata)          # never raises
                    return
            tid = threading.get_ident()
            if self._suppressed.get(tid):
                return
            if domain == CUPTI_CB_DOMAIN_DRIVER_API:
                self._on_call(tid, cbid, _CallbackData.from_address(cbdata))
            elif domain == CUPTI_CB_DOMAIN_RESOURCE:
                res = _ResourceData.from_address(cbdata)
                if cbid == CUPTI_CBID_RESOURCE_MODULE_LOADED:
                    self._on_module_loaded(tid, res)
                elif cbid == CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING and res.context:
                    self._append(("context_destroyed", res.context))
        except Exception:   # never let an exception cross into the driver's thread
            self.callback_errors += 1

    def _append(self, event: tuple) -> None:
        with self._lock:
            self._journal.append(event)

    def _on_module_loaded(self, tid: int, res: _ResourceData) -> None:
        if not res.resourceDescriptor:
            return
        mod = _ModuleResourceData.from_address(res.resourceDescriptor)
        if not (mod.pCubin and mod.cubinSize):
            return
        data = ctypes.string_at(mod.pCubin, mod.cubinSize)
        stack = self._inflight.get(tid)
        if stack:
            frame = stack[-1]
            if frame.cbid in LOAD_CALLS:
                frame.cubins.append(data)      # the handle is known when the call returns
                return
            self._append(("cubin", data, frame.owner))
            return
        self._append(("cubin", data, None))

    def _on_call(self, tid: int, cbid: int, data: _CallbackData) -> None:
        params = data.functionParams or 0
        name = NAMES.get(cbid)
        if not params or name is None:
            return
        if data.callbackSite == CUPTI_API_ENTER:
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in UNLOADS:
                # At entry: once the call frees the handle, another thread's load may get it.
                field, kind = UNLOADS[name]
                self._append(("unload", kind, _word(params, PARAMS[name][field])))
                return
            stack = self._inflight.setdefault(tid, [])
            if len(stack) < MAX_DEPTH:
                stack.append(_Frame(cbid, self._owner(name, params)))
            return
        stack = self._inflight.get(tid)
        frame = None
        while stack:
            top = stack.pop()
            if top.cbid == cbid:
                frame = top
                break
            for cubin in top.cubins:     # a call whose exit never came: its cubins stay unowned
                self._append(("cubin", cubin, None))
        if not stack:
            self._inflight.pop(tid, None)
        if frame is None:
            return
        ok = bool(data.functionReturnValue) and \
            ctypes.c_int.from_address(data.functionReturnValue).value == 0
        if name in LOADS:
            self._load_returned(name, params, frame, ok, data.context or 0)
        elif ok and name in NAMING:
            self._naming_returned(name, params, data.context or 0)
        elif ok and name in SETTINGS:
            field, kind = SETTINGS[name]
            handle = _word(params, PARAMS[name][field])
            config = ctypes.c_int.from_address(params + PARAMS[name]["config"]).value
            dev = ctypes.c_int.from_address(params + PARAMS[name]["dev"]).value \
                if "dev" in PARAMS[name] else None
            if handle:
                self._append(("cache_config", kind, handle, config, dev))

    @staticmethod
    def _owner(name: str, params: int):
        """The handle a call names (a lazily delivered cubin belongs to it)."""
        if name in NAMING:
            field, kind = NAMING[name]
            return (kind, _word(params, PARAMS[name][field]))
        if name in SETTINGS and SETTINGS[name][1] == "kernel":
            # lazy loading may deliver the kernel's cubin inside the call
            kern = _word(params, PARAMS[name][SETTINGS[name][0]])
            return ("kernel", kern) if kern else None
        if name in PARAMS and "f" in PARAMS[name]:
            f = _word(params, PARAMS[name]["f"])
            return ("launch", f) if f else None
        return None

    def _naming_returned(self, name: str, params: int, ctx: int) -> None:
        p = PARAMS[name]
        if name == "cuModuleGetFunction":
            func = _deref(_word(params, p["hfunc"]))
            if func:
                self._append(("module_function", func, _word(params, p["hmod"]),
                              _cstr(_word(params, p["name"]))))
        elif name == "cuLibraryGetKernel":
            kern = _deref(_word(params, p["pKernel"]))
            if kern:
                self._append(("kernel", kern, _word(params, p["library"]),
                              _cstr(_word(params, p["name"]))))
        elif name == "cuLibraryGetModule":
            mod = _deref(_word(params, p["pMod"]))
            if mod:
                self._append(("library_module", _word(params, p["library"]), mod, ctx))
        elif name == "cuKernelGetFunction":
            func = _deref(_word(params, p["pFunc"]))
            if func:
                self._append(("function", func, _word(params, p["kernel"]), ctx))

    def _load_returned(self, name: str, params: int, frame: _Frame, ok: bool, ctx: int) -> None:
        out_field, in_field, kind = LOADS[name]
        handle = _deref(_word(params, PARAMS[name][out_field])) if ok else 0
        if not handle:      # a failed load: what it delivered belongs to no handle
            for cubin in frame.cubins:
                self._append(("cubin", cubin, None))
            return
        inp = self._load_input(name, _word(params, PARAMS[name][in_field]), params,
                               bool(frame.cubins))
        self._append(("load", kind, handle, name, inp, frame.cubins,
                      ctx if kind == "module" else 0))

    def _load_input(self, name: str, address: int, params: int,
                    delivered: bool) -> Optional[ImageInput]:
        """The image the call was given: copied, or referenced with its hash (see ImageInput).
        When the driver delivered the loaded cubin inside the call, that cubin is the image and
        the input is not kept."""
        if name in ("cuModuleLoad", "cuLibraryLoadFromFile"):   # a path
            path = _cstr(address)
            if path is None or delivered:
                return ImageInput("file", path=path)
            try:
                st = os.stat(path)
            except OSError:
                return ImageInput("file", path=path)
            return ImageInput("file", size=st.st_size, path=path,
                              file_id=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        if not address:
            return None
        fmt, size, address = self._extent(address)
        if fmt == "unknown" or delivered:
            return ImageInput(fmt, size)
        preserved = name == "cuLibraryLoadData" and self._preserved(params)
        if preserved or self.copied_bytes + size > self.copy_budget:
            view = (ctypes.c_char * size).from_address(address)
            return ImageInput(fmt, size, address=address, hash=content_hash(view),
                              preserved=preserved)
        self.copied_bytes += size
        return ImageInput(fmt, size, data=ctypes.string_at(address, size))

    @staticmethod
    def _extent(address: int) -> tuple:
        """``(format, size, address)`` of the image at ``address``; a fatbin wrapper is followed
        to the fatbin it points at."""
        def at(base):
            return (lambda off, n: ctypes.string_at(base + off, n),
                    lambda off, limit: _strnlen(base + off, limit))
        fmt, size = image_extent(*at(address))
        if fmt == "wrapper":
            target = _word(address, 8)
            fmt, size = image_extent(*at(target)) if target else ("unknown", 0)
            if fmt != "fatbin":
                return "unknown", 0, 0
            address = target
        return fmt, size, address

    @staticmethod
    def _preserved(params: int) -> bool:
        """cuLibraryLoadData with CU_LIBRARY_BINARY_IS_PRESERVED set: the caller keeps ``code``
        alive until cuLibraryUnload."""
        p = PARAMS["cuLibraryLoadData"]
        count = ctypes.c_uint32.from_address(params + p["numLibraryOptions"]).value
        options = _word(params, p["libraryOptions"])
        values = _word(params, p["libraryOptionValues"])
        if not options or not values:
            return False
        for i in range(min(count, 16)):
            if ctypes.c_int32.from_address(options + 4 * i).value == CU_LIBRARY_BINARY_IS_PRESERVED:
                return bool(_word(values, 8 * i))
        return False

    # ---- control ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def suppressed(self):
        """cgsnap's own loads on this thread (candidate probes) are not the program's: ignore."""
        tid = threading.get_ident()
        self._suppressed[tid] = self._suppressed.get(tid, 0) + 1
        try:
            yield
        finally:
            depth = self._suppressed[tid] - 1
            if depth:
                self._suppressed[tid] = depth
            else:
                del self._suppressed[tid]

    def _load_library(self) -> None:
        """The first candidate that loads and is of API version MIN_CUPTI_API_VERSION or later
        (an older one, e.g. a CUDA 12 wheel's sorted first, is skipped, not fatal)."""
        errors = []
        for path in find_libcupti():
            try:
                lib = _open_library(path)
            except OSError as exc:
                errors.append(f"{path}: {exc}")
                continue
            version = ctypes.c_uint32()
            if lib.cuptiGetVersion(ctypes.byref(version)) != 0 or \
                    version.value < MIN_CUPTI_API_VERSION:
                errors.append(f"{path}: CUPTI API version {version.value} is older than "
                              f"{MIN_CUPTI_API_VERSION}, whose structure layout cgsnap reads")
                continue
            self._lib, self.library_path = lib, path
            return
        raise RecorderError("no usable libcupti found (install the CUDA toolkit's CUPTI or the "
                            "nvidia-cuda-cupti wheel, or set CGSNAP_LIBCUPTI)"
                            + (f"; tried {'; '.join(errors)}" if errors else ""))

    def start(self, launches: bool = False) -> None:
        if self.active:
            if launches and not self.track_launches:
                self._enable_launches()
            return
        if self._lib is None:
            self._load_library()
        rc = self._lib.cuptiSubscribe(ctypes.byref(self._subscriber), self._callback, None)
        if rc == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED:
            raise RecorderError("another CUPTI client (a profiler: nsys, ncu, torch.profiler / "
                                "kineto) holds CUPTI, so the module recorder cannot start; stop the "
                                "profiler, or register images with cgsnap.register_image()")
        if rc != 0:
            raise RecorderError(f"cuptiSubscribe failed with CUPTI error {rc}")
        rc = self._lib.cuptiEnableCallback(1, self._subscriber, CUPTI_CB_DOMAIN_RESOURCE,
                                           CUPTI_CBID_RESOURCE_MODULE_LOADED)
        if rc != 0:
            self._lib.cuptiUnsubscribe(self._subscriber)
            raise RecorderError(f"cuptiEnableCallback failed with CUPTI error {rc}")
        self._inflight.clear()
        self.sync()
        self.loads = LoadTable()      # handles seen before a stop may have been reused since
        enabled = [self._enable(CUPTI_CB_DOMAIN_RESOURCE,
                                CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING)]
        enabled += [self._enable(CUPTI_CB_DOMAIN_DRIVER_API, cbid) for cbid in TRACKED_CALLS]
        self.tracking = all(enabled)
        if not self.tracking:
            # Without every one of them the handle associations could be wrong: keep cubins only.
            for cbid in TRACKED_CALLS:
                self._lib.cuptiEnableCallback(0, self._subscriber, CUPTI_CB_DOMAIN_DRIVER_API, cbid)
            log.warning("cgsnap: CUPTI refused driver-API callbacks; kernels will be found by "
                        "name only")
        self._enable_graph_hooks()
        self.active = True
        if launches or os.environ.get("CGSNAP_RECORD_LAUNCHES", "") not in ("", "0"):
            self._enable_launches()
        if not self._atexit:
            # Library unloads run in C++ destructors after the interpreter is gone: unsubscribe
            # while Python can still take the callback's calls.
            atexit.register(self.stop)
            self._atexit = True

    def _enable(self, domain: int, cbid: int) -> bool:
        return self._lib.cuptiEnableCallback(1, self._subscriber, domain, cbid) == 0

    def _enable_graph_hooks(self) -> None:
        """The conditional-node callbacks: all of them or none (a registry that misses
        destructions could take a new graph at a reused address for an old one)."""
        reg = graph_hooks.registry()
        reg.clear()
        self.graph_hooks = all([self._enable(CUPTI_CB_DOMAIN_DRIVER_API, c) for c in GRAPH_CALLS])
        if not self.graph_hooks:
            for cbid in GRAPH_CALLS:
                self._lib.cuptiEnableCallback(0, self._subscriber, CUPTI_CB_DOMAIN_DRIVER_API, cbid)
            log.warning("cgsnap: CUPTI refused the graph callbacks; conditional nodes cannot be "
                        "recorded")
        reg.enabled = self.graph_hooks

    def _enable_launches(self) -> None:
        if self.tracking and all([self._enable(CUPTI_CB_DOMAIN_DRIVER_API, c)
                                  for c in LAUNCH_CALLS]):
            self.track_launches = True

    def stop(self) -> None:
        if self.active:
            self._lib.cuptiUnsubscribe(self._subscriber)
            self.active = self.tracking = self.track_launches = self.graph_hooks = False
            # Destructions are no longer seen either: forget every conditional node and handle.
            reg = graph_hooks.registry()
            reg.enabled = False
            reg.clear()
            self._inflight.clear()
            # Unloads are no longer seen, so handles may be reused behind our back: forget
            # every association (the cubins stay, for the search by name).
            self.sync()
            self.loads = LoadTable()

    # ---- off the driver's path ---------------------------------------------------------------
    def _keep(self, data: bytes) -> str:
        h = content_hash(data)
        if h not in self.images:
            self.images[h] = data
            self._new.append(h)
        return h

    def sync(self) -> None:
        """Hash what the callback recorded and apply it, in order, to :attr:`loads`."""
        with self._sync_lock:
            with self._lock:
                journal, self._journal = self._journal, []
            for event in journal:
                kind = event[0]
                if kind == "cubin":
                    event = ("cubin", self._keep(event[1]), event[2])
                elif kind == "load":
                    event = event[:5] + ([self._keep(d) for d in event[5]],) + event[6:]
                self.loads.apply(event)

    def images_since(self, count: int) -> list:
        """``[(hash, bytes)]`` of the cubins recorded after the first ``count`` (in order)."""
        self.sync()
        with self._sync_lock:
            if count >= len(self.images):
                return []
            return list(itertools.islice(self.images.items(), count, None))

    def take_new(self) -> list:
        """Cubins recorded since the last call, deduplicated by content hash: ``[(hash, bytes)]``."""
        self.sync()
        with self._sync_lock:
            new, self._new = self._new, []
            return [(h, self.images[h]) for h in new]

    @property
    def recorded_bytes(self) -> int:
        with self._lock:
            pending = sum(len(e[1]) for e in self._journal if e[0] == "cubin") + \
                sum(len(d) for e in self._journal if e[0] == "load" for d in e[5])
        return sum(len(b) for b in self.images.values()) + pending + self.copied_bytes


_recorder: Optional[ModuleRecorder] = None


def start(launches: bool = False) -> ModuleRecorder:
    """Start the process-wide module recorder (idempotent). Call it before the first kernel of
    the graphs you will snapshot is loaded -- best right at start-up, or set CGSNAP_RECORD=1.
    ``launches``: also tie cubins that a launch loads lazily to the launched function (each
    launch then runs a Python callback; see the module docstring)."""
    global _recorder
    if _recorder is None:
        _recorder = ModuleRecorder()
    _recorder.start(launches=launches)
    return _recorder


def recorder() -> Optional[ModuleRecorder]:
    return _recorder
