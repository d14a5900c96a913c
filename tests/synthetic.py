"""A snapshot built from the model in code (no GPU), covering every node type."""
from __future__ import annotations

import numpy as np

from cgsnap.format.hashing import content_hash
from cgsnap.format.model import (Arg, ChildGraphNode, Edge, EmptyNode, EventRecordNode,
                                 EventWaitNode, Graph, HostNode, Kernel, KernelImage, KernelNode,
                                 MemAllocNode, MemcpyNode, MemFreeNode, MemsetNode, Policy, Ref,
                                 Region, RegionKind, Snapshot)


def _ptr(region_base: int, off: int) -> bytes:
    return (region_base + off).to_bytes(8, "little")


def make_snapshot() -> Snapshot:
    image_bytes = b"\x7fELF" + bytes(range(256)) * 4
    h = content_hash(image_bytes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(256).astype(np.float32)
    y = np.zeros(256, dtype=np.float32)
    weights = rng.standard_normal(1024).astype(np.float32)
    regions = [
        Region(0, RegionKind.NAMED, x.nbytes, Policy.SAVED, name="x", dtype="float32",
               shape=(256,), data=x.tobytes(), content_hash=content_hash(x.tobytes())),
        Region(1, RegionKind.NAMED, y.nbytes, Policy.SCRATCH, name="y", dtype="float32",
               shape=(256,)),
        Region(2, RegionKind.ALLOCATION, weights.nbytes, Policy.SAVED, data=weights.tobytes(),
               content_hash=content_hash(weights.tobytes()), alignment=512),
        Region(3, RegionKind.MODULE_GLOBAL, 16, Policy.SAVED, image=h, symbol="coeff",
               data=bytes(16), content_hash=content_hash(bytes(16))),
        Region(4, RegionKind.GRAPH_ALLOC, 4096, Policy.SCRATCH),
        Region(5, RegionKind.NAMED, 1 << 20, Policy.BOUND, name="kv_cache", dtype="bfloat16",
               shape=(512, 1024)),
    ]
    kernels = [
        Kernel(0, "_Z6affinePKfPfi", h, ((0, 8), (8, 8), (16, 4)),
               {"max_dynamic_shared_size_bytes": 49152}),
        Kernel(1, "pair_mul", h, ((0, 32), (32, 8))),
    ]
    # struct Pair { const float* a; int n; float* out; double scale; } -> pointers at 0 and 16
    pair = bytearray(32)
    pair[8:12] = (256).to_bytes(4, "little")
    pair[24:32] = np.float64(0.5).tobytes()
    n0 = KernelNode.from_args(0, 0, (1, 1, 1), (256, 1, 1), 0,
                              (Arg(bytes(8), ((0, Ref(0, 0)),)), Arg(bytes(8), ((0, Ref(1, 0)),)),
                               Arg((256).to_bytes(4, "little"))), kernels[0].params)
    n1 = KernelNode.from_args(1, 1, (1, 1, 1), (256, 1, 1), 128,
                              (Arg(bytes(pair), ((0, Ref(2, 0)), (16, Ref(4, 64)))),
                               Arg(bytes(8), ((0, Ref(2, 512)),))), kernels[1].params,
                              {"priority": 1, "cluster_dim": (2, 1, 1)})
    main = Graph("step", [
        n0, n1,
        MemcpyNode(2, Ref(1, 0), Ref(2, 0), 1024),
        MemcpyNode(3, Ref(2, 0), Ref(2, 2048), 64, 4, 1, 128, 0, 64, 0),
        MemsetNode(4, Ref(1, 0), 0x3F800000, 4, 256),
        EmptyNode(5),
        ChildGraphNode(6, "step/child6"),
        EventRecordNode(7, 0),
        EventWaitNode(8, 0),
        MemAllocNode(9, 4),
        MemFreeNode(10, Ref(4, 0)),
        HostNode(11, "log_step"),
    ], [Edge(9, 1), Edge(0, 1), Edge(1, 2), Edge(2, 3), Edge(3, 4), Edge(4, 5), Edge(5, 6),
        Edge(6, 7), Edge(7, 8), Edge(1, 10), Edge(8, 11, 0, 0, 0), Edge(0, 4, 1, 0, 1)],
        checks={1: y.tobytes()})
    child = Graph("step/child6", [EmptyNode(0)], [], top_level=False)
    images = [KernelImage(h, "cubin", 90, ("_Z6affinePKfPfi", "pair_mul"), image_bytes,
                          "recorder")]
    return Snapshot(graphs=[main, child], regions=regions, images=images, kernels=kernels,
                    events=1, device={"name": "NVIDIA H200", "arch": 90, "cc": [9, 0],
                                      "driver": 13000, "total_memory": 150754820096},
                    versions={"cgsnap": "0.1.0", "cuda-bindings": "13.3.1"},
                    meta={"name": "step", "created": "2026-11-26T00:00:00+00:00"})


def schema2_manifest(snap: Snapshot) -> tuple:
    """``(manifest, blobs)`` as cgsnap wrote schema 2: one map per node (kernel nodes too) and
    one list per edge -- the reader still reads it."""
    from cgsnap.format.nodes import node_to_manifest
    manifest, blobs = snap.to_manifest()
    manifest["schema"] = 2
    layouts = [k.params for k in snap.kernels]
    for g, gm in zip(snap.graphs, manifest["graphs"]):
        del gm["kernels"]
        gm["nodes"] = [node_to_manifest(n, layouts) for n in g.nodes]
        gm["edges"] = [[e.src, e.dst, e.from_port, e.to_port, e.type] for e in g.edges]
    return manifest, blobs


def edit_kernel_params(manifest: dict, graph: int, node_id: int, edit) -> None:
    """``edit(bytearray)`` the parameter buffer of kernel node ``node_id`` of graph ``graph``
    in a manifest, schema 3 (the kernel table's ``params`` column) or schema 1-2 (node maps)."""
    import numpy as np
    from cgsnap.format.nodes import param_buffer_size
    g = manifest["graphs"][graph]
    if "kernels" not in g:
        node = next(n for n in g["nodes"] if n["id"] == node_id)
        p = bytearray(node["params"])
        edit(p)
        node["params"] = bytes(p)
        return
    t = g["kernels"]
    ids = np.frombuffer(t["ids"], dtype="<u4").tolist()
    kernels = np.frombuffer(t["kernel"], dtype="<u4").tolist()
    sizes = [param_buffer_size([tuple(p) for p in manifest["kernels"][k]["params"]]) for k in kernels]
    row = ids.index(node_id)
    start = sum((s + 7) & ~7 for s in sizes[:row])
    params = bytearray(t["params"])
    p = params[start:start + sizes[row]]
    edit(p)
    params[start:start + sizes[row]] = p
    t["params"] = bytes(params)
