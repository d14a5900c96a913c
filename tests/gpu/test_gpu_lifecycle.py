"""The restore lifecycle on the card: a closed restore refuses every use (no use-after-free), a
restore nobody closes gives its device memory back when collected, and a failed upload leaves
no file pages page-locked."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import cgsnap
from cgsnap.cuda import driver
from cgsnap.cuda.driver import cu

pytestmark = pytest.mark.gpu
BIG = 512 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory, request):
    cgsnap.start_recorder()
    from workloads import BindingsGraph
    wl = BindingsGraph()
    request.addfinalizer(wl.close)
    d = tmp_path_factory.mktemp("lifecycle")
    small = d / "small.cgsnap"
    cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="g").save(small)
    # The same graph with a large scratch buffer beside it, to see its memory come back.
    big = driver.mem_alloc(BIG)
    named = dict(wl.buffers, big=cgsnap.Scratch((big, BIG)))
    large = d / "large.cgsnap"
    cgsnap.snapshot(wl.capture, buffers=named, name="g", record_outputs=False).save(large)
    driver.mem_free(big)
    return small, large


def test_a_closed_restore_refuses_every_use(files):
    small, _ = files
    r = cgsnap.load(small)
    g = r.graph("g")
    buf = r.buffer("x")
    g.launch()
    r.synchronize()
    r.close()
    r.close()                                    # idempotent
    for use in (g.launch, g.instantiate, buf.to_numpy, lambda: buf.copy_from(np.zeros(4096, np.float32)),
                lambda: buf.__cuda_array_interface__, r.synchronize, lambda: r.graph("g"),
                r.reset):
        with pytest.raises(cgsnap.RestoreError, match="closed"):
            use()


def test_an_unclosed_restore_is_freed_when_collected(files):
    """Forgetting ``close()`` (no ``with``) frees the restore's device memory once it is
    collected: the big buffer's allocation no longer exists in this process."""
    _, large = files
    r = cgsnap.load(large)
    r.graph("g").instantiate()
    ptr = r.buffer("big").ptr
    assert driver.address_range(ptr) is not None
    ledger = r._ledger
    del r
    gc.collect()
    assert not ledger.open and not any(ledger.items.values())
    assert driver.address_range(ptr) is None, "the big buffer's allocation is still alive"


def test_a_failed_upload_unlocks_every_file_page(tmp_path, monkeypatch):
    """Stager.upload_mapped: a copy that fails midway leaves no piece page-locked."""
    import mmap

    from cgsnap.cuda import transfer
    driver.init(0)
    size = 3 * transfer.REGISTER_PIECE + 4096
    path = tmp_path / "blob.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())
    dst = driver.mem_alloc(size)
    calls = {"n": 0}
    real_call = transfer.call

    def failing(fn, *args):
        if fn is cu.cuMemcpyHtoDAsync:
            calls["n"] += 1
            if calls["n"] == 2:
                raise cgsnap.DriverError("cuMemcpyHtoDAsync", 1, "CUDA_ERROR_INVALID_VALUE")
        return real_call(fn, *args)
    monkeypatch.setattr(transfer, "call", failing)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        base = int(np.frombuffer(mm, dtype=np.uint8).ctypes.data)
        with transfer.Stager() as stager:
            with pytest.raises(cgsnap.DriverError):
                stager.upload_mapped(dst, base, 0, size, size)
        # Every piece can be page-locked again: none was left registered.
        res = cu.cuMemHostRegister(base, size - size % mmap.PAGESIZE,
                                   cu.CU_MEMHOSTREGISTER_READ_ONLY)
        assert res[0] == cu.CUresult.CUDA_SUCCESS, res[0]
        cu.cuMemHostUnregister(base)
    driver.mem_free(dst)
