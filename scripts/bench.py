"""cgsnap benchmarks on a GPU machine: cold start vs recapture, per-node rebuild cost vs a native
C++ loop, region save/restore vs pinned copy bandwidth, replay parity, kernel lookup, and a
compiled serving model's 67 batch-size graphs (``serving``: compile + capture vs restore).

usage: python scripts/bench.py [--out bench.json] [--only cold,nodes,memory,parity,lookup,io,size]
                               [--memory-gb 1,4,16] [--io-gb 4] [--nodes 10000] [--layers N]
       python scripts/bench.py --only serving [--quick] [--layers 32] [--hidden 2048]
                               [--sizes default] [--serving-budget 420]
Prints a table last. Not a test: numbers go to docs/PERFORMANCE.md with card, date and command."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "warm_restart")
sys.path.insert(0, ROOT)
RESULTS: list = []


def row(section, what, value, unit, goal=""):
    RESULTS.append({"section": section, "what": what, "value": value, "unit": unit, "goal": goal})
    print(f"  {section:<8} {what:<52} {value:>12.3f} {unit:<6} {goal}", flush=True)


def env_with(extra=None):
    return dict(os.environ, PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join([ROOT, EXAMPLE,
                                                        os.environ.get("PYTHONPATH", "")]),
                **(extra or {}))


def _keep_failure(directory: str, label: str, log: str) -> None:
    """A restore that failed: keep the capture that made it (file, reference outputs, log) for
    offline analysis -- in $CGSNAP_TEST_ARTIFACTS (scripts/gpu_suite.sh sets it to $OUT)."""
    keep = os.environ.get("CGSNAP_TEST_ARTIFACTS")
    if not keep:
        return
    dest = os.path.join(keep, f"failed-{label}-{int(time.time())}")
    shutil.copytree(directory, dest, dirs_exist_ok=True)
    with open(os.path.join(dest, "restore.log"), "w") as fh:
        fh.write(log)
    print(f"  kept the failing capture in {dest}")


def timings_of(stdout: str) -> dict:
    m = re.search(r"^TIMINGS (.*)$", stdout, re.M)
    if not m:
        raise RuntimeError("no TIMINGS line in:\n" + stdout)
    return json.loads(m.group(1))


# ---- 1. cold start ------------------------------------------------------------------------

def bench_cold(layers: int):
    out = tempfile.mkdtemp(prefix="cgsnap-bench-cold-")
    env = env_with({"WARM_LAYERS": str(layers)})
    caps, rests = [], []
    for _ in range(3):
        p = subprocess.run([sys.executable, os.path.join(EXAMPLE, "save_graphs.py"), out],
                           capture_output=True, text=True, env=env, timeout=600)
        if p.returncode:
            raise RuntimeError(p.stdout + p.stderr)
        caps.append(timings_of(p.stdout))
        p = subprocess.run([sys.executable, os.path.join(EXAMPLE, "restore_graphs.py"), out],
                           capture_output=True, text=True, env=env, timeout=600)
        if p.returncode:
            _keep_failure(out, f"cold{layers}L", p.stdout + p.stderr)
            raise RuntimeError(p.stdout + p.stderr)
        rests.append(timings_of(p.stdout))
    med = lambda xs, k: statistics.median(x.get(k, 0.0) for x in xs)  # noqa: E731
    sec = f"cold{layers}L"
    row(sec, "(a) import torch + cgsnap", med(caps, "import"), "s")
    row(sec, "(a) build model", med(caps, "model"), "s")
    row(sec, "(a) warm-up + capture 7 graphs", med(caps, "capture"), "s")
    row(sec, "(b) import", med(rests, "import"), "s")
    row(sec, "(b) build model", med(rests, "model") * 1e3, "ms")
    for k in ("read", "read.open", "read.validate", "read.images", "read.bind", "read.plans",
              "alloc", "kernels", "copy", "build", "instantiate"):
        row(sec, f"(b) {k}", med(rests, k) * 1e3, "ms")
    row(sec, "(b) cgsnap.load() total (Restored.__init__)", med(rests, "init") * 1e3, "ms")
    row(sec, "(b) cgsnap.torch.load() total", med(rests, "load") * 1e3, "ms")
    graph_b = med(rests, "load") + med(rests, "build") + med(rests, "instantiate")
    row(sec, "(b) graph part: load + bind + node add + instantiate", graph_b * 1e3, "ms")
    row(sec, "(b) first replay of all 7 (incl. lazy build)", med(rests, "first_replays") * 1e3, "ms")
    row(sec, "speed-up of the graph part: capture / restore", med(caps, "capture") / graph_b, "x",
        "goal >= 100x")
    row(sec, "file size", med(caps, "file_bytes") / 1e6, "MB")
    shutil.rmtree(out, ignore_errors=True)


# ---- 2. node rebuild cost -----------------------------------------------------------------

NODE_KERNEL = r"""
struct Params { const float* a; const float* b; float* c; long long n; float alpha; int flags; };
extern "C" __global__ void node_kernel(Params p, const float* extra0, float* extra1, int k) {
    if (threadIdx.x == 0 && p.flags < 0) extra1[0] = p.alpha * p.a[0] + extra0[k];
}
"""

NATIVE_CPP = r"""
#include <cuda.h>
#include <chrono>
#include <cstdio>
#include <vector>
#include <fstream>
#include <iterator>
#define CK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { printf("err %d line %d\n", r, __LINE__); return 1; } } while (0)
struct Params { const float* a; const float* b; float* c; long long n; float alpha; int flags; };
int main(int argc, char** argv) {
  int n = atoi(argv[2]);
  std::ifstream f(argv[1], std::ios::binary);
  std::vector<char> img((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CK(cuInit(0)); CUdevice dev; CK(cuDeviceGet(&dev, 0)); CUcontext ctx;
  CK(cuDevicePrimaryCtxRetain(&ctx, dev)); CK(cuCtxSetCurrent(ctx));
  CUlibrary lib; CK(cuLibraryLoadData(&lib, img.data(), 0, 0, 0, 0, 0, 0));
  CUkernel k; CK(cuLibraryGetKernel(&k, lib, "node_kernel")); CUfunction fn; CK(cuKernelGetFunction(&fn, k));
  CUdeviceptr buf; CK(cuMemAlloc(&buf, 1 << 20));
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    CUgraph g; CK(cuGraphCreate(&g, 0));
    std::vector<Params> ps(n); std::vector<CUdeviceptr> e0(n), e1(n); std::vector<int> ks(n);
    std::vector<void*> args(4 * n);
    for (int i = 0; i < n; ++i) {
      ps[i] = Params{(const float*)(buf + 64 * (i % 100)), (const float*)buf, (float*)buf, i, 1.0f, 0};
      e0[i] = buf + 8 * i % 4096; e1[i] = buf; ks[i] = i;
      args[4*i] = &ps[i]; args[4*i+1] = &e0[i]; args[4*i+2] = &e1[i]; args[4*i+3] = &ks[i];
    }
    auto t0 = std::chrono::steady_clock::now();
    CUgraphNode prev = nullptr;
    for (int i = 0; i < n; ++i) {
      CUDA_KERNEL_NODE_PARAMS p = {};
      p.func = fn; p.gridDimX = p.gridDimY = p.gridDimZ = 1; p.blockDimX = 32; p.blockDimY = p.blockDimZ = 1;
      p.kernelParams = &args[4 * i];
      CUgraphNode node;
      CK(cuGraphAddKernelNode(&node, g, prev ? &prev : nullptr, prev ? 1 : 0, &p));
      prev = node;
    }
    auto t1 = std::chrono::steady_clock::now();
    double us = std::chrono::duration<double, std::micro>(t1 - t0).count() / n;
    if (us < best) best = us;
    CK(cuGraphDestroy(g));
  }
  printf("NATIVE_US_PER_NODE %.4f\n", best);
  return 0;
}
"""


def bench_nodes(n: int):
    import numpy as np

    import cgsnap
    from cgsnap.cuda import driver
    from cgsnap.format.hashing import content_hash
    from cgsnap.format.model import (Arg, Edge, Graph, Kernel, KernelImage, KernelNode, Policy, Ref,
                                     Region, RegionKind, Snapshot)
    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    from workloads import nvrtc_compile
    dev = driver.init(0)
    cubin, _ = _compile_node_kernel(nvrtc_compile, dev.arch)
    h = content_hash(cubin)
    params = ((0, 40), (40, 8), (48, 8), (56, 4))
    kernel = Kernel(0, "node_kernel", h, params, {})
    nodes = []
    for i in range(n):
        p = bytearray(40)
        p[24:32] = int(i).to_bytes(8, "little")
        p[32:36] = np.float32(1.0).tobytes()
        nodes.append(KernelNode.from_args(i, 0, (1, 1, 1), (32, 1, 1), 0, (
            Arg(bytes(p), ((0, Ref(0, 64 * (i % 100))), (8, Ref(0, 0)), (16, Ref(0, 0)))),
            Arg(bytes(8), ((0, Ref(0, 8 * i % 4096)),)), Arg(bytes(8), ((0, Ref(0, 0)),)),
            Arg(int(i).to_bytes(4, "little"))), params))
    edges = [Edge(i, i + 1) for i in range(n - 1)]
    data = np.zeros(1 << 20, dtype=np.uint8)
    snap = Snapshot(graphs=[Graph("chain", nodes, edges)],
                    regions=[Region(0, RegionKind.ALLOCATION, 1 << 20, Policy.SAVED, data=data,
                                    content_hash=content_hash(data))],
                    images=[KernelImage(h, "cubin", dev.arch, ("node_kernel",), cubin, "nvrtc")],
                    kernels=[kernel], device=dev.describe())
    tmp = tempfile.mkdtemp(prefix="cgsnap-bench-nodes-")
    path = os.path.join(tmp, "nodes.cgsnap")
    snap.save(path)
    best_build, best_inst = 1e9, 1e9
    for _ in range(5):
        with cgsnap.load(path) as r:
            r.graph("chain").instantiate()
            best_build = min(best_build, r.timings["build"])
            best_inst = min(best_inst, r.timings["instantiate"])
    us = best_build / n * 1e6
    row("nodes", f"cgsnap node add ({n} kernel nodes), per node", us, "us", "goal <= 5 us")
    row("nodes", "cgsnap instantiate, per node", best_inst / n * 1e6, "us")
    native = _native_us_per_node(cubin, n, tmp)
    if native:
        row("nodes", "native C++ cuGraphAddKernelNode loop, per node", native, "us")
        row("nodes", "cgsnap / native", us / native, "x", "goal <= 3x")
    shutil.rmtree(tmp, ignore_errors=True)


def _compile_node_kernel(nvrtc_compile, arch):
    src = NODE_KERNEL + "\ntemplate <typename T> __global__ void add_into(T*, const T*, int) {}\n" \
        "template __global__ void add_into<float>(float*, const float*, int);\n"
    return nvrtc_compile(src, arch)


def _native_us_per_node(cubin: bytes, n: int, tmp: str):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        print("  (no nvcc: native floor skipped)")
        return None
    src, exe, img = (os.path.join(tmp, x) for x in ("native.cpp", "native", "node.cubin"))
    with open(src, "w") as f:
        f.write(NATIVE_CPP)
    with open(img, "wb") as f:
        f.write(cubin)
    subprocess.run([nvcc, "-O2", "-o", exe, src, "-lcuda"], check=True, capture_output=True)
    p = subprocess.run([exe, img, str(n)], capture_output=True, text=True, timeout=120)
    m = re.search(r"NATIVE_US_PER_NODE ([\d.]+)", p.stdout)
    return float(m.group(1)) if m else None


# ---- 3. memory ----------------------------------------------------------------------------

def _probes():
    sys.path.insert(0, os.path.join(ROOT, "scripts", "probes"))
    import disk_probe
    return disk_probe


def _fill_random(ptr: int, size: int) -> None:
    """Random-looking device contents (zeros or a repeated float would be compressed away by
    compress='auto' and measure zstd, not the transfer paths): a 64 MiB random block copied
    over the range."""
    import numpy as np

    from cgsnap.cuda import driver
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    pinned = driver.host_alloc(block.nbytes)
    driver.host_view(pinned, block.nbytes)[:] = block.tobytes()
    for off in range(0, size, block.nbytes):
        driver.htod(ptr + off, pinned, min(block.nbytes, size - off))
    driver.ctx_sync()
    driver.host_free(pinned)


def bench_memory(sizes_gb, host_hold_up_to_gb: float = 4):
    """Each path of a large saved region beside its ceiling, measured in the same run: pinned
    copies both ways (the link), the disk's sequential write (buffered + one fsync, and
    O_DIRECT) and read (O_DIRECT), then per size: snapshot (device copy + scan through the
    pinned ring), snapshot into host memory (hold='host', the old path), save, restore from a
    warm page cache verified and unverified, and from a cold one."""
    import cgsnap
    from cgsnap.cuda import driver, transfer
    from cgsnap.cuda.driver import call, cu
    from cgsnap.restore.restored import Restored
    driver.init(0)
    probe = 1 << 30
    host = driver.host_alloc(probe)
    dbuf = driver.mem_alloc(probe)
    pinned = {}
    for direction in ("H2D", "D2H"):
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            (driver.htod(dbuf, host, probe) if direction == "H2D" else driver.dtoh(host, dbuf, probe))
            best = min(best, time.perf_counter() - t)
        pinned[direction] = probe / best / 1e9
        row("memory", f"pinned {direction} copy bandwidth (1 GiB)", pinned[direction], "GB/s")
    driver.host_free(host)
    driver.mem_free(dbuf)
    tmp = tempfile.mkdtemp(prefix="cgsnap-bench-mem-", dir=os.environ.get("BENCH_DIR"))
    disk_probe = _probes()
    # One snapshot first: the pinned staging ring (8 x 64 MiB) is allocated once per process
    # (0.1 s per 256 MiB) and kept; the figures below are for a process that has saved before.
    warm_size = 512 << 20
    warm = driver.mem_alloc(warm_size)
    _fill_random(warm, warm_size)
    with cgsnap.capture() as cap:
        call(cu.cuMemsetD8Async, warm, 7, 256, cap.stream)
    t = time.perf_counter()
    cgsnap.snapshot(cap, buffers={"w": (warm, warm_size)}, record_outputs=False,
                    memory_pointers="off").save(os.path.join(tmp, "warm.cgsnap"))
    row("memory", "first 512 MiB snapshot + save of the process (allocates the ring)",
        time.perf_counter() - t, "s")
    cap.close()
    driver.mem_free(warm)
    for gb in sizes_gb:
        size = int(gb * (1 << 30))
        disk = disk_probe.measure(tmp, size)
        disk_write = max(v for v in (disk["write_buffered_fsync"], disk["write_direct"]) if v)
        row("memory", f"{gb} GiB: disk write, buffered + one fsync", disk["write_buffered_fsync"], "GB/s")
        if disk["write_direct"]:
            row("memory", f"{gb} GiB: disk write, O_DIRECT", disk["write_direct"], "GB/s")
        if disk["read_direct"]:
            row("memory", f"{gb} GiB: disk read, O_DIRECT", disk["read_direct"], "GB/s")
        ptr = driver.mem_alloc(size)
        _fill_random(ptr, size)
        with cgsnap.capture() as cap:
            call(cu.cuMemsetD8Async, ptr, 7, 256, cap.stream)
        # The buffer holds random bytes named without a dtype; the memory rows measure the
        # transfer paths, so the scan for stored pointers (memory_pointers='follow', which
        # reads every saved byte of such a buffer into host memory) is off but in one row.
        big = {"big": (ptr, size)}

        def snapshot_row(what: str, **options) -> None:
            t = time.perf_counter()
            snap = cgsnap.snapshot(cap, buffers=big, record_outputs=False, **options)
            row("memory", f"{gb} GiB: {what}", size / (time.perf_counter() - t) / 1e9, "GB/s")
            del snap
        if gb <= host_hold_up_to_gb:
            snapshot_row("snapshot into host memory (hold='host', before)", hold="host",
                         memory_pointers="off")
        if gb == sizes_gb[0]:
            snapshot_row("snapshot with the stored-pointer scan (memory_pointers='follow')")
        snapshot_row("snapshot, hold='live' (device -> pinned, hashed; no copy)", hold="live",
                     memory_pointers="off")
        if gb == sizes_gb[-1]:
            # The scan's knobs (hash threads x pinned slots), each setting run twice: the
            # first run of a larger ring allocates its new pinned slots.
            saved_env = {k: os.environ.get(k) for k in ("CGSNAP_HASH_THREADS", "CGSNAP_SCAN_RING")}
            try:
                for threads, slots in ((8, 8), (12, 12), (16, 8), (16, 16)):
                    os.environ["CGSNAP_HASH_THREADS"] = str(threads)
                    os.environ["CGSNAP_SCAN_RING"] = str(slots)
                    for attempt in ("first", "again"):
                        snapshot_row(f"snapshot, hold='live', {threads} hash threads, {slots} "
                                     f"slots ({attempt})", hold="live", memory_pointers="off")
            finally:
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        t = time.perf_counter()
        snap = cgsnap.snapshot(cap, buffers=big, record_outputs=False, memory_pointers="off")
        t_snap = time.perf_counter() - t
        path = os.path.join(tmp, f"mem{gb}.cgsnap")
        t = time.perf_counter()
        snap.save(path)
        t_save = time.perf_counter() - t
        del snap
        cap.close()
        driver.mem_free(ptr)
        row("memory", f"{gb} GiB: snapshot (device copy, then device -> pinned, hashed)",
            size / t_snap / 1e9, "GB/s",
            f"goal >= {0.8 * pinned['D2H']:.1f} (80% of pinned D2H)")
        row("memory", f"{gb} GiB: save (device -> pinned -> file, one fsync)", size / t_save / 1e9,
            "GB/s", f"goal >= {0.8 * disk_write:.2f} (80% of disk write)")
        for label in ("warm", "warm, unverified", "cold"):
            if label == "cold":
                if not _drop_caches(path):
                    continue
            t = time.perf_counter()
            with Restored(path, verify_blobs=label != "warm, unverified") as r:
                copy = r.timings["copy"]
            total = time.perf_counter() - t
            goal = {"warm": f"goal >= {0.8 * pinned['H2D']:.1f} (80% of pinned H2D)",
                    "cold": f"disk read {disk['read_direct'] or 0:.2f}"}.get(label, "")
            row("memory", f"{gb} GiB: restore copy, {label} page cache", size / copy / 1e9, "GB/s",
                goal)
            row("memory", f"{gb} GiB: whole load, {label} page cache", total, "s")
        os.unlink(path)
    transfer.release_pinned_cache()
    shutil.rmtree(tmp, ignore_errors=True)


def _drop_caches(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def bench_io(gb: float = 4):
    """Where restore bandwidth goes: pread into pinned memory with 1..16 threads, and DMA
    straight from the file's page cache after cuMemHostRegister of its mapping."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from cgsnap.cuda import driver
    from cgsnap.cuda.driver import call, cu
    driver.init(0)
    size = int(gb * (1 << 30))
    tmp = tempfile.mkdtemp(prefix="cgsnap-bench-io-", dir=os.environ.get("BENCH_DIR"))
    path = os.path.join(tmp, "io.bin")
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        for _ in range(size // block.nbytes):
            f.write(block)
    chunk = 64 << 20
    pinned = driver.host_alloc(chunk)
    fd = os.open(path, os.O_RDONLY)
    for threads in (1, 4, 8, 16):
        pool = ThreadPoolExecutor(threads)
        t = time.perf_counter()
        for off in range(0, size, chunk):
            def read(p, off=off):
                os.preadv(fd, [driver.host_view(pinned + p, 4 << 20)], off + p)
            list(pool.map(read, range(0, chunk, 4 << 20)))
        row("io", f"pread page cache -> pinned, {threads} threads", size / (time.perf_counter() - t) / 1e9,
            "GB/s")
        pool.shutdown()
    dev = driver.mem_alloc(size)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    addr = int(np.frombuffer(mm, dtype=np.uint8).ctypes.data)
    # What verifying costs: the blob checksum's 64 MiB pieces hashed from the page cache.
    from cgsnap.format.hashing import piece_digest
    pages = memoryview(mm)

    def digest(o, pages=pages):
        return piece_digest(pages[o:o + chunk])
    for threads in (1, 4, 8):
        pool = ThreadPoolExecutor(threads)
        t = time.perf_counter()
        list(pool.map(digest, range(0, size, chunk)))
        row("io", f"xxh3-128 of the page cache, {threads} threads",
            size / (time.perf_counter() - t) / 1e9, "GB/s")
        pool.shutdown()
    # The snapshot's ceiling on this host: every byte is DMA'd into pinned memory and hashed
    # from it, so both run at once on the memory system. Measured here on separate buffers:
    # D2H of the whole size through a 1 GiB pinned buffer, beside 8 threads hashing as much.
    landing = driver.host_alloc(min(size, 1 << 30))
    stream = driver.stream_create()

    def dma() -> float:
        t0 = time.perf_counter()
        n = min(size, 1 << 30)
        for off in range(0, size, n):
            call(cu.cuMemcpyDtoHAsync, landing, dev + off, min(n, size - off), stream)
        driver.stream_sync(stream)
        return time.perf_counter() - t0
    dma()                                # first touch of the landing buffer's mappings
    row("io", "D2H alone into pinned memory", size / dma() / 1e9, "GB/s")
    for hashers in (8, 16):
        pool = ThreadPoolExecutor(hashers + 1)
        t = time.perf_counter()
        dma_job = pool.submit(dma)
        hashes = [pool.submit(digest, o) for o in range(0, size, chunk)]
        for h in hashes:
            h.result()
        t_hash = time.perf_counter() - t
        t_dma = dma_job.result()
        pool.shutdown()
        row("io", f"D2H while {hashers} threads hash as much (the snapshot's two halves at "
            "once)", size / t_dma / 1e9, "GB/s")
        row("io", f"xxh3-128 on {hashers} threads while the D2H runs", size / t_hash / 1e9, "GB/s")
        row("io", f"both done, {hashers} hash threads: bytes per second through DMA + hash",
            size / max(t_dma, t_hash) / 1e9, "GB/s", "the snapshot's ceiling here")
    driver.stream_destroy(stream)
    driver.host_free(landing)
    t = time.perf_counter()
    res = cu.cuMemHostRegister(addr, size, cu.CU_MEMHOSTREGISTER_READ_ONLY)
    t_reg = time.perf_counter() - t
    if res[0] == driver.SUCCESS:
        t = time.perf_counter()
        call(cu.cuMemcpyHtoD, dev, addr, size)
        t_copy = time.perf_counter() - t
        row("io", "cuMemHostRegister(READ_ONLY) of the file mapping", size / t_reg / 1e9, "GB/s")
        row("io", "H2D straight from the registered page cache", size / t_copy / 1e9, "GB/s")
        row("io", "register + copy together", size / (t_reg + t_copy) / 1e9, "GB/s")
        call(cu.cuMemHostUnregister, addr)
    else:
        print(f"  io: cuMemHostRegister of a file mapping failed: {res[0]}")
    driver.mem_free(dev)
    driver.host_free(pinned)
    os.close(fd)
    shutil.rmtree(tmp, ignore_errors=True)


# ---- 3b. file size: live blocks the graphs reach vs the file ------------------------------

def _live_bytes_reached(graphs: dict, tensors: dict) -> dict:
    """The bytes the graphs can read, computed without cgsnap's recorder: every 8-byte
    aligned word of every kernel's parameters, every memcpy / memset box (child graphs
    included), looked up in torch's allocator snapshot; the live bytes (requested size) of the
    default-pool blocks they reach, plus the named tensors that lie outside them (graph-pool
    outputs). Graph-pool segments are the graphs' own scratch and count nothing. Each word
    that happens to look like an address in a live block counts too, so this is an upper
    bound of what a recorder that tells pointers from integers must save."""
    import bisect

    import torch

    from cgsnap.capture.stream_capture import graph_handle
    from cgsnap.cuda import driver, graphs as cg
    from cgsnap.format.nodes import pitched_span
    dev = torch.cuda.current_device()
    blocks = []                 # (start, end, live bytes) of default-pool live blocks
    for seg in torch.cuda.memory.memory_snapshot():
        if int(seg.get("device", dev)) != dev or tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            continue
        for b in seg["blocks"]:
            if b["state"] != "inactive":
                blocks.append((int(b["address"]), int(b["address"]) + int(b["size"]),
                               min(int(b.get("requested_size") or b["size"]), int(b["size"]))))
    blocks.sort()
    starts = [b[0] for b in blocks]
    reached: set = set()

    def hit(addr: int, span: int = 0) -> None:
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < blocks[i][1]:
            reached.add(i)
        j = i + 1
        while span and j < len(blocks) and blocks[j][0] < addr + span:
            reached.add(j)
            j += 1

    def walk(graph) -> None:
        for n in cg.graph_nodes(graph):
            t = cg.node_type(n)
            if t == "kernel":
                kp = cg.read_kernel(n)
                layout = driver.func_params(kp.func)
                for (off, _), data in zip(layout, kp.argument_bytes(layout, "bench")):
                    for o in range((-off) % 8, len(data) - 7, 8):
                        hit(int.from_bytes(data[o:o + 8], "little"))
            elif t == "memcpy":
                raw = cg.read_node(n, t, "bench")
                for side in ("src", "dst"):
                    sd = raw[side]
                    if sd["kind"] == "device":
                        hit(sd["addr"], pitched_span(raw["width"], raw["height"] or 1,
                                                     raw["depth"] or 1, sd["pitch"], sd["height"]))
            elif t == "memset":
                raw = cg.read_node(n, t, "bench")
                row_bytes = raw["width"] * raw["element_size"]
                hit(raw["dst"], pitched_span(row_bytes, raw["height"], 1, raw["pitch"], 0))
            elif t == "graph":
                walk(cg.read_node(n, t, "bench")["graph"])
    for g in graphs.values():
        walk(graph_handle(g))
    live = sum(blocks[i][2] for i in reached)
    outside = 0
    for t in tensors.values():
        p = int(t.data_ptr())
        i = bisect.bisect_right(starts, p) - 1
        if not (i >= 0 and p < blocks[i][1]):
            outside += t.numel() * t.element_size()
    return {"blocks": len(reached), "live": live + outside}


def _file_parts(path) -> dict:
    """Stored bytes of the file by what they hold."""
    from cgsnap.format import fileformat
    with fileformat.open_file(path) as f:
        m = f.manifest
        image_blobs = {im["blob"] for im in m["images"]}
        images = sum(f.blobs[i].stored_length for i in image_blobs)
        return {"total": os.path.getsize(path), "images": images,
                "contents": sum(b.stored_length for b in f.blobs) - images, "blobs": len(f.blobs),
                "raw": sum(b.raw_length for i, b in enumerate(f.blobs) if i not in image_blobs)}


# What a size workload's graphs use and nothing else holds (its model, weights, optimizer):
# kept alive until the workload is measured, as a program keeps what its graphs read. (Freed,
# their blocks are free memory the graphs still read: saved whole, with a CgsnapWarning.)
_KEEP: list = []


def _wl_train_step():
    """A whole training step: a 0.8M-parameter MLP, cross entropy, AdamW(capturable)."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    x = torch.randn(256, 512, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    _KEEP.extend([model, opt])
    return {"step": g}, {"x": x, "y": y, "loss": loss}


def _wl_multi_stream():
    """Two branches on their own streams inside one capture, joined at the end; the warm-up's
    temporaries are freed in the same segments."""
    import torch
    torch.manual_seed(1)
    a, b = (torch.randn(512, 1024, device="cuda") for _ in range(2))
    w1, w2 = (torch.randn(1024, 512, device="cuda") for _ in range(2))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def step():
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            o1 = (a @ w1).relu_()
        with torch.cuda.stream(s2):
            o2 = (b @ w2).sigmoid_()
        cur.wait_stream(s1)
        cur.wait_stream(s2)
        return o1 + o2
    junk = [torch.randn(256, 1024, device="cuda") for _ in range(8)]   # then freed
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    del junk
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        out = step()
    _KEEP.extend([w1, w2, s1, s2])
    return {"branches": g}, {"a": a, "b": b, "out": out}


def _wl_decode():
    """The warm-restart decoder (2 layers, bf16) with its static KV cache, two batch sizes in
    one graph pool; weights and cache are saved (nothing bound)."""
    import torch
    os.environ["WARM_LAYERS"] = "2"
    sys.path.insert(0, EXAMPLE)
    import model as decoder
    model, kv, _ = decoder.build()
    tokens = torch.zeros(decoder.CONFIG["max_batch"], dtype=torch.long, device="cuda")
    pos = torch.zeros_like(tokens)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for b in (8, 1):
                model(tokens[:b], pos[:b], kv)
        torch.cuda.current_stream().wait_stream(s)
        pool = torch.cuda.graph_pool_handle()
        graphs, outs = {}, {}
        for b in (8, 1):
            g = torch.cuda.CUDAGraph(keep_graph=True)
            with torch.cuda.graph(g, pool=pool):
                outs[b] = model(tokens[:b], pos[:b], kv)
            graphs[f"bs{b}"] = g
    _KEEP.extend([model, kv])
    return graphs, {"tokens": tokens, "pos": pos, **{f"logits{b}": o for b, o in outs.items()}}


def _wl_gpt2():
    """A 4-layer fp32 GPT-2 (d 256, vocab 4096: ~17 MB of parameters), a forward pass."""
    import torch
    from torch import nn
    torch.manual_seed(2)

    class Layer(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            self.heads = heads

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.attn(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads) \
                .permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self, vocab=4096, d=256, layers=4, heads=8, ctx=256):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.layers = nn.ModuleList(Layer(d, heads) for _ in range(layers))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for layer in self.layers:
                x = layer(x)
            return self.head(self.ln(x))
    model = GPT().cuda().eval()
    idx = torch.randint(0, 4096, (4, 128), device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(idx)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(g):
            logits = model(idx)
    _KEEP.append(model)
    return {"forward": g}, {"idx": idx, "logits": logits}


SIZE_WORKLOADS = (("train-step", _wl_train_step), ("multi-stream", _wl_multi_stream),
                  ("decode", _wl_decode), ("gpt2-4L", _wl_gpt2))


def bench_size():
    """File size against the live bytes the graphs reach, per workload: block granularity
    (now) and whole segments (before); each file restored in this process and its graphs'
    outputs compared with the original's, bit for bit."""
    import numpy as np
    import torch

    import cgsnap
    import cgsnap.torch
    tmp = tempfile.mkdtemp(prefix="cgsnap-bench-size-", dir=os.environ.get("BENCH_DIR"))
    for label, build in SIZE_WORKLOADS:
        graphs, tensors = build()
        torch.cuda.synchronize()
        reach = _live_bytes_reached(graphs, tensors)
        parts = {}
        for gran in ("segment", "block"):
            path = os.path.join(tmp, f"{label}-{gran}.cgsnap")
            cgsnap.torch.save(path, graphs, tensors=tensors, granularity=gran)
            parts[gran] = _file_parts(path)
        path = os.path.join(tmp, f"{label}-block.cgsnap")
        # The restored graphs from the saved state give the original's outputs: both sides
        # start from the state saved and replay the graphs in the same order (graphs that
        # share state -- a KV cache -- see each other's writes on both sides).
        restored = cgsnap.torch.load(path)
        same, differ = True, []
        for name, g in graphs.items():
            g.replay()
            restored[name].replay()
            torch.cuda.synchronize()
            for k, t in tensors.items():
                a = restored.tensor(k).contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
                b = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
                if not np.array_equal(a, b):
                    same = False
                    differ.append(f"{name}:{k} ({int(np.count_nonzero(a != b))} bytes)")
        if differ:
            snap = cgsnap.read(path)
            kinds: dict = {}
            for r in snap.regions:
                key = f"{r.kind.value}/{r.policy.value}"
                n, b_ = kinds.get(key, (0, 0))
                kinds[key] = (n + 1, b_ + r.saved_bytes())
            print(f"  size: {label}: restored differs: {', '.join(differ[:8])}; regions "
                  f"(count, saved bytes) by kind/policy {kinds}", flush=True)
        restored.close()
        live, whole, block = reach["live"], parts["segment"], parts["block"]
        row("size", f"{label}: live bytes the graphs reach ({reach['blocks']} blocks)", live / 1e6, "MB")
        row("size", f"{label}: file, whole segments (before)", whole["total"] / 1e6, "MB",
            f"{whole['total'] / live:.2f}x live")
        row("size", f"{label}: file, live blocks ({block['blobs']} blobs; images "
            f"{block['images'] / 1e6:.2f} MB)", block["total"] / 1e6, "MB",
            f"{block['total'] / live:.2f}x live; goal <= 1.1x")
        row("size", f"{label}: memory contents stored, uncompressed (distinct blobs)",
            block["raw"] / 1e6, "MB", f"{block['raw'] / live:.2f}x live")
        row("size", f"{label}: restored replay equals the original (1 = yes)", float(same), "")
        del graphs, tensors, restored
        _KEEP.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)


# ---- 4. replay parity ---------------------------------------------------------------------

PARITY = r"""
import statistics, sys, torch
import cgsnap
cgsnap.start_recorder()
import cgsnap.torch
from model import CONFIG, build
model, kv, kv_init = build()
tokens = torch.zeros(CONFIG["max_batch"], dtype=torch.long, device="cuda"); pos = torch.zeros_like(tokens)
b = int(sys.argv[2])
with torch.no_grad():
    model(tokens[:b], pos[:b], kv)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        out = model(tokens[:b], pos[:b], kv)
cgsnap.torch.save(sys.argv[1], {"g": g}, model=model, bound={"kv_cache": kv},
                  tensors={"tokens": tokens, "pos": pos, "out": out})
r = cgsnap.torch.load(sys.argv[1], bind={"model": model, "kv_cache": kv})
def timed(fn, n=1000):
    for _ in range(50): fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record(); fn(); e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)
res = {}
for rep in range(2):
    res[f"orig{rep}"] = timed(g.replay)
    res[f"rest{rep}"] = timed(r["g"].replay)
print("PARITY", res)
"""


def bench_parity(layers: int):
    tmp = tempfile.mkdtemp(prefix="cgsnap-bench-parity-")
    for b in (1, 64):
        p = subprocess.run([sys.executable, "-c", PARITY, os.path.join(tmp, "p.cgsnap"), str(b)],
                           capture_output=True, text=True, timeout=600,
                           env=env_with({"WARM_LAYERS": str(layers)}))
        if p.returncode:
            raise RuntimeError(p.stdout + p.stderr)
        res = eval(re.search(r"PARITY (.*)", p.stdout).group(1))   # a dict of floats we printed
        orig = min(res["orig0"], res["orig1"])
        rest = min(res["rest0"], res["rest1"])
        row("parity", f"decoder {layers}L bs{b}: original replay median", orig * 1e3, "us")
        row("parity", f"decoder {layers}L bs{b}: restored replay median", rest * 1e3, "us")
        row("parity", f"decoder {layers}L bs{b}: restored / original", rest / orig, "x",
            "goal 1.00 +- 0.02")
    shutil.rmtree(tmp, ignore_errors=True)


# ---- 5. kernel lookup ---------------------------------------------------------------------

LOOKUP = r"""
import sys, time, torch
import cgsnap
from cgsnap.cuda import driver
from cgsnap.kernels.sources import LoadedObjectScan
from cgsnap.errors import CgsnapError
sys.path.insert(0, sys.argv[2])
from model import CONFIG, build
model, kv, _ = build()
tokens = torch.zeros(8, dtype=torch.long, device="cuda")
with torch.no_grad():
    g = torch.cuda.CUDAGraph(keep_graph=True)
    model(tokens, tokens, kv)
    with torch.cuda.graph(g):
        model(tokens, tokens, kv)
from cgsnap.cuda.driver import call, cu
graph = cu.CUgraph(g.raw_cuda_graph())
n = call(cu.cuGraphGetNodes, graph, 0)[1]
names = set()
for node in call(cu.cuGraphGetNodes, graph, n)[0]:
    if call(cu.cuGraphNodeGetType, node) == cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
        names.add(driver.func_name(call(cu.cuGraphKernelNodeGetParams, node).func))
t = time.perf_counter()
scan = LoadedObjectScan(driver.current_device().arch, cache_dir=sys.argv[1])
found = sum(1 for name in names if scan.find(name))
print("LOOKUP", len(names), found, time.perf_counter() - t)
"""


def bench_lookup(layers: int):
    tmp = tempfile.mkdtemp(prefix="cgsnap-bench-lookup-")
    for label in ("cold", "warm"):
        p = subprocess.run([sys.executable, "-c", LOOKUP, tmp, EXAMPLE], capture_output=True,
                           text=True, timeout=600, env=env_with({"WARM_LAYERS": str(layers)}))
        if p.returncode:
            raise RuntimeError(p.stdout + p.stderr)
        total, found, secs = re.search(r"LOOKUP (\d+) (\d+) ([\d.e-]+)", p.stdout).groups()
        goal = "goal <= 5 s" if label == "cold" else "goal <= 0.5 s"
        row("lookup", f"scan lookup of the decoder's {total} kernels ({found} in fatbins), {label}",
            float(secs), "s", goal)
    shutil.rmtree(tmp, ignore_errors=True)
    # Recorder overhead: what it keeps for a whole decoder warm-up.
    p = subprocess.run([sys.executable, "-c", "import cgsnap, sys; rec = cgsnap.start_recorder(); "
                        "sys.path.insert(0, sys.argv[1]); import torch; from model import build; "
                        "m, kv, _ = build(); t = torch.zeros(8, dtype=torch.long, device='cuda'); "
                        "m(t, t, kv); torch.cuda.synchronize(); rec.take_new(); "
                        "print('REC', len(rec.images), rec.recorded_bytes)", EXAMPLE],
                       capture_output=True, text=True, timeout=600,
                       env=env_with({"WARM_LAYERS": str(layers)}))
    m = re.search(r"REC (\d+) (\d+)", p.stdout)
    if m:
        row("lookup", f"recorder: {m.group(1)} modules kept for a decoder step", int(m.group(2)) / 1e6,
            "MB")


# ---- 6. serving-scale cold start ------------------------------------------------------------

SERVING = os.path.join(ROOT, "examples", "serving")


def serving_sizes_module():
    """examples/serving/sizes.py (no torch), loaded by path: the bench process never imports
    torch, and the warm-restart example has a model.py of its own."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("serving_sizes", os.path.join(SERVING, "sizes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def serving_plan(args) -> dict:
    """What ``--only serving`` runs: ``--quick`` is 4 layers, hidden 1024, sizes 1-16, within
    170 s; otherwise 32 layers, hidden 2048, the 67 default sizes, within 420 s. Explicit
    ``--layers``, ``--hidden``, ``--sizes``, ``--serving-budget`` win."""
    sz = serving_sizes_module()
    quick = bool(args.quick)
    sizes = sz.parse_sizes(args.sizes) if args.sizes else \
        list(sz.QUICK_SIZES if quick else sz.DEFAULT_SIZES)
    layers = args.layers or (4 if quick else 32)
    hidden = args.hidden or (1024 if quick else 2048)
    if layers < 1 or hidden < 128 or hidden % 128:
        raise ValueError(f"--layers {layers} --hidden {hidden}: layers >= 1, hidden a multiple "
                         "of 128 expected")
    budget = args.serving_budget or (170.0 if quick else 420.0)
    return {"layers": layers, "hidden": hidden, "sizes": sizes, "quick": quick,
            "budget": float(budget), "max_batch": max(512, max(sizes)) if not quick
            else max(sizes), "coordinate_descent": bool(args.coordinate_descent)}


def _serving_env(extra: dict) -> dict:
    env = dict(os.environ, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([ROOT, SERVING, os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _serving_step(label: str, script: str, argv: list, env: dict, timeout: float,
                  logdir: str) -> dict:
    """Run one start-up path in a fresh process: ``{"label", "rc", "timings", "wall", "log"}``.
    The TIMINGS line is read even when the step failed a check (rc 1), and the whole output is
    kept in ``logdir/serving-<label>.log``."""
    t = time.perf_counter()
    cmd = [sys.executable, os.path.join(SERVING, script), *argv]
    # Its own process group: a step past its time is ended with the compile workers it started.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
        out = (out or "") + f"\n[timed out after {timeout:.0f} s]"
        rc = "timeout"
    wall = time.perf_counter() - t
    log = os.path.join(logdir, f"serving-{label}.log")
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n" + out)
    m = re.search(r"^TIMINGS (.*)$", out, re.M)
    for line in out.splitlines():
        if line.startswith(("(a)", "(b)", "saved", "FAILED", "bs")):
            print(f"    [{label}] {line}", flush=True)
    if rc != 0:
        print(f"    [{label}] exit {rc} after {wall:.0f} s; log: {log}; last lines:\n      " +
              "\n      ".join(out.strip().splitlines()[-12:]), flush=True)
    return {"label": label, "rc": rc, "wall": wall, "log": log,
            "timings": json.loads(m.group(1)) if m else None}


def _serving_cold(plan, steps, weights, caches, sizes, env, left, logdir, tmp,
                  alone: bool = False) -> list:
    """Writes the weights, then runs path A with cold compile caches; the compile arguments."""
    steps["weights"] = _serving_step(
        "weights", "make_weights.py",
        [weights, "--layers", str(plan["layers"]), "--hidden", str(plan["hidden"]),
         "--max-batch", str(plan["max_batch"])], env, min(240.0, left()), logdir)
    if steps["weights"]["rc"] != 0:
        raise RuntimeError("writing the weights failed")
    compile_args = _compile_args(plan, weights, sizes)
    # Cold: fresh, empty compile caches (this run fills them).
    # Alone (--serving-phase cold) it may take the whole budget; else warm and (b) follow.
    share = 0.95 if alone else 0.6
    steps["cold"] = _serving_step("a-cold", "start_compiled.py",
                                  compile_args + ["--out", os.path.join(tmp, "cold")],
                                  env, max(60.0, share * left()), logdir)
    if steps["cold"]["timings"] is None and left() > 0.6 * plan["budget"]:
        # The one fallback: batch 1 compiled on its own (no size-oblivious batch).
        print("    [a-cold] retrying without a size-oblivious batch", flush=True)
        shutil.rmtree(caches, ignore_errors=True)
        compile_args.append("--batch-one-apart")
        steps["cold"] = _serving_step("a-cold-retry", "start_compiled.py",
                                      compile_args + ["--out", os.path.join(tmp, "cold")],
                                      env, max(60.0, 0.6 * left()), logdir)
        steps["cold"]["retried"] = True
        RESULTS.append({"section": "serving", "note": "path A cold failed once; retried "
                        "with batch 1 compiled on its own (--batch-one-apart)"})
    if steps["cold"]["timings"] is None:
        raise RuntimeError("path A (cold) did not finish")
    return compile_args


def _compile_args(plan: dict, weights: str, sizes: str, batch_one_apart: bool = False) -> list:
    """start_compiled.py's arguments for ``plan`` (both path A runs use the same)."""
    return (["--weights", weights, "--sizes", sizes] +
            (["--coordinate-descent"] if plan["coordinate_descent"] else []) +
            (["--batch-one-apart"] if batch_one_apart else []))


def _plan_key(plan: dict) -> dict:
    """What a 'rest' call must share with the 'cold' call it goes on from (not the budget)."""
    return {k: v for k, v in plan.items() if k != "budget"}


def _saved_steps(path: str, plan: dict) -> dict:
    """The steps a '--serving-phase cold' call left, for the same plan; a missing, malformed or
    other-plan file is a RuntimeError (the table then says so)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"no usable steps from a cold call in {path}: {exc}") from None
    steps = saved.get("steps") if isinstance(saved, dict) else None
    if not isinstance(steps, dict) or not all(isinstance(v, dict) for v in steps.values()) or \
            not isinstance(steps.get("cold"), dict):
        raise RuntimeError(f"{path}: not the steps of a cold call")
    if saved.get("plan") != json.loads(json.dumps(_plan_key(plan))):
        raise RuntimeError(f"{path}: the cold call ran another plan ({saved.get('plan')}); "
                           "run --serving-phase cold again with these arguments")
    return steps


def bench_serving(args) -> None:
    """Issue #14: a compiled model's whole set of batch-size graphs. Path A (compile, autotune,
    capture) with cold and with warm compile caches, path B (cgsnap.torch.load) with lazy and
    with eager instantiation; each a fresh process, in that order, within the time budget."""
    plan = serving_plan(args)
    t_begin = time.perf_counter()
    deadline = t_begin + plan["budget"]

    def left() -> float:
        return deadline - time.perf_counter()

    logdir = os.path.dirname(os.path.abspath(args.out))
    phase = args.serving_phase
    if args.serving_dir:         # kept: a later call (--serving-phase rest) goes on from it
        tmp = os.path.abspath(args.serving_dir)
        os.makedirs(tmp, exist_ok=True)
    else:
        if phase != "all":
            raise SystemExit("--serving-phase cold|rest needs --serving-dir")
        tmp = tempfile.mkdtemp(prefix="cgsnap-bench-serving-", dir=os.environ.get("BENCH_DIR"))
    steps_file = os.path.join(tmp, "steps.json")
    weights = os.path.join(tmp, "weights.safetensors")
    caches = os.path.join(tmp, "compile-cache")
    env = _serving_env({"TORCHINDUCTOR_CACHE_DIR": caches,
                        "TRITON_CACHE_DIR": os.path.join(caches, "triton")})
    sizes = ",".join(map(str, plan["sizes"]))
    steps: dict = {}
    print(f"  serving: {plan['layers']} layers, hidden {plan['hidden']}, {len(plan['sizes'])} "
          f"sizes, budget {plan['budget']:.0f} s; logs in {logdir}", flush=True)
    try:
        if phase == "rest":
            steps.update(_saved_steps(steps_file, plan))
            compile_args = _compile_args(plan, weights, sizes,
                                         batch_one_apart=bool(steps["cold"].get("retried")))
        else:
            # A cold run starts from empty compile caches and leaves no earlier run's steps for
            # a later 'rest' to go on from (a reused --serving-dir).
            shutil.rmtree(caches, ignore_errors=True)
            shutil.rmtree(os.path.join(tmp, "warm"), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(steps_file)
            compile_args = _serving_cold(plan, steps, weights, caches, sizes, env, left, logdir,
                                         tmp, alone=phase == "cold")
        if phase == "cold":
            with open(steps_file + ".tmp", "w") as f:
                json.dump({"plan": _plan_key(plan), "steps": steps}, f)
            os.replace(steps_file + ".tmp", steps_file)
            print(f"  serving: path A cold done; go on with --serving-phase rest "
                  f"--serving-dir {tmp}", flush=True)
            return
        if steps.get("cold", {}).get("timings") is None:
            raise RuntimeError("path A (cold) did not finish")
        # Warm: the same caches, as a restart on the same machine finds them; saves the file.
        warm_dir = os.path.join(tmp, "warm")
        shutil.rmtree(warm_dir, ignore_errors=True)     # judged below by the files it writes
        steps["warm"] = _serving_step("a-warm", "start_compiled.py",
                                      compile_args + ["--out", warm_dir, "--save", "--parity"],
                                      env, max(60.0, left() - 60.0), logdir)
        if not all(os.path.exists(os.path.join(warm_dir, f))
                   for f in ("serving.cgsnap", "reference.npz", "original.json")):
            raise RuntimeError("path A (warm) did not save the graphs")
        for mode, extra in (("lazy", []), ("all", ["--time-replays"])):
            steps[mode] = _serving_step(f"b-{mode}", "start_restored.py",
                                        ["--weights", weights, "--dir", warm_dir,
                                         "--instantiate", mode] + extra,
                                        env, max(30.0, left() / (2 if mode == "lazy" else 1)),
                                        logdir)
            if steps[mode]["rc"] != 0:
                _keep_serving_failure(warm_dir, f"serving-{mode}", steps[mode]["log"])
        try:
            snap = read_snapshot(os.path.join(warm_dir, "serving.cgsnap"))
            steps["file"] = {"graphs": len([g for g in snap.graphs if g.top_level]),
                             "nodes": sum(len(g.nodes) for g in snap.graphs),
                             "kernels": len(snap.kernels), "images": len(snap.images)}
        except Exception as exc:      # the table still has the timings
            steps["file"] = {"error": repr(exc)}
    except Exception as exc:
        print(f"  serving: {exc}", flush=True)
        RESULTS.append({"section": "serving", "error": repr(exc)[:2000]})
    finally:
        raw = {k: v for k, v in steps.items()}
        with open(os.path.join(logdir, "serving.json"), "w") as f:
            json.dump({"plan": plan, "steps": raw, "wall": time.perf_counter() - t_begin}, f,
                      indent=1)
        if not args.keep_serving and not args.serving_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"  serving: kept {tmp}")
    steps = {k: v for k, v in steps.items() if isinstance(v, dict)}
    for k, v in steps.items():
        for key, err in (v.get("timings") or {}).items():
            if key.endswith("_error"):
                RESULTS.append({"section": "serving", "note": f"{k}: {key}: {err[:1500]}"})
    for what, value, unit, goal in serving_rows(plan, {k: v.get("timings") if "timings" in v
                                                       else v for k, v in steps.items()}):
        row("serving", what, value, unit, goal)
    print(f"  serving: wall {time.perf_counter() - t_begin:.0f} s of a {plan['budget']:.0f} s "
          "budget", flush=True)


def read_snapshot(path):
    import cgsnap
    return cgsnap.read(path)


def _keep_serving_failure(directory: str, label: str, log: str) -> None:
    """A failed restore: keep the saved graphs, references and log (not the weights)."""
    keep = os.environ.get("CGSNAP_TEST_ARTIFACTS")
    if not keep:
        return
    dest = os.path.join(keep, f"failed-{label}-{int(time.time())}")
    shutil.copytree(directory, dest, dirs_exist_ok=True)
    shutil.copy(log, dest)
    print(f"  kept the failing capture in {dest}")


def _verdict(text: str, ok: bool) -> str:
    return f"{text}: {'met' if ok else 'MISSED'}"


RESTORE_KEYS = ("read", "read.open", "read.validate", "read.images", "read.bind", "read.plans",
                "alloc", "kernels", "copy", "build", "instantiate", "init")


def serving_rows(plan: dict, t: dict) -> list:
    """The serving table, ``[(what, value, unit, goal)]``, from each step's TIMINGS (``t``:
    ``weights``, ``cold``, ``warm``, ``lazy``, ``all`` -> dict or None, ``file`` -> dict).
    Pure: no GPU, no processes (tests/test_serving_bench.py)."""
    out = []
    n = len(plan["sizes"])
    big = max(plan["sizes"])
    w = t.get("weights")
    # A step that died before its graph part (a failed save or load) adds no timing rows.
    cold, warm, lazy, eager = (t.get(k) if t.get(k) and "graph_part" in t[k] else None
                               for k in ("cold", "warm", "lazy", "all"))
    if w:
        c = w["config"]
        out.append((f"model: {c['layers']} layers, hidden {c['hidden']}, vocab {c['vocab']}: "
                    "parameters", w["bytes"] / 2e9, "G", ""))
        out.append((f"weights file, written once in {w['write']:.1f} s", w["bytes"] / 1e9, "GB",
                    ""))
        out.append((f"KV cache [{c['layers']}, 2, {c['max_batch']}, kv heads, {c['max_seq']}, "
                    f"{c['head_dim']}] bf16", w["kv_bytes"] / 1e9, "GB", ""))
    for lab, a in (("cold", cold), ("warm", warm)):
        if not a:
            continue
        out += [(f"(a) {lab}: import torch + cgsnap", a["import"], "s", ""),
                (f"(a) {lab}: load weights (safetensors -> GPU)", a["weights"], "s", ""),
                (f"(a) {lab}: compile + autotune (first call, bs{big})", a["compile"], "s", ""),
                (f"(a) {lab}: warm-up, {n} sizes", a["warmup"], "s", ""),
                (f"(a) {lab}: capture {n} graphs", a["capture"], "s", ""),
                (f"(a) {lab}: instantiate {n} graphs (torch)", a["instantiate"], "s", ""),
                (f"(a) {lab}: graph part: compile to all graphs ready", a["graph_part"], "s", ""),
                (f"(a) {lab}: Dynamo graphs compiled", a["dynamo_graphs"], "n", ""),
                (f"(a) {lab}: process start -> first token", a["ttft_from_start"], "s", "")]
    if warm and "save" in warm:
        out += [(f"(a) warm: snapshot + save {n} graphs (once, not in a start)", warm["save"],
                 "s", ""),
                ("file size", warm["file_bytes"] / 1e6, "MB", "")]
    f = t.get("file") or {}
    if "nodes" in f:
        out.append((f"file: nodes in {f['graphs']} graphs ({f['kernels']} kernels, "
                    f"{f['images']} images)", f["nodes"], "n", ""))
    for lab, b in (("lazy", lazy), ("eager", eager)):
        if not b:
            continue
        out += [(f"(b) {lab}: import torch + cgsnap", b["import"], "s", ""),
                (f"(b) {lab}: load weights (safetensors -> GPU)", b["weights"], "s", ""),
                (f"(b) {lab}: KV cache alloc + fill", b["kv"] * 1e3, "ms", ""),
                (f"(b) {lab}: cgsnap.torch.load()", b["load"] * 1e3, "ms", "")]
        r = b.get("restored", {})
        for k in list(RESTORE_KEYS) + sorted(set(r) - set(RESTORE_KEYS)):
            if k in r:
                out.append((f"(b) {lab}:   {k}", r[k] * 1e3, "ms", ""))
        out += [(f"(b) {lab}: first request bs{min(plan['sizes'])}, logits on the host",
                 b["first_request"] * 1e3, "ms", ""),
                (f"(b) {lab}: first replay of the other {n - 1}", b["other_replays"] * 1e3,
                 "ms", ""),
                (f"(b) {lab}: graph part: load to {n} graphs replayed once", b["graph_part"] * 1e3,
                 "ms", "the replays' GPU time included"),
                (f"(b) {lab}: weights in memory -> first token", b["ttft_from_weights"] * 1e3,
                 "ms", ""),
                (f"(b) {lab}: process start -> first token", b["ttft_from_start"], "s", "")]
    if eager:
        # Ready = instantiated, launchable: what load(instantiate="all") returns.
        out.append((f"(b) eager: all {n} graphs ready (load with instantiate='all', after the "
                    "weights)", eager["load"] * 1e3, "ms",
                    _verdict("goal <= 500 ms", eager["load"] <= 0.5)))
    gpu = sum((eager or {}).get("replay_ms", {}).values()) / 1e3
    if eager and "instantiate" in eager.get("restored", {}):
        r = eager["restored"]
        if gpu:
            out.append((f"floor: GPU time of one replay of each of the {n} graphs", gpu * 1e3,
                        "ms", "sum of replay medians"))
            floor = gpu + r["instantiate"] + r.get("build", 0.0)
            for lab, a in (("cold", cold), ("warm", warm)):
                if a:
                    out.append((f"ceiling: (a) {lab} / (node add + instantiate + one replay each)",
                                a["graph_part"] / floor, "x", ""))
        out += [(f"floor: cuGraphInstantiate of the {n} graphs alone", r["instantiate"] * 1e3,
                 "ms", ""),
                (f"floor: node add of the {n} graphs alone", r.get("build", 0.0) * 1e3, "ms", ""),
                ("floor: node add + instantiate", (r["instantiate"] + r.get("build", 0.0)) * 1e3,
                 "ms", "")]
        for lab, a in (("cold", cold), ("warm", warm)):
            if a:
                out.append((f"ceiling: (a) {lab} / instantiate alone", a["graph_part"] /
                            max(r["instantiate"], 1e-9), "x", ""))
    for la, a in (("cold", cold), ("warm", warm)):
        for lb, b in (("eager", eager), ("lazy", lazy)):
            if a and b:
                x = a["graph_part"] / max(b["graph_part"], 1e-9)
                out.append((f"speed-up of the graph part: (a) {la} / (b) {lb}", x, "x",
                            _verdict("goal >= 100x", x >= 100)))
    for la, a in (("cold", cold), ("warm", warm)):
        if a and lazy:
            out.append((f"start -> first token: (a) {la} / (b) lazy",
                        a["ttft_from_start"] / max(lazy["ttft_from_start"], 1e-9), "x", ""))
    if warm and warm.get("inprocess_replay_ms"):
        ratios = [warm["inprocess_replay_ms"][k] / warm["replay_ms"][k]
                  for k in warm["replay_ms"] if k in warm["inprocess_replay_ms"]]
        out += _parity_rows("one process, interleaved", ratios)
    if eager and eager.get("replay_ratio"):
        out += _parity_rows("new process vs (a)", list(eager["replay_ratio"].values()))
    if warm and warm.get("replay_ms"):
        ms = warm["replay_ms"]
        out.append((f"original replay median, bs{min(plan['sizes'])}",
                    ms.get(f"bs{min(plan['sizes'])}", 0.0) * 1e3, "us", ""))
        out.append((f"original replay median, bs{big}", ms.get(f"bs{big}", 0.0) * 1e3, "us", ""))
        out.append(("original replays timed as", 0, "", warm.get("replay_timed_as", "torch replay()")))
        for k, v in sorted((warm.get("torch_replay_ms") or {}).items(), key=lambda kv: int(kv[0][2:])):
            if ms.get(k):
                out.append((f"torch replay() (RNG prologue + launch) / the graph alone, {k}",
                            v / ms[k], "x", ""))
        for tag, how in (("clone0", "flags 0"), ("clone1", "torch's AUTO_FREE_ON_LAUNCH")):
            for k, v in sorted((warm.get(f"{tag}_ratio") or {}).items(),
                               key=lambda kv: int(kv[0][2:])):
                out.append((f"clone of the original graph, same memory, instantiated with "
                            f"{how} / the original, {k}", v, "x", ""))
    if warm and "inprocess_bitexact" in warm:
        same = warm["inprocess_bitexact"]
        out.append((f"(a) restored in-process: bit-exact sizes of {len(same)}",
                    sum(map(bool, same.values())), "n",
                    _verdict(f"goal {len(same)}", all(same.values()))))
    for lab, b in (("lazy", lazy), ("eager", eager)):
        if not b:
            continue
        same = b.get("bitexact", {})
        sizes = ",".join(str(k) for k in same)
        out.append((f"(b) {lab}: bit-exact logits vs original, bs {sizes}",
                    sum(map(bool, same.values())), "n",
                    _verdict(f"goal {len(same)}", bool(same) and all(same.values()))))
        ev = b.get("compile_evidence", {})
        count = int(ev.get("dynamo_graphs", 0)) + int(ev.get("inductor_events", 0)) + \
            int(bool(ev.get("triton_imported")))
        out.append((f"(b) {lab}: compilation (Dynamo graphs, Inductor events, Triton)", count,
                    "n", _verdict("goal 0", count == 0 and bool(ev))))
        out.append((f"(b) {lab}: torch._dynamo imported at all",
                    int(bool(ev.get("dynamo_imported"))), "n", ""))
    return out


def _parity_rows(where: str, ratios: list) -> list:
    if not ratios:
        return []
    med = statistics.median(ratios)
    outside = sum(1 for x in ratios if abs(x - 1.0) > 0.02)
    return [(f"replay parity, {where}: median restored/original", med, "x",
             _verdict("goal 1.00 +- 0.02", abs(med - 1.0) <= 0.02)),
            (f"replay parity, {where}: lowest", min(ratios), "x", ""),
            (f"replay parity, {where}: highest", max(ratios), "x", ""),
            (f"replay parity, {where}: graphs outside +- 0.02 of {len(ratios)}", outside, "n", "")]


def _compile_package() -> None:
    """Write cgsnap's bytecode before timing anything. An installed package has it; a checkout
    run with PYTHONDONTWRITEBYTECODE=1 (the lent device sets it) would otherwise compile the
    restore path from source inside every timed restore (17 ms measured on the H200)."""
    import compileall
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    compileall.compile_dir(os.path.join(here, "cgsnap"), quiet=1)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--only", default="cold,nodes,memory,parity,lookup,io,size",
                    help="sections, comma-separated; also: serving (not in the default set)")
    ap.add_argument("--memory-gb", default="1,4,16")
    ap.add_argument("--io-gb", type=float, default=4, help="io: size of the file read")
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: 12; serving: 32, --quick 4)")
    ap.add_argument("--hidden", type=int, default=None,
                    help="serving: hidden size (default 2048, --quick 1024)")
    ap.add_argument("--sizes", default=None,
                    help="serving: batch sizes, comma-separated (default: the 67 of a serving "
                         "engine: 1, 2, 4, 8, 16, ..., 512; --quick: 1,2,4,8,16)")
    ap.add_argument("--quick", action="store_true",
                    help="serving: 4 layers, hidden 1024, 5 sizes: a smoke run")
    ap.add_argument("--serving-budget", type=float, default=None,
                    help="serving: seconds for all its steps (default 420, --quick 170)")
    ap.add_argument("--coordinate-descent", action="store_true",
                    help="serving: Inductor's coordinate-descent tuning too (slow cold compile)")
    ap.add_argument("--serving-dir", default=None,
                    help="serving: work in this folder and keep it (for --serving-phase)")
    ap.add_argument("--serving-phase", choices=("all", "cold", "rest"), default="all",
                    help="serving: 'cold' stops after path A with cold caches (one device call), "
                         "'rest' goes on from it in the same --serving-dir (the next call)")
    ap.add_argument("--keep-serving", action="store_true",
                    help="serving: keep the weights, caches and saved graphs")
    return ap


def main():
    import logging
    logging.basicConfig(level=logging.INFO if os.environ.get("CGSNAP_DEBUG") else logging.WARNING,
                        format="    [%(name)s] %(message)s")
    args = parser().parse_args()
    only = set(args.only.split(","))
    layers = args.layers or 12
    _compile_package()
    if only & {"size", "memory", "io", "lookup"}:
        # Before any framework loads a library: every module load is recorded, cuBLAS's
        # kernels that live in no .nv_fatbin included (the size section saves torch graphs).
        import cgsnap
        cgsnap.start_recorder()
    print(f"{'section':<10} {'what':<52} {'value':>12} unit")
    for name, fn in (("cold", lambda: bench_cold(layers)), ("nodes", lambda: bench_nodes(args.nodes)),
                     ("parity", lambda: bench_parity(layers)),
                     ("lookup", lambda: bench_lookup(layers)),
                     ("memory", lambda: bench_memory([float(x) for x in args.memory_gb.split(",")])),
                     ("io", lambda: bench_io(args.io_gb)), ("size", bench_size),
                     ("serving", lambda: bench_serving(args))):
        if name in only:
            try:
                fn()
            except Exception as exc:   # keep the other sections' numbers
                print(f"  {name}: FAILED: {exc!r}"[:2000], flush=True)
                RESULTS.append({"section": name, "error": repr(exc)[:2000]})
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=1)
    print("\n=== results ===")
    for r in RESULTS:
        if "error" in r:
            print(f"{r['section']:<8} ERROR {r['error'][:200]}")
        elif "note" in r:
            print(f"{r['section']:<8} NOTE {r['note']}")
        else:
            print(f"{r['section']:<8} {r['what']:<60} {r['value']:>10.3f} {r['unit']:<5} {r['goal']}")


if __name__ == "__main__":
    main()
