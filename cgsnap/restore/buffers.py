"""Named buffers of a restore: a region's memory in this process, as users see it.

A strided view (channels_last, transposed, a slice, an expanded view) comes back as the same
view: the region is the span of memory it covers; ``__cuda_array_interface__`` gives its data
pointer and byte strides, ``to_numpy`` / ``copy_from`` go through the view. The view math is in
:func:`host_view`, plain numpy over a host copy of the span (tested on CPU).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..capture.buffers import numpy_dtype
from ..cuda import driver
from ..errors import RestoreError
from ..format.model import DTYPE_ITEMSIZE

_RAW_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def element_dtype(dtype: Optional[str], count: int, nbytes: int) -> np.dtype:
    """The numpy dtype a buffer's elements travel as: the dtype itself, or, where numpy has no
    such dtype (bfloat16, fp8, complex32, torch's quantized types), raw unsigned integers (or
    raw bytes) of its item size -- the size cgsnap knows, else ``nbytes / count``."""
    dt = np.dtype(numpy_dtype(dtype))
    size = DTYPE_ITEMSIZE.get(dtype)
    if size is None and dtype is not None and dt == np.uint8 and dtype != "uint8" and count \
            and nbytes % count == 0:
        size = nbytes // count          # a dtype neither cgsnap nor numpy knows
    if size is not None and dt.itemsize != size:
        dt = np.dtype(_RAW_UINT.get(size, f"V{size}"))
    return dt


def host_view(span: np.ndarray, shape: tuple, strides: Optional[tuple], offset: int,
              dtype) -> np.ndarray:
    """The view of ``shape`` / ``strides`` (elements; None: C-contiguous) starting ``offset``
    elements into ``span`` (the bytes of the region), as a numpy view of ``span``."""
    flat = span.view(np.uint8).reshape(-1)
    dt = np.dtype(dtype)
    if strides is None:
        return flat[:int(np.prod(shape, dtype=np.int64)) * dt.itemsize].view(dt).reshape(shape)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype=dt)
    lo = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    hi = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0)
    if lo < 0 or (hi + 1) * dt.itemsize > flat.nbytes:
        raise ValueError(f"a view of shape {shape} and strides {strides} at element {offset} "
                         f"does not fit {flat.nbytes} bytes")
    first = flat[offset * dt.itemsize:][:dt.itemsize].view(dt)   # the view's first element
    return np.lib.stride_tricks.as_strided(first, shape=shape,
                                           strides=tuple(s * dt.itemsize for s in strides))


class Buffer:
    """A named region's memory in this process; exposes ``__cuda_array_interface__``. Valid
    while its restore is open: after ``close()`` every use raises RestoreError.

    ``ptr`` / ``nbytes`` are the memory the buffer covers; for a strided view ``strides``
    (elements) and ``view_offset`` (elements from ``ptr`` to the first element) place the
    view in it."""

    def __init__(self, name: str, ptr: int, nbytes: int, dtype: Optional[str],
                 shape: Optional[tuple], owner=None, strides: Optional[tuple] = None,
                 view_offset: int = 0):
        self.name, self.ptr, self.nbytes = name, ptr, nbytes
        self.dtype = dtype
        self.shape = tuple(shape) if shape is not None else (nbytes,)
        count = int(np.prod(self.shape, dtype=np.int64))
        self._np_dtype = element_dtype(dtype, count, nbytes) if shape is not None else \
            np.dtype(np.uint8)
        self.strides = tuple(strides) if strides is not None and shape is not None else None
        self.view_offset = view_offset if self.strides is not None else 0
        self._owner = owner
        # The bytes a C-contiguous view covers: what its copies move (never past the region).
        self._view_bytes = count * self.itemsize
        if self.strides is None and self._view_bytes > nbytes:
            raise RestoreError(f"buffer {name!r}: shape {self.shape} of {dtype} is "
                               f"{self._view_bytes} bytes, its region holds {nbytes}")

    def _check(self) -> None:
        if self._owner is not None:
            self._owner._check_open()

    @property
    def itemsize(self) -> int:
        return np.dtype(self._np_dtype).itemsize

    @property
    def data_ptr(self) -> int:
        """Address of the view's first element."""
        return self.ptr + self.view_offset * self.itemsize

    @property
    def __cuda_array_interface__(self) -> dict:
        self._check()
        strides = None if self.strides is None else \
            tuple(s * self.itemsize for s in self.strides)
        return {"shape": self.shape, "typestr": np.dtype(self._np_dtype).str,
                "data": (self.data_ptr, False), "version": 3, "strides": strides}

    def _read_span(self) -> np.ndarray:
        span = np.empty(self.nbytes, dtype=np.uint8)
        if self.nbytes:
            driver.dtoh(int(span.ctypes.data), self.ptr, self.nbytes)
        return span

    def copy_from(self, host) -> None:
        """Copy a host array (any dtype, as many bytes as the view's elements) into the view,
        element ``i`` of ``host`` (C order) to element ``i`` of the view (synchronous). An
        expanded view (stride 0) accepts only values that agree where its elements alias."""
        self._check()
        arr = np.ascontiguousarray(host)
        want = int(np.prod(self.shape, dtype=np.int64)) * self.itemsize
        if arr.nbytes != want:
            raise ValueError(f"buffer {self.name!r} holds {want} bytes, got {arr.nbytes}")
        if self.strides is None:
            if want:
                driver.htod(self.ptr, int(arr.ctypes.data), want)
            return
        span = self._read_span()          # the bytes between the view's elements stay
        values = arr.reshape(-1).view(np.uint8).view(self._np_dtype).reshape(self.shape)
        view = host_view(span, self.shape, self.strides, self.view_offset, self._np_dtype)
        view[...] = values
        if np.ascontiguousarray(view).tobytes() != values.tobytes():
            raise ValueError(f"buffer {self.name!r} is a view whose elements share memory "
                             f"(strides {self.strides}): the values given differ where they do")
        driver.htod(self.ptr, int(span.ctypes.data), self.nbytes)

    def to_numpy(self) -> np.ndarray:
        """A host copy of the view, C-contiguous (synchronous). Dtypes numpy lacks (bfloat16,
        fp8, complex32, ...) come back as raw unsigned integers of their size."""
        self._check()
        if self.strides is None:
            out = np.empty(self.shape, dtype=self._np_dtype)
            if out.nbytes:
                driver.dtoh(int(out.ctypes.data), self.ptr, out.nbytes)
            return out
        return np.ascontiguousarray(host_view(self._read_span(), self.shape, self.strides,
                                              self.view_offset, self._np_dtype))

    def __repr__(self) -> str:
        view = f", strides={self.strides}" if self.strides is not None else ""
        return (f"Buffer({self.name!r}, {self.nbytes} bytes, dtype={self.dtype}, "
                f"shape={self.shape}{view})")
