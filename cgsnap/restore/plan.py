"""Plans: everything about a graph's rebuild that can be worked out before touching the GPU.

Per graph, once: node order, dependencies, every kernel node's launch parameters in one array,
the argument bytes of all kernel nodes in one buffer, and where the pointers go in it. Plain
numpy over the model; no driver calls (tested on CPU).
"""
from __future__ import annotations

import numpy as np

from ..cuda.driver import KERNEL_NODE_PARAMS, launch_attribute_block
from ..format.model import Snapshot


class GraphPlan:
    """Everything about one graph that can be worked out before touching the GPU: node order,
    dependencies, every kernel node's launch parameters in one array, the argument bytes of
    all kernel nodes in one buffer, and where the pointers go in it."""

    def __init__(self, snap: Snapshot, graph, late_regions: set, offsets: list):
        self.name = graph.name
        order = graph.topological_order()
        pos = {n.id: i for i, n in enumerate(order)}
        self.nodes = order
        default = [(pos[e.src], pos[e.dst]) for e in graph.edges
                   if (e.from_port, e.to_port, e.type) == (0, 0, 0)]
        self.deps: list = [[] for _ in order]
        for a, b in default:
            self.deps[b].append(a)
        # Dependencies are passed to the driver as a pointer into the array of node handles
        # being built: nodes of a chain, or whose dependencies are consecutive in topological
        # order (nearly all of a captured graph), need no per-node array at all.
        self.dep_first = []
        for d in self.deps:
            d.sort()
            consecutive = bool(d) and d[-1] - d[0] == len(d) - 1
            self.dep_first.append(d[0] if consecutive else -1)
        self.dep_first = np.array(self.dep_first, dtype=np.int64)
        self.ndeps = [len(d) for d in self.deps]
        self.special_edges = [(pos[e.src], pos[e.dst], e) for e in graph.edges
                              if (e.from_port, e.to_port, e.type) != (0, 0, 0)]
        kernel_nodes = [(i, n) for i, n in enumerate(order) if n.TYPE == "kernel"]
        self.kernel_row = {i: k for k, (i, _) in enumerate(kernel_nodes)}
        count = len(kernel_nodes)
        self.params = np.zeros(count, dtype=KERNEL_NODE_PARAMS)
        self.kernel_index = np.array([n.kernel for _, n in kernel_nodes], dtype=np.int64)
        self.attrs = {i: n.attrs for i, n in kernel_nodes if n.attrs}
        self.late_refs: dict = {}
        if count:
            self.params["grid"] = [n.grid for _, n in kernel_nodes]
            self.params["block"] = [n.block for _, n in kernel_nodes]
            self.params["shared_mem"] = [n.shared_mem for _, n in kernel_nodes]
        # Arguments: every node's parameter buffer (as stored: schema 2), 8-byte aligned, one
        # after another in one buffer; the pointer words to patch as arrays over the graph.
        layouts = [k.params for k in snap.kernels]
        packs = [(n.params, n.refs) for _, n in kernel_nodes]
        padded = [(len(p[0]) + 7) & ~7 for p in packs]
        cursors = np.zeros(count, dtype=np.uint64)
        if count > 1:
            cursors[1:] = np.cumsum(padded[:-1], dtype=np.uint64)
        self.arg_bytes = b"".join(p[0].ljust(size, b"\0") for p, size in zip(packs, padded))
        counts = np.array([len(layouts[n.kernel]) for _, n in kernel_nodes], dtype=np.int64)
        self.param_count = counts
        self.param_first = np.zeros(count, dtype=np.int64)
        if count > 1:
            self.param_first[1:] = np.cumsum(counts[:-1])
        self.param_rel = (np.concatenate([offsets[n.kernel] for _, n in kernel_nodes])
                          + np.repeat(cursors, counts)) if count else np.zeros(0, np.uint64)
        table = np.frombuffer(b"".join(p[1] for p in packs), dtype="<u8").reshape(-1, 3)
        ref_counts = [len(p[1]) // 24 for p in packs]
        word = ((np.repeat(cursors, ref_counts) + table[:, 0]) // np.uint64(8)).astype(np.int64)
        region = table[:, 1].astype(np.int64)
        late = np.isin(region, sorted(late_regions)) if late_regions else \
            np.zeros(len(region), dtype=bool)
        self.patch_pos = word[~late]
        self.patch_region = region[~late]
        self.patch_off = table[~late, 2].copy()
        if late.any():
            owner = np.repeat(np.arange(count), ref_counts)
            for idx in np.flatnonzero(late).tolist():
                i = kernel_nodes[int(owner[idx])][0]
                self.late_refs.setdefault(i, []).append(
                    (int(word[idx]), int(region[idx]), int(table[idx, 2])))
        self.children = [n.graph for n in order if n.TYPE == "graph"]
        # Conditional nodes (their bodies are built when the node is added), and the kernel
        # argument words that pass a conditional handle: written once the handles exist.
        self.conditionals = [n for n in order if n.TYPE == "conditional"]
        hrows = [(int(cursors[k]) + pos, hid) for k, (_, n) in enumerate(kernel_nodes)
                 if n.handles for pos, hid in n.handle_refs()]
        self.handle_pos = np.array([pos // 8 for pos, _ in hrows], dtype=np.int64)
        self.handle_id = np.array([hid for _, hid in hrows], dtype=np.int64)
        # Per node: its row in ``params`` (0 for other nodes), and whether it is a plain kernel
        # node that _build adds with a single call.
        self.node_row = np.zeros(len(order), dtype=np.int64)
        for i, k in self.kernel_row.items():
            self.node_row[i] = k
        simple = np.array([i in self.kernel_row and i not in self.late_refs
                           and (not self.deps[i] or self.dep_first[i] >= 0)
                           for i in range(len(order))], dtype=bool)
        # Launch attributes (cluster dimensions of cuBLAS's Hopper kernels, ...) as blocks the
        # native loop sets right after adding the node: offset of node i's block, or -1.
        blocks = []
        self.attr_rel = np.full(len(order), -1, dtype=np.int64)
        cursor = 0
        made: dict = {}                # few distinct attribute sets (cluster shapes) per graph
        for i in sorted(self.attrs):
            key = tuple(sorted(self.attrs[i].items()))
            block = made.get(key)
            if block is None:
                block = made[key] = launch_attribute_block(self.attrs[i])
            self.attr_rel[i] = cursor
            blocks.append(block)
            cursor += len(block)
        self.attr_blob = np.frombuffer(b"".join(blocks) or bytes(8), dtype=np.uint8)
        # Maximal runs of nodes that are all simple or all not: (start, stop, simple).
        cuts = (np.flatnonzero(np.diff(simple.astype(np.int8))) + 1).tolist()
        bounds = [0] + cuts + [len(order)]
        self.runs = [(a, b, bool(simple[a])) for a, b in zip(bounds, bounds[1:]) if b > a]
        self.ndeps_array = np.array(self.ndeps, dtype=np.uint64)


def param_offsets(kernels) -> list:
    """Per kernel, its parameters' offsets in the parameter buffer (``kernelParams`` targets)."""
    return [np.array([off for off, _ in k.params], dtype=np.uint64) for k in kernels]
