"""Can this machine run the snapshot? Checked before any GPU memory is touched.

The driver's major version, the device arch against every kernel's image (a cubin of the same
arch family, or carried PTX when JIT is allowed), and every image the restore will load: a
well-formed cubin (or PTX) that holds the kernels asked of it.
"""
from __future__ import annotations

from ..binary import elf, ptx
from ..binary.elf import arch_runs_on
from ..errors import BinaryFormatError, CompatibilityError, FormatError, KernelNotFoundError


def driver_version_text(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def allow_jit_ok(allow_jit: bool, ptx_image, device_arch: int) -> bool:
    """PTX for compute_XX JITs on any device of arch >= XX, when the caller allows it."""
    return allow_jit and ptx_image.kind == "ptx" and ptx_image.arch <= device_arch


def choose_images(snap, dev_arch: int, dev_name: str, driver_version: int, allow_jit: bool,
                  path: str) -> dict:
    """``{kernel id: KernelImage}``: which image to load for each kernel, or a typed error."""
    recorded = int(snap.device.get("driver", 0) or 0)
    if recorded and driver_version // 1000 < recorded // 1000:
        raise CompatibilityError(
            f"{path}: the snapshot was taken with CUDA driver {driver_version_text(recorded)}; "
            f"this machine's driver is {driver_version_text(driver_version)}, older than its "
            "major version")
    images = {im.hash: im for im in snap.images}
    names: dict = {}                  # image hash -> its arch name as the cubin states it
    choice, problems = {}, []
    for k in snap.kernels:
        im = images[k.image]
        if im.kind == "cubin" and im.hash not in names:
            names[im.hash] = image_arch_name(im)
        if im.kind == "cubin" and arch_runs_on(im.arch, names[im.hash], dev_arch):
            choice[k.id] = im
        elif k.ptx_image and allow_jit_ok(allow_jit, images[k.ptx_image], dev_arch):
            choice[k.id] = images[k.ptx_image]
        else:
            problems.append(k.name)
    check_images(snap, choice, path)
    if problems:
        has_ptx = any(k.ptx_image for k in snap.kernels)
        hint = (" (the file carries PTX: pass allow_jit=True / --allow-jit to JIT it)"
                if has_ptx and not allow_jit else "")
        raise CompatibilityError(
            f"{path}: the snapshot needs sm_{snap.arch} ({snap.device.get('name', '?')}); this "
            f"machine has sm_{dev_arch} ({dev_name}). {len(problems)} kernel(s) cannot run "
            f"here, e.g. {problems[0]}{hint}")
    return choice


def image_arch_name(im) -> str:
    """``sm_90a``-style name of a cubin image from its own header: an arch-specific build
    (``a``/``f``) runs only on exactly its arch. An unreadable image keeps the plain name here;
    :func:`check_images` refuses it."""
    try:
        return elf.cubin_arch_name(im.data)
    except BinaryFormatError:
        return f"sm_{im.arch}"


def check_images(snap, choice: dict, path: str) -> None:
    """Every image the restore will load is a well-formed cubin (or PTX) holding the kernels
    asked of it."""
    wanted: dict = {}
    for k in snap.kernels:
        if k.id in choice:
            wanted.setdefault(choice[k.id].hash, (choice[k.id], []))[1].append(k.name)
    for h, (im, names) in wanted.items():
        if im.kind == "ptx":
            defined = set(ptx.kernels(im.data))
            missing = [n for n in names if n not in defined]
        else:
            try:
                missing = elf.check_cubin(im.data, names)
            except BinaryFormatError as exc:
                raise FormatError(f"kernel image {h} is not a loadable cubin: {exc}",
                                  path=path) from None
        if missing:
            raise KernelNotFoundError(f"{path}: kernel {missing[0]} is not in its image {h}"
                                      + (f" (nor {len(missing) - 1} more)"
                                         if len(missing) > 1 else ""))
