"""Plans: everything about a graph's rebuild that can be worked out before touching the GPU.

Per graph, once, with numpy over the graph's columns (:mod:`cgsnap.format.tables`) -- no object
per node: node order, dependencies, every kernel node's launch parameters in one array, where
each node's arguments lie in the graph's one parameter buffer, and which words of it are
pointers to patch. Per region, once: where its stored pointers go (:class:`RegionPatches`).
No driver calls (tested on CPU).
"""
from __future__ import annotations

import numpy as np

from ..cuda.driver import KERNEL_NODE_PARAMS, launch_attribute_block
from ..errors import FormatError
from ..format.model import REGION_REF_DTYPE, Snapshot
from ..format.tables import node_order


class GraphPlan:
    """The address-independent part of rebuilding one graph.

    Nodes are numbered by their position in a topological order. ``kernel_row`` maps a position
    to its row in ``params`` (the prebuilt CUDA_KERNEL_NODE_PARAMS); ``others`` maps the other
    positions to their node objects. Dependencies: ``ndeps[i]`` of them; when they are
    consecutive positions (nearly always in a captured graph) ``dep_first[i]`` is the first,
    else -1 and ``dep_lists[i]`` lists them."""

    def __init__(self, snap: Snapshot, graph, late_regions: set, offsets: list):
        self.name = graph.name
        if not isinstance(offsets, ParamOffsets):
            offsets = ParamOffsets(snap.kernels, offsets)
        layouts = offsets.layouts
        kt = graph.kernel_table(layouts)
        others = graph.other_nodes()
        nk = len(kt)
        ids = np.concatenate([kt.ids, np.array([n.id for n in others], dtype=np.int64)])
        edges = graph.edge_array()
        # index -> position; the validator's order when the graph was read from a file
        order = graph.table_order()
        if order is not None and len(order) != len(ids):   # columns changed since: not theirs
            order = None
        if order is None:
            order = node_order(ids, edges, f"graph {graph.name!r}")
        n = len(order)
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        self.node_ids = ids[order]
        self.others = {int(pos[nk + j]): node for j, node in enumerate(others)}
        # ---- dependencies ------------------------------------------------------------------
        by_id = np.argsort(ids, kind="stable")
        sorted_ids = ids[by_id]
        src = pos[by_id[np.searchsorted(sorted_ids, edges[:, 0])]] if len(edges) else \
            np.zeros(0, dtype=np.int64)
        dst = pos[by_id[np.searchsorted(sorted_ids, edges[:, 1])]] if len(edges) else \
            np.zeros(0, dtype=np.int64)
        plain = (edges[:, 2:] == 0).all(axis=1) if len(edges) else np.zeros(0, dtype=bool)
        d_src, d_dst = src[plain], dst[plain]
        ndeps = np.bincount(d_dst, minlength=n).astype(np.int64)
        lo = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.full(n, -1, dtype=np.int64)
        np.minimum.at(lo, d_dst, d_src)
        np.maximum.at(hi, d_dst, d_src)
        # Dependencies are passed to the driver as a pointer into the array of node handles
        # being built: consecutive ones need no per-node array at all.
        consecutive = (ndeps > 0) & (hi - lo == ndeps - 1)
        self.dep_first = np.where(consecutive, lo, -1).astype(np.int64)
        self.ndeps = ndeps.tolist()
        self.ndeps_array = ndeps.astype(np.uint64)
        self.dep_lists: dict = {}
        scattered = np.flatnonzero((ndeps > 0) & ~consecutive)
        if scattered.size:
            by_dst = np.argsort(d_dst, kind="stable")
            starts = np.searchsorted(d_dst[by_dst], scattered)
            for i, s in zip(scattered.tolist(), starts.tolist()):
                self.dep_lists[i] = sorted(d_src[by_dst[s:s + ndeps[i]]].tolist())
        self.special_edges = [] if plain.all() else \
            [(int(a), int(b), tuple(int(x) for x in e[2:]))
             for a, b, e in zip(src[~plain], dst[~plain], edges[~plain])]
        # ---- kernel nodes, in position order ---------------------------------------------------
        kpos = np.flatnonzero(order < nk)              # positions holding kernel nodes
        rows = order[kpos]                             # their rows in the kernel table
        count = len(rows)
        self.kernel_row = dict(zip(kpos.tolist(), range(count)))
        self.node_row = np.zeros(n, dtype=np.int64)
        self.node_row[kpos] = np.arange(count)
        self.params = np.zeros(count, dtype=KERNEL_NODE_PARAMS)
        kernels = kt.kernel[rows]
        self.kernel_index = kernels
        if count:
            d = kt.dims[rows]
            self.params["grid"] = d[:, 0:3]
            self.params["block"] = d[:, 3:6]
            self.params["shared_mem"] = d[:, 6]
        # Arguments: the table's one parameter buffer (each node's at an 8-aligned start); per
        # node, where its kernelParams pointers start, and each parameter's byte offset.
        self.arg_bytes = kt.params
        starts = kt.starts[rows].astype(np.uint64)
        per_node = offsets.counts[kernels] if count else np.zeros(0, dtype=np.int64)
        self.param_count = per_node
        self.param_first = np.zeros(count, dtype=np.int64)
        if count > 1:
            self.param_first[1:] = np.cumsum(per_node[:-1])
        total = int(per_node.sum())
        within = np.arange(total, dtype=np.int64) - np.repeat(self.param_first, per_node)
        gather = np.repeat(offsets.first[kernels], per_node) + within
        self.param_rel = (offsets.flat[gather] if total else np.zeros(0, dtype=np.uint64)) + \
            np.repeat(starts, per_node)
        # Pointer words: the table's refs belong to rows in table order.
        owner_row = np.repeat(np.arange(nk), kt.nrefs)
        word = ((kt.starts[owner_row].astype(np.uint64) + kt.refs[:, 0]) // np.uint64(8)
                ).astype(np.int64) if len(kt.refs) else np.zeros(0, dtype=np.int64)
        region = kt.refs[:, 1].astype(np.int64) if len(kt.refs) else np.zeros(0, dtype=np.int64)
        late = np.isin(region, sorted(late_regions)) if late_regions else None
        if late is None or not late.any():      # (nearly always: no graph memory in the table)
            late = None
            self.patch_pos, self.patch_region = word, region
            self.patch_off = kt.refs[:, 2].copy() if len(kt.refs) else np.zeros(0, np.uint64)
        else:
            self.patch_pos = word[~late]
            self.patch_region = region[~late]
            self.patch_off = kt.refs[~late, 2].copy()
        self.late_refs: dict = {}
        if late is not None:
            for idx in np.flatnonzero(late).tolist():
                p = int(pos[owner_row[idx]])
                self.late_refs.setdefault(p, []).append(
                    (int(word[idx]), int(region[idx]), int(kt.refs[idx, 2])))
        if late_regions:
            self._check_graph_memory(late_regions, src, dst)
        other_order = [self.others[p] for p in sorted(self.others)]
        self.children = [n.graph for n in other_order if n.TYPE == "graph"]
        # Conditional nodes (their bodies are built when the node is added), and the kernel
        # argument words that pass a conditional handle: written once the handles exist.
        self.conditionals = [n for n in other_order if n.TYPE == "conditional"]
        hkt = kt.handles if kt.handles is not None else np.zeros((0, 2), dtype=np.uint64)
        if len(hkt):
            howner = np.repeat(np.arange(nk), kt.nhandles)
            self.handle_pos = ((kt.starts[howner].astype(np.uint64) + hkt[:, 0]) //
                               np.uint64(8)).astype(np.int64)
            self.handle_id = hkt[:, 1].astype(np.int64)
        else:
            self.handle_pos = self.handle_id = np.zeros(0, dtype=np.int64)
        simple = np.zeros(n, dtype=bool)
        simple[kpos] = True
        simple &= (ndeps == 0) | consecutive
        for p in self.late_refs:
            simple[p] = False
        # Launch attributes (cluster dimensions of cuBLAS's Hopper kernels, ...) as blocks the
        # native loop sets right after adding the node: offset of node i's block, or -1.
        self.attr_rel = np.full(n, -1, dtype=np.int64)
        blocks, cursor, block_at = [], 0, []
        for a in kt.attrs:
            block = launch_attribute_block(a)
            block_at.append(cursor)
            blocks.append(block)
            cursor += len(block)
        if count and kt.attr is not None:
            sets = kt.attr[rows]
            has = sets >= 0
            self.attr_rel[kpos[has]] = np.array(block_at, dtype=np.int64)[sets[has]] \
                if has.any() else []
        self.attr_blob = np.frombuffer(b"".join(blocks) or bytes(8), dtype=np.uint8)
        # Maximal runs of nodes that are all simple or all not: (start, stop, simple).
        cuts = (np.flatnonzero(np.diff(simple.astype(np.int8))) + 1).tolist()
        bounds = [0] + cuts + [n]
        self.runs = [(a, b, bool(simple[a])) for a, b in zip(bounds, bounds[1:]) if b > a]

    def _check_graph_memory(self, late_regions: set, src, dst) -> None:
        """Graph memory has an address once its mem_alloc node is added, and may be used only
        by nodes ordered after it: every node using it must be reachable from an allocation of
        it in this graph (else it would be handed address 0, or race with the allocation)."""
        uses = [(p, r) for p, refs in self.late_refs.items() for _, r, _ in refs]
        uses += [(p, r) for p, node in self.others.items() if node.TYPE != "mem_alloc"
                 for r in node.regions() if r in late_regions]
        if not uses:
            return
        starts: dict = {}
        for p, node in self.others.items():
            if node.TYPE == "mem_alloc":
                starts.setdefault(node.region, []).append(p)
        succ: list = [[] for _ in range(len(self.node_ids))]
        for a, b in zip(src.tolist(), dst.tolist()):
            succ[a].append(b)
        reached: dict = {}
        for p, r in sorted(uses):
            if r not in reached:
                seen, todo = set(), list(starts.get(r, ()))
                while todo:
                    for b in succ[todo.pop()]:
                        if b not in seen:
                            seen.add(b)
                            todo.append(b)
                reached[r] = seen
            if p not in reached[r]:
                raise FormatError(f"graph {self.name!r} node {int(self.node_ids[p])}: uses graph "
                                  f"memory (region {r}) that no mem_alloc node ordered before it "
                                  "allocates")

    def deps_of(self, i: int) -> list:
        """Positions node ``i`` depends on (plain edges)."""
        first = int(self.dep_first[i])
        if first >= 0:
            return list(range(first, first + self.ndeps[i]))
        return self.dep_lists.get(i, [])


class ParamOffsets(list):
    """Per kernel, its parameters' offsets in the parameter buffer (``kernelParams`` targets):
    ``offsets[k]`` is kernel k's as a uint64 array. Made once per load and shared by every
    graph's plan, with what the plans look up in it: ``layouts[k]`` (kernel k's params),
    ``counts[k]`` (how many), ``flat`` (every kernel's offsets, in kernel order) and
    ``first[k]`` (where kernel k's start in ``flat``)."""

    def __init__(self, kernels, offsets=None):
        super().__init__(offsets if offsets is not None else
                         [np.array([off for off, _ in k.params], dtype=np.uint64)
                          for k in kernels])
        self.layouts = [k.params for k in kernels]
        self.counts = np.array([len(o) for o in self], dtype=np.int64)
        self.flat = np.concatenate(self) if len(self) else np.zeros(0, dtype=np.uint64)
        self.first = np.zeros(len(self), dtype=np.int64)
        if len(self) > 1:
            self.first[1:] = np.cumsum(self.counts[:-1])


def param_offsets(kernels) -> ParamOffsets:
    """Per kernel, its parameters' offsets in the parameter buffer (``kernelParams`` targets);
    see :class:`ParamOffsets`."""
    return ParamOffsets(kernels)


class RegionPatches:
    """The stored pointers of one region (its ``refs``), planned once: word offsets, target
    regions and offsets as arrays, and the runs of consecutive words (a pointer array is one
    run), so that writing them costs one vectorised step and one copy per run."""

    __slots__ = ("offsets", "targets", "target_offsets", "runs")

    def __init__(self, refs: bytes):
        table = np.frombuffer(refs, dtype=REGION_REF_DTYPE)
        self.offsets = table["offset"].astype(np.int64)
        self.targets = table["region"].astype(np.int64)
        self.target_offsets = table["target_offset"].copy()
        self.runs = word_runs(self.offsets)

    def values(self, bases: np.ndarray) -> np.ndarray:
        """The words to write: each target's base in this process plus the offset."""
        return bases[self.targets] + self.target_offsets

    def apply(self, data: np.ndarray, bases: np.ndarray) -> None:
        """Write the words into a host copy of the region's contents (bytes, in place)."""
        flat = data.reshape(-1).view(np.uint8)
        values = self.values(bases).astype("<u8").view(np.uint8).reshape(-1, 8)
        index = self.offsets[:, None] + np.arange(8, dtype=np.int64)
        flat[index] = values

    def chunks(self, bases: np.ndarray) -> list:
        """``[(offset in the region, bytes), ...]``: one piece per run of consecutive words, for
        regions whose contents are written to the device without a host copy."""
        values = self.values(bases).astype("<u8")
        return [(int(self.offsets[a]), values[a:b].tobytes()) for a, b in self.runs]


def word_runs(offsets: np.ndarray) -> list:
    """``[(first, stop), ...]`` index ranges of ``offsets`` whose words follow each other
    without a gap (offset[i + 1] == offset[i] + 8)."""
    if not len(offsets):
        return []
    cuts = (np.flatnonzero(np.diff(offsets) != 8) + 1).tolist()
    bounds = [0] + cuts + [len(offsets)]
    return list(zip(bounds, bounds[1:]))


def region_patches(snap: Snapshot) -> dict:
    """``{region id: RegionPatches}`` for every region with stored pointers."""
    return {r.id: RegionPatches(r.refs) for r in snap.regions if r.refs}
