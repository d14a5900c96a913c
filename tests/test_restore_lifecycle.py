"""The restore's resource ledger and lifecycle, without a GPU: every resource is freed once, in
dependency order, every step is attempted even after one fails, the failure is raised afterwards,
and a restore nobody closes is freed when it is collected (tests/gpu/test_gpu_lifecycle.py
checks the same on the card)."""
from __future__ import annotations

import gc

import pytest

from cgsnap.errors import DriverError, RestoreError
from cgsnap.restore import ledger as ledger_mod
from cgsnap.restore.ledger import Ledger


@pytest.fixture
def freed(monkeypatch):
    log = []

    def releaser(kind):
        def release(handle):
            log.append((kind, handle))
            if handle == "bad":
                raise DriverError("cuMemFree", 700, "CUDA_ERROR_ILLEGAL_ADDRESS")
        return release
    monkeypatch.setattr(ledger_mod, "_RELEASE", {k: releaser(k) for k in ledger_mod._KINDS})
    monkeypatch.setattr(ledger_mod.driver, "ctx_sync", lambda: log.append(("sync", None)))
    return log


def test_release_order_and_once(freed):
    led = Ledger("f.cgsnap")
    led.add("device", 1)
    led.add("library", 2)
    led.add("graph", 3)
    led.add("exec", 4)
    led.add("device", 5)
    led.add("event", 6)
    led.release()
    assert freed == [("sync", None), ("exec", 4), ("graph", 3), ("event", 6), ("library", 2),
                     ("device", 5), ("device", 1)]
    led.release()                                  # idempotent
    assert len(freed) == 7


def test_a_failed_step_does_not_stop_the_others_and_is_raised(freed):
    led = Ledger("f.cgsnap")
    led.add("device", 1)
    led.add("device", "bad")
    led.add("host", 2)
    with pytest.raises(RestoreError, match=r"f.cgsnap: 1 step\(s\).*CUDA_ERROR_ILLEGAL_ADDRESS"):
        led.release()
    assert ("device", 1) in freed and ("host", 2) in freed


def test_forget_removes_a_handle_released_by_its_user(freed):
    led = Ledger("f.cgsnap")
    s = object()
    led.add("stager", s)
    led.forget("stager", s)
    led.release()
    assert freed == [] or freed == [("sync", None)]


def test_finalizer_frees_an_unclosed_owner(freed):
    class Owner:
        pass
    owner = Owner()
    led = Ledger("f.cgsnap")
    led.add("device", 7)
    fin = led.finalize_with(owner)
    assert fin.alive and fin.atexit is False
    del owner
    gc.collect()
    assert ("device", 7) in freed and not led.open


def test_finalizer_swallows_release_errors(freed):
    class Owner:
        pass
    owner = Owner()
    led = Ledger("f.cgsnap")
    led.add("device", "bad")
    led.finalize_with(owner)
    del owner
    gc.collect()                      # must not raise from the collector
    assert ("device", "bad") in freed


def test_a_closed_restore_refuses_every_public_call():
    """Restored's public methods check the lifecycle first (no GPU needed to see it)."""
    from cgsnap.restore.restored import Restored, RestoredGraph
    r = Restored.__new__(Restored)
    r.path, r._closed = "f.cgsnap", True
    for call in (lambda: r.graph("g"), lambda: r.buffer("x"), lambda: r.buffers,
                 r.reset, lambda: r.read_region(0), lambda: r.expected("g", 0), r.synchronize,
                 lambda: RestoredGraph(r, "g").launch(), lambda: RestoredGraph(r, "g").instantiate(),
                 lambda: RestoredGraph(r, "g").set_rng(1, 0), lambda: RestoredGraph(r, "g").rng):
        with pytest.raises(RestoreError, match="closed"):
            call()
