"""CPU cost of reading a graph's kernel nodes: msgpack decode + validation + restore plan, per
node, schema 3 (columnar kernel tables) against schema 2 (one map per kernel node). No GPU.

usage: PYTHONPATH=. python3 scripts/probes/tables_probe.py [--nodes 20000] [--repeat 3]
       PYTHONPATH=. python3 scripts/probes/tables_probe.py --graphs 67 [--repeat 3] [--profile]

A synthetic graph: N kernel nodes of 50 kernels, 4 arguments (two pointers, a u64, a u32), in
one chain of edges. Prints, per schema (each in a fresh process), the first run (what a restore
pays: one file per process) and the best of ``--repeat``, with the cyclic garbage collector off
as ``cgsnap.load()`` has it.

``--graphs G``: a serving file instead (schema 3, written to a temporary file with
``cgsnap.format.snapfile.save``): G top-level graphs of one decoder, one per batch size (1, 2,
4, then steps of 8, as vLLM captures them), each a chain of ~118 kernel nodes plus a few memcpy
and memset nodes, sharing 100 kernels of 50 images and ~400 regions (bound named weights,
allocations saved as extents, graph-pool scratch with named views into it). Prints the times
``cgsnap.load()`` records as ``read.open`` (file + manifest decode), ``read.validate``
(``Snapshot.from_manifest``), ``read.images`` (``SnapshotFile.images``; see ``--image-kb``,
``--image-count``, ``--no-images``, ``--overlap``) and ``read.plans`` (every graph's
``GraphPlan`` and the region patches), with the garbage collector off (as ``load()`` runs
them) and on; ``--profile`` prints the cProfile of one validate + plans run."""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import msgpack
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from synthetic import schema2_manifest  # noqa: E402

from cgsnap.format.hashing import content_hash  # noqa: E402
from cgsnap.format.model import (Arg, Edge, Extent, Graph, Kernel, KernelImage,  # noqa: E402
                                 KernelNode, MemcpyNode, MemsetNode, Policy, Ref, Region,
                                 RegionKind, Snapshot)
from cgsnap.restore.plan import GraphPlan, param_offsets, region_patches  # noqa: E402


def synthetic(n: int) -> Snapshot:
    params = ((0, 8), (8, 8), (16, 8), (24, 4))
    h = content_hash(b"x")
    kernels = [Kernel(i, f"k{i}", h, params) for i in range(50)]
    nodes = []
    for i in range(n):
        args = (Arg(bytes(8), ((0, Ref(0, 64 * (i % 100))),)), Arg(bytes(8), ((0, Ref(0, 0)),)),
                Arg(bytes(8)), Arg(i.to_bytes(4, "little")))
        nodes.append(KernelNode.from_args(i, i % 50, (i % 7 + 1, 1, 1), (128, 1, 1), 0, args,
                                          params))
    edges = [Edge(i, i + 1) for i in range(n - 1)]
    return Snapshot(graphs=[Graph("g", nodes, edges)],
                    regions=[Region(0, RegionKind.ALLOCATION, 1 << 20, Policy.SCRATCH)],
                    images=[KernelImage(h, "cubin", 90, tuple(k.name for k in kernels), b"x", "t")],
                    kernels=kernels, device={"arch": 90})


def serving(graphs: int, image_kb: int = 256, image_count: int = 50) -> Snapshot:
    """A serving engine's file (see the module docstring): ``graphs`` batch sizes of one
    decoder, sharing kernels, images and regions."""
    sizes = ([1, 2, 4] + list(range(8, 8 * graphs, 8)))[:graphs]
    regions = []

    def region(kind, size, policy, **kw):
        regions.append(Region(len(regions), kind, size, policy, **kw))
        return regions[-1].id

    # 200 weights the caller binds (load(bind=...)), 2 MiB each.
    weights = [region(RegionKind.NAMED, 1 << 21, Policy.BOUND, name=f"model.w{i}",
                      dtype="bfloat16", shape=(1024, 1024)) for i in range(200)]
    # 120 allocations saved as a few extents (buffers, lookup tables, RoPE caches).
    saved = []
    for i in range(120):
        ext = [Extent(4096 * j, 256, bytes([i % 251, j]) * 128) for j in range(3)]
        saved.append(region(RegionKind.ALLOCATION, 1 << 16, Policy.SAVED, extents=ext))
    # The graph pool: 40 allocations of scratch, each with 2 named activation views.
    pools, views = [], []
    for i in range(40):
        pools.append(region(RegionKind.ALLOCATION, 1 << 22, Policy.SCRATCH, pool="graph_pool"))
        for j in range(2):
            views.append(region(RegionKind.NAMED, 1 << 20, Policy.SCRATCH,
                                name=f"act{i}.{j}", dtype="float16", shape=(512, 1024),
                                parent=pools[-1], parent_offset=j << 21))
    targets = weights + saved + pools + views
    # ``image_count`` images (Triton kernels come one per image): compressible like cubins,
    # ``image_kb`` KiB each on average.
    images, kernels = [], []
    rng = np.random.default_rng(0)
    for m in range(image_count):
        data = rng.integers(0, 16, (image_kb * 1024 * (1 + m % 3)) // 2, dtype=np.uint8).tobytes()
        h = content_hash(data)
        names = tuple(f"_Z7kernel{k}Pv" for k in range(m, 100, image_count))
        images.append(KernelImage(h, "cubin", 90, names, data, "synthetic"))
    for k in range(100):
        npointers, nscalars = 3 + k % 5, 1 + k % 3
        params = tuple((8 * i, 8) for i in range(npointers)) + \
            tuple((8 * npointers + 4 * i, 4) for i in range(nscalars))
        kernels.append(Kernel(k, f"_Z7kernel{k}Pv", images[k % image_count].hash, params,
                              {"max_dynamic_shared_size_bytes": 49152} if k % 10 == 0 else {}))
    out = []
    for b in sizes:
        nodes = []
        for i in range(118):
            k = kernels[(i * 7) % 100]
            npointers = sum(1 for _, size in k.params if size == 8)
            args = tuple(Arg(bytes(8), ((0, Ref(targets[(i * 13 + j * 31 + b) % len(targets)],
                                                64 * j)),)) for j in range(npointers)) + \
                tuple(Arg((b + j).to_bytes(4, "little")) for j in range(len(k.params) - npointers))
            nodes.append(KernelNode.from_args(len(nodes), k.id, (b, 1 + i % 4, 1), (128, 1, 1),
                                              1024 * (i % 3), args, k.params,
                                              {"cluster_dim": (2, 1, 1)} if i % 17 == 0 else {}))
            if i in (0, 40, 80):
                nodes.append(MemsetNode(len(nodes), Ref(pools[i % 40], 0), 0, 4, 1024 * b))
            if i in (59, 117):
                nodes.append(MemcpyNode(len(nodes), Ref(views[i % 80], 0), Ref(views[1], 0),
                                        2048 * b))
        edges = [Edge(i, i + 1) for i in range(len(nodes) - 1)]
        out.append(Graph(f"decode_b{b}", nodes, edges))
    return Snapshot(graphs=out, regions=regions, images=images, kernels=kernels,
                    device={"name": "NVIDIA H200", "arch": 90}, meta={"name": "serving"})


def serving_main(args) -> None:
    """Times of reading a serving file as ``cgsnap.load()`` reads it (no GPU)."""
    import cProfile
    import pstats
    import tempfile

    from cgsnap.format import fileformat
    from cgsnap.format.snapfile import save
    from concurrent.futures import ThreadPoolExecutor
    snap = serving(args.graphs, args.image_kb, args.image_count)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "serving.cgsnap")
        save(path, snap, prune=False)
        nodes = sum(g.node_count() for g in snap.graphs)
        print(f"{len(snap.graphs)} graphs, {nodes} nodes, {len(snap.kernels)} kernels, "
              f"{len(snap.images)} images, {len(snap.regions)} regions; file "
              f"{os.path.getsize(path) / 1e6:.1f} MB")

        def read(profile=None):
            # As Restored._prepare: validation, then the images (SnapshotFile.images). With
            # --overlap, as load() did before: 8 threads decompress the images while the
            # manifest is validated, waited for after.
            t0 = time.perf_counter()
            f = fileformat.open_file(path, check_types=False)
            t1 = time.perf_counter()
            pool = ThreadPoolExecutor(8) if args.images and args.overlap else None
            jobs = [pool.submit(f.image, im["blob"]) for im in f.manifest["images"]] \
                if pool else []
            if profile is not None:
                profile.enable()
            s = Snapshot.from_manifest(f.manifest, [b.raw_length for b in f.blobs], path)
            t2 = time.perf_counter()
            for job in jobs:
                job.result()
            if pool:
                pool.shutdown()
            elif args.images:
                f.images([im.data for im in s.images])
            t3 = time.perf_counter()
            late = {r.id for r in s.regions if r.kind is RegionKind.GRAPH_ALLOC}
            offsets = param_offsets(s.kernels)
            {g.name: GraphPlan(s, g, late, offsets) for g in s.graphs}
            region_patches(s)
            t4 = time.perf_counter()
            if profile is not None:
                profile.disable()
            f.close()
            return t1 - t0, t2 - t1, t3 - t2, t4 - t3

        for gc_on in (False, True):
            (gc.enable if gc_on else gc.disable)()
            runs = [read() for _ in range(args.repeat)]
            for what, (o, v, i, p) in (("first run", runs[0]),
                                       (f"best of {len(runs)}", min(runs, key=sum))):
                print(f"gc {'on ' if gc_on else 'off'}, {what}: read.open {1e3 * o:.1f} ms, "
                      f"read.validate {1e3 * v:.1f} ms, read.images {1e3 * i:.1f} ms, "
                      f"read.plans {1e3 * p:.1f} ms -> validate+plans "
                      f"{1e6 * (v + p) / nodes:.2f} us/node")
        gc.enable()
        if args.profile:
            gc.disable()
            prof = cProfile.Profile()
            read(prof)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--schema", type=int, choices=(2, 3), default=None,
                    help="one schema, in this process (default: each in a fresh process)")
    ap.add_argument("--graphs", type=int, default=None,
                    help="a serving file of this many graphs instead (see the docstring)")
    ap.add_argument("--profile", action="store_true", help="with --graphs: cProfile one read")
    ap.add_argument("--image-kb", type=int, default=256,
                    help="with --graphs: KiB per kernel image, on average (0.5x to 1.5x)")
    ap.add_argument("--image-count", type=int, default=50, choices=range(1, 101),
                    metavar="1..100", help="with --graphs: this many kernel images (default 50)")
    ap.add_argument("--no-images", dest="images", action="store_false",
                    help="with --graphs: validate without decompressing the images")
    ap.add_argument("--overlap", action="store_true",
                    help="with --graphs: decompress the images on 8 threads while validating "
                         "(what load() did before; slower: the threads' GIL hand-offs)")
    args = ap.parse_args()
    if args.graphs is not None:
        serving_main(args)
        return
    if args.schema is None:
        import subprocess
        for schema in (3, 2):
            subprocess.run([sys.executable, __file__, "--nodes", str(args.nodes), "--repeat",
                            str(args.repeat), "--schema", str(schema)], check=True)
        return
    snap = synthetic(args.nodes)
    gc.disable()
    label = f"schema {args.schema}"
    manifest, _ = snap.to_manifest() if args.schema == 3 else schema2_manifest(snap)
    raw = msgpack.packb(manifest, use_bin_type=True)
    runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        m = msgpack.unpackb(raw, raw=False)
        t1 = time.perf_counter()
        s = Snapshot.from_manifest(m, [1], "synthetic")
        t2 = time.perf_counter()
        GraphPlan(s, s.graphs[0], set(), param_offsets(s.kernels))
        t3 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1, t3 - t2))
    for what, (d, v, p) in (("first run", runs[0]), (f"best of {len(runs)}", min(runs, key=sum))):
        print(f"{label}, {what}: manifest {len(raw) / 1e6:.1f} MB; decode {1e3 * d:.1f} ms, "
              f"validate {1e3 * v:.1f} ms, plan {1e3 * p:.1f} ms -> "
              f"{1e6 * (d + v + p) / args.nodes:.2f} us/node")


if __name__ == "__main__":
    main()
