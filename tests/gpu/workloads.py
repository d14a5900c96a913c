"""GPU workloads for the tests: each returns something cgsnap.snapshot() accepts, the named
buffers, and a function that replays the original graph on given inputs."""
from __future__ import annotations

import ctypes

import numpy as np

import cgsnap
from cgsnap.cuda import driver
from cgsnap.cuda.driver import call, cu

KERNELS_CU = r"""
__constant__ float coeff[4];
__constant__ float offsets[2] = {0.5f, -0.25f};   // never written: comes from the image itself
__device__ unsigned int launches;

extern "C" __global__ void affine(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = coeff[0] * x[i] + coeff[1] + offsets[i & 1];
    if (i == 0) atomicAdd(&launches, 1u);
}

struct Pair { const float* a; int n; float* out; double scale; };

extern "C" __global__ void pair_mul(Pair p, const float* b) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) p.out[i] = (float)(p.scale * p.a[i] * b[i]);
}

template <typename T>
__global__ void add_into(T* dst, const T* src, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i];
}
template __global__ void add_into<float>(float*, const float*, int);

extern "C" __global__ void sum_rows(const float* m, float* out, int rows, int cols) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) { float s = 0; for (int c = 0; c < cols; ++c) s += m[r * cols + c]; out[r] = s; }
}
"""


def nvrtc_compile(source: str, arch: int, name: str = "kernels.cu") -> bytes:
    from cuda.bindings import nvrtc

    def nv(res):
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC: {res[0]}")
        return res[1] if len(res) > 1 else None
    prog = nv(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17"]
    try:
        nv(nvrtc.nvrtcAddNameExpression(prog, b"add_into<float>"))
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = nv(nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * size
            nv(nvrtc.nvrtcGetProgramLog(prog, log))
            raise RuntimeError(log.decode())
        mangled = nv(nvrtc.nvrtcGetLoweredName(prog, b"add_into<float>"))
        cubin = b" " * nv(nvrtc.nvrtcGetCUBINSize(prog))
        nv(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin, mangled.decode() if isinstance(mangled, bytes) else mangled
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def launch(func, grid, block, args, stream, smem=0):
    """cuLaunchKernel with ctypes-packed args."""
    holders = list(args)
    ptrs = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(a) for a in holders])
    call(cu.cuLaunchKernel, func, grid, 1, 1, block, 1, 1, smem, stream, ctypes.addressof(ptrs), 0)


class Pair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint64), ("n", ctypes.c_int), ("out", ctypes.c_uint64),
                ("scale", ctypes.c_double)]


class BindingsGraph:
    """A graph captured through cuda-bindings: NVRTC kernels (one reading a __constant__ set at run
    time, one taking a struct with pointers at odd word positions, a C++ template), 1D and 2D D2D
    memcpy, memset, fork/join across two captured streams, and a child graph."""

    N = 4096
    ROWS, COLS = 64, 64

    def __init__(self, mem_nodes: bool = False):
        self.dev = driver.init(0)
        cubin, self.add_name = nvrtc_compile(KERNELS_CU, self.dev.arch)
        self.lib = driver.library_load(cubin)
        self._made = []          # (release function, handle), released by close()
        self._made.append((driver.library_unload, self.lib))
        f = {k: driver.library_function(self.lib, k) for k in ("affine", "pair_mul", "sum_rows")}
        f["add"] = driver.library_function(self.lib, self.add_name)
        # __constant__ coeff set at run time: the restore must carry this value.
        addr, size = driver.library_global(self.lib, "coeff")
        driver.htod(addr, np.array([1.5, -0.25, 0, 0], dtype=np.float32), size)
        n, nb = self.N, self.N * 4
        self.buf = {k: driver.mem_alloc(nb) for k in ("x", "y", "w", "z", "acc")}
        self.mat = driver.mem_alloc(self.ROWS * self.COLS * 4)
        self.rows = driver.mem_alloc(self.ROWS * 4)
        self._made += [(driver.mem_free, p) for p in (*self.buf.values(), self.mat, self.rows)]
        rng = np.random.default_rng(1)
        for k in self.buf:
            driver.htod(self.buf[k], rng.standard_normal(n, dtype=np.float32), nb)
        driver.htod(self.mat, rng.standard_normal(self.ROWS * self.COLS, dtype=np.float32),
                    self.ROWS * self.COLS * 4)
        s1, s2 = driver.stream_create(), driver.stream_create()
        ev_fork, ev_join = call(cu.cuEventCreate, 0), call(cu.cuEventCreate, 0)
        self._made += [(driver.stream_destroy, s1), (driver.stream_destroy, s2),
                       (lambda e: call(cu.cuEventDestroy, e), ev_fork),
                       (lambda e: call(cu.cuEventDestroy, e), ev_join)]
        b = self.buf
        grid = (n + 255) // 256
        with cgsnap.capture(stream=s1) as cap:
            launch(f["affine"], grid, 256, [ctypes.c_uint64(b["x"]), ctypes.c_uint64(b["y"]),
                                            ctypes.c_int(n)], s1)
            call(cu.cuEventRecord, ev_fork, s1)
            call(cu.cuStreamWaitEvent, s2, ev_fork, 0)          # fork
            pair = Pair(b["y"], n, b["w"], 0.5)
            launch(f["pair_mul"], grid, 256, [pair, ctypes.c_uint64(b["x"])], s2)
            tmp = None
            if mem_nodes:
                tmp = int(call(cu.cuMemAllocAsync, nb, s2))
                call(cu.cuMemcpyDtoDAsync, tmp, b["w"], nb, s2)
                launch(f["add"], grid, 256, [ctypes.c_uint64(tmp), ctypes.c_uint64(b["x"]),
                                             ctypes.c_int(n)], s2)
                call(cu.cuMemcpyDtoDAsync, b["w"], tmp, nb, s2)
                call(cu.cuMemFreeAsync, tmp, s2)
            call(cu.cuMemsetD32Async, b["z"], 0x3F800000, n, s1)  # 1.0f
            call(cu.cuEventRecord, ev_join, s2)
            call(cu.cuStreamWaitEvent, s1, ev_join, 0)           # join
            call(cu.cuMemcpyDtoDAsync, b["acc"], b["w"], nb, s1)  # 1D
            launch(f["add"], grid, 256, [ctypes.c_uint64(b["acc"]), ctypes.c_uint64(b["z"]),
                                         ctypes.c_int(n)], s1)
            p2 = cu.CUDA_MEMCPY2D()                                 # 2D: every other row
            p2.srcMemoryType = p2.dstMemoryType = cu.CUmemorytype.CU_MEMORYTYPE_DEVICE
            p2.srcDevice, p2.srcPitch = self.mat, 2 * self.COLS * 4
            p2.dstDevice, p2.dstPitch = b["z"], self.COLS * 4
            p2.WidthInBytes, p2.Height = self.COLS * 4, self.ROWS // 2
            call(cu.cuMemcpy2DAsync, p2, s1)
            launch(f["sum_rows"], 1, self.ROWS, [ctypes.c_uint64(self.mat),
                                                 ctypes.c_uint64(self.rows), ctypes.c_int(self.ROWS),
                                                 ctypes.c_int(self.COLS)], s1)
        self.capture = cap
        self.graph = cap.graph
        # A child graph appended after the captured work: y += x, via a small captured graph.
        with cgsnap.capture(stream=s2) as child:
            launch(f["add"], grid, 256, [ctypes.c_uint64(b["y"]), ctypes.c_uint64(b["x"]),
                                         ctypes.c_int(n)], s2)
        leaves = _leaf_nodes(self.graph)
        call(cu.cuGraphAddChildGraphNode, self.graph, leaves, len(leaves), child.graph)
        self._made += [(lambda c: c.close(), child), (lambda c: c.close(), cap)]
        self.buffers = {"x": (b["x"], nb), "y": (b["y"], nb), "w": (b["w"], nb),
                        "z": (b["z"], nb), "acc": (b["acc"], nb),
                        "rows": (self.rows, self.ROWS * 4)}
        self.outputs = ["y", "w", "z", "acc", "rows"]

    def close(self) -> None:
        """Free every library, buffer, stream, event and graph this workload made."""
        driver.ctx_sync()
        while self._made:
            release, handle = self._made.pop()
            release(handle)

    def __enter__(self) -> "BindingsGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, x: np.ndarray) -> dict:
        """Replay the original graph with input x, from the state it had at capture."""
        driver.htod(self.buf["x"], x, x.nbytes)
        exe = call(cu.cuGraphInstantiate, self.graph, 0)
        call(cu.cuGraphLaunch, exe, cu.CUstream(0))
        driver.ctx_sync()
        call(cu.cuGraphExecDestroy, exe)
        return {k: read(self.buffers[k]) for k in self.outputs}


def read(buf) -> np.ndarray:
    ptr, nbytes = buf
    out = np.empty(nbytes, dtype=np.uint8)
    driver.dtoh(int(out.ctypes.data), ptr, nbytes)
    return out


def _leaf_nodes(graph) -> list:
    count = call(cu.cuGraphGetNodes, graph, 0)[1]
    nodes = call(cu.cuGraphGetNodes, graph, count)[0]
    res = call(cu.cuGraphGetEdges, graph, 0)
    m = res[-1]
    froms = set()
    if m:
        res = call(cu.cuGraphGetEdges, graph, m)
        froms = {int(a) for a in res[0]}
    return [n for n in nodes if int(n) not in froms]


def write_state(buffers: dict, state: dict) -> None:
    for k, data in state.items():
        ptr, nbytes = buffers[k]
        driver.htod(ptr, data, nbytes)
