"""``cgsnap demo``: the whole round trip on a real workload, or the bundled sample without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Package data, so that `pip install .` (not only an editable install) has a sample to show.
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample.cgsnap")

NVRTC_SOURCE = r"""
extern "C" __global__ void scale_add(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
extern "C" __global__ void square(float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = y[i] * y[i];
}
"""


def _gpu_available() -> bool:
    try:
        from ..cuda import driver
        driver.init(0)
        return True
    except Exception:
        return False


def torch_mlp(batch: int = 8, width: int = 256, seed: int = 0):
    """A torch Linear -> GELU -> Linear -> LayerNorm graph: ``(graph, buffers, make_input)``."""
    import torch

    import cgsnap
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width), torch.nn.LayerNorm(width)).cuda()
    x = torch.randn(batch, width, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g), torch.no_grad():
        y = model(x)
    torch.cuda.synchronize()
    return g, {"model": cgsnap.Saved(model), "x": x, "y": y}, (model, x, y)


def nvrtc_workload(n: int = 1 << 20):
    """Two NVRTC-compiled kernels captured with cgsnap.capture(): ``(capture, buffers)``."""
    import cgsnap
    from ..cuda import driver
    from ..cuda.nvrtc import compile_cubin
    dev = driver.init(0)
    cubin, _ = compile_cubin(NVRTC_SOURCE, dev.arch, "demo.cu")
    cgsnap.register_image(cubin, source="nvrtc:demo.cu")
    lib = driver.library_load(cubin)
    f_scale, f_square = (driver.library_function(lib, k) for k in ("scale_add", "square"))
    x, y = driver.mem_alloc(4 * n), driver.mem_alloc(4 * n)
    rng = np.random.default_rng(0)
    driver.htod(x, rng.standard_normal(n, dtype=np.float32), 4 * n)
    driver.htod(y, rng.standard_normal(n, dtype=np.float32), 4 * n)
    import ctypes
    with cgsnap.capture() as cap:
        for func, args in ((f_scale, [ctypes.c_uint64(x), ctypes.c_uint64(y), ctypes.c_float(2.0),
                                      ctypes.c_int(n)]),
                           (f_square, [ctypes.c_uint64(y), ctypes.c_int(n)])):
            driver.launch_kernel(func, ((n + 255) // 256, 1, 1), (256, 1, 1), 0, cap.stream, args)
    return cap, {"x": (x, 4 * n), "y": (y, 4 * n)}


def run_demo(keep=None) -> int:
    from . import render
    if not _gpu_available():
        print("cgsnap demo: no CUDA GPU here, so nothing can be captured or replayed.")
        print(f"Showing the bundled snapshot instead ({SAMPLE}), captured on a GPU:\n")
        from ..format.snapfile import read
        snap, f = read(SAMPLE)
        with f:
            sys.stdout.write(render.info_text(render.info_dict(snap, f.blobs, f.version, SAMPLE)))
        print()
        sys.stdout.write(render.show_text(snap))
        return 0
    import cgsnap
    cgsnap.start_recorder()
    t0 = time.perf_counter()
    try:
        import torch  # noqa: F401
        graph, buffers, _keep = torch_mlp()
        workload = "torch MLP (Linear 256->1024, GELU, Linear 1024->256, LayerNorm), batch 8"
    except ImportError:
        graph, buffers = nvrtc_workload()
        workload = "two NVRTC kernels (scale_add, square) on 1M floats"
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    snap = cgsnap.snapshot(graph, buffers=buffers, name="demo")
    t_snap = time.perf_counter() - t0
    out_dir = keep or tempfile.mkdtemp(prefix="cgsnap-demo-")
    path = os.path.join(out_dir, "demo.cgsnap")
    t0 = time.perf_counter()
    snap.save(path, compress=True)
    t_save = time.perf_counter() - t0
    info = render.info_dict(snap)
    g = info["graphs"][0]
    print(f"workload  {workload}")
    print(f"graph     {g['nodes']} nodes, {len(snap.kernels)} kernels, {g['refs']} pointer refs; "
          f"file {os.path.getsize(path) / 1e6:.2f} MB at {path}")
    print(f"times     build+capture {t_capture * 1e3:.0f} ms, snapshot {t_snap * 1e3:.0f} ms, "
          f"save {t_save * 1e3:.0f} ms")
    print("restoring in a fresh process (python -m cgsnap replay --check) ...")
    proc = subprocess.run([sys.executable, "-m", "cgsnap", "replay", path, "--check"],
                          capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    print("demo: " + ("PASS: the restored graph computed bit-identical outputs" if proc.returncode == 0
                      else "FAIL"))
    return 0 if proc.returncode == 0 else 1
