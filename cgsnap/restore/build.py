"""Building graphs: the nodes of a plan (:mod:`cgsnap.restore.plan`) into a new CUgraph.

Kernel nodes, nearly all of a captured graph, go in bulk: their parameter structs are prebuilt
in one numpy array with every pointer patched in one vectorised step, and a run of them is one
call of the native node loop (:mod:`cgsnap.cuda.native`), or without it one foreign call per
node. Every other node goes through its spec (:mod:`cgsnap.format.nodes`: ``to_live``) and its
adder (:mod:`cgsnap.cuda.graphs`).
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..cuda import graphs
from ..cuda.driver import KERNEL_NODE_PARAMS
from ..format.model import RegionKind


class BuildState:
    """What building needs from the restore, and what node specs ask while converting their
    fields to raw parameters (``to_live``): addresses, events, child graphs, callbacks."""

    def __init__(self, snapshot, bases, func_handles, builder, node_loop, events: list,
                 built: dict, host_callbacks: dict, env: graphs.AddEnv):
        self.snapshot, self.bases, self.func_handles = snapshot, bases, func_handles
        self.builder, self.node_loop, self.events, self.built = builder, node_loop, events, built
        self.host_callbacks, self.env = host_callbacks, env

    def addr(self, ref) -> int:
        return int(self.bases[ref.region]) + ref.offset

    def is_host(self, rid: int) -> bool:
        return self.snapshot.regions[rid].kind is RegionKind.HOST

    def region_size(self, rid: int) -> int:
        return self.snapshot.regions[rid].size

    def set_base(self, rid: int, addr: int) -> None:
        self.bases[rid] = addr

    def child_graph(self, name: str):
        return self.built[name]

    def event(self, index: int):
        return self.events[index]

    def host_callback(self, name: str):
        return self.host_callbacks[name]


def add_nodes(state, name: str, plan, graph) -> None:
    """Every node of ``plan`` into the empty ``graph``, in topological order."""
    graph_int = int(graph)
    fast = state.builder
    # Arguments: one buffer for the graph, every pointer patched in one vectorised step.
    args = np.frombuffer(bytearray(plan.arg_bytes), dtype=np.uint8)
    words = args.view(np.uint64) if args.nbytes else np.zeros(0, dtype=np.uint64)
    if len(plan.patch_pos):
        words[plan.patch_pos] = state.bases[plan.patch_region] + plan.patch_off
    ptrs = np.uint64(args.ctypes.data) + plan.param_rel
    params = plan.params.copy()
    if len(params):
        params["func"] = state.func_handles[plan.kernel_index]
        params["kernel_params"] = np.where(
            plan.param_count > 0, np.uint64(ptrs.ctypes.data) + 8 * plan.param_first.astype(
                np.uint64), 0)
    params_addr = params.ctypes.data
    param_size = KERNEL_NODE_PARAMS.itemsize
    n = len(plan.node_ids)
    handles = np.zeros(n, dtype=np.uint64)
    handles_addr = handles.ctypes.data
    dep_buf = np.zeros(max((len(d) for d in plan.dep_lists.values()), default=0) or 1,
                       dtype=np.uint64)
    dep_addr = dep_buf.ctypes.data
    add_kernel, kernel_row = fast.add_kernel, plan.kernel_row

    def add_kernel_node(i: int, dep_ptr, ndeps: int, handle_ptr: int, param_ptr: int) -> None:
        """One kernel node and its launch attributes, by a foreign call (no native loop,
        or a node the loop does not take)."""
        code = add_kernel(handle_ptr, graph_int, dep_ptr, ndeps, param_ptr)
        if code:
            fast.raise_for(code, f"cuGraphAddKernelNode (graph {name!r} node "
                                 f"{plan.node_ids[i]})")
        if plan.attr_rel[i] >= 0:
            fast.set_attributes(int(handles[i]), plan.attr_blob, int(plan.attr_rel[i]),
                                f"graph {name!r} node {plan.node_ids[i]}")
    # Every address the driver calls take, worked out for all nodes at once: a run of plain
    # kernel nodes is then one call of the native loop (cgsnap/nodeloop.c), or without it
    # one foreign call per node.
    handle_ptrs = handles_addr + 8 * np.arange(n, dtype=np.uint64)
    dep_ptrs = np.where(plan.dep_first >= 0,
                        np.uint64(handles_addr) + 8 * plan.dep_first.astype(np.uint64),
                        np.uint64(0))
    param_ptrs = np.uint64(params_addr) + param_size * plan.node_row.astype(np.uint64)
    loop = state.node_loop
    if loop is not None:
        ndeps = plan.ndeps_array
        attr_ptrs = np.where(plan.attr_rel >= 0, np.uint64(plan.attr_blob.ctypes.data)
                             + plan.attr_rel.astype(np.uint64), np.uint64(0))
        failed = ctypes.c_size_t(0)
        failed_addr = ctypes.addressof(failed)
        at = (handle_ptrs.ctypes.data, dep_ptrs.ctypes.data, ndeps.ctypes.data,
              param_ptrs.ctypes.data, attr_ptrs.ctypes.data)
        add_addr, set_attr_addr = fast.add_kernel_address, fast.set_attribute_address
    else:
        handle_list, dep_list, param_list = (handle_ptrs.tolist(), dep_ptrs.tolist(),
                                             param_ptrs.tolist())
    for start, stop, simple in plan.runs:
        if simple:      # kernel nodes, dependencies consecutive (or none), no extras
            if loop is not None:
                code = loop(add_addr, set_attr_addr, graph_int, stop - start,
                            at[0] + 8 * start, at[1] + 8 * start, at[2] + 8 * start,
                            at[3] + 8 * start, at[4] + 8 * start, failed_addr)
                if code:
                    i = start + failed.value     # a handle was made: the attribute failed
                    what = "cuGraphKernelNodeSetAttribute" if handles[i] else \
                        "cuGraphAddKernelNode"
                    fast.raise_for(code, f"{what} (graph {name!r} node {plan.node_ids[i]})")
                continue
            for i in range(start, stop):
                add_kernel_node(i, dep_list[i] or None, plan.ndeps[i], handle_list[i],
                                param_list[i])
            continue
        for i in range(start, stop):
            deps = plan.deps_of(i)
            d = int(dep_ptrs[i])
            if not deps:
                dep_ptr = None
            elif d:
                dep_ptr = d
            else:
                dep_buf[:len(deps)] = handles[deps]
                dep_ptr = dep_addr
            k = kernel_row.get(i)
            if k is None:
                node = plan.others[i]
                h, result = graphs.add_node(graph, node.TYPE, handles[deps].tolist(),
                                            node.to_live(state), state.env)
                node.on_added(state, result)
                handles[i] = int(h)
                continue
            if i in plan.late_refs:
                for pos_, region, off in plan.late_refs[i]:
                    words[pos_] = int(state.bases[region]) + off
            add_kernel_node(i, dep_ptr, len(deps), int(handle_ptrs[i]), int(param_ptrs[i]))
    graphs.add_dependencies(graph, [(int(handles[a]), int(handles[b]), ports)
                                    for a, b, ports in plan.special_edges])


def build_graph(state, name: str, plans: dict, ledger):
    """The CUgraph for ``name`` (its child graphs first, each once), entered in ``ledger``;
    a graph whose build fails is destroyed, never kept half-built for a retry."""
    built = state.built.get(name)
    if built is not None:
        return built
    plan = plans[name]
    for child in plan.children:
        build_graph(state, child, plans, ledger)
    graph = graphs.graph_create()
    try:
        add_nodes(state, name, plan, graph)
    except BaseException:
        graphs.graph_destroy(graph)
        raise
    state.built[name] = ledger.add("graph", graph)
    return graph
