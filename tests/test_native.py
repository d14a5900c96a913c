"""The native node loop (cgsnap/nodeloop.c), built with this machine's C compiler and driven
with a fake cuGraphAddKernelNode (CPU)."""
from __future__ import annotations

import ctypes
import os
import struct

import numpy as np
import pytest

from cgsnap.cuda import native

ADD = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_size_t, ctypes.c_void_p)
SET_ATTR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


@pytest.fixture
def loop(tmp_path, monkeypatch):
    monkeypatch.setenv("CGSNAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    if native._compiler() is None:
        pytest.fail("no C compiler on this machine: CI images have one (nvcc needs it)")
    fn = native.node_loop()
    assert fn is not None
    return fn


def drive(loop, n, fail_at=None, attrs=None, attr_fail_at=None):
    """Run the loop over ``n`` chained nodes with fake driver calls; ``attrs``: {node: dict}."""
    from cgsnap.cuda.driver import launch_attribute_block
    calls, attr_calls = [], []

    def fake(node_out, graph, deps, ndeps, params):
        i = len(calls)
        calls.append((node_out, graph, deps or 0, ndeps, params))
        if i == fail_at:
            return 700                      # CUDA_ERROR_ILLEGAL_ADDRESS, say
        ctypes.c_uint64.from_address(node_out).value = 0x1000 + i
        return 0

    def fake_attr(node, attr, value):
        attr_calls.append((node, attr, ctypes.string_at(value, 64)))
        return 1 if node == attr_fail_at else 0
    cb, cb_attr = ADD(fake), SET_ATTR(fake_attr)
    handles = np.zeros(n, dtype=np.uint64)
    hp = handles.ctypes.data + 8 * np.arange(n, dtype=np.uint64)
    dp = np.where(np.arange(n) > 0, hp - 8, 0).astype(np.uint64)
    nd = (np.arange(n) > 0).astype(np.uint64)
    pp = 0x5000 + 64 * np.arange(n, dtype=np.uint64)
    blocks = {i: np.frombuffer(launch_attribute_block(a), np.uint8)
              for i, a in (attrs or {}).items()}
    ap = np.array([blocks[i].ctypes.data if i in blocks else 0 for i in range(n)], np.uint64)
    failed = ctypes.c_size_t(99)
    code = loop(ctypes.cast(cb, ctypes.c_void_p).value, ctypes.cast(cb_attr, ctypes.c_void_p).value,
                0xABC, n, hp.ctypes.data, dp.ctypes.data, nd.ctypes.data, pp.ctypes.data,
                ap.ctypes.data, ctypes.addressof(failed))
    return code, failed.value, calls, handles, hp, dp, nd, pp, attr_calls


def test_every_node_is_added_in_order_with_its_arguments(loop):
    code, _, calls, handles, hp, dp, nd, pp, attr_calls = drive(loop, 50)
    assert code == 0 and len(calls) == 50
    assert [c[0] for c in calls] == hp.tolist()
    assert {c[1] for c in calls} == {0xABC}
    assert [c[2] for c in calls] == dp.tolist() and [c[3] for c in calls] == nd.tolist()
    assert [c[4] for c in calls] == pp.tolist()
    assert handles.tolist() == [0x1000 + i for i in range(50)]
    assert attr_calls == []


def test_launch_attributes_are_set_on_the_new_node(loop):
    attrs = {3: {"cluster_dim": (4, 1, 1)}, 7: {"priority": -2, "cooperative": 1}}
    code, _, calls, handles, *_, attr_calls = drive(loop, 10, attrs=attrs)
    assert code == 0 and len(calls) == 10
    assert [(node, attr) for node, attr, _ in attr_calls] == [(0x1003, 4), (0x1007, 8),
                                                              (0x1007, 2)]
    assert attr_calls[0][2] == struct.pack("<3I", 4, 1, 1).ljust(64, b"\0")
    assert attr_calls[1][2] == struct.pack("<i", -2).ljust(64, b"\0")
    code, failed, calls, *_ = drive(loop, 10, attrs=attrs, attr_fail_at=0x1007)
    assert code == 1 and failed == 7 and len(calls) == 8


def test_the_first_failure_stops_the_loop_and_names_its_index(loop):
    code, failed, calls, handles, *_ = drive(loop, 20, fail_at=7)
    assert code == 700 and failed == 7 and len(calls) == 8
    assert handles[7] == 0 and handles[8] == 0


def test_the_build_is_cached_and_can_be_switched_off(loop, tmp_path, monkeypatch):
    path = native.library_path(build=False)
    assert path is not None and path.startswith(str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CGSNAP_NATIVE", "0")
    assert native.node_loop() is None


def test_no_compiler_means_no_loop_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CGSNAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.node_loop() is None


def test_a_broken_compiler_means_no_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("CGSNAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    assert native.node_loop() is None
    assert not list((tmp_path / "native").glob("*.so*"))     # no half-written library left


def test_plan_splits_a_graph_into_runs_of_plain_kernel_nodes():
    """GraphPlan.runs: maximal stretches the native loop adds in one call (attributes
    included), and the nodes in between (a memset, one whose dependencies are not consecutive)."""
    from cgsnap.format.model import (Arg, Edge, Graph, Kernel, KernelNode, MemsetNode, Policy, Ref,
                                     Region, RegionKind, Snapshot)
    from cgsnap.restore.plan import GraphPlan, param_offsets

    def k(i, attrs=None):
        return KernelNode.from_args(i, 0, (1, 1, 1), (32, 1, 1), 0,
                                    (Arg(bytes(8), ((0, Ref(0, 0)),)),), ((0, 8),), attrs)
    nodes = [k(0), k(1), k(2), MemsetNode(3, Ref(0, 0), 0, 1, 16), k(4), k(5, {"priority": 1}),
             k(6), k(7), k(8)]
    chain = [Edge(i, i + 1) for i in range(8)] + [Edge(0, 8)]   # node 8 waits on 0 and 7
    snap = Snapshot(graphs=[Graph("g", nodes, chain)],
                    regions=[Region(0, RegionKind.ALLOCATION, 64, Policy.SCRATCH)], images=[],
                    kernels=[Kernel(0, "k", "0" * 32, ((0, 8),))], device={"arch": 90})
    plan = GraphPlan(snap, snap.graphs[0], set(), param_offsets(snap.kernels))
    assert plan.runs == [(0, 3, True), (3, 4, False), (4, 8, True), (8, 9, False)]
    assert plan.attr_rel.tolist() == [-1, -1, -1, -1, -1, 0, -1, -1, -1]
    assert plan.ndeps_array.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 2]


def test_python_fallback_sets_the_same_attribute_blocks(monkeypatch):
    """GraphBuilder.set_attributes (the loop's Python twin) reads the blocks the C loop reads."""
    from cgsnap.cuda import driver
    from cgsnap.cuda.driver import GraphBuilder, launch_attribute_block
    seen = []

    def fake(node, attr, value):
        seen.append((node, attr, ctypes.string_at(value, 64)))
        return 0
    cb = SET_ATTR(fake)
    monkeypatch.setattr(GraphBuilder, "_set_attribute", cb)
    builder = object.__new__(GraphBuilder)
    blob = np.frombuffer(b"\0" * 8 + launch_attribute_block({"cluster_dim": (2, 1, 1),
                                                             "priority": 3}), np.uint8)
    builder.set_attributes(0x1234, blob, 8, "node 0")
    assert [(n, a) for n, a, _ in seen] == [(0x1234, 4), (0x1234, 8)]
    assert seen[0][2] == struct.pack("<3I", 2, 1, 1).ljust(64, b"\0")
    monkeypatch.setattr(GraphBuilder, "_set_attribute", SET_ATTR(lambda n, a, v: 1))
    monkeypatch.setattr(driver, "error_name", lambda err: "CUDA_ERROR_INVALID_VALUE")  # no driver
    with pytest.raises(driver.DriverError, match="cuGraphKernelNodeSetAttribute \\(node 0\\)"):
        builder.set_attributes(0x1234, blob, 8, "node 0")


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_library_others_can_write_is_not_loaded(loop, tmp_path, monkeypatch, mode):
    path = native.library_path(build=False)
    os.chmod(path, mode)
    monkeypatch.setattr(native, "_loaded", {})
    assert native.library_path(build=False) is None
    assert native.node_loop() is None           # and no rebuild over someone else's file
    assert os.stat(path).st_mode & 0o777 == mode


def test_stale_half_written_builds_are_removed(tmp_path, monkeypatch):
    """A build whose process died left ``.nodeloop-KEY.so.tmp-PID-RANDOM``: the next build
    removes it (that pid is gone); a live writer's temporary stays."""
    monkeypatch.setenv("CGSNAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    d = tmp_path / "native"
    d.mkdir(mode=0o700)
    name = native._library_name()[0]
    dead = _dead_pid()
    old, live = d / f".{name}.tmp-{dead}-0123", d / f".{name}.tmp-{os.getppid()}-4567"
    old.write_bytes(b"x")
    live.write_bytes(b"x")
    assert native.node_loop() is not None
    assert not old.exists() and live.exists()


def _dead_pid() -> int:
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _give_away(path, monkeypatch) -> None:
    """Make ``path`` another user's: chown as root, else pretend to be someone else."""
    if os.geteuid() == 0:
        os.chown(path, 4242, 4242)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)


def _fresh(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})


def test_a_symlinked_library_is_not_loaded_nor_rebuilt_over(loop, tmp_path, monkeypatch):
    path = native.library_path(build=False)
    elsewhere = tmp_path / "elsewhere.so"
    os.replace(path, elsewhere)
    os.symlink(elsewhere, path)          # e.g. another account's library
    _fresh(monkeypatch)
    assert native.node_loop() is None
    assert os.path.islink(path)


def test_another_users_library_is_not_loaded(loop, tmp_path, monkeypatch):
    _give_away(native.library_path(build=False), monkeypatch)
    _fresh(monkeypatch)
    assert native.node_loop() is None


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_cache_directory_others_can_write_is_not_used(loop, tmp_path, monkeypatch, mode):
    os.chmod(tmp_path / "native", mode)
    _fresh(monkeypatch)
    assert native.library_path(build=False) is None and native.node_loop() is None


def test_a_symlinked_cache_directory_is_not_used(loop, tmp_path, monkeypatch):
    os.replace(tmp_path / "native", tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "native")
    _fresh(monkeypatch)
    assert native.node_loop() is None


def test_the_checked_file_is_what_is_loaded(loop, tmp_path, monkeypatch):
    """The swap of the issue (a symlink exchanged between the check and dlopen) made
    deterministic: right after the checks pass, the path is made to name something else. What
    is loaded is the descriptor that was checked, so the loop still works; loading by path
    would have read the replacement (not a library: dlopen fails)."""
    from cgsnap import _fs
    path = native.library_path(build=False)
    real_open = _fs.open_private
    swapped = []

    def open_then_swap(name, dir_fd, flags=os.O_RDONLY):
        fd = real_open(name, dir_fd, flags)
        junk = tmp_path / "junk.so"
        junk.write_bytes(b"not a library")
        os.replace(path, tmp_path / "checked.so")
        os.symlink(junk, path)
        swapped.append(path)
        return fd
    monkeypatch.setattr(_fs, "open_private", open_then_swap)
    _fresh(monkeypatch)
    fn = native.node_loop()
    assert swapped and fn is not None
    code, _, calls, *_ = drive(fn, 5)
    assert code == 0 and len(calls) == 5
