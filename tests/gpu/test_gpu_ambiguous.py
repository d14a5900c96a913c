"""An int beside 4 stale bytes whose word lands inside a device allocation (GPU): the restored
graph must see the int, not a relocated address (docs/RELIABILITY.md, "Pointer classification")."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_gpu_roundtrip import assert_bit_equal, restore_in_fresh_process
from workloads import launch, nvrtc_compile, read

import cgsnap
from cgsnap.cuda import driver
from cgsnap.cuda.driver import cu

pytestmark = pytest.mark.gpu

KERNEL = r"""
struct Stale { int n; int stale; const float* x; };   // `stale`: 4 bytes the kernel never reads
extern "C" __global__ void scale_n(Stale s, float* y, int count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) y[i] = s.x[i] * (float)s.n;
}
struct Padded { const float* x; int n; int pad; const void* unused; };   // `unused`: never read
extern "C" __global__ void scale_p(Padded p, float* y, int count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) y[i] = p.x[i] * (float)p.n;
}
template <typename T> __global__ void add_into(T*, const T*, int) {}
template __global__ void add_into<float>(float*, const float*, int);
"""


class Stale(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int), ("stale", ctypes.c_uint32), ("x", ctypes.c_uint64)]


def test_int_with_stale_high_half_inside_an_allocation_survives(tmp_path):
    dev = driver.init(0)
    cubin, _ = nvrtc_compile(KERNEL, dev.arch)
    cgsnap.register_image(cubin, "nvrtc")
    lib = driver.library_load(cubin)
    func = driver.library_function(lib, "scale_n")
    # A 5 GiB allocation holds a 4 GiB boundary B; the struct's first word is B + 7: the int 7
    # with B's high half as its "uninitialised" neighbour -- an address inside the allocation.
    big_size = 5 << 30
    big = driver.mem_alloc(big_size)
    count = 1024
    x, y = driver.mem_alloc(count * 4), driver.mem_alloc(count * 4)
    try:
        boundary = ((big >> 32) + 1) << 32
        assert big <= boundary and boundary + 4096 <= big + big_size
        xs = np.random.default_rng(3).standard_normal(count, dtype=np.float32)
        driver.htod(x, xs, count * 4)
        stream = driver.stream_create()
        with cgsnap.capture(stream=stream) as cap:
            launch(func, count // 256, 256, [Stale(7, boundary >> 32, x), ctypes.c_uint64(y),
                                             ctypes.c_int(count)], stream)
        snap = cgsnap.snapshot(cap, buffers={"x": (x, count * 4), "y": (y, count * 4)},
                               name="stale")
        assert snap.meta.get("ambiguous_word_count") == 1
        assert snap.meta["ambiguous_words"][0].endswith(": literal")
        assert f"word {boundary + 7:#x}" in snap.meta["ambiguous_words"][0]
        # The allocation was found only through that word: it is not the graph's memory.
        assert all(r.size < big_size for r in snap.regions)
        path = tmp_path / "stale.cgsnap"
        snap.save(path)
        exe = driver.call(cu.cuGraphInstantiate, cap.graph, 0)
        driver.call(cu.cuGraphLaunch, exe, cu.CUstream(0))
        driver.ctx_sync()
        driver.call(cu.cuGraphExecDestroy, exe)
        original = {"y": read((y, count * 4))}
        assert np.array_equal(original["y"].view(np.float32), xs * 7)
        restored = restore_in_fresh_process(path, {"x": xs}, ["y"], "stale", tmp_path)
        assert_bit_equal(restored, original)
    finally:
        for p in (big, x, y):
            driver.mem_free(p)


class Padded(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint64), ("n", ctypes.c_int), ("pad", ctypes.c_int),
                ("unused", ctypes.c_uint64)]


def test_stale_address_in_padding_is_saved_unless_the_memory_is_named():
    """A whole stale device address in a field the kernel never reads drags its allocation into
    the file (no value test can tell it from a real pointer); naming the memory Scratch keeps
    its bytes out, and either file restores bit-exactly."""
    dev = driver.init(0)
    cubin, _ = nvrtc_compile(KERNEL, dev.arch)
    cgsnap.register_image(cubin, "nvrtc")
    lib = driver.library_load(cubin)
    func = driver.library_function(lib, "scale_p")
    count = 1024
    stale = driver.mem_alloc(4 << 20)
    x, y = driver.mem_alloc(count * 4), driver.mem_alloc(count * 4)
    try:
        for p in (x, y):          # no leftovers of earlier tests (stored pointers) in them
            driver.memset_d8(p, 0, count * 4)
        stream = driver.stream_create()
        with cgsnap.capture(stream=stream) as cap:
            # 1 MiB + 4 KiB in: never within 64 KiB of a 4 GiB boundary for a 2 MiB-aligned
            # allocation, so the word is a plain pointer, not an ambiguous one.
            launch(func, count // 256, 256, [Padded(x, 3, 0, stale + (1 << 20) + 4096),
                                             ctypes.c_uint64(y), ctypes.c_int(count)], stream)
        buffers = {"x": (x, count * 4), "y": (y, count * 4)}
        snap = cgsnap.snapshot(cap, buffers=buffers, name="padded")
        dragged = [r for r in snap.regions if r.origin == stale]
        assert len(dragged) == 1 and dragged[0].policy.value == "saved"
        named = dict(buffers, workspace=cgsnap.Scratch((stale, 4 << 20)))
        snap = cgsnap.snapshot(cap, buffers=named, name="padded")
        assert sum(r.size for r in snap.regions if r.policy.value == "saved") == 2 * count * 4
    finally:
        for p in (stale, x, y):
            driver.mem_free(p)
