"""The driver side of kernel identity: the live kernel's handles and attributes, and loading a
candidate image on its own to read its attributes (:mod:`cgsnap.kernels.identity` decides)."""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Optional

from ..cuda import driver
from ..errors import BinaryFormatError, DriverError
from .identity import MAX_IMAGE_BYTES

_UNSET = object()
# (device ordinal, image hash, kernel name) -> attributes: what an image gives a kernel
# does not change, so snapshots of several graphs over the same images load each image once.
_probed: dict = {}


class DriverFunction:
    """A kernel node's function, asked of the driver on demand (each answer once)."""

    def __init__(self, name: str, func, kern=None, module=None):
        self.name = name
        self._func = func
        self.func = int(func)
        self.kern = int(kern) if kern is not None else 0
        self._module = module
        self.module = int(module) if module is not None else None
        self._attrs = _UNSET
        self._functions = _UNSET

    def kernel_library(self) -> Optional[int]:
        return driver.kernel_library(self.kern) if self.kern else None

    def library_module(self, lib: int) -> Optional[int]:
        return driver.library_module(lib)

    def attributes(self) -> Optional[dict]:
        if self._attrs is _UNSET:
            try:
                self._attrs = driver.function_identity(self._func)
            except DriverError:
                self._attrs = None
        return self._attrs

    def module_functions(self) -> frozenset:
        if self._functions is _UNSET:
            self._functions = (driver.module_function_names(self._module)
                               if self._module is not None else frozenset())
        return self._functions


class DriverProbe:
    """Loads candidate images with ``cuLibraryLoadData`` (on the current context, the recorder
    told to ignore them) and reads a kernel's attributes there. Loaded images are kept, up to
    ``budget`` bytes, until :meth:`close`: one snapshot asks about many kernels of one image."""

    def __init__(self, recorder=None, budget: int = 1 << 30):
        self.recorder = recorder
        self.budget = budget
        self._libs: OrderedDict = OrderedDict()   # image hash -> (CUlibrary, bytes)
        self._bytes = 0
        self._ordinal: Optional[int] = None

    def attributes(self, cand, name: str) -> Optional[dict]:
        if self._ordinal is None:       # the device of the snapshot's context, asked once
            self._ordinal = driver.current_device().ordinal
        key = (self._ordinal, cand.hash, name)
        if key not in _probed:
            with self._quiet():
                try:
                    func = driver.library_function(self._library(cand), name)
                    _probed[key] = driver.function_identity(func)
                except (DriverError, BinaryFormatError):
                    return None       # not kept: the next snapshot tries again
        return _probed[key]

    def _quiet(self):
        return self.recorder.suppressed() if self.recorder is not None else contextlib.nullcontext()

    def _library(self, cand):
        if cand.hash in self._libs:
            self._libs.move_to_end(cand.hash)
            return self._libs[cand.hash][0]
        data = cand.data
        while self._libs and self._bytes + len(data) > self.budget:
            _, (lib, size) = self._libs.popitem(last=False)
            self._unload(lib)
            self._bytes -= size
        lib = driver.library_load(data)
        self._libs[cand.hash] = (lib, len(data))
        self._bytes += len(data)
        return lib

    @staticmethod
    def _unload(lib) -> None:
        try:
            driver.library_unload(lib)
        except DriverError:
            pass

    def close(self) -> None:
        with self._quiet():
            while self._libs:
                _, (lib, _size) = self._libs.popitem()
                self._unload(lib)
        self._bytes = 0


def read_own_memory(address: int, size: int) -> Optional[bytes]:
    """``size`` bytes of this process's memory at ``address`` through /proc/self/mem: memory
    unmapped since is an error here, not a crash."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts, done = [], 0
        while done < size:
            chunk = os.pread(fd, min(size - done, 64 << 20), address + done)
            if not chunk:
                return None
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)
    except (OSError, OverflowError):
        return None
    finally:
        os.close(fd)


def read_file_if_unchanged(path: str, file_id: Optional[tuple]) -> Optional[bytes]:
    """The contents of the file a load was given, if it is still the same file (device, inode,
    size, mtime as at the load); None otherwise."""
    if file_id is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != tuple(file_id) or \
                st.st_size > MAX_IMAGE_BYTES:
            return None
        parts, done = [], 0
        while done < st.st_size:
            chunk = os.read(fd, min(st.st_size - done, 64 << 20))
            if not chunk:
                return None
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)
