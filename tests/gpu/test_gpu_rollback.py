"""A restore that fails at any step frees everything it made (GPU)."""
from __future__ import annotations

import copy

import pytest

import cgsnap
from cgsnap.cuda import driver
from cgsnap.format import fileformat

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def good(tmp_path_factory, request):
    cgsnap.start_recorder()
    from workloads import BindingsGraph
    wl = BindingsGraph()
    request.addfinalizer(wl.close)
    path = tmp_path_factory.mktemp("rollback") / "good.cgsnap"
    cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="g").save(path)
    return path


def rewrite(src, dst, edit):
    with fileformat.open_file(src) as f:
        manifest = copy.deepcopy(f.manifest)
        blobs = [bytes(f.blob(i)) for i in range(len(f.blobs))]
    edit(manifest, blobs)
    fileformat.write_file(dst, manifest, blobs)
    return dst


def bad_image(m, blobs):
    im = m["images"][0]
    blobs[im["blob"]] = b"\x7fELF" + b"\x00" * 4000        # not a loadable cubin


def missing_kernel(m, blobs):
    m["kernels"][0]["name"] = "no_such_kernel"


def wrong_arch(m, blobs):
    for im in m["images"]:
        im["arch"] = 120 if m["device"]["arch"] != 120 else 100


def out_of_memory(m, blobs):
    r = next(r for r in m["regions"] if r["kind"] == "allocation")
    if "blob" in r:       # its contents become one extent of it (a file uses every blob)
        r["extents"] = [[0, len(blobs[r["blob"]]), r.pop("blob")]]
    r["size"] = 1 << 46                                      # 64 TiB


def wrong_global_size(m, blobs):
    """Fails late: after memory is allocated and images are loaded."""
    r = next(r for r in m["regions"] if r.get("symbol") == "coeff")
    r["size"] *= 2
    blobs[r["blob"]] = bytes(r["size"])


CASES = [(bad_image, cgsnap.FormatError), (missing_kernel, cgsnap.KernelNotFoundError),
         (wrong_arch, cgsnap.CompatibilityError), (out_of_memory, cgsnap.RestoreError),
         (wrong_global_size, cgsnap.RestoreError)]


def _count_gpu_objects(monkeypatch) -> dict:
    """Count every GPU object a restore makes and every one it releases, by kind (process-local,
    so tests running beside this one on the same GPU cannot disturb it)."""
    import threading

    from cgsnap.cuda import graphs
    from cgsnap.restore import ledger
    lock = threading.Lock()
    counts = {"made": {}, "released": {}}

    def bump(side, kind):
        with lock:
            counts[side][kind] = counts[side].get(kind, 0) + 1

    def made(kind, module, name):
        real = getattr(module, name)

        def wrapper(*args, **kw):
            handle = real(*args, **kw)
            bump("made", kind)
            return handle
        monkeypatch.setattr(module, name, wrapper)

    def released(kind):
        real = ledger._RELEASE[kind]

        def wrapper(handle):
            bump("released", kind)
            return real(handle)
        monkeypatch.setitem(ledger._RELEASE, kind, wrapper)
    for kind, module, name in (("device", driver, "mem_alloc"), ("host", driver, "host_alloc"),
                               ("library", driver, "library_load"),
                               ("event", graphs, "event_create"),
                               ("graph", graphs, "graph_create"), ("exec", graphs, "instantiate")):
        made(kind, module, name)
        released(kind)
    return counts


def test_hundred_failing_restores_free_everything_they_made(good, tmp_path, monkeypatch):
    files = [(rewrite(good, tmp_path / f"{fn.__name__}.cgsnap", fn), err) for fn, err in CASES]
    counts = _count_gpu_objects(monkeypatch)
    failures = 0
    for i in range(100):
        if i % 6 == 5:                      # a bind that does not match
            with pytest.raises(cgsnap.BindError):
                cgsnap.load(good, bind={"nonexistent": (0, 4)})
        else:
            path, err = files[i % 6]
            with pytest.raises(err):
                cgsnap.load(path)
        failures += 1
    made, released = counts["made"], counts["released"]
    print(f"{failures} failing restores made {made}, released {released}")
    assert made.get("device", 0) > 0 and made.get("library", 0) > 0, "the failures came too early"
    assert made == released
    # A good restore after them still works and is freed the same way.
    with cgsnap.load(good) as r:
        r.graph("g").launch()
        r.synchronize()
    assert counts["made"] == counts["released"]
