"""Snapshot file -> runnable graphs in this process.

Order of work (each step only after the previous succeeded; any failure frees everything made so
far and raises a typed error):

1. read and validate the whole file (no GPU work yet);
2. check the device, the driver and every kernel image against the snapshot, and the bound
   buffers against the regions they replace;
3. allocate regions, copy saved contents, load images and kernels, write module globals,
   create events;
4. build each graph on first use (or all at once), instantiate once.

The per-node work that does not depend on addresses (argument bytes, pointer patch lists,
dependency lists, node order) is planned once per graph before any driver call.

Nothing here imports torch or CuPy.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from ..binary import elf
from ..binary.elf import arch_runs_on
from ..capture.buffers import check_bind, flatten, numpy_dtype
from ..cuda import driver, native, transfer
from ..cuda.driver import call, cu
from ..errors import (BinaryFormatError, BindError, CgsnapError, CompatibilityError, DriverError,
                      FormatError, KernelNotFoundError, RestoreError)
from ..format import fileformat
from ..format.hashing import region_hash
from ..format.model import Policy, RegionKind, Snapshot, pack_args

log = logging.getLogger("cgsnap.restore")


# ---- buffers ----------------------------------------------------------------------------------

class Buffer:
    """A named region's memory in this process; exposes ``__cuda_array_interface__``."""

    def __init__(self, name: str, ptr: int, nbytes: int, dtype: Optional[str], shape: Optional[tuple]):
        self.name, self.ptr, self.nbytes = name, ptr, nbytes
        self.dtype = dtype
        self.shape = tuple(shape) if shape is not None else (nbytes,)
        self._np_dtype = numpy_dtype(dtype) if shape is not None else np.uint8

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": np.dtype(self._np_dtype).str,
                "data": (self.ptr, False), "version": 3, "strides": None}

    def copy_from(self, host) -> None:
        """Copy a host array (any dtype, same number of bytes) into the buffer (synchronous)."""
        arr = np.ascontiguousarray(host)
        if arr.nbytes != self.nbytes:
            raise ValueError(f"buffer {self.name!r} holds {self.nbytes} bytes, got {arr.nbytes}")
        driver.htod(self.ptr, int(arr.ctypes.data), self.nbytes)

    def to_numpy(self) -> np.ndarray:
        """A host copy (synchronous). bfloat16 / fp8 come back as raw unsigned integers."""
        out = np.empty(self.shape, dtype=self._np_dtype)
        driver.dtoh(int(out.ctypes.data), self.ptr, self.nbytes)
        return out

    def __repr__(self) -> str:
        return f"Buffer({self.name!r}, {self.nbytes} bytes, dtype={self.dtype}, shape={self.shape})"


# ---- plans: the address-independent part of each graph --------------------------------------

class _GraphPlan:
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
        self.params = np.zeros(count, dtype=driver.KERNEL_NODE_PARAMS)
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
        packs = [n.packed if n.args is None else pack_args(n.args, layouts[n.kernel])
                 for _, n in kernel_nodes]
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
                block = made[key] = driver.launch_attribute_block(self.attrs[i])
            self.attr_rel[i] = cursor
            blocks.append(block)
            cursor += len(block)
        self.attr_blob = np.frombuffer(b"".join(blocks) or bytes(8), dtype=np.uint8)
        # Maximal runs of nodes that are all simple or all not: (start, stop, simple).
        cuts = (np.flatnonzero(np.diff(simple.astype(np.int8))) + 1).tolist()
        bounds = [0] + cuts + [len(order)]
        self.runs = [(a, b, bool(simple[a])) for a, b in zip(bounds, bounds[1:]) if b > a]
        self.ndeps_array = np.array(self.ndeps, dtype=np.uint64)


def _param_offsets(kernels) -> list:
    """Per kernel, its parameters' offsets in the parameter buffer (``kernelParams`` targets)."""
    return [np.array([off for off, _ in k.params], dtype=np.uint64) for k in kernels]


# ---- the restored snapshot ----------------------------------------------------------------

class RestoredGraph:
    """One graph, built and instantiated on first launch (or by :meth:`instantiate`)."""

    def __init__(self, owner: "Restored", name: str):
        self._owner = owner
        self.name = name
        self.exec = None

    def instantiate(self) -> "RestoredGraph":
        if self.exec is None:
            self._owner._instantiate(self.name)
        return self

    def launch(self, stream=None) -> None:
        if self.exec is None:
            self.instantiate()
        call(cu.cuGraphLaunch, self.exec, driver.as_stream(stream))

    replay = launch


class Restored:
    """What :func:`cgsnap.load` returns; a context manager that frees everything on exit."""

    def __init__(self, path: str, device: int = 0, bind: Optional[dict] = None,
                 instantiate: str = "lazy", verify_bound: bool = False, allow_jit: bool = False,
                 verify_blobs: bool = True, host_callbacks: Optional[dict] = None,
                 limits=None, require_signature=None):
        self.path = str(path)
        self.timings: dict = {}
        self._allocs: list = []
        self._host_allocs: list = []
        self._libraries: list = []
        self._events: list = []
        self._cu_graphs: dict = {}
        self._graphs: dict = {}
        self._closed = False
        self._file = None
        self._stager = None
        self._host_callbacks = dict(host_callbacks or {})
        self._trampolines: list = []        # ctypes thunks the graphs' host nodes call
        t_init = time.perf_counter()
        native.prefetch()
        try:
            with _gc_paused():
                t0 = time.perf_counter()
                # One descriptor: the signature (if required) is checked over the bytes read.
                self._file = fileformat.open_file(self.path, check_types=False, limits=limits,
                                                  signature_key=require_signature)
                self.timings["read.open"] = time.perf_counter() - t0
                self._prepare(bind or {}, verify_bound, allow_jit, verify_blobs)
                self.timings["read"] = time.perf_counter() - t0
                self._setup_gpu(device)
                if instantiate == "all":
                    for name in self.graph_names:
                        self.graph(name).instantiate()
            self.timings["init"] = time.perf_counter() - t_init
        except BaseException as exc:
            self.close()
            if isinstance(exc, DriverError):
                raise RestoreError(f"{self.path}: restore failed, everything it allocated was "
                                   f"released: {exc}") from exc
            raise

    # ---- step 1-2: validate, plan, check (no GPU work) ----------------------------------
    def _prepare(self, bind, verify_bound, allow_jit, verify_blobs):
        f = self._file
        blob_sizes = [b.raw_length for b in f.blobs]
        # Kernel images are zstd-compressed (several-fold smaller: tens of MB of cuBLAS cubins
        # are common). Their blobs are decompressed (and checksummed) by threads while the
        # manifest is validated -- zstd releases the GIL -- so speculatively, from the
        # unvalidated manifest: only blobs that the validated images name are used afterwards.
        pool = ThreadPoolExecutor(8, thread_name_prefix="cgsnap-images")
        try:
            def decompress(i):
                return f.image(i)       # verified, within the image budgets
            early = {}
            raw = f.manifest.get("images") if isinstance(f.manifest, dict) else None
            for im in raw if isinstance(raw, list) else ():
                b = im.get("blob") if isinstance(im, dict) else None
                if type(b) is int and 0 <= b < len(blob_sizes) and b not in early:
                    early[b] = pool.submit(decompress, b)
            t = time.perf_counter()
            self.snapshot = snap = Snapshot.from_manifest(f.manifest, blob_sizes, self.path,
                                                          unpack=False)
            self.timings["read.validate"] = time.perf_counter() - t
            t = time.perf_counter()
            for im in snap.images:
                job = early.get(im.data) or pool.submit(decompress, im.data)
                im.data = job.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self.timings["read.images"] = time.perf_counter() - t
        t = time.perf_counter()
        self._verify_blobs = verify_blobs
        self._bound = self._check_bind(bind)
        self.timings["read.bind"] = time.perf_counter() - t
        t = time.perf_counter()
        self._late = {r.id for r in snap.regions if r.kind is RegionKind.GRAPH_ALLOC}
        offsets = _param_offsets(snap.kernels)     # once per load, shared by every graph's plan
        self._plans = {g.name: _GraphPlan(snap, g, self._late, offsets) for g in snap.graphs}
        self.timings["read.plans"] = time.perf_counter() - t
        self.graph_names = [g.name for g in snap.graphs if g.top_level]
        missing = sorted({n.callback for g in snap.graphs for n in g.nodes if n.TYPE == "host"}
                         - set(self._host_callbacks))
        if missing:
            raise RestoreError(f"{self.path}: the graphs call host callback(s) "
                               f"{', '.join(missing)}: pass load(..., host_callbacks="
                               "{name: python_callable})")
        self._allow_jit = allow_jit
        self._verify_bound = verify_bound

    def _check_bind(self, bind: dict) -> dict:
        snap = self.snapshot
        bind = {name: obj for name, obj, _ in flatten(bind)}
        named = {r.name: r for r in snap.regions if r.name is not None}
        problems = []
        missing = [r.name for r in snap.regions if r.policy is Policy.BOUND and r.name not in bind]
        if missing:
            problems.append("missing: " + ", ".join(sorted(missing)))
        extra = [k for k in bind if k not in named]
        if extra:
            problems.append("not in the snapshot: " + ", ".join(sorted(extra)))
        bound = {}
        for key, obj in bind.items():
            if key in named:
                try:
                    bound[named[key].id] = check_bind(named[key], obj)
                except BindError as exc:
                    problems.append(str(exc))
        if problems:
            raise BindError(f"{self.path}: cannot bind buffers: " + "; ".join(problems))
        return bound

    def _check_device(self, dev: driver.Device) -> dict:
        """Which image to load for each kernel, or a CompatibilityError before any allocation."""
        snap = self.snapshot
        recorded = int(snap.device.get("driver", 0) or 0)
        if recorded and dev.driver_version // 1000 < recorded // 1000:
            raise CompatibilityError(
                f"{self.path}: the snapshot was taken with CUDA driver {_ver(recorded)}; this "
                f"machine's driver is {_ver(dev.driver_version)}, older than its major version")
        images = {im.hash: im for im in snap.images}
        choice, problems = {}, []
        for k in snap.kernels:
            im = images[k.image]
            if im.kind == "cubin" and arch_runs_on(im.arch, _arch_name(im), dev.arch):
                choice[k.id] = im
            elif k.ptx_image and allow_jit_ok(self._allow_jit, images[k.ptx_image], dev.arch):
                choice[k.id] = images[k.ptx_image]
            else:
                problems.append(k.name)
        self._check_images(choice)
        if problems:
            has_ptx = any(k.ptx_image for k in snap.kernels)
            hint = (" (the file carries PTX: pass allow_jit=True / --allow-jit to JIT it)"
                    if has_ptx and not self._allow_jit else "")
            raise CompatibilityError(
                f"{self.path}: the snapshot needs sm_{snap.arch} "
                f"({snap.device.get('name', '?')}); this machine has sm_{dev.arch} ({dev.name}). "
                f"{len(problems)} kernel(s) cannot run here, e.g. {problems[0]}{hint}")
        return choice

    def _check_images(self, choice: dict) -> None:
        """Every image the restore will load is a well-formed cubin (or PTX) holding the kernels
        asked of it -- checked before any GPU memory is touched."""
        wanted: dict = {}
        for k in self.snapshot.kernels:
            if k.id in choice:
                wanted.setdefault(choice[k.id].hash, (choice[k.id], []))[1].append(k.name)
        for h, (im, names) in wanted.items():
            if im.kind == "ptx":
                missing = [n for n in names if f".entry {n}".encode() not in im.data]
            else:
                try:
                    missing = elf.check_cubin(im.data, names)
                except BinaryFormatError as exc:
                    raise FormatError(f"kernel image {h} is not a loadable cubin: {exc}",
                                      path=self.path) from None
            if missing:
                raise KernelNotFoundError(f"{self.path}: kernel {missing[0]} is not in its image "
                                          f"{h}" + (f" (nor {len(missing) - 1} more)"
                                                    if len(missing) > 1 else ""))

    # ---- step 3: memory, kernels, events --------------------------------------------------
    def _setup_gpu(self, ordinal: int):
        t = time.perf_counter()
        self.device = dev = driver.init(ordinal)
        choice = self._check_device(dev)
        snap = self.snapshot
        self._bases = np.zeros(len(snap.regions), dtype=np.uint64)
        for r in snap.regions:
            if r.id in self._bound:
                self._bases[r.id] = self._bound[r.id]
            elif r.kind in (RegionKind.MODULE_GLOBAL, RegionKind.GRAPH_ALLOC) or \
                    r.parent is not None:
                continue    # placed by the library load / by the graph / inside its parent
            elif r.kind is RegionKind.HOST:
                ptr = driver.host_alloc(r.size)
                self._host_allocs.append(ptr)
                self._bases[r.id] = ptr
            else:
                self._bases[r.id] = self._alloc(r.size, r.alignment)
        for r in snap.regions:
            # Scratch starts zeroed, not with whatever the allocator returns: some library
            # kernels keep self-resetting counters in their workspace, valid when zero.
            if r.policy is Policy.SCRATCH and r.parent is None and r.id not in self._bound \
                    and r.kind in (RegionKind.ALLOCATION, RegionKind.NAMED):
                driver.memset_d8(int(self._bases[r.id]), 0, r.size)
        for r in snap.regions:              # views: at their offset in the parent's memory
            if r.parent is not None and r.id not in self._bound:
                self._bases[r.id] = self._bases[r.parent] + np.uint64(r.parent_offset)
        self.timings["alloc"] = time.perf_counter() - t
        t = time.perf_counter()
        self._load_kernels(choice)
        self.timings["kernels"] = time.perf_counter() - t
        t = time.perf_counter()
        for r in snap.regions:
            if r.policy is Policy.SAVED and r.id not in self._bound:
                self._write_blob(r.data, int(self._bases[r.id]), r.size, host=r.kind is RegionKind.HOST)
        if self._verify_bound:
            self._verify_bound_hashes()
        driver.ctx_sync()
        self._close_stager()
        self.timings["copy"] = time.perf_counter() - t
        self._events = [call(cu.cuEventCreate, 0) for _ in range(snap.events)]

    def _alloc(self, size: int, alignment: int) -> int:
        # cuMemAlloc aligns to at least 256 bytes; larger recorded alignments get padding.
        pad = alignment if alignment > 256 else 0
        ptr = driver.mem_alloc(size + pad)
        self._allocs.append(ptr)
        return (ptr + pad - 1) // pad * pad if pad else ptr

    def _write_blob(self, blob: int, dst: int, size: int, host: bool = False) -> None:
        if not size:
            return
        info = self._file.blobs[blob]
        if host or size < transfer.THRESHOLD or info.compression != fileformat.Compression.NONE:
            data = self._file.blob(blob, verify=self._verify_blobs)
            if host:
                driver.host_view(dst, size)[:] = data
            else:
                driver.htod(dst, data, size)
            return
        # Large and stored as is: DMA straight from the file's page cache (or, where file pages
        # cannot be page-locked, read by several threads into a pinned ring), the checksum
        # computed on the way: the file is read once.
        if self._stager is None:
            self._stager = transfer.Stager()
        checksum = info.checksum if self._verify_blobs else None
        base, mapped = self._file.mapping_address()
        t = time.perf_counter()
        ok = None
        if transfer.upload_path() == "mapped":
            ok = self._stager.upload_mapped(dst, base, info.offset, size, mapped, checksum)
        how = "DMA from the page-locked page cache"
        if ok is None:      # the driver would not page-lock file pages here
            ok = self._stager.upload_file(dst, self._file.fileno(), info.offset, size, checksum)
            how = "pread into pinned staging"
        log.info("blob %d: %d bytes by %s%s: %.2f GB/s", blob, size, how,
                 ", verified" if checksum else "", size / (time.perf_counter() - t) / 1e9)
        if not ok:
            raise FormatError(f"blob {blob}: checksum mismatch (the file is corrupt)",
                              path=self.path)

    def _close_stager(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _verify_bound_hashes(self):
        for r in self.snapshot.regions:
            if r.id in self._bound and r.content_hash:
                host = np.empty(r.size, dtype=np.uint8)
                driver.dtoh(int(host.ctypes.data), int(self._bases[r.id]), r.size)
                if region_hash(host) != r.content_hash:
                    raise BindError(f"{self.path}: bound buffer {r.name!r} does not hold the "
                                    "contents recorded at save time (verify_bound=True)")

    def _load_kernels(self, choice: dict):
        snap = self.snapshot
        images = list({v.hash: v for v in choice.values()}.values())
        by_image: dict = {}
        for k in snap.kernels:
            by_image.setdefault(choice[k.id].hash, []).append(k)
        ctx = self.device.context

        def load(im):
            call(cu.cuCtxSetCurrent, ctx)      # pool threads have no current context
            data = im.data
            if im.kind == "ptx" and not bytes(data[-1:]) == b"\0":
                data = bytes(data) + b"\0"
            lib = driver.library_load(data)
            # Getting the function is what loads it into the context (lazy loading): done here,
            # in parallel too, rather than one kernel after another afterwards.
            funcs = {}
            try:
                for k in by_image.get(im.hash, ()):
                    func = driver.library_function(lib, k.name)
                    funcs[k.id] = (func, driver.func_params(func))
            except DriverError:
                funcs[None] = k.name
            return lib, funcs
        # Images load in parallel: the driver parses tens of MB of cuBLAS cubins otherwise one
        # after another. Every library that did load is recorded before any error is raised,
        # so that a failed restore unloads it.
        with ThreadPoolExecutor(min(8, max(1, len(images)))) as pool:
            futures = [pool.submit(load, im) for im in images]
        libs, funcs, first_error = {}, {}, None
        for im, fut in zip(images, futures):
            try:
                libs[im.hash], found = fut.result()
                self._libraries.append(libs[im.hash])
            except CgsnapError as exc:
                first_error = first_error or exc
                continue
            if None in found and first_error is None:
                first_error = KernelNotFoundError(f"{self.path}: kernel {found[None]} is not in "
                                                  f"its image {im.hash}")
            funcs.update(found)
        if first_error is not None:
            raise first_error
        self._funcs = []
        for k in snap.kernels:
            func, params = funcs[k.id]
            if params != tuple(k.params):
                raise RestoreError(f"{self.path}: kernel {k.name}: the reloaded kernel takes "
                                   f"parameters {params}, the snapshot recorded {k.params}")
            if k.attrs:
                driver.func_set_attrs(func, k.attrs)
            self._funcs.append(func)
        self._func_handles = np.array([int(f) for f in self._funcs], dtype=np.uint64)
        self._builder = driver.GraphBuilder()
        self._node_loop = native.node_loop()
        # Module globals live in the reloaded library; their saved contents are written there.
        for r in snap.regions:
            if r.kind is RegionKind.MODULE_GLOBAL:
                lib = libs.get(r.image)
                found = driver.library_global(lib, r.symbol) if lib is not None else None
                if found is None:
                    raise RestoreError(f"{self.path}: module global {r.symbol} of region {r.id} "
                                       "is not in the reloaded image")
                addr, size = found
                if size != r.size:
                    raise RestoreError(f"{self.path}: module global {r.symbol} has {size} bytes, "
                                       f"the snapshot recorded {r.size}")
                self._bases[r.id] = addr
                if r.policy is Policy.SAVED:
                    self._write_blob(r.data, addr, size)

    # ---- step 4: graphs -------------------------------------------------------------------
    def graph(self, name: str) -> RestoredGraph:
        if name not in self._plans:
            raise KeyError(f"{self.path} has no graph {name!r} (it has: "
                           f"{', '.join(self.graph_names)})")
        g = self._graphs.get(name)
        if g is None:
            g = self._graphs[name] = RestoredGraph(self, name)
        return g

    def _instantiate(self, name: str) -> None:
        t = time.perf_counter()
        with _gc_paused():
            graph = self._build(name)
        t1 = time.perf_counter()
        exe = call(cu.cuGraphInstantiate, graph, 0)
        self._graphs[name].exec = exe
        self.timings.setdefault("build", 0.0)
        self.timings.setdefault("instantiate", 0.0)
        self.timings["build"] += t1 - t
        self.timings["instantiate"] += time.perf_counter() - t1

    def _build(self, name: str):
        """Create the CUgraph for ``name`` (children first), all nodes in topological order.

        Kernel nodes go through :class:`driver.GraphBuilder` with their parameters prebuilt and
        their dependencies given as they are added."""
        if name in self._cu_graphs:
            return self._cu_graphs[name]
        plan = self._plans[name]
        for child in plan.children:
            self._build(child)
        graph = call(cu.cuGraphCreate, 0)
        try:
            self._add_nodes(name, plan, graph)
        except BaseException:
            call(cu.cuGraphDestroy, graph)      # never keep a half-built graph for a retry
            raise
        self._cu_graphs[name] = graph
        return graph

    def _add_nodes(self, name: str, plan, graph) -> None:
        graph_int = int(graph)
        fast = self._builder
        # Arguments: one buffer for the graph, every pointer patched in one vectorised step.
        args = np.frombuffer(bytearray(plan.arg_bytes), dtype=np.uint8)
        words = args.view(np.uint64) if args.nbytes else np.zeros(0, dtype=np.uint64)
        if len(plan.patch_pos):
            words[plan.patch_pos] = self._bases[plan.patch_region] + plan.patch_off
        ptrs = np.uint64(args.ctypes.data) + plan.param_rel
        params = plan.params.copy()
        if len(params):
            params["func"] = self._func_handles[plan.kernel_index]
            params["kernel_params"] = np.where(
                plan.param_count > 0, np.uint64(ptrs.ctypes.data) + 8 * plan.param_first.astype(
                    np.uint64), 0)
        params_addr = params.ctypes.data
        param_size = driver.KERNEL_NODE_PARAMS.itemsize
        handles = np.zeros(len(plan.nodes), dtype=np.uint64)
        handles_addr = handles.ctypes.data
        dep_buf = np.zeros(max((len(d) for d in plan.deps), default=0) or 1, dtype=np.uint64)
        dep_addr = dep_buf.ctypes.data
        add_kernel, kernel_row = fast.add_kernel, plan.kernel_row

        def add_kernel_node(i: int, dep_ptr, ndeps: int, handle_ptr: int, param_ptr: int) -> None:
            """One kernel node and its launch attributes, by a foreign call (no native loop,
            or a node the loop does not take)."""
            code = add_kernel(handle_ptr, graph_int, dep_ptr, ndeps, param_ptr)
            if code:
                fast.raise_for(code, f"cuGraphAddKernelNode (graph {name!r} node "
                                     f"{plan.nodes[i].id})")
            if plan.attr_rel[i] >= 0:
                fast.set_attributes(int(handles[i]), plan.attr_blob, int(plan.attr_rel[i]),
                                    f"graph {name!r} node {plan.nodes[i].id}")
        # Every address the driver calls take, worked out for all nodes at once: a run of plain
        # kernel nodes is then one call of the native loop (cgsnap/nodeloop.c), or without it
        # one foreign call per node.
        n = len(plan.nodes)
        handle_ptrs = handles_addr + 8 * np.arange(n, dtype=np.uint64)
        dep_ptrs = np.where(plan.dep_first >= 0,
                            np.uint64(handles_addr) + 8 * plan.dep_first.astype(np.uint64),
                            np.uint64(0))
        param_ptrs = np.uint64(params_addr) + param_size * plan.node_row.astype(np.uint64)
        loop = self._node_loop
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
                        fast.raise_for(code, f"{what} (graph {name!r} node {plan.nodes[i].id})")
                    continue
                for i in range(start, stop):
                    add_kernel_node(i, dep_list[i] or None, plan.ndeps[i], handle_list[i],
                                    param_list[i])
                continue
            for i in range(start, stop):
                deps = plan.deps[i]
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
                    dep_nodes = [cu.CUgraphNode(int(handles[j])) for j in deps]
                    handles[i] = int(self._add_node(graph, plan.nodes[i], dep_nodes))
                    continue
                if i in plan.late_refs:
                    for pos_, region, off in plan.late_refs[i]:
                        words[pos_] = int(self._bases[region]) + off
                add_kernel_node(i, dep_ptr, len(deps), int(handle_ptrs[i]), int(param_ptrs[i]))
        if plan.special_edges:
            data = []
            for _, _, e in plan.special_edges:
                d = cu.CUgraphEdgeData()
                d.from_port, d.to_port, d.type = e.from_port, e.to_port, e.type
                data.append(d)
            call(cu.cuGraphAddDependencies, graph,
                 [cu.CUgraphNode(int(handles[a])) for a, _, _ in plan.special_edges],
                 [cu.CUgraphNode(int(handles[b])) for _, b, _ in plan.special_edges],
                 data, len(data))

    def _ref_addr(self, ref) -> int:
        return int(self._bases[ref.region]) + ref.offset

    def _add_node(self, graph, node, deps):
        """Any node but a kernel node, through cuda-bindings (these are few)."""
        t = node.TYPE
        if t == "memcpy":
            p = cu.CUDA_MEMCPY3D()
            for side, ref, pitch, height in (("src", node.src, node.src_pitch, node.src_height),
                                             ("dst", node.dst, node.dst_pitch, node.dst_height)):
                addr = self._ref_addr(ref)
                if self.snapshot.regions[ref.region].kind is RegionKind.HOST:
                    setattr(p, f"{side}MemoryType", driver.MemType.CU_MEMORYTYPE_HOST)
                    setattr(p, f"{side}Host", addr)
                else:
                    setattr(p, f"{side}MemoryType", driver.MemType.CU_MEMORYTYPE_DEVICE)
                    setattr(p, f"{side}Device", addr)
                setattr(p, f"{side}Pitch", pitch or node.width)
                setattr(p, f"{side}Height", height or node.height)
            p.WidthInBytes, p.Height, p.Depth = node.width, node.height, node.depth
            return call(cu.cuGraphAddMemcpyNode, graph, deps, len(deps), p, self.device.context)
        if t == "memset":
            p = cu.CUDA_MEMSET_NODE_PARAMS()
            p.dst = self._ref_addr(node.dst)
            p.value, p.elementSize = node.value, node.element_size
            p.width, p.height = node.width, node.height
            p.pitch = node.pitch or node.width * node.element_size
            return call(cu.cuGraphAddMemsetNode, graph, deps, len(deps), p, self.device.context)
        if t == "empty":
            return call(cu.cuGraphAddEmptyNode, graph, deps, len(deps))
        if t == "graph":
            return call(cu.cuGraphAddChildGraphNode, graph, deps, len(deps),
                        self._cu_graphs[node.graph])
        if t == "event_record":
            return call(cu.cuGraphAddEventRecordNode, graph, deps, len(deps), self._events[node.event])
        if t == "event_wait":
            return call(cu.cuGraphAddEventWaitNode, graph, deps, len(deps), self._events[node.event])
        if t == "mem_alloc":
            region = self.snapshot.regions[node.region]
            p = cu.CUDA_MEM_ALLOC_NODE_PARAMS()
            p.poolProps.allocType = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
            p.poolProps.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            p.poolProps.location.id = self.device.ordinal
            p.bytesize = region.size
            h = call(cu.cuGraphAddMemAllocNode, graph, deps, len(deps), p)
            self._bases[node.region] = int(call(cu.cuGraphMemAllocNodeGetParams, h).dptr)
            return h
        if t == "mem_free":
            return call(cu.cuGraphAddMemFreeNode, graph, deps, len(deps), self._ref_addr(node.ptr))
        if t == "host":
            p, trampoline = driver.host_node_params(self._host_callbacks[node.callback])
            self._trampolines.append(trampoline)
            return call(cu.cuGraphAddHostNode, graph, deps, len(deps), p)
        raise RestoreError(f"{self.path}: graph node type {t!r} cannot be rebuilt")

    # ---- public -----------------------------------------------------------------------------
    def buffer(self, name: str) -> Buffer:
        try:
            r = self.snapshot.region_by_name(name)
        except KeyError:
            names = [r.name for r in self.snapshot.regions if r.name]
            raise KeyError(f"{self.path} has no buffer {name!r} (it has: {', '.join(names)})") \
                from None
        return Buffer(name, int(self._bases[r.id]), r.size, r.dtype, r.shape)

    @property
    def buffers(self) -> dict:
        return {r.name: self.buffer(r.name) for r in self.snapshot.regions if r.name}

    def reset(self) -> None:
        """Write the saved contents back into every saved region (the state at save time)."""
        for r in self.snapshot.regions:
            if r.policy is Policy.SAVED and r.id not in self._bound and r.kind is not \
                    RegionKind.GRAPH_ALLOC:
                self._write_blob(r.data, int(self._bases[r.id]), r.size,
                                 host=r.kind is RegionKind.HOST)
        driver.ctx_sync()
        self._close_stager()

    def read_region(self, rid: int) -> np.ndarray:
        """A host copy of region ``rid`` (synchronous)."""
        r = self.snapshot.regions[rid]
        out = np.empty(r.size, dtype=np.uint8)
        if r.size:
            if r.kind is RegionKind.HOST:
                out[:] = driver.host_view(int(self._bases[rid]), r.size)
            else:
                driver.dtoh(int(out.ctypes.data), int(self._bases[rid]), r.size)
        return out

    def expected(self, graph: str, rid: int):
        """The contents region ``rid`` held after one launch of ``graph`` at save time."""
        return self._file.blob(self.snapshot.graph(graph).checks[rid])

    def synchronize(self) -> None:
        driver.ctx_sync()

    def close(self) -> None:
        """Free every graph, event, library and allocation this restore made (idempotent)."""
        if self._closed:
            return
        self._closed = True
        errors = []

        def attempt(fn, *args):
            try:
                fn(*args)
            except CgsnapError as exc:
                errors.append(exc)
        if self._allocs or self._graphs or self._libraries:
            attempt(driver.ctx_sync)
        if self._stager is not None:
            attempt(self._close_stager)
        for g in self._graphs.values():
            if g.exec is not None:
                attempt(call, cu.cuGraphExecDestroy, g.exec)
                g.exec = None
        for graph in self._cu_graphs.values():
            attempt(call, cu.cuGraphDestroy, graph)
        for ev in self._events:
            attempt(call, cu.cuEventDestroy, ev)
        for lib in self._libraries:
            attempt(driver.library_unload, lib)
        for ptr in self._allocs:
            attempt(driver.mem_free, ptr)
        for ptr in self._host_allocs:
            attempt(driver.host_free, ptr)
        self._allocs, self._host_allocs, self._libraries, self._events = [], [], [], []
        self._cu_graphs = {}
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "Restored":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _gc_paused():
    """The cyclic collector off for the duration, back on afterwards if it was on. A manifest
    becomes tens of thousands of small objects: in a process with a large heap (torch imported)
    each full collection they trigger walks all of it -- measured 160 ms instead of 40 for
    validating the decoder's manifest. What is made meanwhile is freed by reference counting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _arch_name(im) -> str:
    return f"sm_{im.arch}"


def allow_jit_ok(allow_jit: bool, ptx_image, device_arch: int) -> bool:
    """PTX for compute_XX JITs on any device of arch >= XX, when the caller allows it."""
    return allow_jit and ptx_image.kind == "ptx" and ptx_image.arch <= device_arch


def _ver(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"
