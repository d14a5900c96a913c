"""Capture side of tests/gpu/test_gpu_kernel_identity.py: one scenario per fresh process (the
recorder must start before the kernels load; CUDA_MODULE_LOADING must be set before cuInit).

usage: identity_worker.py SCENARIO OUTDIR [OPTIONS_JSON]

Writes OUTDIR/report.json (what the test asserts on, and measurements it prints), and for
scenarios that snapshot: OUTDIR/snap.cgsnap, OUTDIR/inputs.npz (fresh inputs for the restored
graph) and OUTDIR/expected.npz (what the original graph computed from those inputs)."""
from __future__ import annotations

import ctypes
import json
import os
import sys
import traceback

import numpy as np

import cgsnap     # first: with CGSNAP_RECORD=1 this starts the recorder before anything loads
from cgsnap.cuda import driver
from cgsnap.cuda.driver import call, cu
from cgsnap.format.hashing import content_hash
from cgsnap.kernels import cupti

N = 4096
MUL = r"""
extern "C" __global__ void k(float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = y[i] * FACTOR;
}
"""
# Same name and parameters, with static shared memory: y[i] = y[i ^ 1] * FACTOR.
SHARED = r"""
extern "C" __global__ void k(float* y, int n) {
    __shared__ float tile[256];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? y[i] : 0.0f;
    __syncthreads();
    if (i < n) y[i] = tile[threadIdx.x ^ 1] * FACTOR;
}
"""


def nvrtc_cubin(source: str, factor: str, arch: int) -> bytes:
    from cuda.bindings import nvrtc

    def nv(res):
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC: {res[0]}")
        return res[1] if len(res) > 1 else None
    prog = nv(nvrtc.nvrtcCreateProgram(source.encode(), b"k.cu", 0, [], []))
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), f"-DFACTOR={factor}".encode()]
        if nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = b" " * nv(nvrtc.nvrtcGetProgramLogSize(prog))
            nv(nvrtc.nvrtcGetProgramLog(prog, log))
            raise RuntimeError(log.decode())
        cubin = b" " * nv(nvrtc.nvrtcGetCUBINSize(prog))
        nv(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def launch(func, grid, block, args, stream):
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    call(cu.cuLaunchKernel, func, grid, 1, 1, block, 1, 1, 0, stream, ctypes.addressof(ptrs), 0)


def read(ptr: int, nbytes: int) -> np.ndarray:
    out = np.empty(nbytes // 4, dtype=np.float32)
    driver.dtoh(int(out.ctypes.data), ptr, nbytes)
    return out


def recorder_report() -> dict:
    rec = cupti.recorder()
    if rec is None:
        return {}
    rec.sync()
    t = rec.loads
    return {"active": rec.active, "tracking": rec.tracking, "launches": rec.track_launches,
            "callback_errors": rec.callback_errors, "calls": dict(rec.calls),
            "images": len(rec.images), "recorded_bytes": rec.recorded_bytes,
            "copied_input_bytes": rec.copied_bytes, "modules": len(t.modules),
            "libraries": len(t.libraries), "kernels": len(t.kernels),
            "unattributed_cubins": t.unattributed,
            "library_inputs": sorted({(r.input.format if r.input else "none",
                                       "preserved" if r.input and r.input.preserved else
                                       "copied" if r.input and r.input.data is not None else
                                       "referenced" if r.input and r.input.address else "not kept")
                                      for r in t.libraries.values()}),
            "libraries_with_eager_cubins": sum(1 for r in t.libraries.values() if r.eager),
            "libraries_with_lazy_cubins": sum(1 for r in t.libraries.values() if r.lazy)}


def kernel_report(snap) -> list:
    images = {im.hash: im for im in snap.images}
    return [{"name": k.name, "image": k.image, "source": images[k.image].source}
            for k in snap.kernels]


def same_named_images(snap) -> dict:
    """For each kernel name of the snapshot: how many different recorded cubins hold it."""
    from cgsnap.kernels import registry
    src = registry._recorder_source
    if src is None:
        return {}
    src.sync()
    return {k.name: len(src.index.find(k.name)) for k in snap.kernels}


# ---- scenarios --------------------------------------------------------------------------------

def handles(out: str, opts: dict, report: dict) -> None:
    """The recorder's handle associations for one module load and one library load."""
    rec = cupti.recorder()
    assert rec is not None and rec.active, "run with CGSNAP_RECORD=1"
    dev = driver.init(0)
    cubin = nvrtc_cubin(MUL, "2.0f", dev.arch)
    h = content_hash(cubin)
    report["cubin_hash"] = h
    mod = call(cu.cuModuleLoadData, cubin)
    func = call(cu.cuModuleGetFunction, mod, b"k")
    lib = driver.library_load(cubin)
    kern = call(cu.cuLibraryGetKernel, lib, b"k")
    lfunc = call(cu.cuKernelGetFunction, kern)
    rec.sync()
    t = rec.loads
    m, lb = t.modules.get(int(mod)), t.libraries.get(int(lib))
    report["module"] = None if m is None else {
        "api": m.api, "eager": m.eager, "lazy": m.lazy,
        "input": m.input.format if m.input else None,
        "input_kept": bool(m.input and m.input.data is not None)}
    report["module_function"] = t.module_functions.get(int(func)) == int(mod)
    report["library"] = None if lb is None else {
        "api": lb.api, "eager": lb.eager, "lazy": lb.lazy,
        "input": lb.input.format if lb.input else None,
        "input_is_the_cubin": bool(lb.input and lb.input.data == cubin)}
    report["kernel"] = list(t.kernels.get(int(kern), ()))
    report["function"] = list(t.functions.get(int(lfunc), ()))[:1]
    report["ids"] = {"module": int(mod), "library": int(lib), "kernel": int(kern)}
    report["delivered_equals_input"] = h in rec.images
    call(cu.cuModuleUnload, mod)
    driver.library_unload(lib)
    rec.sync()
    report["after_unload"] = {"module": int(mod) in t.modules, "library": int(lib) in t.libraries,
                              "kernel": int(kern) in t.kernels,
                              "function": int(lfunc) in t.functions}
    report["recorder"] = recorder_report()


def nvrtc_pair(out: str, opts: dict, report: dict) -> None:
    """Two NVRTC modules each defining k(float*, int) with different code, launched into one
    captured graph (see the test for the options)."""
    dev = driver.init(0)
    loader = opts.get("loader", "module")
    ca = nvrtc_cubin(MUL, "2.0f", dev.arch)
    cb = nvrtc_cubin(SHARED if opts.get("variant") == "shared" else MUL, "3.0f", dev.arch)
    report["hashes"] = [content_hash(ca), content_hash(cb)]
    if opts.get("register"):
        cgsnap.register_image(ca, "nvrtc:A")
        cgsnap.register_image(cb, "nvrtc:B")
    funcs, attrs = [], []
    for cubin in (ca, cb):
        if loader == "module":
            mod = call(cu.cuModuleLoadData, cubin)
            f = call(cu.cuModuleGetFunction, mod, b"k")
            attrs.append(driver.function_identity(f))
        else:
            lib = driver.library_load(cubin)
            kern = call(cu.cuLibraryGetKernel, lib, b"k")
            if loader == "library":
                f = call(cu.cuKernelGetFunction, kern)
                attrs.append(driver.function_identity(f))
            else:                               # launch the CUkernel itself, cast
                f = cu.CUfunction(int(kern))
        funcs.append(f)
    report["attrs"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in a.items()}
                       for a in attrs]
    nb = N * 4
    ya, yb = driver.mem_alloc(nb), driver.mem_alloc(nb)
    rng = np.random.default_rng(11)
    for p in (ya, yb):
        driver.htod(p, rng.standard_normal(N, dtype=np.float32), nb)
    stream = driver.stream_create()
    with cgsnap.capture(stream=stream) as cap:
        for f, y in zip(funcs, (ya, yb)):
            launch(f, N // 256, 256, [ctypes.c_uint64(y), ctypes.c_int(N)], stream)
    buffers = {"ya": (ya, nb), "yb": (yb, nb)}
    try:
        snap = cgsnap.snapshot(cap, buffers=buffers, name="ident")
    except cgsnap.AmbiguousKernelError as exc:
        report["ambiguous"] = str(exc)
        return
    report["kernels"] = kernel_report(snap)
    snap.save(os.path.join(out, "snap.cgsnap"))
    xa, xb = rng.standard_normal(N, dtype=np.float32), rng.standard_normal(N, dtype=np.float32)
    driver.htod(ya, xa, nb)
    driver.htod(yb, xb, nb)
    exe = call(cu.cuGraphInstantiate, cap.graph, 0)
    call(cu.cuGraphLaunch, exe, cu.CUstream(0))
    driver.ctx_sync()
    got_a, got_b = read(ya, nb), read(yb, nb)
    want_b = (xb[np.arange(N) ^ 1] if opts.get("variant") == "shared" else xb) * np.float32(3)
    report["host_check"] = bool(np.array_equal(got_a, xa * np.float32(2)) and
                                np.array_equal(got_b, want_b))
    np.savez(os.path.join(out, "inputs.npz"), ya=xa, yb=xb)
    np.savez(os.path.join(out, "expected.npz"), ya=got_a, yb=got_b)
    report["recorder"] = recorder_report()


def _torch_graph(build, out: str, report: dict, names: list) -> None:
    """Warm up ``build()`` (which returns (inputs dict, fn)), capture fn in a torch CUDA graph,
    snapshot it, and write fresh inputs and the original's outputs for them."""
    import torch
    inputs, fn = build()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph(keep_graph=True)
    try:
        with torch.cuda.graph(g):
            y = fn()
    except Exception as exc:        # not cgsnap's: the workload cannot be captured here
        report["skip"] = f"the workload could not be captured in a CUDA graph: {exc!r}"
        return
    torch.cuda.synchronize()
    buffers = dict(inputs, y=y)
    snap = cgsnap.snapshot(g, buffers=buffers, name="torch")
    report["kernels"] = kernel_report(snap)
    report["same_named_images"] = same_named_images(snap)
    snap.save(os.path.join(out, "snap.cgsnap"))
    fresh = {}
    for name in names:
        t = inputs[name]
        new = torch.randn(t.shape, device=t.device, dtype=torch.float32).to(t.dtype)
        t.copy_(new)
        fresh[name] = new.view(torch.uint8).cpu().numpy() if new.dtype == torch.bfloat16 \
            else new.cpu().numpy()
    g.replay()
    torch.cuda.synchronize()
    result = y.view(torch.uint8) if y.dtype == torch.bfloat16 else y
    np.savez(os.path.join(out, "inputs.npz"), **fresh)
    np.savez(os.path.join(out, "expected.npz"), y=result.cpu().numpy())
    report["recorder"] = recorder_report()


def compiled(out: str, opts: dict, report: dict) -> None:
    """torch.compile max-autotune of relu(x @ w + b) in fp16, Triton templates only: autotuning
    loads one module per candidate configuration, all holding the same kernel name."""
    import torch
    import torch._inductor.config as icfg
    icfg.max_autotune_gemm_backends = "TRITON"
    torch.manual_seed(0)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    w = torch.randn(128, 64, device="cuda", dtype=torch.float16)
    b = torch.randn(64, device="cuda", dtype=torch.float16)
    # "max-autotune" would also wrap the call in inductor's own CUDA graphs; the capture below
    # is ours, so the same autotuning without them.
    cf = torch.compile(lambda x, w, b: torch.relu(x @ w + b), mode="max-autotune-no-cudagraphs")

    def build():
        return {"x": x, "w": w, "b": b}, lambda: cf(x, w, b)
    _torch_graph(build, out, report, ["x"])


def sdpa(out: str, opts: dict, report: dict) -> None:
    """Scaled dot-product attention on cuDNN's backend in bf16 (runtime-compiled kernels)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ctx = sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    ctx.__enter__()
    try:
        F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
    except Exception as exc:
        report["skip"] = f"cuDNN attention is not available here: {exc!r}"
        return

    # A named buffer must be contiguous, and cuDNN's output need not be: copy it into one.
    y = torch.empty_like(q)

    def build():
        return {"q": q, "k": k, "v": v}, lambda: y.copy_(F.scaled_dot_product_attention(q, k, v))
    _torch_graph(build, out, report, ["q", "k", "v"])


def torch_calls(out: str, opts: dict, report: dict) -> None:
    """How many tracked driver calls eager torch makes per launch once warm: the recorder's
    callback must stay off the launch path."""
    import torch
    rec = cupti.recorder()
    x = torch.randn(256, 256, device="cuda")
    w = torch.randn(256, 256, device="cuda")
    ln = torch.nn.LayerNorm(256).cuda()

    def step():
        y = torch.nn.functional.gelu(x @ w)
        return ln(y + 1).sum()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    before = dict(rec.calls)
    launches = 0
    for _ in range(500):
        step()
        launches += 5
    torch.cuda.synchronize()
    report["launches"] = launches
    report["tracked_calls_during"] = {k: v - before.get(k, 0) for k, v in rec.calls.items()
                                      if v != before.get(k, 0)}
    report["recorder"] = recorder_report()


SCENARIOS = {"handles": handles, "nvrtc": nvrtc_pair, "compile": compiled, "sdpa": sdpa,
             "torch_calls": torch_calls}


def main() -> int:
    scenario, out = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    report = {"scenario": scenario, "opts": opts,
              "module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default)")}
    rc = 0
    try:
        SCENARIOS[scenario](out, opts, report)
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        rc = 1
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in report.items() if k != "traceback"}, default=str)[:4000])
    if rc:
        print(report["traceback"], file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
