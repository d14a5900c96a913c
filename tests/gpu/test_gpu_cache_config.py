"""A kernel's cache preference (GPU). Triton loads each kernel with cuModuleLoadData and sets
CU_FUNC_CACHE_PREFER_SHARED on those over 48 KiB of shared memory; the driver has no getter for
it, so only the recorder can see it. The file carries it and a fresh process (no torch) applies
it to the reloaded kernel, which computes what the original computes, bit-exact."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_gpu_device_pointers import Memory, run_original
from test_gpu_roundtrip import assert_bit_equal, restore_in_fresh_process
from workloads import launch

import cgsnap
from cgsnap.cuda import driver
from cgsnap.cuda.driver import call, cu
from cgsnap.cuda.nvrtc import compile_cubin

pytestmark = pytest.mark.gpu

SOURCE = r"""
extern "C" __global__ void staged(const float* x, float* out, int n) {
    extern __shared__ float tile[];           // 64 KiB of dynamic shared memory
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    for (int k = threadIdx.x; k < 16384; k += blockDim.x) tile[k] = (float)k * 0.25f;
    __syncthreads();
    if (i < n) out[i] = x[i] * tile[(i * 7) % 16384] + tile[threadIdx.x];
}
extern "C" __global__ void plain(const float* x, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] * 3.0f - 1.0f;
}
"""
N = 8192
SMEM = 16384 * 4


def test_a_cache_preference_travels_with_the_kernel(tmp_path):
    cgsnap.start_recorder()
    dev = driver.init(0)
    image, _ = compile_cubin(SOURCE, dev.arch, "cache_config.cu")
    module = call(cu.cuModuleLoadData, image)               # as Triton loads its kernels
    staged = call(cu.cuModuleGetFunction, module, b"staged")
    plain = call(cu.cuModuleGetFunction, module, b"plain")
    call(cu.cuFuncSetAttribute, staged,
         cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, SMEM)
    call(cu.cuFuncSetCacheConfig, staged, cu.CUfunc_cache.CU_FUNC_CACHE_PREFER_SHARED)
    mem, cap = Memory(), None
    try:
        rng = np.random.default_rng(5)
        x = mem.alloc(4 * N, rng.standard_normal(N, dtype=np.float32))
        mid, out = mem.alloc(4 * N), mem.alloc(4 * N)
        stream = driver.stream_create()
        with cgsnap.capture(stream=stream) as cap:
            launch(staged, N // 256, 256, [ctypes.c_uint64(x), ctypes.c_uint64(mid),
                                           ctypes.c_int(N)], stream, smem=SMEM)
            launch(plain, N // 256, 256, [ctypes.c_uint64(mid), ctypes.c_uint64(out),
                                          ctypes.c_int(N)], stream)
        buffers = {"x": (x, 4 * N), "out": (out, 4 * N)}
        snap = cgsnap.snapshot(cap, buffers=buffers, name="cache_config")
        attrs = {k.name: k.attrs for k in snap.kernels}
        assert attrs["staged"].get("cache_config") == 1, attrs      # CU_FUNC_CACHE_PREFER_SHARED
        assert attrs["staged"].get("max_dynamic_shared_size_bytes") == SMEM
        assert "cache_config" not in attrs["plain"], attrs          # never set: not recorded
        path = tmp_path / "cache_config.cgsnap"
        snap.save(path)
        assert {k.name: k.attrs.get("cache_config") for k in cgsnap.read(path).kernels} == \
            {"staged": 1, "plain": None}
        fresh = {"x": rng.standard_normal(N, dtype=np.float32)}
        original = run_original(cap.graph, fresh, buffers, ["out"])
        assert np.count_nonzero(original["out"]) > N // 2
        restored = restore_in_fresh_process(path, fresh, ["out"], "cache_config", tmp_path)
        assert_bit_equal(restored, original)
    finally:
        if cap is not None:
            cap.close()
        mem.free()
