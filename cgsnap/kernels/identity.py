"""Exact kernel identity: the very image a live kernel was loaded from.

Several loaded modules can hold a kernel of the same name with different code (torch.compile
autotuning loads one module per candidate configuration; cuDNN's runtime-compiled kernels put one
name in several libraries), so a name is not an identity. The module recorder
(:mod:`cgsnap.kernels.cupti`) sees every load after it starts: which handle each ``cuModuleLoad*``
/ ``cuLibraryLoad*`` call returned, the image it was given, and the cubins the driver delivered
inside it or later inside a call naming that handle. This module keeps those associations
(:class:`LoadTable`) and decides, for a live kernel, which image it runs -- pure Python over
handles, hashes and attribute dicts, so every rule is tested on CPU.

Resolution order (:class:`IdentityResolver`), exact steps first:

1. the node's ``CUkernel`` -> ``cuKernelGetLibrary`` -> a recorded library;
2. the ``CUfunction`` is itself a recorded ``CUkernel``, or was returned by a recorded
   ``cuKernelGetFunction`` (-> its kernel's library) or ``cuModuleGetFunction`` (-> its module);
3. ``cuFuncGetModule`` -> a recorded module, or a module a recorded ``cuLibraryGetModule``
   returned;
4. the function was launched while a cubin was delivered (only with launch tracking on);
5. the libraries a recorded ``cuLibraryGetKernel`` found this name in (at most
   :data:`MAX_LIBRARY_CHECKS`): ``cuLibraryGetModule(lib) == cuFuncGetModule(func)``.

A recorded module or library gives its image: the cubin delivered inside the load call, else one
delivered later in a call naming the handle, else the image the load was given -- a cubin as
is; from a fatbin the entry the driver picks (exact-arch SASS, else the closest lower minor of
the same major; two entries at that rank are told apart by which of them the driver was seen
delivering); PTX needs the JIT's output, looked for among the delivered cubins by the PTX's
function set. Where no step applies (the load happened before the recorder started, scanned
libraries, JIT caches, registered images), the sources are searched by name and the candidates
narrowed by every discriminator there is: the live module's function set, then each candidate's
driver-reported attributes (registers, static shared / constant / local memory, max threads,
binary version, cache mode, parameter layout) against the live function's.

Every choice is then *verified*: the chosen image, loaded on its own, must give the function the
live function's attributes, or the snapshot fails. Nothing is chosen by guess: candidates that
agree on every discriminator but differ in bytes raise :class:`AmbiguousKernelError` naming each
(source and hash) and how they differ.
"""
from __future__ import annotations

import dataclasses
import struct
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import numpy as np

from ..binary import elf, fatbin
from ..errors import AmbiguousKernelError, BinaryFormatError, KernelNotFoundError
from ..format.hashing import content_hash
from .sources import (Candidate, arch_runs_on, cubin_candidate, ptx_candidate, ptx_kernels,
                      ptx_target)

# KernelImage.source of an image the recorder tied to its kernel's load ("recorder: module
# load", "recorder: library input (fatbin sm_90)", ...); name-based finds keep their source's
# label ("recorder", "scan:/path", "registered", ...) with " [by ...]" for the discriminator used.
EXACT_SOURCE_PREFIX = "recorder: "

# ---- the images load calls are given --------------------------------------------------------

FATBIN_WRAPPER_MAGIC = 0x466243B1     # __fatBinC_Wrapper_t: {u32 magic, u32 version, data, ...}
MAX_IMAGE_BYTES = 1 << 31             # larger inputs are not kept (no GPU image comes near)
MAX_SECTIONS = 1 << 20
MAX_TEXT_BYTES = 1 << 28              # PTX text, NUL-terminated
_SHDR = np.dtype([("sh_name", "<u4"), ("sh_type", "<u4"), ("sh_flags", "<u8"),
                  ("sh_addr", "<u8"), ("sh_offset", "<u8"), ("sh_size", "<u8"),
                  ("sh_link", "<u4"), ("sh_info", "<u4"), ("sh_addralign", "<u8"),
                  ("sh_entsize", "<u8")])
_PHDR = np.dtype([("p_type", "<u4"), ("p_flags", "<u4"), ("p_offset", "<u8"), ("p_vaddr", "<u8"),
                  ("p_paddr", "<u8"), ("p_filesz", "<u8"), ("p_memsz", "<u8"),
                  ("p_align", "<u8")])
_TEXT_START = set(b"\t\n\r /.") | set(range(ord("A"), ord("Z") + 1)) | \
    set(range(ord("a"), ord("z") + 1))


def image_extent(peek: Callable[[int, int], bytes],
                 text_length: Callable[[int, int], int]) -> tuple:
    """``(format, size)`` of a loader input, from its own headers: ``format`` is ``cubin``,
    ``fatbin``, ``wrapper`` (a ``__fatBinC_Wrapper_t``: 16 bytes, its fatbin is elsewhere),
    ``ptx`` or ``unknown`` (size 0). ``peek(offset, n)`` returns n bytes of the input,
    ``text_length(offset, limit)`` the length of the NUL-terminated text there (at most limit).

    Only called on inputs the driver accepted, so the headers were read by the driver too; a
    size beyond the bounds here (or a header that contradicts itself) gives ``unknown``."""
    try:
        head = peek(0, 8)
        if head[:4] == b"\x7fELF":
            size = _elf_extent(peek)
            return ("cubin", size) if 0 < size <= MAX_IMAGE_BYTES else ("unknown", 0)
        magic = int.from_bytes(head[:4], "little")
        if magic == fatbin.FATBIN_MAGIC:
            _, _version, header_size, fat_size = struct.unpack("<IHHQ", peek(0, 16))
            size = header_size + fat_size
            if header_size < 16 or size > MAX_IMAGE_BYTES:
                return "unknown", 0
            return "fatbin", size
        if magic == FATBIN_WRAPPER_MAGIC:
            return "wrapper", 16
        if head[0] in _TEXT_START:
            n = text_length(0, MAX_TEXT_BYTES)
            if 0 < n < MAX_TEXT_BYTES:
                return "ptx", n + 1      # with its NUL, as the driver read it
    except (struct.error, ValueError, OverflowError):
        pass
    return "unknown", 0


def _elf_extent(peek) -> int:
    """End of the last byte an ELF64 image's headers account for (section table, program
    headers, every section with file contents); 0 when the header contradicts itself."""
    ehdr = peek(0, 64)
    if ehdr[4] != 2 or ehdr[5] != 1:        # ELFCLASS64, little-endian
        return 0
    phoff, shoff = struct.unpack_from("<QQ", ehdr, 32)
    ehsize, phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHHH", ehdr, 52)
    end = max(ehsize, 64)
    if phnum:
        if phentsize != _PHDR.itemsize or phoff + phnum * phentsize > MAX_IMAGE_BYTES:
            return 0
        ph = np.frombuffer(peek(phoff, phnum * phentsize), dtype=_PHDR)
        end = max(end, phoff + phnum * phentsize, int((ph["p_offset"] + ph["p_filesz"]).max()))
    if shoff:
        if shentsize != _SHDR.itemsize:
            return 0
        if shnum == 0:       # extended numbering: the count is section 0's sh_size
            shnum = struct.unpack_from("<Q", peek(shoff + 32, 8))[0]
        if not 0 < shnum <= MAX_SECTIONS or shoff + shnum * shentsize > MAX_IMAGE_BYTES:
            return 0
        sh = np.frombuffer(peek(shoff, shnum * shentsize), dtype=_SHDR)
        with_data = sh[sh["sh_type"] != elf.SHT_NOBITS]
        end = max(end, shoff + shnum * shentsize)
        if len(with_data):
            end = max(end, int((with_data["sh_offset"] + with_data["sh_size"]).max()))
    return end if end <= MAX_IMAGE_BYTES else 0


@dataclass
class ImageInput:
    """The image one load call was given: copied when the call returned, or -- when the caller
    keeps it alive (``CU_LIBRARY_BINARY_IS_PRESERVED``) or it is over the copy budget -- its
    address with the hash of its bytes then, read back on demand and checked against that hash
    (so memory freed and reused since is noticed, never taken for the image)."""
    format: str                            # cubin | fatbin | ptx | file | unknown
    size: int = 0
    data: Optional[bytes] = None
    address: int = 0
    hash: Optional[str] = None             # of the bytes at load (referenced inputs)
    path: Optional[str] = None             # cuModuleLoad / cuLibraryLoadFromFile
    file_id: Optional[tuple] = None        # (st_dev, st_ino, st_size, st_mtime_ns) at load
    preserved: bool = False
    problem: Optional[str] = None          # why it could not be read back, once tried

    def read(self, memory: Callable[[int, int], Optional[bytes]],
             open_file: Optional[Callable] = None) -> Optional[bytes]:
        """The bytes, or None (and ``problem`` says why) when they are no longer there. Bytes
        read back are not kept here (the caller caches them for as long as it needs them)."""
        if self.data is not None:
            return self.data
        if self.problem is not None:
            return None
        if self.address and self.size:
            got = memory(self.address, self.size)
            if got is None or len(got) != self.size or content_hash(got) != self.hash:
                self.problem = "the memory it was loaded from no longer holds it"
                return None
            return got
        if self.path is not None and open_file is not None:
            got = open_file(self.path, self.file_id)
            if got is None:
                self.problem = f"{self.path} changed or is gone since it was loaded"
                return None
            return got
        self.problem = f"the load call's input ({self.format}) was not kept"
        return None


# ---- what was loaded, by handle -----------------------------------------------------------------

@dataclass
class LoadRecord:
    """One recorded module or library handle."""
    kind: str                      # "module" | "library"
    handle: int
    api: str                       # the call that returned it
    input: Optional[ImageInput]
    eager: list = field(default_factory=list)   # cubin hashes delivered inside the load call
    lazy: list = field(default_factory=list)    # ... delivered later, in calls naming the handle
    context: int = 0               # the current context when a module was loaded


class LoadTable:
    """Handle associations built from the recorder's events, in the order they happened.

    Events (tuples; cubins already hashed)::

        ("load", kind, handle, api, ImageInput | None, [hash, ...], context)
        ("unload", kind, handle)                       # recorded at the call's entry
        ("cubin", hash, owner)                         # owner: None | (kind, handle), kind in
                                                       #   module, library, kernel, launch
        ("kernel", CUkernel, CUlibrary, name)          # cuLibraryGetKernel
        ("function", CUfunction, CUkernel, context)    # cuKernelGetFunction
        ("module_function", CUfunction, CUmodule, name)  # cuModuleGetFunction
        ("library_module", CUlibrary, CUmodule, context) # cuLibraryGetModule
        ("context_destroyed", CUcontext)
        ("cache_config", "function" | "kernel", handle, CUfunc_cache, CUdevice | None)
                                                       # cuFuncSetCacheConfig /
                                                       #   cuKernelSetCacheConfig (per device)

    Unloads drop every association of the handle (handles are reused); a destroyed context
    drops its modules and functions."""

    def __init__(self):
        self.modules: dict = {}            # CUmodule -> LoadRecord
        self.libraries: dict = {}          # CUlibrary -> LoadRecord
        self.kernels: dict = {}            # CUkernel -> (CUlibrary, name)
        self.functions: dict = {}          # CUfunction -> (CUkernel, context)
        self.module_functions: dict = {}   # CUfunction -> CUmodule
        self.library_modules: dict = {}    # CUmodule -> (CUlibrary, context)
        self.launched: dict = {}           # CUfunction / CUkernel -> [hash] delivered in its launch
        self.by_name: dict = {}            # kernel name -> {CUlibrary} (cuLibraryGetKernel)
        self.cache_configs: dict = {}      # handle -> {CUdevice: CUfunc_cache} last set (a
                                           #   function's setting under None)
        self.unattributed = 0              # cubins delivered outside any tracked call
        self._lib_kernels: dict = {}       # CUlibrary -> {CUkernel}
        self._kernel_functions: dict = {}  # CUkernel -> {CUfunction}
        self._module_funcs: dict = {}      # CUmodule -> {CUfunction}
        self._lib_modules: dict = {}       # CUlibrary -> {CUmodule}

    def apply(self, event: tuple) -> None:
        kind = event[0]
        if kind == "load":
            _, what, handle, api, inp, hashes, ctx = event
            table = self.modules if what == "module" else self.libraries
            if handle in table:             # reused without a recorded unload
                self._forget(what, handle)
            table[handle] = LoadRecord(what, handle, api, inp, list(hashes), context=ctx)
        elif kind == "unload":
            self._forget(event[1], event[2])
        elif kind == "cubin":
            self._delivered(event[1], event[2])
        elif kind == "kernel":
            _, kern, lib, name = event
            self.kernels[kern] = (lib, name)
            self._lib_kernels.setdefault(lib, set()).add(kern)
            if name:
                self.by_name.setdefault(name, set()).add(lib)
        elif kind == "function":
            _, func, kern, ctx = event
            if self.functions.get(func, (kern, ctx)) != (kern, ctx):
                self.cache_configs.pop(func, None)     # the handle now names another function
            self.functions[func] = (kern, ctx)
            self._kernel_functions.setdefault(kern, set()).add(func)
        elif kind == "module_function":
            _, func, mod, _name = event
            if self.module_functions.get(func, mod) != mod:
                self.cache_configs.pop(func, None)
            self.module_functions[func] = mod
            self._module_funcs.setdefault(mod, set()).add(func)
        elif kind == "library_module":
            _, lib, mod, ctx = event
            self.library_modules[mod] = (lib, ctx)
            self._lib_modules.setdefault(lib, set()).add(mod)
        elif kind == "context_destroyed":
            self._context_destroyed(event[1])
        elif kind == "cache_config":
            _, _what, handle, config, dev = event
            self.cache_configs.setdefault(handle, {})[dev] = int(config)

    def cache_config(self, func: int, kern: int = 0, device: Optional[int] = None) -> Optional[int]:
        """The cache preference last set on the function ``func`` or, failing that, on its
        kernel ``kern`` for ``device`` (None: never set while recording; a kernel's setting
        for an unknown device counts only where it was set for one device alone)."""
        got = self.cache_configs.get(func, {}).get(None)
        for k in (kern, (self.functions.get(func) or (0,))[0]):
            settings = self.cache_configs.get(k) if k and got is None else None
            if not settings:
                continue
            if None in settings:        # cuFuncSetCacheConfig on a CUkernel cast to a CUfunction
                got = settings[None]
            elif device is not None:
                got = settings.get(device)
            elif len(settings) == 1:
                got = next(iter(settings.values()))
        return got

    def _delivered(self, h: str, owner) -> None:
        record = None
        if owner is not None:
            what, handle = owner
            if what == "launch":
                self.launched.setdefault(handle, []).append(h)
                record = self._record_of_function(handle)
            elif what == "module":
                record = self.modules.get(handle)
            elif what == "library":
                record = self.libraries.get(handle)
            elif what == "kernel":
                lib = self.kernels.get(handle, (None,))[0]
                record = self.libraries.get(lib)
        if record is not None:
            record.lazy.append(h)
        elif owner is None or owner[0] != "launch":
            self.unattributed += 1

    def _record_of_function(self, handle: int) -> Optional[LoadRecord]:
        if handle in self.kernels:
            return self.libraries.get(self.kernels[handle][0])
        if handle in self.functions:
            lib = self.kernels.get(self.functions[handle][0], (None,))[0]
            return self.libraries.get(lib)
        if handle in self.module_functions:
            return self.modules.get(self.module_functions[handle])
        return None

    def _forget(self, what: str, handle: int) -> None:
        if what == "module":
            self.modules.pop(handle, None)
            self._forget_module_functions(handle)
            lib = self.library_modules.pop(handle, (None,))[0]
            if lib is not None:
                self._lib_modules.get(lib, set()).discard(handle)
            return
        self.libraries.pop(handle, None)
        for kern in self._lib_kernels.pop(handle, ()):
            name = self.kernels.pop(kern, (None, None))[1]
            if name in self.by_name:
                self.by_name[name].discard(handle)
                if not self.by_name[name]:
                    del self.by_name[name]
            self.launched.pop(kern, None)
            self.cache_configs.pop(kern, None)
            for func in self._kernel_functions.pop(kern, ()):
                self.functions.pop(func, None)
                self.launched.pop(func, None)
                self.cache_configs.pop(func, None)
        for mod in self._lib_modules.pop(handle, ()):
            self.library_modules.pop(mod, None)
            self._forget_module_functions(mod)

    def _forget_module_functions(self, mod: int) -> None:
        for func in self._module_funcs.pop(mod, ()):
            self.module_functions.pop(func, None)
            self.launched.pop(func, None)
            self.cache_configs.pop(func, None)

    def _context_destroyed(self, ctx: int) -> None:
        for mod in [m for m, r in self.modules.items() if r.context == ctx]:
            self._forget("module", mod)
        for func in [f for f, (_, c) in self.functions.items() if c == ctx]:
            kern = self.functions.pop(func)[0]
            self._kernel_functions.get(kern, set()).discard(func)
            self.launched.pop(func, None)
            self.cache_configs.pop(func, None)
        for mod in [m for m, (_, c) in self.library_modules.items() if c == ctx]:
            lib = self.library_modules.pop(mod)[0]
            self._lib_modules.get(lib, set()).discard(mod)
            self._forget_module_functions(mod)


# ---- the live kernel, as the driver reports it ------------------------------------------------

class LiveFunction(Protocol):
    """What resolution asks of the live kernel (:class:`cgsnap.kernels.live.DriverFunction`)."""
    name: str
    func: int                       # CUfunction handle
    kern: int                       # CUkernel handle of the node, 0 if none
    module: Optional[int]           # cuFuncGetModule(func)

    def kernel_library(self) -> Optional[int]: ...          # cuKernelGetLibrary(kern)
    def library_module(self, lib: int) -> Optional[int]: ...  # cuLibraryGetModule(lib)
    def attributes(self) -> Optional[dict]: ...              # see COMPARED_ATTRIBUTES
    def module_functions(self) -> frozenset: ...             # names in its module


class Probe(Protocol):
    def attributes(self, cand: Candidate, name: str) -> Optional[dict]:
        """The attributes ``name`` has when ``cand`` is loaded on its own; None when the image
        cannot be loaded or lacks the kernel."""


# Attributes the image fixes and nobody can change after load (REQUIRED_CLUSTER_*, the carveout
# and MAX_DYNAMIC_SHARED_SIZE_BYTES can be set at run time; PTX_VERSION of a JIT-compiled
# function need not match the cubin the JIT produced), plus "params": the parameter layout.
COMPARED_ATTRIBUTES = ("num_regs", "shared_size_bytes", "const_size_bytes", "local_size_bytes",
                       "max_threads_per_block", "binary_version", "cache_mode_ca",
                       "cluster_size_must_be_set", "params")
MAX_LIBRARY_CHECKS = 32     # step 5: cuLibraryGetModule calls per kernel
MAX_PROBES = 16             # candidates loaded to compare attributes, per kernel


def attribute_differences(want: dict, got: Optional[dict]) -> list:
    """``[(name, live value, candidate value)]`` over the attributes both report."""
    if got is None:
        return [("load", "ok", "failed")]
    return [(k, want[k], got[k]) for k in COMPARED_ATTRIBUTES
            if k in want and k in got and want[k] != got[k]]


def _describe_attrs(attrs: dict) -> str:
    return ", ".join(f"{k}={attrs[k]}" for k in COMPARED_ATTRIBUTES if k in attrs and k != "params")


def _label(c: Candidate) -> str:
    return f"{c.source} {c.hash[:16]}"


def _section_differences(cands: list, limit: int = 4) -> str:
    """Sections whose bytes differ between the candidates (by name), for the error message."""
    try:
        tables = []
        for c in cands:
            e = elf.ElfFile(c.data)
            tables.append({s.name: content_hash(e.section_data(s)) for s in e.sections})
    except BinaryFormatError:
        return ""
    names = sorted(set().union(*tables))
    differ = [n for n in names if len({t.get(n) for t in tables}) > 1]
    if not differ:
        return ""
    more = f" and {len(differ) - limit} more" if len(differ) > limit else ""
    return "sections that differ: " + ", ".join(differ[:limit]) + more


_FIX = ("Start the recorder before these kernels are loaded (cgsnap.start_recorder() first "
        "thing, or CGSNAP_RECORD=1), so the load itself identifies the image; or register only "
        "the right image with cgsnap.register_image().")


def _runnable(c: Candidate, arch: int) -> bool:
    return c.kind == "cubin" and arch_runs_on(c.arch, c.arch_name, arch)


# ---- the image a recorded load gives ----------------------------------------------------------

@dataclass
class Found:
    """What an exact step found: a record (or the cubins a launch delivered) and how."""
    how: str
    record: Optional[LoadRecord] = None
    delivered: tuple = ()            # hashes (launch step)


def exact_record(table: LoadTable, live: LiveFunction) -> Optional[Found]:
    """Steps 1-5 of the module docstring: the recorded load the live function comes from."""
    if live.kern:
        lib = live.kernel_library()
        if lib in table.libraries:
            return Found("the node's CUkernel is in this library", table.libraries[lib])
    f = live.func or None          # 0: no function handle (a name-only lookup)
    if f in table.kernels and table.kernels[f][0] in table.libraries:
        return Found("the function is a CUkernel of this library",
                     table.libraries[table.kernels[f][0]])
    if f in table.functions:
        lib = table.kernels.get(table.functions[f][0], (None,))[0]
        if lib in table.libraries:
            return Found("cuKernelGetFunction returned this function for a kernel of this "
                         "library", table.libraries[lib])
    if f in table.module_functions and table.module_functions[f] in table.modules:
        return Found("cuModuleGetFunction returned this function",
                     table.modules[table.module_functions[f]])
    mod = live.module
    if mod is not None:
        if mod in table.modules:
            return Found("cuFuncGetModule gives this module", table.modules[mod])
        lib = table.library_modules.get(mod, (None,))[0]
        if lib in table.libraries:
            return Found("cuFuncGetModule gives this library's module", table.libraries[lib])
    if f in table.launched:
        return Found("delivered inside a launch of this function",
                     delivered=tuple(table.launched[f]))
    if live.kern and live.kern in table.launched:
        return Found("delivered inside a launch of this kernel",
                     delivered=tuple(table.launched[live.kern]))
    if mod is not None:
        libs = sorted(lib for lib in table.by_name.get(live.name, ()) if lib in table.libraries)
        for lib in libs[:MAX_LIBRARY_CHECKS]:
            if live.library_module(lib) == mod:
                return Found("cuLibraryGetModule of this library gives the function's module",
                             table.libraries[lib])
    return None


def _entry_rank(entry, arch: int) -> Optional[int]:
    """Lower is what the driver prefers; None when the entry's SASS cannot run on ``arch``."""
    if entry.kind != "cubin" or not arch_runs_on(entry.arch, entry.arch_name, arch):
        return None
    return arch - entry.arch


def input_images(data: bytes, label: str, arch: int,
                 pool: Callable[[str], Optional[Candidate]]) -> tuple:
    """``(cubins, ptx, note)`` of a load input: the cubin(s) the driver loads from it on
    ``arch`` (a cubin as is; from a fatbin the best-ranked SASS entries, narrowed to those the
    driver was seen delivering when there are several); the best PTX it holds (for
    ``allow_jit`` restores and the JIT search); a note saying why there is no cubin."""
    if data[:4] == b"\x7fELF":
        c = cubin_candidate(data, label)
        if c is None:
            return [], None, "the cubin it was given does not parse"
        if not _runnable(c, arch):
            return [], None, f"the cubin it was given is for {c.arch_name}"
        return [c], None, ""
    if int.from_bytes(data[:4], "little") == fatbin.FATBIN_MAGIC:
        try:
            container = next(fatbin.iter_containers(memoryview(data)))
        except (BinaryFormatError, StopIteration):
            return [], None, "the fatbin it was given does not parse"
        ranked = [(r, e) for e in container.entries if (r := _entry_rank(e, arch)) is not None]
        ptx_entries = [e for e in container.entries if e.kind == "ptx" and e.arch <= arch]
        ptx = None
        if ptx_entries:
            best = max(ptx_entries, key=lambda e: e.arch)
            try:
                ptx = ptx_candidate(best.payload(), best.arch,
                                    f"{label} (fatbin compute_{best.arch})")
            except BinaryFormatError:
                ptx = None
        if not ranked:
            return [], ptx, ("the fatbin has no SASS for this device (the driver JIT-compiled "
                             "its PTX)")
        top = min(r for r, _ in ranked)
        group = []
        for _, e in (x for x in ranked if x[0] == top):
            try:
                c = cubin_candidate(e.payload(), f"{label} (fatbin {e.arch_name})")
            except BinaryFormatError:
                c = None
            if c is not None:
                group.append(c)
        if len(group) > 1:
            # The driver delivered one of them when it loaded the module: prefer what it did.
            seen = [c for c in group if pool(c.hash) is not None]
            group = seen or group
        return group, ptx, "" if group else "its fatbin entries do not parse"
    text = data.rstrip(b"\0")
    if b".entry" in text:
        try:
            ptx = ptx_candidate(text, ptx_target(text), f"{label} (PTX)")
        except BinaryFormatError:
            return [], None, "it was PTX without a .target"
        return [], ptx, "it was PTX (the driver JIT-compiled it)"
    return [], None, "its format is not one cgsnap reads"


# ---- the resolver -------------------------------------------------------------------------------

class IdentityResolver:
    """Finds, for a live kernel, the image it was loaded from (see the module docstring).

    ``sources``: the name-based sources in order (:mod:`cgsnap.kernels.sources`); ``recorded``:
    the :class:`~cgsnap.kernels.sources.RecorderSource` whose recorder keeps a :class:`LoadTable`
    (None without a recorder); ``probe``: loads candidates to read their attributes;
    ``verify``: check every choice against the live function's attributes;
    ``memory`` / ``open_file``: read back referenced load inputs."""

    def __init__(self, device_arch: int, sources: list, recorded=None,
                 probe: Optional[Probe] = None, verify: bool = True, memory: Optional[Callable] = None,
                 open_file: Optional[Callable] = None):
        self.arch = device_arch
        self.sources = sources
        self.recorded = recorded
        self.probe = probe
        self.verify = verify
        self.memory = memory or (lambda address, size: None)
        self.open_file = open_file
        self._inputs: dict = {}          # id(ImageInput) -> input_images(...)
        self._input_owners: list = []
        # Images the probe loaded are unloaded when the resolver (one snapshot's) goes away.
        close = getattr(probe, "close", None)
        self._finalizer = weakref.finalize(self, close) if close is not None else None
        if self._finalizer is not None:
            self._finalizer.atexit = False

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    # -- entry points ------------------------------------------------------------------------
    def resolve_function(self, name: str, func, kern=None, module=None) -> Candidate:
        """The image of the live kernel ``func`` (a kernel node's ``func`` / ``kern``; ``module``
        is ``cuFuncGetModule(func)``); its ``source`` says how it was found."""
        from .live import DriverFunction
        return self.resolve_live(DriverFunction(name, func, kern, module))

    def cache_config(self, func, kern=None, device: Optional[int] = None) -> Optional[int]:
        """The cache preference the recorder saw set on this function (None: none seen, or no
        recorder)."""
        table = self._table()
        return None if table is None else table.cache_config(int(func or 0), int(kern or 0),
                                                             device)

    def resolve(self, name: str, module_functions: Callable[[], frozenset]) -> Candidate:
        """By name and the live module's function set only (no handle, no attributes)."""
        return self.resolve_live(_NameOnly(name, module_functions))

    def resolve_live(self, live: LiveFunction) -> Candidate:
        notes: list = []
        table = self._table()
        if table is not None:
            found = exact_record(table, live)
            if found is not None:
                cands, ptx, note = self._found_candidates(found, live.name, live)
                if cands:
                    return self._settle(cands, ptx, live, exact=True, why=found.how)
                notes.append(f"the recorder saw its load ({found.how}) but {note}")
        return self._by_name(live, notes)

    # -- exact --------------------------------------------------------------------------------
    def _table(self) -> Optional[LoadTable]:
        if self.recorded is None:
            return None
        self.recorded.sync()
        return getattr(self.recorded.rec, "loads", None)

    def _pool(self, h: str) -> Optional[Candidate]:
        return self.recorded.index.by_hash.get(h) if self.recorded is not None else None

    def _found_candidates(self, found: Found, name: str, live: LiveFunction) -> tuple:
        record = found.record
        if record is None:
            return self._delivered(found.delivered, name, f"{EXACT_SOURCE_PREFIX}launch"), None, \
                "none of the cubins delivered in its launches holds it"
        label = f"{EXACT_SOURCE_PREFIX}{record.kind} load"
        got = self._delivered(record.eager, name, label)
        got += [c for c in self._delivered(record.lazy, name, f"{label} (lazy)")
                if c.hash not in {g.hash for g in got}]
        ptx = None
        note = "no cubin delivered for it holds the kernel"
        inp = record.input
        # The input is needed when nothing delivered holds the kernel; when it is a fatbin or
        # PTX it also gives the PTX a restore on a newer device may JIT (allow_jit).
        if inp is not None and (not got or inp.format in ("fatbin", "ptx")):
            images, ptx, why = self._input_images(record)
            if not got:
                got = [c for c in images if name in c.kernels]
                note = why if not images else "" if got else \
                    "the image the driver loads from its input lacks the kernel"
                if not images and ptx is not None:
                    got, note = self._jit_products(ptx, name, record.kind), \
                        "no delivered cubin matches the JIT of its PTX"
        return got, ptx, note

    def _input_images(self, record: LoadRecord) -> tuple:
        """:func:`input_images` of a record's input, read and parsed once per resolver."""
        key = id(record.input)
        if key not in self._inputs:
            data = record.input.read(self.memory, self.open_file)
            if data is None:
                self._inputs[key] = ([], None,
                                     f"its input cannot be read back: {record.input.problem}")
            else:
                self._inputs[key] = input_images(data, f"{EXACT_SOURCE_PREFIX}{record.kind} input",
                                                 self.arch, self._pool)
            self._input_owners.append(record.input)     # keeps id() unique while cached
        return self._inputs[key]

    def _delivered(self, hashes, name: str, label: str) -> list:
        out, seen = [], set()
        for h in hashes:
            c = self._pool(h)
            if c is not None and h not in seen and name in c.kernels and _runnable(c, self.arch):
                seen.add(h)
                out.append(dataclasses.replace(c, source=label))
        return out

    def _jit_products(self, ptx: Candidate, name: str, kind: str) -> list:
        """Delivered cubins that can be the JIT output of ``ptx``: holding exactly its kernels."""
        if self.recorded is None:
            return []
        wanted = frozenset(ptx_kernels(ptx.data))
        label = f"{EXACT_SOURCE_PREFIX}{kind} JIT output (by function set)"
        return [dataclasses.replace(c, source=label)
                for c in self.recorded.index.find(name)
                if _runnable(c, self.arch) and c.kernels == wanted]

    # -- by name ------------------------------------------------------------------------------
    def _by_name(self, live: LiveFunction, notes: list) -> Candidate:
        tried, rejected = [], []
        for source in self.sources:
            hits = {c.hash: c for c in source.find(live.name)}
            tried.append(source.name)
            runnable = [c for c in hits.values() if _runnable(c, self.arch)]
            if not runnable:
                continue
            ptx = [c for c in hits.values() if c.kind == "ptx"]
            best_ptx = max(ptx, key=lambda c: c.arch) if ptx else None
            how = ""
            if len(runnable) > 1:
                wanted = live.module_functions()
                same = [c for c in runnable if wanted and c.kernels == wanted]
                if same and len(same) < len(runnable):
                    runnable, how = same, "by function set"
            try:
                return self._settle(runnable, best_ptx, live, exact=False, why=how)
            except _NoMatch as exc:
                rejected.append(exc.detail)
                continue
        detail = "; ".join(notes + rejected)
        if rejected:
            raise KernelNotFoundError(
                f"kernel {live.name}: no image found for sm_{self.arch} is the one the live kernel "
                f"runs (searched: {', '.join(tried)}): {detail}. " + _FIX)
        raise KernelNotFoundError(
            f"kernel {live.name} was found in no image for sm_{self.arch} (searched: "
            f"{', '.join(tried)}){'; ' + detail if detail else ''}. Start the module recorder "
            "before the kernel is first loaded (cgsnap.start_recorder() at start-up, or "
            "CGSNAP_RECORD=1), or register its image with cgsnap.register_image(data)")

    # -- choosing and verifying -----------------------------------------------------------------
    def _settle(self, cands: list, ptx: Optional[Candidate], live: LiveFunction, exact: bool,
                why: str) -> Candidate:
        """The one candidate the live function is, verified; :class:`_NoMatch` (name-based) or
        KernelNotFoundError (exact) when none is; AmbiguousKernelError when several are."""
        name = live.name
        want = live.attributes() if (self.probe is not None and
                                     (self.verify or len(cands) > 1)) else None
        probed: dict = {}
        if want is not None:
            if len(cands) > MAX_PROBES:
                raise AmbiguousKernelError(
                    f"kernel {name}: {len(cands)} different images hold it "
                    f"({', '.join(_label(c) for c in cands[:4])}, ...), more than the "
                    f"{MAX_PROBES} cgsnap compares. " + _FIX)
            agree = []
            for c in cands:
                probed[c.hash] = self.probe.attributes(c, name)
                if not attribute_differences(want, probed[c.hash]):
                    agree.append(c)
            if not agree:
                detail = "; ".join(
                    f"{_label(c)}: " + ", ".join(f"{k} {w} live vs {g}" for k, w, g in
                                                  attribute_differences(want, probed[c.hash]))
                    for c in cands)
                if exact:
                    raise KernelNotFoundError(
                        f"kernel {name}: the image the recorder tied to it ({why}) does not give "
                        f"it the live kernel's attributes: {detail}. This should not happen; "
                        "please report it (set CGSNAP_VERIFY_KERNELS=0 to skip the check)")
                raise _NoMatch(f"{len(cands)} image(s) hold it but differ from the live kernel: "
                               f"{detail}")
            if len(agree) < len(cands):
                why = (why + ", " if why else "") + "by attributes"
            cands = agree
        if len(cands) > 1:
            raise AmbiguousKernelError(self._ambiguity(name, cands, live, want, exact, why))
        best = cands[0]
        if exact and "by attributes" in why:      # the load's own entries, told apart
            best = dataclasses.replace(best, source=f"{best.source} [by attributes]")
        elif not exact and why:
            best = dataclasses.replace(best, source=f"{best.source} [{why}]")
        if ptx is not None and best.ptx is None:
            best = dataclasses.replace(best, ptx=ptx)
        return best

    def _ambiguity(self, name: str, cands: list, live, want, exact: bool, why: str) -> str:
        fs = live.module_functions()
        sets = {c.kernels for c in cands}
        parts = [f"kernel {name}: {len(cands)} different images hold it and nothing tells them "
                 f"apart: " + "; ".join(_label(c) for c in cands)]
        if exact:
            parts.append(f"the recorder tied the kernel to a load ({why}) that holds all of them")
        if len(sets) == 1:
            parts.append(f"their function sets are equal ({len(next(iter(sets)))} functions)"
                         + (" and match the live module's" if fs and fs in sets else ""))
        else:
            parts.append("their function sets differ (" + ", ".join(
                f"{c.hash[:8]}: {len(c.kernels)}" for c in cands) + " functions) and the live "
                f"module's ({len(fs)} functions) does not single one out")
        if want is not None:
            parts.append(f"each gives it the live kernel's attributes ({_describe_attrs(want)})")
        else:
            parts.append("their attributes were not compared (no live kernel to compare with)")
        diff = _section_differences(cands)
        parts.append("they differ only in their bytes" + (f" ({diff})" if diff else ""))
        return "; ".join(parts) + ". cgsnap does not choose by guess. " + _FIX


class _NoMatch(Exception):
    def __init__(self, detail: str):
        self.detail = detail


class _NameOnly:
    """A live kernel known only by name and module function set (KernelResolver.resolve)."""

    def __init__(self, name: str, module_functions: Callable[[], frozenset]):
        self.name, self._fs = name, module_functions
        self.func, self.kern, self.module = 0, 0, None

    def kernel_library(self):
        return None

    def library_module(self, lib):
        return None

    def attributes(self):
        return None

    def module_functions(self):
        return self._fs()
