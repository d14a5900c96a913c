"""Refusal before damage (cgsnap.restore.compat), CPU: what a restore checks of the device, the
driver and the kernel images before any GPU memory is touched, with messages saying what the
snapshot needs and what the machine has. tests/gpu/test_gpu_rollback.py refuses a wrong arch
on the card."""
from __future__ import annotations

import os

import pytest

from cgsnap.errors import CompatibilityError, FormatError, KernelNotFoundError
from cgsnap.format.hashing import content_hash
from cgsnap.format.model import Kernel, KernelImage, Snapshot
from cgsnap.restore.compat import choose_images

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def snapshot(image_file: str = "kernels.sm_90.cubin", kernel: str = "axpy", arch: int = 90,
             ptx: bool = False, data: bytes | None = None) -> Snapshot:
    if data is None:
        with open(os.path.join(FIXTURES, image_file), "rb") as f:
            data = f.read()
    images = [KernelImage(content_hash(data), "cubin", arch, (kernel,), data, "test")]
    k = Kernel(0, kernel, images[0].hash, ((0, 8),))
    if ptx:
        text = b".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry axpy()\n{\nret;\n}\n"
        images.append(KernelImage(content_hash(text), "ptx", 90, (kernel,), text, "test"))
        k.ptx_image = images[1].hash
    return Snapshot(graphs=[], regions=[], images=images, kernels=[k],
                    device={"name": "NVIDIA H200", "arch": arch, "driver": 13000})


def test_a_cubin_runs_on_its_arch_and_later_minors_of_its_major():
    snap = snapshot()
    for dev in (90, 91):
        assert choose_images(snap, dev, "dev", 13000, False, "f.cgsnap")[0] is snap.images[0]


@pytest.mark.parametrize("dev", [89, 100, 120])
def test_another_arch_is_refused_naming_both(dev):
    with pytest.raises(CompatibilityError, match=rf"f.cgsnap: the snapshot needs sm_90 \(NVIDIA "
                                                 rf"H200\); this machine has sm_{dev} \(dev\)\. "
                                                 r"1 kernel\(s\) cannot run here, e\.g\. axpy$"):
        choose_images(snapshot(), dev, "dev", 13000, False, "f.cgsnap")


def test_carried_ptx_is_named_as_the_way_out_and_used_with_allow_jit():
    snap = snapshot(ptx=True)
    with pytest.raises(CompatibilityError, match="carries PTX: pass allow_jit=True"):
        choose_images(snap, 100, "dev", 13000, False, "f.cgsnap")
    assert choose_images(snap, 100, "dev", 13000, True, "f.cgsnap")[0] is snap.images[1]


def test_an_older_driver_major_is_refused():
    with pytest.raises(CompatibilityError, match="taken with CUDA driver 13.0; this machine's "
                                                 "driver is 12.8, older than its major version"):
        choose_images(snapshot(), 90, "dev", 12080, False, "f.cgsnap")
    assert choose_images(snapshot(), 90, "dev", 13020, False, "f.cgsnap")      # newer: fine


def test_a_kernel_missing_from_its_image_is_refused():
    with pytest.raises(KernelNotFoundError, match="kernel no_such_kernel is not in its image"):
        choose_images(snapshot(kernel="no_such_kernel"), 90, "dev", 13000, False, "f.cgsnap")


def test_an_image_that_is_no_cubin_is_a_format_error():
    with pytest.raises(FormatError, match="is not a loadable cubin"):
        choose_images(snapshot(data=b"\x7fELF" + bytes(60)), 90, "dev", 13000, False, "f.cgsnap")


def test_an_arch_specific_cubin_runs_only_on_its_exact_arch():
    """sm_90a (from the cubin's own header, not the image's arch number) runs on sm_90 only."""
    snap = snapshot("kernels.sm_90a.cubin")
    assert choose_images(snap, 90, "dev", 13000, False, "f.cgsnap")[0] is snap.images[0]
    with pytest.raises(CompatibilityError, match="cannot run here"):
        choose_images(snap, 91, "dev", 13000, False, "f.cgsnap")
    plain = snapshot("kernels.sm_90.cubin")
    assert choose_images(plain, 91, "dev", 13000, False, "f.cgsnap")[0] is plain.images[0]
