"""Saving from a live process: the GPU check behind cutting kernel images down.

:func:`cgsnap.format.snapfile.prune_images` keeps a cut cubin only when, loaded next to the
whole one, it gives every kept kernel the same parameters and attributes. The format layer never
touches a GPU, so this layer installs the check. It makes a context current itself (the
current one, or device 0's primary context), so what ``save()`` writes does not depend on
whether the caller happened to have a context current: only on whether the machine has a GPU.
"""
from __future__ import annotations

import contextlib

from ..errors import CgsnapError
from ..format import snapfile


def gpu_image_checker():
    """The check of cut images on this machine's GPU, or why there is none."""
    from ..cuda import driver
    from ..kernels import cupti
    try:
        driver.current_device()
    except CgsnapError as exc:
        return f"no GPU to check cut images on ({exc})"

    def check(original, pruned, kernels, variables):
        # The check's loads are cgsnap's, not the program's: a recorder that saw them would
        # keep the cut cubin as one more image of those kernels (the next snapshot's search by
        # name then finds two images that agree on everything: ambiguous, or the cut one).
        rec = cupti.recorder()
        with rec.suppressed() if rec is not None else contextlib.nullcontext():
            return driver.images_agree(original, pruned, kernels, variables)
    return check


snapfile.install_image_checker(gpu_image_checker)
