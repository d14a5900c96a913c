"""Pruned images on the GPU: the driver loads them, gives every kept kernel the same attributes,
and the kernels compute the same bytes as the whole image's (cgsnap.binary.cubin_prune)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import cgsnap
from cgsnap.binary import cubin_prune, elf
from cgsnap.cuda import driver

pytestmark = pytest.mark.gpu

SOURCE = r"""
__constant__ float coeff[4];
__device__ float table[64];
extern "C" __global__ void affine(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = coeff[0] * x[i] + coeff[1] + table[i & 63];
}
extern "C" __global__ void square(float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = y[i] * y[i] + table[i & 63];
}
extern "C" __global__ void reduce_shared(const float* x, float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x]; __syncthreads();
    for (int k = 128; k > 0; k >>= 1) { if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k]; __syncthreads(); }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}
template <typename T> __global__ void add_into(T* d, const T* s, int n) { d[threadIdx.x] += s[threadIdx.x]; }
template __global__ void add_into<float>(float*, const float*, int);   // workloads.nvrtc_compile names it
template <int N> __global__ void unused(float* a) { a[threadIdx.x] *= N; }
template __global__ void unused<1>(float*); template __global__ void unused<2>(float*);
template __global__ void unused<3>(float*); template __global__ void unused<4>(float*);
"""
N = 4096


@pytest.fixture(scope="module", autouse=True)
def recorder():
    return cgsnap.start_recorder()


@pytest.fixture(scope="module")
def image():
    from workloads import nvrtc_compile
    dev = driver.init(0)
    cubin, _ = nvrtc_compile(SOURCE, dev.arch, "prune.cu")
    return bytes(cubin)


def _run(cubin: bytes, x: np.ndarray) -> dict:
    from workloads import launch
    lib = driver.library_load(cubin)
    bufs = []
    try:
        addr, size = driver.library_global(lib, "coeff")
        driver.htod(addr, np.array([1.25, -0.5, 0, 0], dtype=np.float32), size)
        addr, size = driver.library_global(lib, "table")
        driver.htod(addr, np.linspace(-1, 1, 64, dtype=np.float32), size)
        xd, yd, od = (driver.mem_alloc(N * 4) for _ in range(3))
        bufs += [xd, yd, od]
        driver.htod(xd, x, N * 4)
        stream = driver.stream_create()
        launch(driver.library_function(lib, "affine"), N // 256, 256,
               [ctypes.c_uint64(xd), ctypes.c_uint64(yd), ctypes.c_int(N)], stream)
        launch(driver.library_function(lib, "square"), N // 256, 256,
               [ctypes.c_uint64(yd), ctypes.c_int(N)], stream)
        launch(driver.library_function(lib, "reduce_shared"), N // 256, 256,
               [ctypes.c_uint64(yd), ctypes.c_uint64(od)], stream)
        driver.stream_sync(stream)
        driver.stream_destroy(stream)
        out = {}
        for name, ptr in (("y", yd), ("out", od)):
            host = np.empty(N, dtype=np.float32)
            driver.dtoh(host, ptr, N * 4)
            out[name] = host
        return out
    finally:
        for b in bufs:
            driver.mem_free(b)
        driver.library_unload(lib)


def test_pruned_image_agrees_and_computes_the_same(image):
    keep = {"affine", "square", "reduce_shared"}
    result = cubin_prune.prune_cubin(image, keep)
    assert result.reason == "" and result.kernels_after == 3 and result.kernels_before == 8
    variables = [g.name for g in elf.cubin_info(result.data).globals]
    assert sorted(variables) == ["coeff", "table"]
    assert driver.images_agree(image, result.data, sorted(keep), variables) is None
    x = np.random.default_rng(3).standard_normal(N, dtype=np.float32)
    whole, pruned = _run(image, x), _run(result.data, x)
    for k in whole:
        assert whole[k].tobytes() == pruned[k].tobytes(), k


def test_a_kernel_cut_away_is_reported_not_raised(image):
    pruned = cubin_prune.prune_cubin(image, {"affine"}).data
    problem = driver.images_agree(image, pruned, ["affine", "square"], [])
    assert problem and "CUDA_ERROR_NOT_FOUND" in problem
    # Both libraries were unloaded: loading and unloading again still works.
    driver.library_unload(driver.library_load(pruned))


def test_save_prunes_and_the_file_restores(tmp_path, image):
    """cgsnap.save() cuts an image down on its own (a context is current) and the restored
    graph, launched in this process, computes what the original did."""
    from workloads import launch
    lib = driver.library_load(image)
    xd, yd = driver.mem_alloc(N * 4), driver.mem_alloc(N * 4)
    stream = driver.stream_create()
    try:
        addr, size = driver.library_global(lib, "coeff")
        driver.htod(addr, np.array([2.0, 1.0, 0, 0], dtype=np.float32), size)
        x = np.arange(N, dtype=np.float32)
        driver.htod(xd, x, N * 4)
        with cgsnap.capture(stream=stream) as cap:
            launch(driver.library_function(lib, "affine"), N // 256, 256,
                   [ctypes.c_uint64(xd), ctypes.c_uint64(yd), ctypes.c_int(N)], stream)
        snap = cgsnap.snapshot(cap, buffers={"x": (xd, N * 4), "y": (yd, N * 4)}, name="affine")
        path = tmp_path / "affine.cgsnap"
        cgsnap.save(path, snap)
        back = cgsnap.read(path)
        (entry,) = back.meta["pruned_images"]
        assert entry["kernels"] == [8, 1] and entry["bytes"][1] < entry["bytes"][0]
        assert back.images[0].names == ("affine",)
        with cgsnap.load(path) as r:
            r.graph("affine").launch()
            r.synchronize()
            got = r.buffer("y").to_numpy()
        want = snap.graphs[0].checks[snap.region_by_name("y").id]
        assert got.tobytes() == bytes(want)
    finally:
        driver.stream_destroy(stream)
        driver.mem_free(xd)
        driver.mem_free(yd)
        driver.library_unload(lib)
