"""Pointers stored in device memory (GPU): kernels that read addresses out of memory no kernel
argument names -- a pointer array, a __device__ T* module global set at run time, an array of
structs of pointers, a table of tables -- restored in a fresh process (no torch imported there)
compute what the originals compute, bit-exact, on fresh inputs."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from test_gpu_roundtrip import ROOT, assert_bit_equal, restore_in_fresh_process
from workloads import launch

import cgsnap
from cgsnap.cuda import driver
from cgsnap.cuda.driver import cu
from cgsnap.cuda.nvrtc import compile_cubin

pytestmark = pytest.mark.gpu

SOURCE = r"""
extern "C" __global__ void gather_sum(const float* const* ptrs, int nptr, const float* x,
                                      float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float s = 0.f;
        for (int k = 0; k < nptr; ++k) s += ptrs[k][i] * (float)(k + 1);
        out[i] = s * x[i];
    }
}

__device__ const float* g_table;
__device__ unsigned int g_len;
extern "C" __global__ void lookup(const unsigned int* idx, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = g_table[idx[i] % g_len] + (float)i;
}

struct Job { const float* in; float* out; int n; };
extern "C" __global__ void run_jobs(const Job* jobs, float scale) {
    Job j = jobs[blockIdx.y];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < j.n; i += gridDim.x * blockDim.x)
        j.out[i] = j.in[i] * scale + (float)blockIdx.y;
}

__device__ const float* const* g_rows;
__device__ unsigned int g_nrows;
extern "C" __global__ void row_gather(const float* x, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = g_rows[i % g_nrows][i] * x[i] - g_rows[(i + 1) % g_nrows][n - 1 - i];
}
"""

N = 4096


@pytest.fixture(scope="module")
def cubin():
    cgsnap.start_recorder()
    dev = driver.init(0)
    image, _ = compile_cubin(SOURCE, dev.arch, "device_pointers.cu")
    cgsnap.register_image(image, "nvrtc:device_pointers.cu")
    return image


@pytest.fixture
def lib(cubin):
    """The kernels loaded afresh for each test: its module globals start as the image has them
    (left loaded: the test's captured graph still names its kernels)."""
    return driver.library_load(cubin)


class Memory:
    """Device allocations a test makes, freed at the end."""

    def __init__(self):
        self.ptrs = []

    def alloc(self, nbytes: int, data=None) -> int:
        p = driver.mem_alloc(nbytes)
        self.ptrs.append(p)
        driver.memset_d8(p, 0, nbytes)
        if data is not None:
            driver.htod(p, np.ascontiguousarray(data), nbytes)
        return p

    def free(self):
        for p in self.ptrs:
            driver.mem_free(p)


@pytest.fixture
def mem():
    m = Memory()
    yield m
    m.free()


def read(ptr: int, nbytes: int, dtype=np.uint8) -> np.ndarray:
    out = np.empty(nbytes, dtype=np.uint8)
    driver.dtoh(int(out.ctypes.data), ptr, nbytes)
    return out.view(dtype)


def run_original(graph, inputs: dict, buffers: dict, outputs: list) -> dict:
    """Write ``inputs`` into the original buffers, launch the original graph once, read."""
    for k, v in inputs.items():
        driver.htod(buffers[k][0], np.ascontiguousarray(v), buffers[k][1])
    exe = driver.call(cu.cuGraphInstantiate, graph, 0)
    driver.call(cu.cuGraphLaunch, exe, cu.CUstream(0))
    driver.ctx_sync()
    driver.call(cu.cuGraphExecDestroy, exe)
    return {k: read(*buffers[k]) for k in outputs}


def region_at(snap, origin: int):
    found = [r for r in snap.regions if r.origin == origin]
    assert len(found) == 1, f"no single region at {origin:#x}: {found}"
    return found[0]


def refs_of(region) -> list:
    return [tuple(row) for row in region.pointer_table().tolist()]


def set_global(lib, name: str, value: np.ndarray) -> None:
    addr, size = driver.library_global(lib, name)
    assert size == value.nbytes, (name, size)
    driver.htod(addr, value, size)


def test_pointer_array_and_the_arrays_it_points_to(lib, mem, tmp_path):
    """gather_sum reads 4 arrays through a pointer array: only the pointer array is an argument;
    array 0 is a named input, arrays 1-3 are memory no argument or name reaches."""
    func = driver.library_function(lib, "gather_sum")
    rng = np.random.default_rng(11)
    arrays = [mem.alloc(4 * N + 64, rng.standard_normal(N + 16, dtype=np.float32))
              for _ in range(4)]
    targets = [a + 16 * k for k, a in enumerate(arrays)]          # offsets inside them
    ptrs = mem.alloc(32, np.array(targets, dtype=np.uint64))
    x, out = mem.alloc(4 * N, rng.standard_normal(N, dtype=np.float32)), mem.alloc(4 * N)
    stream = driver.stream_create()
    with cgsnap.capture(stream=stream) as cap:
        launch(func, N // 256, 256, [ctypes.c_uint64(ptrs), ctypes.c_int(4), ctypes.c_uint64(x),
                                     ctypes.c_uint64(out), ctypes.c_int(N)], stream)
    buffers = {"x": (x, 4 * N), "out": (out, 4 * N), "a0": (arrays[0], 4 * N + 64)}
    ptr_bytes = read(ptrs, 32).copy()
    out_before = run_original(cap.graph, {}, buffers, ["out"])
    snap = cgsnap.snapshot(cap, buffers=buffers, name="ptr_array")
    # The pointer array holds 4 stored pointers: into the named input and 3 brought-in arrays.
    table = region_at(snap, ptrs)
    a0 = snap.region_by_name("a0")
    brought = [region_at(snap, a) for a in arrays[1:]]
    assert refs_of(table) == [(0, a0.id, 0)] + [(8 * k, r.id, 16 * k)
                                                for k, r in enumerate(brought, 1)]
    for a, r in zip(arrays[1:], brought):
        assert r.policy.value == "saved" and r.size >= 4 * N + 64
        assert np.array_equal(np.asarray(r.data)[:4 * N + 64], read(a, 4 * N + 64))
    # The original is untouched: same pointer bytes, same output.
    assert np.array_equal(read(ptrs, 32), ptr_bytes)
    assert_bit_equal(run_original(cap.graph, {}, buffers, ["out"]), out_before)
    path = tmp_path / "ptr_array.cgsnap"
    snap.save(path)
    fresh = {"x": rng.standard_normal(N, dtype=np.float32),
             "a0": rng.standard_normal(N + 16, dtype=np.float32)}
    original = run_original(cap.graph, fresh, buffers, ["out"])
    restored = restore_in_fresh_process(path, fresh, ["out"], "ptr_array", tmp_path)
    assert_bit_equal(restored, original)
    # The budget names the region, the offset and the budget; "off" leaves memory as it is.
    with pytest.raises(cgsnap.CaptureError) as err:
        cgsnap.snapshot(cap, buffers=buffers, name="ptr_array", pointer_budget=1024)
    msg = str(err.value)
    assert "byte 0x8" in msg and "pointer_budget=1024" in msg and f"{ptrs:#x}" in msg
    off = cgsnap.snapshot(cap, buffers=buffers, name="ptr_array", memory_pointers="off")
    assert not any(r.refs for r in off.regions)
    assert not any(r.origin in arrays[1:] for r in off.regions)


def test_module_global_pointing_at_a_table(lib, mem, tmp_path):
    """`__device__ const float* g_table`, set at run time (as a library does at plan time) to a
    table in an allocation that no kernel argument names."""
    func = driver.library_function(lib, "lookup")
    rng = np.random.default_rng(12)
    table_len = 1000
    table = mem.alloc(4 * table_len + 256, rng.standard_normal(table_len + 64, dtype=np.float32))
    set_global(lib, "g_table", np.array([table + 256], dtype=np.uint64))
    set_global(lib, "g_len", np.array([table_len], dtype=np.uint32))
    idx = mem.alloc(4 * N, rng.integers(0, 1 << 31, N, dtype=np.uint32))
    out = mem.alloc(4 * N)
    stream = driver.stream_create()
    with cgsnap.capture(stream=stream) as cap:
        launch(func, N // 256, 256, [ctypes.c_uint64(idx), ctypes.c_uint64(out),
                                     ctypes.c_int(N)], stream)
    buffers = {"idx": (idx, 4 * N), "out": (out, 4 * N)}
    snap = cgsnap.snapshot(cap, buffers=buffers, name="global")
    g = next(r for r in snap.regions if r.symbol == "g_table")
    t = region_at(snap, table)
    assert refs_of(g) == [(0, t.id, 256)] and t.policy.value == "saved"
    assert any(r.symbol == "g_len" for r in snap.regions)
    path = tmp_path / "global.cgsnap"
    snap.save(path)
    fresh = {"idx": rng.integers(0, 1 << 31, N, dtype=np.uint32)}
    original = run_original(cap.graph, fresh, buffers, ["out"])
    restored = restore_in_fresh_process(path, fresh, ["out"], "global", tmp_path)
    assert_bit_equal(restored, original)


JOB = np.dtype([("in", "<u8"), ("out", "<u8"), ("n", "<i4"), ("pad", "<u4")])


def test_array_of_structs_of_pointers(lib, mem, tmp_path):
    """`struct Job {const float* in; float* out; int n;}` x 3 in a buffer: inputs named or
    not, one pointing into the middle of a named input, outputs named."""
    func = driver.library_function(lib, "run_jobs")
    rng = np.random.default_rng(13)
    in0 = mem.alloc(4 * N, rng.standard_normal(N, dtype=np.float32))
    in1 = mem.alloc(4 * N, rng.standard_normal(N, dtype=np.float32))     # never named
    outs = [mem.alloc(4 * N) for _ in range(3)]
    jobs = np.zeros(3, dtype=JOB)
    jobs["in"] = [in0, in1, in0 + 4 * (N // 2)]
    jobs["out"] = outs
    jobs["n"] = [N, N - 100, N // 2]
    job_buf = mem.alloc(jobs.nbytes, jobs)
    stream = driver.stream_create()
    with cgsnap.capture(stream=stream) as cap:
        grid = (8, 3, 1)
        args = [ctypes.c_uint64(job_buf), ctypes.c_float(1.5)]
        holders = (ctypes.c_void_p * 2)(*[ctypes.addressof(a) for a in args])
        driver.call(cu.cuLaunchKernel, func, *grid, 256, 1, 1, 0, stream,
                    ctypes.addressof(holders), 0)
    buffers = {"in0": (in0, 4 * N), **{f"out{k}": (o, 4 * N) for k, o in enumerate(outs)}}
    snap = cgsnap.snapshot(cap, buffers=buffers, name="jobs")
    jr = region_at(snap, job_buf)
    i0, i1 = snap.region_by_name("in0"), region_at(snap, in1)
    o = [snap.region_by_name(f"out{k}") for k in range(3)]
    assert refs_of(jr) == [(0, i0.id, 0), (8, o[0].id, 0), (24, i1.id, 0), (32, o[1].id, 0),
                           (48, i0.id, 4 * (N // 2)), (56, o[2].id, 0)]
    path = tmp_path / "jobs.cgsnap"
    snap.save(path)
    fresh = {"in0": rng.standard_normal(N, dtype=np.float32)}
    names = [f"out{k}" for k in range(3)]
    original = run_original(cap.graph, fresh, buffers, names)
    restored = restore_in_fresh_process(path, fresh, names, "jobs", tmp_path)
    assert_bit_equal(restored, original)


def test_table_of_tables_through_a_module_global(lib, mem, tmp_path):
    """g_rows -> an array of row pointers -> 3 rows, each its own allocation: two levels of
    stored pointers, none of it named or passed as an argument."""
    func = driver.library_function(lib, "row_gather")
    rng = np.random.default_rng(14)
    rows = [mem.alloc(4 * N, rng.standard_normal(N, dtype=np.float32)) for _ in range(3)]
    row_table = mem.alloc(24, np.array(rows, dtype=np.uint64))
    set_global(lib, "g_rows", np.array([row_table], dtype=np.uint64))
    set_global(lib, "g_nrows", np.array([3], dtype=np.uint32))
    x, out = mem.alloc(4 * N, rng.standard_normal(N, dtype=np.float32)), mem.alloc(4 * N)
    stream = driver.stream_create()
    with cgsnap.capture(stream=stream) as cap:
        launch(func, N // 256, 256, [ctypes.c_uint64(x), ctypes.c_uint64(out), ctypes.c_int(N)],
               stream)
    buffers = {"x": (x, 4 * N), "out": (out, 4 * N)}
    snap = cgsnap.snapshot(cap, buffers=buffers, name="rows")
    g = next(r for r in snap.regions if r.symbol == "g_rows")
    rt = region_at(snap, row_table)
    assert refs_of(g) == [(0, rt.id, 0)]
    assert refs_of(rt) == [(8 * k, region_at(snap, r).id, 0) for k, r in enumerate(rows)]
    path = tmp_path / "rows.cgsnap"
    snap.save(path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    text = subprocess.run([sys.executable, "-m", "cgsnap", "show", str(path)],
                          capture_output=True, text=True, env=env, timeout=300).stdout
    assert f'region {g.id} "g_rows": 1 stored pointer(s)' in text, text[-2000:]
    fresh = {"x": rng.standard_normal(N, dtype=np.float32)}
    original = run_original(cap.graph, fresh, buffers, ["out"])
    restored = restore_in_fresh_process(path, fresh, ["out"], "rows", tmp_path)
    assert_bit_equal(restored, original)

