"""Where the GPU binary of a kernel comes from.

A kernel node holds a CUfunction, which means nothing in another process; we carry the kernel's
mangled name plus the image that holds it. Sources are tried in order, each answering "the images
holding kernel NAME that this device can run":

1. :class:`RecorderSource` -- cubins the CUPTI module recorder saw being loaded (:mod:`cgsnap.kernels.cupti`);
2. :class:`RegisteredSource` -- images the user registered (``cgsnap.register_image``, e.g. NVRTC
   output) plus the on-disk caches of JIT producers (Triton, CuPy);
3. :class:`LoadedObjectScan` -- the ``.nv_fatbin`` sections of every ELF object mapped into the
   process, with an on-disk index cache keyed by file identity.

When a name is in several different images, the original module's function set
(``cuFuncGetModule`` + ``cuModuleEnumerateFunctions``) picks the one that matches; if that does not
settle it the lookup fails with :class:`AmbiguousKernelError` rather than guessing.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import msgpack

from .. import _fs
from ..binary import elf, fatbin, ptx
from ..binary.elf import arch_runs_on  # noqa: F401  (re-exported)
from ..errors import AmbiguousKernelError, BinaryFormatError, KernelNotFoundError, LimitError
from ..format.fileformat import OverBudget, unpackb_bounded
from ..format.hashing import content_hash
from ..limits import DEFAULT_LIMITS, Limits, Meter, resolve

log = logging.getLogger("cgsnap")

INDEX_VERSION = 1


@dataclass
class Candidate:
    """One loadable image that holds a kernel."""
    hash: str
    kind: str                  # "cubin" | "ptx"
    arch: int
    arch_name: str
    kernels: frozenset
    globals: tuple             # ((name, size), ...)
    source: str
    load: Callable[[], bytes] = field(repr=False, default=None)   # the bytes, read on demand
    ptx: Optional["Candidate"] = None

    @property
    def data(self) -> bytes:
        return self.load()


def cubin_candidate(data: bytes, source: str, h: Optional[str] = None) -> Optional[Candidate]:
    try:
        info = elf.cubin_info(data)
    except BinaryFormatError:
        return None
    return Candidate(hash=h or content_hash(data), kind="cubin", arch=info.arch,
                     arch_name=info.arch_name, kernels=frozenset(info.kernels),
                     globals=tuple((g.name, g.size) for g in info.globals), source=source,
                     load=lambda: data)


ptx_kernels, ptx_target = ptx.kernels, ptx.target


def ptx_candidate(text: bytes, arch: int, source: str) -> Candidate:
    kernels = frozenset(ptx_kernels(text))
    return Candidate(hash=content_hash(text), kind="ptx", arch=arch, arch_name=f"compute_{arch}",
                     kernels=kernels, globals=(), source=source, load=lambda: text)


class _NameIndex:
    """name -> candidates, filled incrementally."""

    def __init__(self):
        self.by_name: dict = {}
        self.by_hash: dict = {}

    def add(self, cand: Optional[Candidate]) -> None:
        if cand is None or cand.hash in self.by_hash:
            return
        self.by_hash[cand.hash] = cand
        for name in cand.kernels:
            self.by_name.setdefault(name, []).append(cand)

    def find(self, name: str) -> list:
        return list(self.by_name.get(name, ()))


class RecorderSource:
    name = "recorder"

    def __init__(self, rec):
        self.rec = rec
        self.index = _NameIndex()
        self._indexed = 0

    def sync(self) -> None:
        """Index the cubins recorded since the last call (and bring ``rec.loads`` up to date)."""
        for h, data in self.rec.images_since(self._indexed):
            self.index.add(cubin_candidate(data, "recorder", h))
            self._indexed += 1

    def find(self, name: str) -> list:
        self.sync()
        return self.index.find(name)


class RegisteredSource:
    """Images registered by the user, and cubins in the JIT caches of Triton and CuPy."""
    name = "registered"

    def __init__(self):
        self.index = _NameIndex()
        self._seen_files: set = set()

    def register(self, data: bytes, source: str = "registered") -> list:
        """Add a cubin, a fatbin or PTX text; return the candidates it yielded."""
        data = bytes(data)
        before = set(self.index.by_hash)
        if data[:4] == b"\x7fELF":
            self.index.add(cubin_candidate(data, source))
        elif data[:4] == fatbin.FATBIN_MAGIC.to_bytes(4, "little"):
            for cand in _fatbin_candidates(memoryview(data), source):
                self.index.add(cand)
        elif b".entry" in data:
            target = ptx_target(data)
            self.index.add(ptx_candidate(data, target, source))
        else:
            raise BinaryFormatError(f"{source}: not a cubin, fatbin or PTX image")
        return [c for h, c in self.index.by_hash.items() if h not in before]

    def _scan_jit_caches(self) -> None:
        dirs = [os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"),
                os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")]
        for d in dirs:
            for path in jit_cache_files(d, ".cubin"):
                if path in self._seen_files:
                    continue
                self._seen_files.add(path)
                raw = read_jit_cache_file(path)
                if raw is None:
                    continue
                start = raw.find(b"\x7fELF")   # CuPy prefixes its cache files with a hash
                if start >= 0:
                    self.index.add(cubin_candidate(raw[start:], f"jit-cache:{path}"))

    def find(self, name: str) -> list:
        hits = self.index.find(name)
        if not hits:
            self._scan_jit_caches()
            hits = self.index.find(name)
        return hits


def _fatbin_candidates(data: memoryview, source: str, arch: Optional[int] = None) -> list:
    out = []
    for container in fatbin.iter_containers(data, Meter()):
        for entry in container.entries:
            if entry.kind not in ("cubin", "ptx") or (arch is not None and
                                                       entry.arch // 10 != arch // 10):
                continue     # LTO-IR and unknown kinds cannot be loaded
            payload = entry.payload()
            if entry.kind == "cubin":
                cand = cubin_candidate(payload, source)
            elif entry.kind == "ptx":
                cand = ptx_candidate(payload, entry.arch, source)
            else:
                cand = None
            if cand is not None:
                out.append(cand)
    return out


# ---- JIT caches (other tools' directories: walked without following links, bounded) ----------

def jit_cache_files(root: str, suffix: str, limits: Optional[Limits] = None) -> Iterator[str]:
    """Files ending in ``suffix`` under ``root``: symlinks are not followed (a ``..`` link made
    the recursive glob loop forever), at most ``scan_entries`` directory entries are visited,
    32 levels deep."""
    budget = resolve(limits).scan_entries
    stack, visited = [(root, 0)], 0
    while stack:
        directory, depth = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            visited += 1
            if visited > budget:
                log.warning("cgsnap: stopped scanning %s after %d entries (the scan_entries "
                            "budget)", root, budget)
                return
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < 32:
                        stack.append((entry.path, depth + 1))
                elif entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                    yield entry.path
            except OSError:
                continue


def read_jit_cache_file(path: str, limits: Optional[Limits] = None) -> Optional[bytes]:
    """A JIT cache file's bytes, or None: never through a symlink, only a regular file that no
    one but us (or root) can have written -- its kernels may end up in a snapshot -- and within
    the ``image_bytes`` budget."""
    limits = resolve(limits)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _fs.stable(st) or st.st_size > limits.image_bytes:
            if stat.S_ISREG(st.st_mode) and not _fs.stable(st):
                log.warning("cgsnap: not using JIT cache file %s (another user's, or writable by "
                            "others)", path)
            return None
        return os.pread(fd, st.st_size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


# ---- scanning loaded objects ------------------------------------------------------------

def _mapped_files() -> list:
    """Regular files mapped into this process (shared libraries and the executable)."""
    files = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    files.append(parts[5].strip())
    except OSError:
        return []
    return [p for p in dict.fromkeys(files) if os.path.isfile(p)]


def _file_identity(path: str, host) -> str:
    """Path, size, mtime and GNU build-id: a rebuilt or replaced library gets a new index."""
    st = os.stat(path)
    note = host.section(".note.gnu.build-id")
    build_id = bytes(host.section_data(note)) if note is not None else b""
    key = f"{INDEX_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}|{build_id.hex()}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def default_cache_dir() -> str:
    return os.path.join(_fs.cache_root(), "index")


def holds_kernel(candidate: Optional[Candidate], name: str) -> bool:
    """The image really defines kernel ``name`` (what a source returns for ``name`` must: an
    index read from disk only says where to look)."""
    return candidate is not None and name in candidate.kernels


class LoadedObjectScan:
    """Finds kernels in the fatbins of the objects mapped into this process.

    For each file, an index (kernel name -> fatbin entry offsets, per arch family) is built once
    and cached on disk under a key of the file's identity (path, size, mtime, build-id), so a
    later process looks a kernel up without decompressing anything but the entry it needs. The
    cache is private (:mod:`cgsnap._fs`: a 0700 directory of ours, files of ours that no one
    else can write, opened without following links); a cached index that is not exactly in the
    form written is ignored and rebuilt, and an image it points to is used for a kernel only if
    it defines that kernel."""
    name = "scan"

    def __init__(self, arch: int, cache_dir: Optional[str] = None, limits: Optional[Limits] = None):
        self.arch = arch
        self.cache_dir = cache_dir or default_cache_dir()
        self.limits = resolve(limits)
        # [(path, {name: [[section offset, section size, container offset, entry index], ...]})]
        self._indexes: list = []
        self._seen: set = set()
        self._lock = threading.Lock()
        self._loaded: dict = {}                    # (path, offset) -> Candidate

    def _index_file(self, path: str) -> Optional[dict]:
        try:
            fd = _fs.open_regular(path)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < 64:
                return None
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        # The mapping is not closed explicitly: parsed entries hold zero-copy views into it, and
        # it is unmapped when the last of them goes (on return).
        if mm[:4] != b"\x7fELF":
            return None
        try:
            host = elf.ElfFile(mm, path, self.limits)
            sections = fatbin.fatbin_section_headers(host)
        except BinaryFormatError:
            return None
        if not sections:
            return None
        key = _file_identity(path, host)
        cache_name = f"{key}-sm{self.arch // 10}x.msgpack"
        cached = _read_cache(self.cache_dir, cache_name, self.limits)
        if cached is not None:
            return cached
        index: dict = {}
        meter = self.limits.meter(path)
        for sec in sections:
            view = memoryview(mm)[sec.offset:sec.offset + sec.size]
            try:
                for container in fatbin.iter_containers(view, meter):
                    for j, entry in enumerate(container.entries):
                        if entry.kind != "cubin" or entry.arch // 10 != self.arch // 10:
                            continue
                        try:
                            info = elf.cubin_info(entry.payload(), self.limits)
                        except LimitError as exc:
                            _warn_once((path, exc.budget), "cgsnap: %s: an image is not "
                                       "indexed: %s", path, exc)
                            continue
                        except BinaryFormatError:
                            continue
                        where = [sec.offset, sec.size, container.offset, j]
                        for name in info.kernels:
                            index.setdefault(name, []).append(where)
            except BinaryFormatError as exc:
                if isinstance(exc, LimitError):
                    _warn_once((path, exc.budget), "cgsnap: %s: not all of its kernels are "
                               "indexed: %s", path, exc)
                continue    # keep what earlier containers gave
        _write_cache(self.cache_dir, cache_name, index)
        return index

    def _ensure_indexes(self) -> list:
        """Index every mapped file not indexed yet (libraries may be loaded after a lookup)."""
        with self._lock:
            for path in _mapped_files():
                if path not in self._seen:
                    self._seen.add(path)
                    index = self._index_file(path)
                    if index:
                        self._indexes.append((path, index))
            return self._indexes

    def find(self, name: str) -> list:
        out = []
        for path, index in self._ensure_indexes():
            for where in index.get(name, ()):
                key = (path, tuple(where))
                if key not in self._loaded:
                    self._loaded[key] = self._load_entry(path, *where)
                if holds_kernel(self._loaded[key], name):
                    out.append(self._loaded[key])
        return out

    def _load_entry(self, path: str, sec_offset: int, sec_size: int, container_offset: int,
                    entry_index: int) -> Optional[Candidate]:
        try:
            fd = _fs.open_regular(path)
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            view = memoryview(mm)[sec_offset + container_offset:sec_offset + sec_size]
            container = next(fatbin.iter_containers(view, self.limits.meter(path)))
            payload = container.entries[entry_index].payload()
        except (OSError, ValueError, IndexError, StopIteration, BinaryFormatError):
            return None
        return cubin_candidate(payload, f"scan:{path}")


_U63 = (1 << 63) - 1
_warned: set = set()


def _warn_once(key, message: str, *args) -> None:
    """One warning per cache directory or file: hundreds of mapped libraries hit the same one."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _decode_index(raw: bytes, limits: Limits) -> Optional[dict]:
    """A cached index exactly as :func:`_write_cache` writes it -- ``{kernel name: [[section
    offset, section size, container offset, entry index], ...]}`` of non-negative ints -- or
    None for anything else (a malformed index is rebuilt, never trusted in part)."""
    try:
        data = unpackb_bounded(raw, limits.manifest_objects)
    except (OverBudget, msgpack.UnpackException, ValueError, TypeError, OverflowError,
            RecursionError):
        return None
    if type(data) is not dict:
        return None
    for name, places in data.items():
        if type(name) is not str or type(places) is not list:
            return None
        for where in places:
            if type(where) is not list or len(where) != 4 or \
                    not all(type(v) is int and 0 <= v <= _U63 for v in where):
                return None
    return data


def _read_cache(cache_dir: str, name: str, limits: Limits = DEFAULT_LIMITS) -> Optional[dict]:
    try:
        dir_fd = _fs.private_dir(cache_dir, create=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn_once(cache_dir, "cgsnap: not using the kernel-index cache %s: %s", cache_dir,
                   getattr(exc, "why", exc))
        return None
    try:
        raw = _fs.read_private(name, dir_fd, limits.cache_bytes)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn_once((cache_dir, name), "cgsnap: not using kernel index %s in %s: %s", name,
                   cache_dir, getattr(exc, "why", exc))
        return None
    finally:
        os.close(dir_fd)
    return _decode_index(raw, limits)


def _write_cache(cache_dir: str, name: str, index: dict) -> None:
    try:
        dir_fd = _fs.private_dir(cache_dir, create=True)
    except OSError as exc:
        _warn_once(cache_dir, "cgsnap: not using the kernel-index cache %s: %s", cache_dir,
                   getattr(exc, "why", exc))
        return
    try:
        with _fs.atomic_write(name, dir_fd=dir_fd, mode=0o600) as f:
            f.write(msgpack.packb(index, use_bin_type=True))
    except OSError:
        pass    # a read-only cache directory only costs speed
    finally:
        os.close(dir_fd)


# ---- the resolver ---------------------------------------------------------------------------

class KernelResolver:
    """Finds, for a live CUfunction, the image that holds it (see the module docstring)."""

    def __init__(self, device_arch: int, sources: list):
        self.arch = device_arch
        self.sources = sources

    def resolve(self, name: str, module_functions: Callable[[], frozenset]) -> Candidate:
        """The single runnable cubin holding ``name``; ``module_functions()`` lists the functions
        of the module the live kernel came from, asked only when several images match."""
        tried = []
        for source in self.sources:
            hits = {c.hash: c for c in source.find(name)}
            tried.append(source.name)
            runnable = [c for c in hits.values() if c.kind == "cubin"
                        and arch_runs_on(c.arch, c.arch_name, self.arch)]
            if not runnable:
                continue
            if len(runnable) > 1:
                wanted = module_functions()
                same = [c for c in runnable if wanted and c.kernels == wanted]
                if len(same) == 1:
                    runnable = same
                elif len(same) > 1 and len({c.kernels for c in same}) == 1:
                    # Identical function sets: prefer the exact arch, then refuse to guess.
                    exact = [c for c in same if c.arch == self.arch]
                    runnable = exact if len(exact) == 1 else same
            if len(runnable) > 1:
                raise AmbiguousKernelError(
                    f"kernel {name}: {len(runnable)} different images hold it "
                    f"({', '.join(c.source for c in runnable)}) and its module's function set does "
                    "not tell them apart; register the right image with cgsnap.register_image()")
            best = runnable[0]
            ptx = [c for c in hits.values() if c.kind == "ptx"]
            if ptx and best.ptx is None:
                best.ptx = max(ptx, key=lambda c: c.arch)
            return best
        raise KernelNotFoundError(
            f"kernel {name} was found in no image for sm_{self.arch} (searched: "
            f"{', '.join(tried)}). Start the module recorder before the kernel is first loaded "
            "(cgsnap.start_recorder() at start-up, or CGSNAP_RECORD=1), or register its image "
            "with cgsnap.register_image(data)")
