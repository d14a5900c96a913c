"""Exact kernel identity on CPU: the recorder's callback parsing (ctypes-built CUPTI structures
fed to ModuleRecorder._on_event, as CUPTI would), the handle associations it builds, the sizes
of load inputs, and every resolution rule of cgsnap.kernels.identity with synthetic live kernels
and attribute probes. The GPU side is tests/gpu/test_gpu_kernel_identity.py."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from cgsnap.binary import elf, fatbin
from cgsnap.errors import AmbiguousKernelError, KernelNotFoundError, RecorderError
from cgsnap.format.hashing import content_hash
from cgsnap.kernels import cupti
from cgsnap.kernels.identity import IdentityResolver, image_extent
from cgsnap.kernels.live import read_file_if_unchanged, read_own_memory
from cgsnap.kernels.sources import RecorderSource, RegisteredSource

FIX = Path(__file__).resolve().parent / "fixtures"
A = (FIX / "identity_a.sm_90.cubin").read_bytes()      # k: y *= 2
B = (FIX / "identity_b.sm_90.cubin").read_bytes()      # k: y *= 3, same layout
C = (FIX / "identity_c.sm_90.cubin").read_bytes()      # k only
FAT = (FIX / "identity.fatbin").read_bytes()           # sm_90, sm_90a, sm_80, compute_80 of A
KFAT = (FIX / "kernels.fatbin").read_bytes()
HA, HB, HC = content_hash(A), content_hash(B), content_hash(C)
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"


# ---- sizes of load inputs -----------------------------------------------------------------------

def reader(data: bytes):
    """peek / text_length over ``data`` that fail the test on any read past its end."""
    def peek(off, n):
        assert 0 <= off and off + n <= len(data), f"read past the input: {off}+{n} > {len(data)}"
        return bytes(data[off:off + n])

    def text_length(off, limit):
        end = data.find(b"\0", off, off + limit)
        assert end >= 0, "text without its NUL"
        return end - off
    return peek, text_length


@pytest.mark.parametrize("name", ["identity_a.sm_90.cubin", "kernels.sm_75.cubin",
                                  "kernels.sm_90a.cubin", "kernels.sm_100.cubin",
                                  "kernels.rdc.sm_90.cubin", "kernels.ptxas12.sm_80.cubin"])
def test_extent_of_a_cubin_is_its_size_even_with_bytes_after_it(name):
    data = (FIX / name).read_bytes()
    assert image_extent(*reader(data)) == ("cubin", len(data))
    assert image_extent(*reader(data + b"\xff" * 4096)) == ("cubin", len(data))


def test_extent_with_extended_section_numbering():
    """e_shnum 0: the section count is section 0's sh_size."""
    data = bytearray(A)
    e = elf.ElfFile(bytes(A))
    count = len(e.sections)
    struct.pack_into("<H", data, 60, 0)
    struct.pack_into("<Q", data, e.header.e_shoff + 32, count)
    assert image_extent(*reader(bytes(data))) == ("cubin", len(A))


def test_extent_of_a_fatbin_is_its_first_container():
    assert image_extent(*reader(FAT)) == ("fatbin", len(FAT))
    both = FAT + bytes(8) + KFAT
    assert image_extent(*reader(both)) == ("fatbin", len(FAT))
    assert len(list(fatbin.iter_containers(both))) == 2


def test_extent_of_ptx_a_wrapper_and_what_it_cannot_read():
    ptx = b"//\n.version 9.0\n.target sm_90\n.visible .entry k()\n{\nret;\n}\n"
    assert image_extent(*reader(ptx + b"\0" + b"junk")) == ("ptx", len(ptx) + 1)
    wrapper = struct.pack("<IIQQ", 0x466243B1, 1, 0x1000, 0)
    assert image_extent(*reader(wrapper)) == ("wrapper", 16)
    assert image_extent(*reader(b"\x00\x01\x02\x03" * 8)) == ("unknown", 0)


@pytest.mark.parametrize("patch", ["elf32", "shentsize", "shnum_huge", "shoff_huge",
                                   "fatbin_huge", "fatbin_header_small"])
def test_extent_refuses_headers_that_contradict_themselves(patch):
    data = bytearray(FAT if patch.startswith("fatbin") else A)
    if patch == "elf32":
        data[4] = 1
    elif patch == "shentsize":
        struct.pack_into("<H", data, 58, 40)
    elif patch == "shnum_huge":
        struct.pack_into("<H", data, 60, 0)
        struct.pack_into("<Q", data, elf.ElfFile(A).header.e_shoff + 32, 1 << 40)
    elif patch == "shoff_huge":
        struct.pack_into("<Q", data, 40, 1 << 40)
    elif patch == "fatbin_huge":
        struct.pack_into("<Q", data, 8, 1 << 40)
    else:
        struct.pack_into("<H", data, 6, 8)
    assert image_extent(*reader(bytes(data))) == ("unknown", 0)


def test_extent_through_ctypes_follows_a_fatbin_wrapper():
    buf = ctypes.create_string_buffer(FAT, len(FAT))
    wrapper = (ctypes.c_uint64 * 3)(0x466243B1 | (1 << 32), ctypes.addressof(buf), 0)
    assert cupti.ModuleRecorder._extent(ctypes.addressof(wrapper)) == \
        ("fatbin", len(FAT), ctypes.addressof(buf))
    cub = ctypes.create_string_buffer(A, len(A))
    assert cupti.ModuleRecorder._extent(ctypes.addressof(cub)) == \
        ("cubin", len(A), ctypes.addressof(cub))


# ---- the CUPTI structures the callback reads ---------------------------------------------------

def test_param_offsets_and_callback_ids_match_the_cuda_headers(tmp_path):
    """Every offset the callback reads and every callback id it enables, against the headers
    (cupti_driver_cbid.h, generated_cuda_meta.h, cupti_callbacks.h), compiled with the system C
    compiler; skipped where the CUDA headers or a compiler are missing."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not (CUDA_INCLUDE / "generated_cuda_meta.h").exists():
        pytest.skip("needs the CUDA headers and a C compiler")
    cbid_h = (CUDA_INCLUDE / "cupti_driver_cbid.h").read_text()
    for name, cbid in cupti.CBIDS.items():
        m = re.search(rf"CUPTI_DRIVER_TRACE_CBID_{name}\s*=\s*(\d+)", cbid_h)
        assert m and int(m.group(1)) == cbid, name
    lines = []
    for name, fields in cupti.PARAMS.items():
        for field, offset in fields.items():
            lines.append(f'printf("{name}.{field} %zu {offset}\\n", offsetof({name}_params, {field}));')
    for struct_name, cls in (("CUpti_CallbackData", cupti._CallbackData),
                             ("CUpti_ResourceData", cupti._ResourceData),
                             ("CUpti_ModuleResourceData", cupti._ModuleResourceData)):
        for field, _ in cls._fields_:
            lines.append(f'printf("{struct_name}.{field} %zu {getattr(cls, field).offset}\\n", '
                         f'offsetof({struct_name}, {field}));')
    # What is read at those offsets, and how wide (cupti._word reads a pointer-sized word;
    # numLibraryOptions is read as a uint32, each CUlibraryOption as an int32), and the enum
    # values the recorder passes to CUPTI or compares with.
    for name, fields in cupti.PARAMS.items():
        for field in fields:
            width = 4 if field in ("numLibraryOptions", "config", "dev") else 8
            lines.append(f'printf("{name}.{field}.size %zu {width}\\n", '
                         f'sizeof((({name}_params *)0)->{field}));')
    lines.append('printf("CUlibraryOption.size %zu 4\\n", sizeof(CUlibraryOption));')
    for struct_name, cls in (("CUpti_CallbackData", cupti._CallbackData),
                             ("CUpti_ModuleResourceData", cupti._ModuleResourceData)):
        for field, ctype in cls._fields_:
            lines.append(f'printf("{struct_name}.{field}.size %zu {ctypes.sizeof(ctype)}\\n", '
                         f'sizeof((({struct_name} *)0)->{field}));')
    for const, value in (("CUPTI_CB_DOMAIN_DRIVER_API", cupti.CUPTI_CB_DOMAIN_DRIVER_API),
                         ("CUPTI_CB_DOMAIN_RESOURCE", cupti.CUPTI_CB_DOMAIN_RESOURCE),
                         ("CUPTI_CBID_RESOURCE_MODULE_LOADED",
                          cupti.CUPTI_CBID_RESOURCE_MODULE_LOADED),
                         ("CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING",
                          cupti.CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING),
                         ("CUPTI_API_ENTER", cupti.CUPTI_API_ENTER),
                         ("CUPTI_API_EXIT", cupti.CUPTI_API_EXIT),
                         ("CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED",
                          cupti.CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED),
                         ("CU_LIBRARY_BINARY_IS_PRESERVED", cupti.CU_LIBRARY_BINARY_IS_PRESERVED)):
        lines.append(f'printf("{const} %d {value}\\n", (int){const});')
    lines.append(f'printf("CUPTI_API_VERSION>=min %d 1\\n", '
                 f'CUPTI_API_VERSION >= {cupti.MIN_CUPTI_API_VERSION});')
    src = tmp_path / "offsets.c"
    src.write_text("#define __CUDA_API_VERSION_INTERNAL 1\n#include <stddef.h>\n#include <stdio.h>\n"
                   "#include <cuda.h>\n#include <cupti_callbacks.h>\n#include <cupti_result.h>\n"
                   "#include <cupti_version.h>\n#include <generated_cuda_meta.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "offsets"
    subprocess.run([cc, f"-I{CUDA_INCLUDE}", str(src), "-o", str(exe)], check=True,
                   capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    wrong = [line for line in out if line and line.split()[1] != line.split()[2]]
    assert not wrong and len([line for line in out if line]) == len(lines), wrong


class _ModuleLoadData(ctypes.Structure):
    _fields_ = [("module", ctypes.c_void_p), ("image", ctypes.c_void_p)]


class _LibraryLoadData(ctypes.Structure):
    _fields_ = [("library", ctypes.c_void_p), ("code", ctypes.c_void_p),
                ("jitOptions", ctypes.c_void_p), ("jitOptionsValues", ctypes.c_void_p),
                ("numJitOptions", ctypes.c_uint), ("libraryOptions", ctypes.c_void_p),
                ("libraryOptionValues", ctypes.c_void_p), ("numLibraryOptions", ctypes.c_uint)]


class _OutIn(ctypes.Structure):   # (T* out, handle in[, const char* name])
    _fields_ = [("out", ctypes.c_void_p), ("handle", ctypes.c_void_p), ("name", ctypes.c_char_p)]


class _Handle(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_void_p)]


class _CacheConfig(ctypes.Structure):   # cuFuncSetCacheConfig / cuKernelSetCacheConfig
    _fields_ = [("handle", ctypes.c_void_p), ("config", ctypes.c_int), ("dev", ctypes.c_int)]


class _LaunchEx(ctypes.Structure):
    _fields_ = [("config", ctypes.c_void_p), ("f", ctypes.c_void_p)]


class FakeCupti:
    """Drives a ModuleRecorder's callback as CUPTI would: entry, what the driver delivers
    inside the call, exit with the call's result. Buffers stay alive as long as this object."""

    def __init__(self, rec: cupti.ModuleRecorder):
        self.rec = rec
        self.keep: list = []

    def _data(self, site: int, params, result: int, ctx: int):
        ret = ctypes.c_int(result)
        data = cupti._CallbackData(callbackSite=site, functionParams=ctypes.addressof(params),
                                   functionReturnValue=ctypes.addressof(ret), context=ctx)
        self.keep += [ret, data, params]
        return ctypes.addressof(data)

    def call(self, name: str, params, result: int = 0, inside=(), ctx: int = 0, during=None):
        cbid = cupti.CBIDS[name]
        self.rec._on_event(None, cupti.CUPTI_CB_DOMAIN_DRIVER_API, cbid,
                           self._data(cupti.CUPTI_API_ENTER, params, 0, ctx))
        for cubin in inside:
            self.deliver(cubin)
        if during is not None:
            during()
        self.rec._on_event(None, cupti.CUPTI_CB_DOMAIN_DRIVER_API, cbid,
                           self._data(cupti.CUPTI_API_EXIT, params, result, ctx))

    def deliver(self, cubin: bytes) -> None:
        buf = ctypes.create_string_buffer(cubin, len(cubin))
        mod = cupti._ModuleResourceData(moduleId=1, cubinSize=len(cubin),
                                        pCubin=ctypes.addressof(buf))
        res = cupti._ResourceData(resourceDescriptor=ctypes.addressof(mod))
        self.rec._on_event(None, cupti.CUPTI_CB_DOMAIN_RESOURCE,
                           cupti.CUPTI_CBID_RESOURCE_MODULE_LOADED, ctypes.addressof(res))

    def buffer(self, data: bytes):
        buf = ctypes.create_string_buffer(data, len(data))
        self.keep.append(buf)
        return buf

    def out(self, handle: int):
        slot = ctypes.c_void_p(handle)      # what the driver writes through the output pointer
        self.keep.append(slot)
        return ctypes.addressof(slot)

    # the calls
    def module_load(self, image: bytes, handle: int, inside=(), result=0, api="cuModuleLoadData",
                    ctx=0):
        self.call(api, _ModuleLoadData(self.out(handle), ctypes.addressof(self.buffer(image))),
                  result, inside, ctx)

    def library_load(self, image: bytes, handle: int, inside=(), preserved=False, result=0):
        buf = self.buffer(image)
        opts = (ctypes.c_int * 1)(cupti.CU_LIBRARY_BINARY_IS_PRESERVED)
        vals = (ctypes.c_void_p * 1)(1)
        self.keep += [opts, vals]
        p = _LibraryLoadData(self.out(handle), ctypes.addressof(buf), None, None, 0,
                             ctypes.addressof(opts) if preserved else None,
                             ctypes.addressof(vals) if preserved else None, 1 if preserved else 0)
        self.call("cuLibraryLoadData", p, result, inside)
        return buf

    def get_kernel(self, lib, name, kern, inside=()):
        self.call("cuLibraryGetKernel", _OutIn(self.out(kern), lib, name.encode()), 0, inside)

    def kernel_function(self, kern, func, inside=(), ctx=0):
        self.call("cuKernelGetFunction", _OutIn(self.out(func), kern, None), 0, inside, ctx)

    def module_function(self, mod, name, func, inside=()):
        self.call("cuModuleGetFunction", _OutIn(self.out(func), mod, name.encode()), 0, inside)

    def library_module(self, lib, mod, ctx=0):
        self.call("cuLibraryGetModule", _OutIn(self.out(mod), lib, None), 0, (), ctx)

    def cache_config(self, handle, config, api="cuFuncSetCacheConfig", result=0, dev=0):
        self.call(api, _CacheConfig(handle, config, dev), result)

    def unload(self, api, handle):
        self.call(api, _Handle(handle))

    def launch(self, f, inside=(), ex=False):
        if ex:
            self.call("cuLaunchKernelEx", _LaunchEx(0, f), 0, inside)
        else:
            self.call("cuLaunchKernel", _Handle(f), 0, inside)


@pytest.fixture
def rec():
    return cupti.ModuleRecorder()


@pytest.fixture
def fake(rec):
    return FakeCupti(rec)


def test_module_load_ties_the_cubin_delivered_inside_it_to_the_handle(rec, fake):
    fake.module_load(A, 0x1000, inside=[A], ctx=0x77)
    fake.module_load(B, 0x2000, inside=[B], ctx=0x77)
    fake.module_function(0x1000, "k", 0x1100)
    rec.sync()
    t = rec.loads
    assert t.modules[0x1000].eager == [HA] and t.modules[0x2000].eager == [HB]
    assert t.modules[0x1000].api == "cuModuleLoadData" and t.modules[0x1000].context == 0x77
    # The loaded cubin is the image: the input was not copied.
    assert t.modules[0x1000].input.data is None and rec.copied_bytes == 0
    assert t.module_functions == {0x1100: 0x1000}
    assert set(rec.images) == {HA, HB} and t.unattributed == 0
    assert rec.calls == {"cuModuleLoadData": 2, "cuModuleGetFunction": 1}


def test_a_failed_load_leaves_what_it_delivered_unattributed(rec, fake):
    fake.module_load(A, 0x1000, inside=[A], result=200)       # CUDA_ERROR_INVALID_IMAGE
    rec.sync()
    assert not rec.loads.modules and rec.loads.unattributed == 1 and HA in rec.images


def test_lazy_library_load_keeps_its_input_and_ties_the_later_cubin(rec, fake):
    fake.library_load(A, 0x3000)                  # lazy: nothing delivered inside
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.kernel_function(0x3100, 0x3200, inside=[A], ctx=0x55)
    fake.deliver(B)                               # outside any tracked call
    rec.sync()
    t = rec.loads
    lib = t.libraries[0x3000]
    assert lib.input.format == "cubin" and lib.input.data == A and rec.copied_bytes == len(A)
    assert lib.eager == [] and lib.lazy == [HA]
    assert t.kernels == {0x3100: (0x3000, "k")} and t.by_name == {"k": {0x3000}}
    assert t.functions == {0x3200: (0x3100, 0x55)} and t.unattributed == 1


def test_a_preserved_input_is_referenced_and_read_back_only_while_unchanged(rec, fake):
    buf = fake.library_load(FAT, 0x3000, preserved=True)
    rec.sync()
    inp = rec.loads.libraries[0x3000].input
    assert inp.preserved and inp.data is None and inp.address == ctypes.addressof(buf)
    assert inp.format == "fatbin" and inp.size == len(FAT) and rec.copied_bytes == 0
    assert inp.read(read_own_memory) == FAT
    buf2 = fake.library_load(A, 0x4000, preserved=True)
    rec.sync()
    inp2 = rec.loads.libraries[0x4000].input
    ctypes.memmove(ctypes.addressof(buf2) + 100, b"\x00\x11\x22\x33", 4)   # the memory was reused
    assert inp2.read(read_own_memory) is None and "no longer holds it" in inp2.problem


def test_over_the_copy_budget_an_input_is_referenced_with_its_hash(fake):
    rec = cupti.ModuleRecorder(copy_budget=len(A) + 1)
    fake = FakeCupti(rec)
    fake.library_load(A, 0x3000)
    fake.library_load(B, 0x4000)
    rec.sync()
    first, second = rec.loads.libraries[0x3000].input, rec.loads.libraries[0x4000].input
    assert first.data == A and second.data is None and second.hash == HB
    assert second.read(read_own_memory) == B


def test_unload_is_recorded_at_entry_and_drops_every_association(rec, fake):
    fake.library_load(A, 0x3000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.kernel_function(0x3100, 0x3200, inside=[A])
    fake.library_module(0x3000, 0x3300)

    # Another thread's load gets the handle back while the unload is still in flight.
    def reuse():
        t = threading.Thread(target=fake.library_load, args=(B, 0x3000))
        t.start()
        t.join()
    fake.call("cuLibraryUnload", _Handle(0x3000), during=reuse)
    rec.sync()
    t = rec.loads
    assert t.libraries[0x3000].input.data == B, "the reused handle is the new library"
    assert not t.kernels and not t.functions and not t.library_modules and not t.by_name
    fake.module_load(A, 0x1000, inside=[A])
    fake.module_function(0x1000, "k", 0x1100)
    fake.unload("cuModuleUnload", 0x1000)
    rec.sync()
    assert not t.modules and not t.module_functions


def test_each_thread_keeps_its_own_calls_in_flight(rec, fake):
    """A cubin belongs to the tracked call in flight on the thread it is delivered on."""
    entered, go = threading.Event(), threading.Event()

    def held():       # inside its load call, until the other thread has loaded its own
        entered.set()
        assert go.wait(10)
        fake.deliver(B)
    t = threading.Thread(target=lambda: fake.call(
        "cuModuleLoadData", _ModuleLoadData(fake.out(0x2000), ctypes.addressof(fake.buffer(B))),
        during=held))
    t.start()
    assert entered.wait(10)
    fake.module_load(A, 0x1000, inside=[A])
    go.set()
    t.join()
    rec.sync()
    assert rec.loads.modules[0x1000].eager == [HA]
    assert rec.loads.modules[0x2000].eager == [HB]
    assert not rec._inflight


def test_the_recorder_ignores_cgsnap_own_loads(rec, fake):
    with rec.suppressed():
        fake.module_load(A, 0x1000, inside=[A])
        with rec.suppressed():
            fake.deliver(B)
    fake.module_load(B, 0x2000, inside=[B])
    rec.sync()
    assert list(rec.loads.modules) == [0x2000] and set(rec.images) == {HB}
    assert not rec._suppressed


def test_the_cut_image_check_is_hidden_from_the_recorder(rec, fake, monkeypatch):
    """save(prune=True) loads each cut cubin beside the whole one to compare them: those loads
    are cgsnap's, and a recorder that kept the cut cubin would offer it as one more image of
    its kernels to every later snapshot in the process."""
    from cgsnap.capture import saving
    from cgsnap.cuda import driver
    monkeypatch.setattr(cupti, "_recorder", rec)
    monkeypatch.setattr(driver, "current_device", lambda: None)

    def images_agree(original, pruned, kernels, variables):
        fake.module_load(pruned, 0x3000, inside=[pruned])
        return None
    monkeypatch.setattr(driver, "images_agree", images_agree)
    check = saving.gpu_image_checker()
    assert check(A, B, ["k"], []) is None
    rec.sync()
    assert not rec.images and not rec.loads.modules and not rec._suppressed


def test_an_old_libcupti_found_first_is_skipped(monkeypatch):
    """A CUDA 12 libcupti sorted before the CUDA 13 one (two wheels installed) is passed over,
    not fatal; with only old ones the error names each."""
    class Lib:
        def __init__(self, version):
            self.version = version

        def cuptiGetVersion(self, out):
            out._obj.value = self.version
            return 0
    libs = {"/old/libcupti.so.12": Lib(120800), "/new/libcupti.so.13": Lib(130001)}
    monkeypatch.setattr(cupti, "_open_library", lambda path: libs[path])
    monkeypatch.setattr(cupti, "find_libcupti", lambda: list(libs))
    rec = cupti.ModuleRecorder()
    rec._load_library()
    assert rec.library_path == "/new/libcupti.so.13" and rec._lib is libs[rec.library_path]
    del libs["/new/libcupti.so.13"]
    with pytest.raises(RecorderError, match=r"/old/libcupti.so.12: CUPTI API version 120800"):
        cupti.ModuleRecorder()._load_library()


def test_a_libcupti_already_loaded_is_the_first_candidate(monkeypatch, tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /site/nvidia/cu13/lib/libcupti.so.13\n"
                    "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/libc.so.6\n"
                    "7f04-7f05 rw-p 00000000 00:00 0 \n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        maps if path == "/proc/self/maps" else path, *a, **k))
    monkeypatch.delenv("CGSNAP_LIBCUPTI", raising=False)
    assert cupti.find_libcupti()[0] == "/site/nvidia/cu13/lib/libcupti.so.13"


def test_the_callback_never_raises(rec, fake):
    res = cupti._ResourceData()            # no descriptor
    rec._on_event(None, cupti.CUPTI_CB_DOMAIN_RESOURCE, cupti.CUPTI_CBID_RESOURCE_MODULE_LOADED,
                  ctypes.addressof(res))
    data = cupti._CallbackData(callbackSite=0)      # no parameters
    rec._on_event(None, cupti.CUPTI_CB_DOMAIN_DRIVER_API, 19, ctypes.addressof(data))
    rec._on_event(None, cupti.CUPTI_CB_DOMAIN_DRIVER_API, 9999, ctypes.addressof(data))
    rec._on_event(None, 1, 19, None)       # NULL cbdata: caught, counted
    fake.call("cuModuleLoadData", _ModuleLoadData(0, 0))   # NULL output pointer
    rec.sync()
    assert rec.callback_errors == 1 and not rec.loads.modules and not rec._inflight


def test_a_fatbin_wrapper_input_keeps_the_fatbin(rec, fake):
    buf = fake.buffer(FAT)
    wrapper = (ctypes.c_uint64 * 3)(0x466243B1 | (1 << 32), ctypes.addressof(buf), 0)
    fake.keep.append(wrapper)
    fake.call("cuModuleLoadFatBinary", _ModuleLoadData(fake.out(0x1000), ctypes.addressof(wrapper)))
    rec.sync()
    assert rec.loads.modules[0x1000].input.data == FAT
    assert rec.loads.modules[0x1000].api == "cuModuleLoadFatBinary"


def test_a_destroyed_context_drops_its_modules_and_functions(rec, fake):
    fake.module_load(A, 0x1000, inside=[A], ctx=0x77)
    fake.module_load(B, 0x2000, inside=[B], ctx=0x88)
    fake.library_load(A, 0x3000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.kernel_function(0x3100, 0x3200, ctx=0x77)
    res = cupti._ResourceData(context=0x77)
    rec._on_event(None, cupti.CUPTI_CB_DOMAIN_RESOURCE,
                  cupti.CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING, ctypes.addressof(res))
    rec.sync()
    t = rec.loads
    assert list(t.modules) == [0x2000] and not t.functions
    assert 0x3000 in t.libraries and t.kernels      # libraries outlive contexts


def test_a_cubin_delivered_in_a_launch_belongs_to_the_launched_function(rec, fake):
    fake.library_load(A, 0x3000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.launch(0x3100, inside=[A], ex=True)       # a CUkernel cast to CUfunction
    fake.launch(0x9000, inside=[B])                # a function the recorder knows nothing of
    fake.launch(0, inside=[C])                     # no handle: the cubin belongs to nothing
    rec.sync()
    t = rec.loads
    assert t.libraries[0x3000].lazy == [HA]
    assert t.launched == {0x3100: [HA], 0x9000: [HB]} and t.unattributed == 1


def test_read_file_if_unchanged(tmp_path):
    p = tmp_path / "k.cubin"
    p.write_bytes(A)
    st = os.stat(p)
    fid = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    assert read_file_if_unchanged(str(p), fid) == A
    p.write_bytes(B + b"x")
    assert read_file_if_unchanged(str(p), fid) is None
    assert read_file_if_unchanged(str(tmp_path / "gone"), fid) is None


# ---- resolution ------------------------------------------------------------------------------

ATTRS = {"num_regs": 10, "shared_size_bytes": 0, "const_size_bytes": 0, "local_size_bytes": 0,
         "max_threads_per_block": 1024, "binary_version": 90, "cache_mode_ca": 0,
         "params": ((0, 8), (8, 4))}


def attrs(**changes):
    return dict(ATTRS, **changes)


class FakeLive:
    def __init__(self, name="k", func=0xF000, kern=0, module=None, attributes=None,
                 functions=frozenset({"k", "other"}), kernel_library=None, library_modules=None):
        self.name, self.func, self.kern, self.module = name, func, kern, module
        self._attributes = ATTRS if attributes is None else attributes
        self._functions, self._kl = functions, kernel_library
        self._lm = library_modules or {}
        self.asked: list = []

    def kernel_library(self):
        self.asked.append("kernel_library")
        return self._kl

    def library_module(self, lib):
        self.asked.append(("library_module", lib))
        return self._lm.get(lib)

    def attributes(self):
        return self._attributes

    def module_functions(self):
        return self._functions


class FakeProbe:
    """Attributes by image hash (the kernel is missing from images not listed)."""

    def __init__(self, by_hash: dict):
        self.by_hash = by_hash
        self.asked: list = []

    def attributes(self, cand, name):
        self.asked.append(cand.hash)
        return self.by_hash.get(cand.hash)


def resolver(rec=None, sources=(), probe=None, arch=90, verify=True):
    recorded = RecorderSource(rec) if rec is not None else None
    return IdentityResolver(arch, ([recorded] if recorded else []) + list(sources),
                            recorded=recorded, probe=probe, verify=verify, memory=read_own_memory)


def entry_hashes(data: bytes) -> dict:
    """arch name -> hash of each cubin entry of a fatbin."""
    return {e.arch_name: content_hash(e.payload()) for c in fatbin.iter_containers(data)
            for e in c.entries if e.kind == "cubin"}


def test_same_named_modules_resolve_exactly_by_module_handle(rec, fake):
    fake.module_load(A, 0x1000, inside=[A])
    fake.module_load(B, 0x2000, inside=[B])
    probe = FakeProbe({HA: ATTRS, HB: ATTRS})
    r = resolver(rec, probe=probe)
    got_a = r.resolve_live(FakeLive(module=0x1000))
    got_b = r.resolve_live(FakeLive(module=0x2000))
    assert (got_a.hash, got_b.hash) == (HA, HB)
    assert got_a.source == "recorder: module load"
    assert probe.asked == [HA, HB], "each choice is verified against the live kernel"
    # By name alone the same two are indistinguishable: the live module's function set is
    # theirs and so are the attributes.
    with pytest.raises(AmbiguousKernelError) as err:
        r.resolve_live(FakeLive(module=0x9999))
    msg = str(err.value)
    assert HA[:16] in msg and HB[:16] in msg and ".text.k" in msg and "start_recorder" in msg


def test_a_node_kernel_handle_and_function_handles_lead_to_their_library(rec, fake):
    fake.library_load(A, 0x3000)
    fake.library_load(B, 0x4000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.get_kernel(0x4000, "k", 0x4100)
    fake.kernel_function(0x4100, 0x4200)
    fake.library_module(0x3000, 0x3300)
    r = resolver(rec, probe=FakeProbe({HA: ATTRS, HB: ATTRS}))
    cases = [(FakeLive(kern=0x3100, kernel_library=0x3000), HA),      # the node's CUkernel
             (FakeLive(func=0x4100), HB),                              # a CUkernel as CUfunction
             (FakeLive(func=0x4200), HB),                              # cuKernelGetFunction
             (FakeLive(module=0x3300), HA)]                            # cuLibraryGetModule
    for live, want in cases:
        got = r.resolve_live(live)
        assert got.hash == want and got.source == "recorder: library input", live.__dict__


def test_libraries_holding_the_name_are_asked_for_their_module(rec, fake):
    fake.library_load(A, 0x3000)
    fake.library_load(B, 0x4000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.get_kernel(0x4000, "k", 0x4100)
    r = resolver(rec, probe=FakeProbe({HA: ATTRS, HB: ATTRS}))
    live = FakeLive(module=0x4400, library_modules={0x3000: 0x3300, 0x4000: 0x4400})
    assert r.resolve_live(live).hash == HB
    assert [a for a in live.asked if a != "kernel_library"] == \
        [("library_module", 0x3000), ("library_module", 0x4000)]


def test_a_lazily_delivered_cubin_is_the_library_image(rec, fake):
    fake.library_load(FAT, 0x3000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.kernel_function(0x3100, 0x3200, inside=[A])
    r = resolver(rec, probe=FakeProbe({HA: ATTRS}))
    got = r.resolve_live(FakeLive(func=0x3200))
    assert got.hash == HA and got.source == "recorder: library load (lazy)"
    assert got.ptx is not None and got.ptx.arch == 80, "the fatbin's PTX rides along"


def test_from_a_fatbin_input_the_entry_the_driver_picks(rec, fake):
    entries = entry_hashes(FAT)
    fake.library_load(FAT, 0x3000)
    fake.get_kernel(0x3000, "k", 0x3100)
    live = FakeLive(func=0x3100)
    # sm_90 and sm_90a both run on an sm_90 device: the attributes tell them apart here...
    probe = FakeProbe({entries["sm_90"]: ATTRS, entries["sm_90a"]: attrs(num_regs=12),
                       entries["sm_80"]: attrs(binary_version=80)})
    got = resolver(rec, probe=probe).resolve_live(live)
    assert got.hash == entries["sm_90"]
    assert got.source == "recorder: library input (fatbin sm_90) [by attributes]"
    # ... and with equal attributes, the one the driver was seen delivering is the one loaded.
    rec2 = cupti.ModuleRecorder()
    fake2 = FakeCupti(rec2)
    fake2.library_load(FAT, 0x3000)
    fake2.get_kernel(0x3000, "k", 0x3100)
    sm90a = next(e.payload() for c in fatbin.iter_containers(FAT) for e in c.entries
                 if e.arch_name == "sm_90a")
    fake2.deliver(sm90a)                       # seen, but outside any tracked call
    same = FakeProbe({entries["sm_90"]: ATTRS, entries["sm_90a"]: ATTRS})
    assert resolver(rec2, probe=same).resolve_live(live).hash == entries["sm_90a"]
    # Without either, it is not guessed.
    with pytest.raises(AmbiguousKernelError, match="sm_90a"):
        resolver(rec, probe=same).resolve_live(live)
    # An sm_86 device loads the sm_80 entry (the closest lower minor of its major).
    got = resolver(rec, probe=FakeProbe({entries["sm_80"]: attrs(binary_version=80)}),
                   arch=86).resolve_live(FakeLive(func=0x3100, attributes=attrs(binary_version=80)))
    assert got.hash == entries["sm_80"]


def test_a_fatbin_without_sass_for_the_device_needs_the_jit_output(rec, fake):
    fake.library_load(FAT, 0x3000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.deliver(A)           # sm_90: cannot run on sm_100, so it is not the JIT's output
    r = resolver(rec, probe=FakeProbe({HA: ATTRS}), arch=100)
    with pytest.raises(KernelNotFoundError, match="JIT"):
        r.resolve_live(FakeLive(func=0x3100, attributes=attrs(binary_version=100)))


def test_jit_output_by_function_set_on_a_device_without_sass(rec, fake):
    """A library given only PTX: its module is the JIT's output, found among the delivered
    cubins by the PTX's function set and verified by attributes."""
    ptx = next(e.payload() for c in fatbin.iter_containers(FAT) for e in c.entries
               if e.kind == "ptx")
    fake.library_load(ptx + b"\0", 0x3000)
    fake.get_kernel(0x3000, "k", 0x3100)
    fake.deliver(A)                                  # the JIT output (holds exactly k, other)
    fake.deliver((FIX / "kernels.sm_90.cubin").read_bytes())
    got = resolver(rec, probe=FakeProbe({HA: ATTRS})).resolve_live(FakeLive(func=0x3100))
    assert got.hash == HA and got.source == "recorder: library JIT output (by function set)"
    assert rec.loads.libraries[0x3000].input.format == "ptx"


def test_an_exact_choice_that_the_driver_disagrees_with_is_an_error(rec, fake):
    fake.module_load(A, 0x1000, inside=[A])
    r = resolver(rec, probe=FakeProbe({HA: attrs(num_regs=40)}))
    with pytest.raises(KernelNotFoundError) as err:
        r.resolve_live(FakeLive(module=0x1000))
    assert "num_regs 10 live vs 40" in str(err.value) and HA[:16] in str(err.value)
    # CGSNAP_VERIFY_KERNELS=0 (verify=False): an unambiguous exact choice is not re-checked.
    assert resolver(rec, probe=FakeProbe({}), verify=False).resolve_live(
        FakeLive(module=0x1000)).hash == HA


def registered(*images):
    src = RegisteredSource()
    src._scan_jit_caches = lambda: None        # no JIT caches of this machine in the test
    for data, label in images:
        src.register(data, label)
    return src


def test_by_name_the_function_set_narrows_then_the_attributes():
    src = registered((A, "nvrtc:a"), (B, "nvrtc:b"), (C, "nvrtc:c"))
    probe = FakeProbe({HA: ATTRS, HB: ATTRS, HC: ATTRS})
    got = resolver(sources=[src], probe=probe).resolve_live(FakeLive(functions=frozenset({"k"})))
    assert got.hash == HC and got.source == "nvrtc:c [by function set]" and probe.asked == [HC]
    probe = FakeProbe({HA: ATTRS, HB: attrs(shared_size_bytes=1024), HC: ATTRS})
    got = resolver(sources=[src], probe=probe).resolve_live(FakeLive())
    assert got.hash == HA and got.source == "nvrtc:a [by function set, by attributes]"
    assert sorted(probe.asked) == sorted([HA, HB])


def test_by_name_equal_images_on_every_discriminator_are_ambiguous():
    src = registered((A, "nvrtc:a"), (B, "nvrtc:b"), (C, "nvrtc:c"))
    with pytest.raises(AmbiguousKernelError) as err:
        resolver(sources=[src], probe=FakeProbe({HA: ATTRS, HB: ATTRS})).resolve_live(FakeLive())
    msg = str(err.value)
    for part in ("nvrtc:a " + HA[:16], "nvrtc:b " + HB[:16], "function sets are equal",
                 "and match the live module's", "num_regs=10", "sections that differ: .text.k",
                 "does not choose by guess", "register_image"):
        assert part in msg, (part, msg)


def test_by_name_images_the_driver_disagrees_with_are_skipped_for_the_next_source(rec, fake):
    fake.deliver(B)                               # recorded, but not the live kernel
    src = registered((A, "nvrtc:a"))
    r = resolver(rec, sources=[src], probe=FakeProbe({HA: ATTRS, HB: attrs(num_regs=32)}))
    got = r.resolve_live(FakeLive(module=0x9999))
    assert got.hash == HA and got.source == "nvrtc:a"
    with pytest.raises(KernelNotFoundError) as err:
        resolver(rec, probe=FakeProbe({HB: attrs(num_regs=32)})).resolve_live(FakeLive())
    assert "num_regs 10 live vs 32" in str(err.value)


def test_by_name_without_a_probe_one_image_is_taken_and_two_are_an_error():
    one = registered((A, "nvrtc:a"))
    assert resolver(sources=[one]).resolve("k", lambda: frozenset({"k", "other"})).hash == HA
    two = registered((A, "nvrtc:a"), (B, "nvrtc:b"))
    with pytest.raises(AmbiguousKernelError, match="not compared"):
        resolver(sources=[two]).resolve("k", lambda: frozenset({"k", "other"}))


def test_an_input_that_cannot_be_read_back_falls_back_to_the_name_search(rec, fake):
    fake.library_load(A, 0x3000, preserved=True)
    fake.get_kernel(0x3000, "k", 0x3100)
    rec.sync()
    inp = rec.loads.libraries[0x3000].input
    ctypes.memmove(inp.address + 64, b"\xee" * 8, 8)
    with pytest.raises(KernelNotFoundError) as err:
        resolver(rec, probe=FakeProbe({})).resolve_live(FakeLive(func=0x3100))
    assert "no longer holds it" in str(err.value) and "was found in no image" in str(err.value)


def test_the_launch_step_uses_what_the_launch_delivered(rec, fake):
    fake.launch(0xF000, inside=[B])
    fake.deliver(A)
    got = resolver(rec, probe=FakeProbe({HB: ATTRS})).resolve_live(FakeLive())
    assert got.hash == HB and got.source == "recorder: launch"


def test_default_resolver_is_the_identity_resolver(monkeypatch):
    from cgsnap.kernels import registry
    monkeypatch.setenv("CGSNAP_NO_SCAN", "1")
    monkeypatch.setenv("CGSNAP_VERIFY_KERNELS", "0")
    r = registry.default_resolver(90)
    assert isinstance(r, IdentityResolver) and r.verify is False and r.arch == 90
    assert [s.name for s in r.sources][-1] == "registered"
    r.close()


def test_the_probe_loads_each_image_once_within_its_budget_and_quietly(monkeypatch):
    """DriverProbe against a stand-in driver: images stay loaded (least recently used first out)
    within the budget, what they give a kernel is kept process-wide, failures are not kept, and
    the recorder is told to ignore the probe's own loads."""
    from types import SimpleNamespace

    from cgsnap.cuda import driver as drv
    from cgsnap.errors import DriverError
    from cgsnap.kernels import live
    events, loaded = [], {}
    rec = cupti.ModuleRecorder()

    def load(data):
        assert rec._suppressed, "the probe's loads must be hidden from the recorder"
        handle = len(loaded) + 1
        loaded[handle] = data
        events.append(("load", len(data)))
        return handle

    def function(lib, name):
        if name == "missing":
            raise DriverError("cuLibraryGetKernel", 500, "CUDA_ERROR_NOT_FOUND")
        return (lib, name)

    monkeypatch.setattr(live, "_probed", {})
    monkeypatch.setattr(drv, "current_device", lambda: SimpleNamespace(ordinal=0))
    monkeypatch.setattr(drv, "library_load", load)
    monkeypatch.setattr(drv, "library_unload", lambda lib: events.append(("unload", lib)))
    monkeypatch.setattr(drv, "library_function", function)
    monkeypatch.setattr(drv, "function_identity", lambda f: {"num_regs": len(loaded[f[0]])})
    ca, cb = cubin_of(A, "a"), cubin_of(B, "b")
    probe = live.DriverProbe(rec, budget=len(A) + len(B) // 2)
    assert probe.attributes(ca, "k") == {"num_regs": len(A)}
    assert probe.attributes(ca, "other") == {"num_regs": len(A)}     # same image, still loaded
    assert probe.attributes(cb, "k") == {"num_regs": len(B)}         # over budget: A goes
    assert probe.attributes(cb, "missing") is None
    assert events == [("load", len(A)), ("unload", 1), ("load", len(B))]
    assert live.DriverProbe(rec).attributes(ca, "k") == {"num_regs": len(A)}, "kept process-wide"
    probe.close()
    assert events[-1] == ("unload", 2) and not rec._suppressed


def cubin_of(data, label):
    from cgsnap.kernels.sources import cubin_candidate
    return cubin_candidate(data, label)


def test_stopping_the_recorder_forgets_the_associations_but_keeps_the_cubins(rec, fake):
    class FakeLib:
        def cuptiUnsubscribe(self, _sub):
            return 0
    fake.module_load(A, 0x1000, inside=[A])
    rec._lib, rec.active = FakeLib(), True
    rec.stop()
    assert not rec.loads.modules and HA in rec.images and not rec.active


def test_a_cache_preference_set_on_a_function_is_recorded_until_its_module_goes(rec, fake):
    """cuFuncSetCacheConfig has no getter: the recorder keeps the last value set per function
    (Triton sets PREFER_SHARED on kernels over 48 KiB of shared memory), per kernel through
    cuKernelSetCacheConfig; a failed call records nothing, an unload forgets it."""
    fake.module_load(A, 0x1000, inside=[A])
    fake.module_function(0x1000, "k", 0x1100)
    fake.cache_config(0x1100, 1)                       # CU_FUNC_CACHE_PREFER_SHARED
    fake.cache_config(0x1100, 3, result=1)             # failed: not applied
    lib_buf = fake.library_load(B, 0x3000, inside=[B])
    fake.get_kernel(0x3000, "kk", 0x3100)
    fake.kernel_function(0x3100, 0x3200)
    fake.cache_config(0x3100, 2, api="cuKernelSetCacheConfig")
    rec.sync()
    t = rec.loads
    assert lib_buf is not None
    assert t.cache_config(0x1100) == 1
    assert t.cache_config(0x3200) == 2 and t.cache_config(0x3200, 0x3100) == 2
    assert t.cache_config(0x9999) is None
    # cuKernelSetCacheConfig is per device: set for device 1 too, an unknown device is ambiguous.
    fake.cache_config(0x3100, 3, api="cuKernelSetCacheConfig", dev=1)
    rec.sync()
    assert t.cache_config(0x3200, 0x3100, device=0) == 2
    assert t.cache_config(0x3200, 0x3100, device=1) == 3
    assert t.cache_config(0x3200, 0x3100) is None
    assert t.cache_config(0x3200, 0x3100, device=2) is None
    fake.unload("cuModuleUnload", 0x1000)
    fake.unload("cuLibraryUnload", 0x3000)
    rec.sync()
    assert t.cache_config(0x1100) is None and t.cache_config(0x3200, 0x3100) is None
    assert rec.calls["cuFuncSetCacheConfig"] == 2


def test_a_reused_function_handle_drops_the_old_preference(rec, fake):
    fake.module_load(A, 0x1000, inside=[A])
    fake.module_load(B, 0x2000, inside=[B])
    fake.module_function(0x1000, "k", 0x1100)
    fake.cache_config(0x1100, 1)
    fake.module_function(0x2000, "other", 0x1100)   # the driver hands the handle out again
    rec.sync()
    assert rec.loads.cache_config(0x1100) is None


def test_the_restore_applies_a_cache_preference(monkeypatch):
    """driver.func_set_attrs turns attrs.cache_config into cuFuncSetCacheConfig, the others
    into cuFuncSetAttribute, and ignores names it does not know."""
    from cgsnap.cuda import driver
    calls = []
    monkeypatch.setattr(driver, "call", lambda fn, *args: calls.append((fn, args)))
    driver.func_set_attrs("F", {"cache_config": 1, "max_dynamic_shared_size_bytes": 65536,
                                "made_up": 3})
    assert [fn for fn, _ in calls] == [driver.cu.cuFuncSetCacheConfig,
                                       driver.cu.cuFuncSetAttribute]
    fn, args = calls[0]
    assert args[0] == "F" and int(args[1]) == 1


def test_a_function_setting_on_a_kernel_handle_still_counts(rec, fake):
    """cuFuncSetCacheConfig given a CUkernel (the runtime casts them) applies to its functions."""
    fake.library_load(B, 0x3000, inside=[B])
    fake.get_kernel(0x3000, "kk", 0x3100)
    fake.kernel_function(0x3100, 0x3200)
    fake.cache_config(0x3100, 2)                      # cuFuncSetCacheConfig, a kernel handle
    rec.sync()
    assert rec.loads.cache_config(0x3200) == 2 and rec.loads.cache_config(0x3200, 0x3100) == 2
