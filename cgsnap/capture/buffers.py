"""Named buffers: what users hand to ``snapshot(buffers=...)`` and get back from a restore.

Accepted at save time, duck-typed so that neither torch nor CuPy is imported here: a torch tensor
(``data_ptr``/``element_size``), anything with ``__cuda_array_interface__`` (CuPy, Numba, ...),
a ``(ptr, nbytes)`` pair, or a ``Bound``/``Scratch`` wrapper that sets the contents policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import BindError
from ..format.model import Policy

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


def describe(obj) -> tuple:
    """``(ptr, nbytes, dtype, shape)`` of a device buffer object."""
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(x, int) for x in obj):
        return obj[0], obj[1], None, None
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size"):          # torch.Tensor
        if not obj.is_cuda:
            raise TypeError("a named buffer must live in GPU memory")
        if not obj.is_contiguous():
            raise TypeError("a named torch tensor must be contiguous")
        dtype = str(obj.dtype).replace("torch.", "")
        return int(obj.data_ptr()), obj.numel() * obj.element_size(), dtype, tuple(obj.shape)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(cai["shape"])
        dt = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is not None and strides != _contiguous_strides(shape, dt.itemsize):
            raise TypeError("a named buffer must be C-contiguous")
        return int(cai["data"][0]), int(np.prod(shape, dtype=np.int64)) * dt.itemsize, \
            dt.name, shape
    raise TypeError(f"cannot use {type(obj).__name__} as a named buffer: give a torch tensor, an "
                    "object with __cuda_array_interface__, or (ptr, nbytes)")


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
        ptr, nbytes, dtype, shape = describe(obj)
        specs.append(BufferSpec(name, ptr, nbytes, dtype, shape, policy or Policy.SAVED))
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
    """The address of ``obj`` after checking it fits ``region``; raises BindError otherwise."""
    try:
        ptr, nbytes, dtype, shape = describe(obj)
    except TypeError as exc:
        raise BindError(f"{region.name}: {exc}") from None
    problems = []
    if nbytes != region.size:
        problems.append(f"{nbytes} bytes, expected {region.size}")
    if region.dtype and dtype and dtype != region.dtype:
        problems.append(f"dtype {dtype}, expected {region.dtype}")
    if region.shape is not None and shape is not None and tuple(shape) != tuple(region.shape):
        problems.append(f"shape {tuple(shape)}, expected {tuple(region.shape)}")
    if problems:
        raise BindError(f"{region.name}: " + "; ".join(problems))
    return ptr
