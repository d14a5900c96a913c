"""Strided named buffers (GPU): users name what they have -- channels_last tensors, transposed
views, slices of larger tensors, expanded views -- and get the same views back after a restore
in a fresh process (no torch imported there), bit-exact; two views of one storage named
separately still share memory."""
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
from cgsnap.cuda.nvrtc import compile_cubin

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def recorder():
    return cgsnap.start_recorder()


def _torch_graph(fn):
    """Warm ``fn`` up on a side stream, then capture it: ``(graph, result)``."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g), torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    return g, out


def test_channels_last_conv2d(tmp_path):
    """A cuDNN conv2d in channels_last: input and output named as they are (not contiguous)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 24, 24, device="cuda").to(memory_format=torch.channels_last)
    g, y = _torch_graph(lambda: conv(x))
    assert not x.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    assert not y.is_contiguous()
    snap = cgsnap.snapshot(g, buffers={"x": x, "y": y}, name="conv")
    rx, ry = snap.region_by_name("x"), snap.region_by_name("y")
    assert rx.strides == tuple(x.stride()) and ry.strides == tuple(y.stride())
    assert rx.size == x.numel() * 4 and rx.shape == tuple(x.shape)
    path = tmp_path / "conv.cgsnap"
    snap.save(path)
    x_new = torch.randn(4, 16, 24, 24, device="cuda")
    x.copy_(x_new)                             # keeps x's channels_last strides
    g.replay()
    torch.cuda.synchronize()
    original = {"y": y.cpu().numpy()}          # logical NCHW order, as Buffer.to_numpy gives
    restored = restore_in_fresh_process(path, {"x": x_new.cpu().numpy()}, ["y"], "conv",
                                        tmp_path)
    assert restored["y"].shape == tuple(y.shape)
    assert_bit_equal(restored, original)


def test_transposed_slice_and_expanded_views(tmp_path):
    """out_slice = 2 * x.t() + bias.expand(...): a transposed input, an expanded input, and an
    output that is a slice of a larger tensor, each named as the view it is."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    base = torch.randn(64, 48, device="cuda")
    xt = base.t()                                    # (48, 64), strides (1, 48)
    bias = torch.randn(1, 64, device="cuda")
    be = bias.expand(48, 64)                         # strides (0, 1)
    big = torch.full((128, 96), 7.0, device="cuda")
    out = big[10:58, 20:84]                          # (48, 64), strides (96, 1)

    def step():
        torch.add(xt * 2.0, be, out=out)
        return out
    g, _ = _torch_graph(step)
    snap = cgsnap.snapshot(g, buffers={"xt": xt, "be": be, "out": out}, name="views")
    assert snap.region_by_name("xt").strides == (1, 48)
    assert snap.region_by_name("be").strides == (0, 1) and snap.region_by_name("be").size == 256
    ro = snap.region_by_name("out")
    assert ro.strides == (96, 1) and ro.size == (47 * 96 + 63 + 1) * 4
    path = tmp_path / "views.cgsnap"
    snap.save(path)
    xt_new = torch.randn(48, 64, device="cuda")
    row_new = torch.randn(1, 64, device="cuda")
    xt.copy_(xt_new)
    bias.copy_(row_new)
    g.replay()
    torch.cuda.synchronize()
    original = {"out": out.cpu().numpy()}
    inputs = {"xt": xt_new.cpu().numpy(), "be": row_new.expand(48, 64).cpu().numpy()}
    restored = restore_in_fresh_process(path, inputs, ["out"], "views", tmp_path)
    assert_bit_equal(restored, original)


TWO_VIEWS = r"""
import sys, numpy as np, cgsnap
path, graph, a, b, y, shape = sys.argv[1:7]
shape = tuple(int(n) for n in shape.split("x"))
new = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
with cgsnap.load(path) as r:
    r.buffer(a).copy_from(new)                  # written through one view ...
    through_b = r.buffer(b).to_numpy()          # ... read through the other
    r.graph(graph).launch()
    r.synchronize()
    out = r.buffer(y).to_numpy()
assert np.array_equal(through_b, new.T), "the two views do not share memory"
np.save(sys.argv[7], out)
assert "torch" not in sys.modules
print("two views ok")
"""


def _two_views_restore(path, graph, a, b, y, shape, tmp_path):
    res = tmp_path / "two_views.npy"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", TWO_VIEWS, str(path), graph, a, b, y,
                           "x".join(map(str, shape)), str(res)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return np.load(res)


def test_two_torch_views_of_one_storage(tmp_path):
    """x and x.t() named separately: after restore, writing x is what x.t() reads, and the
    graph (which reads x.t()) sees it."""
    torch = pytest.importorskip("torch")
    x = torch.randn(512, 1024, device="cuda")   # inside a caching-allocator segment
    xt = x.t()
    g, y = _torch_graph(lambda: xt * 3.0)
    snap = cgsnap.snapshot(g, buffers={"x": x, "xt": xt, "y": y}, name="tviews")
    rx, rxt = snap.region_by_name("x"), snap.region_by_name("xt")
    assert rx.parent is not None and rx.parent == rxt.parent
    assert rx.parent_offset == rxt.parent_offset
    path = tmp_path / "tviews.cgsnap"
    snap.save(path)
    new = np.random.default_rng(5).standard_normal((512, 1024)).astype(np.float32)
    x.copy_(torch.from_numpy(new))
    g.replay()
    torch.cuda.synchronize()
    out = _two_views_restore(path, "tviews", "x", "xt", "y", (512, 1024), tmp_path)
    assert np.array_equal(np.ascontiguousarray(out).view(np.uint8),
                          np.ascontiguousarray(y.cpu().numpy()).view(np.uint8))
    # cgsnap.torch gives back the same views, over the same memory.
    from cgsnap import torch as cgsnap_torch
    with cgsnap_torch.load(path) as graphs:
        tx, txt, ty = graphs.tensor("x"), graphs.tensor("xt"), graphs.tensor("y")
        assert txt.stride() == xt.stride() and ty.stride() == y.stride()
        assert txt.data_ptr() == tx.data_ptr()
        tx.copy_(torch.from_numpy(new))
        graphs["tviews"].replay()
        torch.cuda.synchronize()
        assert torch.equal(txt, tx.t()) and torch.equal(ty, y)


class CudaArray:
    """A device array described by __cuda_array_interface__ only (as Numba or CuPy give it)."""

    def __init__(self, ptr, shape, strides=None, typestr="<f4"):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape,
                                         "typestr": typestr, "strides": strides, "version": 3}


SCALE = r"""
extern "C" __global__ void scale_t(const float* a, float* y, int rows, int cols) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;     // y = 2 * a^T
    if (i < rows * cols) { int r = i / cols, c = i % cols; y[c * rows + r] = 2.0f * a[i]; }
}
"""


def test_two_views_spanning_one_whole_allocation(tmp_path):
    """Two names for one whole cuMemAlloc allocation (an array and its transpose, by
    __cuda_array_interface__): they share it after restore."""
    dev = driver.init(0)
    cubin, _ = compile_cubin(SCALE, dev.arch, "scale_t.cu")
    cgsnap.register_image(cubin, "nvrtc:scale_t.cu")
    lib = driver.library_load(cubin)
    func = driver.library_function(lib, "scale_t")
    rows, cols = 64, 96
    nbytes = rows * cols * 4
    a, y = driver.mem_alloc(nbytes), driver.mem_alloc(nbytes)
    try:
        driver.htod(a, np.random.default_rng(6).standard_normal(rows * cols, dtype=np.float32),
                    nbytes)
        stream = driver.stream_create()
        with cgsnap.capture(stream=stream) as cap:
            launch(func, rows * cols // 256, 256, [ctypes.c_uint64(a), ctypes.c_uint64(y),
                                                   ctypes.c_int(rows), ctypes.c_int(cols)],
                   stream)
        buffers = {"m": CudaArray(a, (rows, cols)),
                   "mt": CudaArray(a, (cols, rows), (4, 4 * cols)),
                   "y": CudaArray(y, (cols, rows))}
        snap = cgsnap.snapshot(cap, buffers=buffers, name="whole")
        rm, rmt = snap.region_by_name("m"), snap.region_by_name("mt")
        assert rmt.strides == (1, cols) and rm.strides is None
        assert rm.parent is not None and rm.parent == rmt.parent
        path = tmp_path / "whole.cgsnap"
        snap.save(path)
        new = np.random.default_rng(5).standard_normal((rows, cols)).astype(np.float32)
        out = _two_views_restore(path, "whole", "m", "mt", "y", (rows, cols), tmp_path)
        want = np.ascontiguousarray((2.0 * new.T).astype(np.float32))
        assert np.array_equal(np.ascontiguousarray(out).view(np.uint8), want.view(np.uint8))
    finally:
        driver.mem_free(a)
        driver.mem_free(y)
