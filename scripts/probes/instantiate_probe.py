"""Does cuGraphInstantiate scale over threads? (Issue #14: the serving restore's floor is node
add + instantiate, 96 ms of 0.41 s for 67 graphs on the H200.) Captures N graphs of K kernel
launches each (a trivial NVRTC kernel, chained), then instantiates them all serially and with
T threads (each thread makes the context current and instantiates its share), and prints the
median of R rounds. Not yet run on a card.
usage: python3 scripts/probes/instantiate_probe.py [--graphs 67] [--nodes 122] [--threads 1,2,4,8]"""
import argparse
import ctypes
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from cgsnap.cuda import driver, graphs  # noqa: E402
from cgsnap.cuda.nvrtc import compile_cubin  # noqa: E402

SRC = r'extern "C" __global__ void step(float* x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] = x[i] * 0.5f + 1.0f; }'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", type=int, default=67)
    ap.add_argument("--nodes", type=int, default=122)
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = driver.init(0)
    cubin, _ = compile_cubin(SRC, dev.arch, "step.cu")
    func = driver.library_function(driver.library_load(cubin), "step")
    n = 1 << 16
    buf = driver.mem_alloc(n * 4)
    stream = driver.stream_create()
    made = []
    for _ in range(args.graphs):
        graphs.begin_capture(stream, "thread_local")
        for _ in range(args.nodes):
            driver.launch_kernel(func, (n // 256, 1, 1), (256, 1, 1), 0, stream,
                                 [ctypes.c_uint64(buf), ctypes.c_int(n)])
        g, err = graphs.end_capture(stream)
        if err:
            raise SystemExit(f"capture failed: {err}")
        made.append(g)
    ctx = driver.current_context()

    def part(gs):
        driver.set_current(ctx)
        return [graphs.instantiate(g) for g in gs]
    print(f"{args.graphs} graphs x {args.nodes} kernel nodes, {dev.name if hasattr(dev, 'name') else ''}")
    print(f"{'threads':>8} {'median ms':>10} {'per graph us':>13}")
    for t in [int(x) for x in args.threads.split(",")]:
        times = []
        for _ in range(args.rounds):
            chunks = [made[i::t] for i in range(t)]
            t0 = time.perf_counter()
            if t == 1:
                exes = part(made)
            else:
                with ThreadPoolExecutor(t) as pool:
                    exes = [e for es in pool.map(part, chunks) for e in es]
            times.append(time.perf_counter() - t0)
            for e in exes:
                graphs.exec_destroy(e)
        med = statistics.median(times)
        print(f"{t:>8} {med * 1e3:>10.2f} {med / args.graphs * 1e6:>13.1f}")
    for g in made:
        graphs.graph_destroy(g)
    driver.mem_free(buf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
