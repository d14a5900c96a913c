"""The process's pinned staging cache (no GPU: allocation is stubbed): a ring's slots come
back to it on close, a larger ring (CGSNAP_SCAN_RING) keeps all of its slots, and
CGSNAP_PINNED_CACHE=0 keeps none."""
from cgsnap.cuda import driver, transfer


def _stub(monkeypatch):
    allocs, freed = [], []
    monkeypatch.setattr(driver, "host_alloc", lambda n: allocs.append(n) or 0x1000 * len(allocs))
    monkeypatch.setattr(driver, "host_free", freed.append)
    monkeypatch.setattr(transfer, "_pinned_free", [])
    return allocs, freed


def _cycle(slots: int, keep: int) -> None:
    bufs = [transfer._take_pinned(transfer.CHUNK) for _ in range(slots)]
    for b in bufs:
        transfer._give_pinned(b, transfer.CHUNK, keep=keep)


def test_a_16_slot_ring_is_warm_on_its_second_run(monkeypatch):
    allocs, freed = _stub(monkeypatch)
    _cycle(16, keep=16)
    assert len(allocs) == 16 and not freed
    _cycle(16, keep=16)
    assert len(allocs) == 16, "the second run allocated again"


def test_the_default_cache_keeps_eight_slots(monkeypatch):
    allocs, freed = _stub(monkeypatch)
    _cycle(12, keep=transfer.MAX_PINNED_CACHED)
    assert len(freed) == 12 - transfer.MAX_PINNED_CACHED


def test_no_cache_frees_every_slot(monkeypatch):
    allocs, freed = _stub(monkeypatch)
    monkeypatch.setenv("CGSNAP_PINNED_CACHE", "0")
    _cycle(4, keep=16)
    assert len(freed) == 4


def test_thread_and_ring_knobs_refuse_what_is_not_a_plain_number(monkeypatch):
    from cgsnap.capture.contents import READ_RING, scan_ring
    from cgsnap.format.fileformat import hash_threads, io_threads
    for bad in ("\u00b2", "-3", "0", "x", "", "9" * 5000):
        monkeypatch.setenv("CGSNAP_SCAN_RING", bad)
        monkeypatch.setenv("CGSNAP_HASH_THREADS", bad)
        monkeypatch.setenv("CGSNAP_IO_THREADS", bad)
        assert scan_ring() == READ_RING and 2 <= hash_threads() <= 8 and 2 <= io_threads() <= 8
    monkeypatch.setenv("CGSNAP_SCAN_RING", "99")
    monkeypatch.setenv("CGSNAP_HASH_THREADS", "1000")
    assert scan_ring() == 32 and hash_threads() == 64
