"""A restore that fails at any step frees everything it made (GPU)."""
from __future__ import annotations

import copy
import gc

import pytest

import cgsnap
from cgsnap.cuda import driver
from cgsnap.format import fileformat

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    cgsnap.start_recorder()
    from workloads import BindingsGraph
    wl = BindingsGraph()
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


def test_hundred_failing_restores_leave_device_memory_unchanged(good, tmp_path):
    files = [(rewrite(good, tmp_path / f"{fn.__name__}.cgsnap", fn), err) for fn, err in CASES]
    with cgsnap.load(good) as r:           # warm-up: driver-internal one-time reservations
        r.graph("g").launch()
        r.synchronize()
    for path, err in files:                 # ... and one failure of each kind (the driver
        with pytest.raises(err):            # releases some memory lazily, on a later call)
            cgsnap.load(path)
    gc.collect()                            # other tests' garbage must not move the baseline
    driver.ctx_sync()
    free_before, _ = driver.mem_get_info()
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
    driver.ctx_sync()
    free_after, _ = driver.mem_get_info()
    print(f"{failures} failing restores; free device memory before {free_before >> 20} MiB, "
          f"after {free_after >> 20} MiB")
    assert abs(free_after - free_before) <= 1 << 20
