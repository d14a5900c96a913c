"""Named buffers of a restore: a region's memory in this process, as users see it."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..capture.buffers import numpy_dtype
from ..cuda import driver


class Buffer:
    """A named region's memory in this process; exposes ``__cuda_array_interface__``. Valid
    while its restore is open: after ``close()`` every use raises RestoreError."""

    def __init__(self, name: str, ptr: int, nbytes: int, dtype: Optional[str],
                 shape: Optional[tuple], owner=None):
        self.name, self.ptr, self.nbytes = name, ptr, nbytes
        self.dtype = dtype
        self.shape = tuple(shape) if shape is not None else (nbytes,)
        self._np_dtype = numpy_dtype(dtype) if shape is not None else np.uint8
        self._owner = owner

    def _check(self) -> None:
        if self._owner is not None:
            self._owner._check_open()

    @property
    def __cuda_array_interface__(self) -> dict:
        self._check()
        return {"shape": self.shape, "typestr": np.dtype(self._np_dtype).str,
                "data": (self.ptr, False), "version": 3, "strides": None}

    def copy_from(self, host) -> None:
        """Copy a host array (any dtype, same number of bytes) into the buffer (synchronous)."""
        self._check()
        arr = np.ascontiguousarray(host)
        if arr.nbytes != self.nbytes:
            raise ValueError(f"buffer {self.name!r} holds {self.nbytes} bytes, got {arr.nbytes}")
        driver.htod(self.ptr, int(arr.ctypes.data), self.nbytes)

    def to_numpy(self) -> np.ndarray:
        """A host copy (synchronous). bfloat16 / fp8 come back as raw unsigned integers."""
        self._check()
        out = np.empty(self.shape, dtype=self._np_dtype)
        driver.dtoh(int(out.ctypes.data), self.ptr, self.nbytes)
        return out

    def __repr__(self) -> str:
        return f"Buffer({self.name!r}, {self.nbytes} bytes, dtype={self.dtype}, shape={self.shape})"
