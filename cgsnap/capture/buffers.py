"""Named buffers: what users hand to ``snapshot(buffers=...)`` and get back from a restore.

Accepted at save time, duck-typed so that neither torch nor CuPy is imported here: a torch tensor
(``data_ptr``/``element_size``), anything with ``__cuda_array_interface__`` (CuPy, Numba, ...),
a ``(ptr, nbytes)`` pair, or a ``Bound``/``Scratch`` wrapper that sets the contents policy.
A strided view (channels_last, transposed, a slice, an expanded view) is recorded as the span of
memory it covers plus its shape, strides and offset in that span.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import BindError
from ..format.model import DTYPE_ITEMSIZE, Policy, view_span

# dtype names we store -> numpy dtype (bfloat16 & friends have none: raw 2-byte words)
_RAW = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8,
        "float8_e4m3fnuz": np.uint8, "float8_e5m2fnuz": np.uint8}


@dataclass(frozen=True)
class BufferSpec:
    name: str
    ptr: int
    nbytes: int
    dtype: Optional[str] = None
    shape: Optional[tuple] = None
    policy: Policy = Policy.SAVED
    strides: Optional[tuple] = None     # elements; None: C-contiguous
    view_offset: int = 0                # elements from ``ptr`` to the view's first element


@dataclass(frozen=True)
class View:
    """A device buffer as cgsnap records it: the span of memory ``[ptr, ptr + nbytes)`` that
    the view covers, and how the view lies in it (``strides`` in elements, None when
    C-contiguous; the first element ``offset`` elements after ``ptr``)."""
    ptr: int
    nbytes: int
    dtype: Optional[str] = None
    shape: Optional[tuple] = None
    strides: Optional[tuple] = None
    offset: int = 0


class _PolicyWrapper:
    policy = Policy.SAVED

    def __init__(self, obj):
        self.obj = obj


class Saved(_PolicyWrapper):
    """Contents travel in the file (the default for named buffers)."""
    policy = Policy.SAVED


class Bound(_PolicyWrapper):
    """No contents in the file: the restoring process binds its own memory (``load(bind=...)``)."""
    policy = Policy.BOUND


class Scratch(_PolicyWrapper):
    """No contents in the file: fresh memory at restore."""
    policy = Policy.SCRATCH


def describe(obj) -> View:
    """The :class:`View` of a device buffer object: a torch tensor (any strides: channels_last,
    transposed, a slice, an expanded view), an object with ``__cuda_array_interface__`` (byte
    strides, negative ones too), or ``(ptr, nbytes)``."""
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(x, int) for x in obj):
        return View(obj[0], obj[1])
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size"):          # torch.Tensor
        if not obj.is_cuda:
            raise TypeError("a named buffer must live in GPU memory")
        dtype = str(obj.dtype).replace("torch.", "")
        shape, itemsize = tuple(int(n) for n in obj.shape), int(obj.element_size())
        strides = None if obj.is_contiguous() else tuple(int(x) for x in obj.stride())
        return strided_view(int(obj.data_ptr()), shape, strides, itemsize, dtype)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        if cai.get("mask") is not None:
            raise TypeError("a named buffer cannot be a masked array")
        shape = tuple(int(n) for n in cai["shape"])
        dt = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is not None:
            strides = tuple(int(x) for x in strides)
            if strides == _contiguous_strides(shape, dt.itemsize):
                strides = None
            elif any(x % dt.itemsize for x in strides):
                raise TypeError(f"strides {strides} are not multiples of the item size "
                                f"({dt.itemsize} bytes)")
            else:
                strides = tuple(x // dt.itemsize for x in strides)
        return strided_view(int(cai["data"][0]), shape, strides, dt.itemsize, dt.name)
    raise TypeError(f"cannot use {type(obj).__name__} as a named buffer: give a torch tensor, an "
                    "object with __cuda_array_interface__, or (ptr, nbytes)")


def strided_view(data: int, shape: tuple, strides: Optional[tuple], itemsize: int,
                 dtype: str) -> View:
    """The :class:`View` of a view whose first element is at address ``data`` (strides in
    elements; None: C-contiguous)."""
    if strides is None:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return View(data, count * itemsize, dtype, shape)
    if len(strides) != len(shape):
        raise TypeError(f"{len(strides)} strides for {len(shape)} dimensions")
    if dtype not in DTYPE_ITEMSIZE or DTYPE_ITEMSIZE[dtype] != itemsize:
        raise TypeError(f"a strided named buffer needs a dtype cgsnap knows the size of, not "
                        f"{dtype!r}")
    span = view_span(shape, strides)
    if span is None:             # no elements: no memory
        return View(data, 0, dtype, shape, strides, 0)
    lo, hi = span
    return View(data + lo * itemsize, (hi - lo + 1) * itemsize, dtype, shape, strides, -lo)


def _contiguous_strides(shape, itemsize) -> tuple:
    strides, acc = [], itemsize
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def _is_module(obj) -> bool:
    return hasattr(obj, "named_parameters") and hasattr(obj, "named_buffers")


def flatten(buffers: dict) -> list:
    """``[(name, tensor_or_buffer, policy or None)]``: a ``torch.nn.Module`` stands for all its
    parameters and buffers, named ``"{name}.{param}"`` (tied weights once, under their first
    name)."""
    out = []
    for name, obj in buffers.items():
        policy = None
        if isinstance(obj, _PolicyWrapper):
            policy, obj = obj.policy, obj.obj
        if _is_module(obj):
            seen = set()
            for sub, t in list(obj.named_parameters()) + list(obj.named_buffers()):
                if t is None or t.numel() == 0 or t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                # Weights are what a restarted server loads again anyway: bound by default.
                out.append((f"{name}.{sub}", t.detach(), policy or Policy.BOUND))
        else:
            out.append((name, obj, policy))
    return out


def expand_buffers(buffers: dict) -> list:
    """BufferSpecs for ``snapshot(buffers=...)``; plain buffers are saved unless wrapped."""
    specs = []
    for name, obj, policy in flatten(buffers):
        v = describe(obj)
        specs.append(BufferSpec(name, v.ptr, v.nbytes, v.dtype, v.shape, policy or Policy.SAVED,
                                v.strides, v.offset))
    return specs


def numpy_dtype(dtype: Optional[str]):
    if dtype is None:
        return np.uint8
    if dtype in _RAW:
        return _RAW[dtype]
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.uint8


def check_bind(region, obj) -> int:
    """The address of the memory ``obj`` covers (its span's start) after checking it lies like
    ``region``'s view; raises BindError otherwise."""
    try:
        v = describe(obj)
    except TypeError as exc:
        raise BindError(f"{region.name}: {exc}") from None
    problems = []
    if v.nbytes != region.size:
        problems.append(f"{v.nbytes} bytes, expected {region.size}")
    if region.dtype and v.dtype and v.dtype != region.dtype:
        problems.append(f"dtype {v.dtype}, expected {region.dtype}")
    if region.shape is not None and v.shape is not None and tuple(v.shape) != tuple(region.shape):
        problems.append(f"shape {tuple(v.shape)}, expected {tuple(region.shape)}")
    want = None if region.strides is None else tuple(region.strides)
    if v.shape is not None and (v.strides, v.offset) != (want, region.view_offset):
        problems.append(f"strides {_strides_text(v.strides)}, expected "
                        f"{_strides_text(want)} (in elements)")
    if problems:
        raise BindError(f"{region.name}: " + "; ".join(problems))
    return v.ptr


def _strides_text(strides) -> str:
    return "contiguous" if strides is None else str(tuple(strides))
