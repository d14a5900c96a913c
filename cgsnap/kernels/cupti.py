"""The module recorder: keeps the cubin of every module the driver loads, through CUPTI.

There is no driver call that returns the binary of a loaded module. CUPTI's resource callback
(domain RESOURCE, id MODULE_LOADED) hands over ``CUpti_ModuleResourceData{moduleId, cubinSize,
pCubin}`` for every module loaded after it is enabled -- also kernels no ``.nv_fatbin`` holds
(cuBLAS keeps some in its own resource section) and modules JIT-compiled from PTX or NVRTC output.

We call libcupti through ctypes: the three structures we read have had this layout since CUPTI 4
and the callback signature is part of the stable C API, so any libcupti of API version >= 13
(CUDA 13; the version we check) is binary-safe for this use. The callback copies the bytes and
returns; hashing and parsing happen later, off the driver's loading path.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
import threading
from typing import Optional

from ..errors import RecorderError

CUPTI_CB_DOMAIN_RESOURCE = 3
CUPTI_CBID_RESOURCE_MODULE_LOADED = 6
CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED = 39
MIN_CUPTI_API_VERSION = 130000   # CUDA 13.0's CUPTI

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)


class _ResourceData(ctypes.Structure):      # CUpti_ResourceData
    _fields_ = [("context", ctypes.c_void_p), ("resourceHandle", ctypes.c_void_p),
                ("resourceDescriptor", ctypes.c_void_p)]


class _ModuleResourceData(ctypes.Structure):  # CUpti_ModuleResourceData
    _fields_ = [("moduleId", ctypes.c_uint32), ("cubinSize", ctypes.c_size_t),
                ("pCubin", ctypes.c_void_p)]


def find_libcupti() -> list:
    """Candidate libcupti paths: $CGSNAP_LIBCUPTI, the nvidia-cuda-cupti wheel, the CUDA install."""
    out = []
    if os.environ.get("CGSNAP_LIBCUPTI"):
        out.append(os.environ["CGSNAP_LIBCUPTI"])
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for root in dict.fromkeys(roots):
        out += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcupti.so*")))
        out += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_cupti", "lib", "libcupti.so*")))
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for sub in ("lib64", "lib", "extras/CUPTI/lib64"):
        out += sorted(glob.glob(os.path.join(cuda_home, sub, "libcupti.so*")))
    return list(dict.fromkeys(out))


class ModuleRecorder:
    """Records loaded cubins. Use :func:`start` / :func:`recorder` rather than instantiating."""

    def __init__(self):
        self._lib = None
        self._subscriber = ctypes.c_void_p()
        self._callback = _CALLBACK(self._on_event)   # kept alive as long as the recorder
        self._lock = threading.Lock()
        self._pending: list = []      # raw cubins, in load order, not yet hashed
        self.images: dict = {}        # content hash -> bytes
        self.library_path: Optional[str] = None
        self.active = False

    def _on_event(self, _userdata, domain, cbid, cbdata):
        if domain != CUPTI_CB_DOMAIN_RESOURCE or cbid != CUPTI_CBID_RESOURCE_MODULE_LOADED:
            return
        try:
            res = _ResourceData.from_address(cbdata)
            mod = _ModuleResourceData.from_address(res.resourceDescriptor)
            if mod.pCubin and mod.cubinSize:
                self._pending.append(ctypes.string_at(mod.pCubin, mod.cubinSize))
        except Exception:   # never let an exception cross into the driver's thread
            pass

    def start(self) -> None:
        if self.active:
            return
        errors = []
        for path in find_libcupti():
            try:
                self._lib = ctypes.CDLL(path)
                self.library_path = path
                break
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        if self._lib is None:
            raise RecorderError("no libcupti found (install the CUDA toolkit's CUPTI or the "
                                "nvidia-cuda-cupti wheel, or set CGSNAP_LIBCUPTI)"
                                + (f"; tried {'; '.join(errors)}" if errors else ""))
        version = ctypes.c_uint32()
        if self._lib.cuptiGetVersion(ctypes.byref(version)) != 0 or \
                version.value < MIN_CUPTI_API_VERSION:
            raise RecorderError(f"{self.library_path}: CUPTI API version {version.value} is older "
                                f"than {MIN_CUPTI_API_VERSION}, whose structure layout cgsnap reads")
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
        self.active = True

    def stop(self) -> None:
        if self.active:
            self._lib.cuptiUnsubscribe(self._subscriber)
            self.active = False

    def take_new(self) -> list:
        """Cubins recorded since the last call, deduplicated by content hash: ``[(hash, bytes)]``."""
        from ..format.hashing import content_hash
        with self._lock:
            pending, self._pending = self._pending, []
            new = []
            for data in pending:
                h = content_hash(data)
                if h not in self.images:
                    self.images[h] = data
                    new.append((h, data))
            return new

    @property
    def recorded_bytes(self) -> int:
        return sum(len(b) for b in self.images.values()) + sum(len(b) for b in self._pending)


_recorder: Optional[ModuleRecorder] = None


def start() -> ModuleRecorder:
    """Start the process-wide module recorder (idempotent). Call it before the first kernel of
    the graphs you will snapshot is loaded -- best right at start-up, or set CGSNAP_RECORD=1."""
    global _recorder
    if _recorder is None:
        _recorder = ModuleRecorder()
    _recorder.start()
    return _recorder


def recorder() -> Optional[ModuleRecorder]:
    return _recorder
