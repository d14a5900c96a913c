"""Why a torch.save(granularity="block") file misses bytes: for a workload of scripts/bench.py,
each parameter's allocator block (state, size) and whether any kernel-parameter word of the
graph points into it; then what cgsnap.torch.snapshot planned per region.
usage: python3 scripts/probes/blocks_probe.py WORKLOAD [WORKLOAD ...] (bench.SIZE_WORKLOADS labels)"""
import bisect
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
import cgsnap  # noqa: E402

cgsnap.start_recorder()
import torch  # noqa: E402

import bench  # noqa: E402
import cgsnap.torch  # noqa: E402
from cgsnap.capture.stream_capture import graph_handle  # noqa: E402
from cgsnap.cuda import driver, graphs as cg  # noqa: E402

WL = dict(bench.SIZE_WORKLOADS)


def words_of(graph):
    out = []
    for n in cg.graph_nodes(graph):
        if cg.node_type(n) != "kernel":
            continue
        kp = cg.read_kernel(n)
        name = driver.func_name(kp.func)
        layout = driver.func_params(kp.func)
        for (off, _), data in zip(layout, kp.argument_bytes(layout, "probe")):
            for o in range((-off) % 8, len(data) - 7, 8):
                out.append((int.from_bytes(data[o:o + 8], "little"), name[:60]))
    return out


for label in sys.argv[1:]:
    graphs, tensors = WL[label]()
    torch.cuda.synchronize()
    blocks = []
    for seg in torch.cuda.memory.memory_snapshot():
        for b in seg["blocks"]:
            blocks.append((int(b["address"]), int(b["size"]), b["state"],
                           int(b.get("requested_size") or 0), tuple(seg.get("segment_pool_id", (0, 0))),
                           seg.get("segment_type")))
    blocks.sort()
    starts = [b[0] for b in blocks]
    words = [w for g in graphs.values() for w in words_of(graph_handle(g))]
    print(f"== {label}: {len(blocks)} blocks, {len(words)} parameter words")
    # every live block a word lands in
    hit = {}
    for w, k in words:
        i = bisect.bisect_right(starts, w) - 1
        if i >= 0 and w < blocks[i][0] + blocks[i][1]:
            hit.setdefault(i, k)
    for i, k in sorted(hit.items()):
        print(f"  word hits block {blocks[i][0]:#x} size {blocks[i][1]} {blocks[i][2]} req "
              f"{blocks[i][3]} pool {blocks[i][4]} {blocks[i][5]} (kernel {k})")
    params = []
    for obj in list(tensors.values()):
        params.append(("named", obj))
    import gc
    for o in gc.get_objects():
        if isinstance(o, torch.nn.Parameter) and o.is_cuda:
            params.append(("param", o))
    seen = set()
    for kind, t in params:
        p = t.data_ptr()
        if p in seen:
            continue
        seen.add(p)
        i = bisect.bisect_right(starts, p) - 1
        where = (f"block {blocks[i][0]:#x} {blocks[i][2]} size {blocks[i][1]} pool {blocks[i][4]}"
                 if i >= 0 and p < blocks[i][0] + blocks[i][1] else "in no block")
        near = min((abs(w - p) for w, _ in words), default=-1)
        print(f"  {kind} {tuple(t.shape)} at {p:#x}: {where}; nearest word {near:#x} away; "
              f"reached {i in hit}")
    snaps = cgsnap.torch.snapshot(graphs, tensors=tensors)
    for r in snaps[0].regions:
        ex = r.extents
        print(f"  region {r.id} {r.kind.value}/{r.policy.value} origin {r.origin:#x} size {r.size}"
              f" extents {None if ex is None else [(e.offset, e.length) for e in ex][:6]}"
              f"{'' if ex is None or len(ex) <= 6 else f' +{len(ex) - 6}'}")
    del graphs, tensors, snaps
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
