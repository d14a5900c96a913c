"""Time the pieces of kernel loading for a snapshot file: decompress, cuLibraryLoadData,
cuModuleLoadData, get function/params/attrs. usage: kload.py FILE"""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from cgsnap.cuda import driver
from cgsnap.cuda.driver import call, cu
from cgsnap.format import fileformat
from cgsnap.format.model import Snapshot

path = sys.argv[1]
t = time.perf_counter(); f = fileformat.open_file(path, check_types=False); t_open = time.perf_counter() - t
t = time.perf_counter(); snap = Snapshot.from_manifest(f.manifest, [b.raw_length for b in f.blobs], path); t_man = time.perf_counter() - t
t = time.perf_counter(); datas = [bytes(f.blob(im.data, verify=True)) for im in snap.images]; t_dec = time.perf_counter() - t
t = time.perf_counter(); [bytes(f.blob(im.data, verify=False)) for im in snap.images]; t_dec_nv = time.perf_counter() - t
print(f"open {t_open*1e3:.1f} ms, from_manifest {t_man*1e3:.1f} ms, decompress serial verified {t_dec*1e3:.1f} unverified {t_dec_nv*1e3:.1f} ms, {len(datas)} images {sum(map(len, datas))/1e6:.1f} MB, mode={os.environ.get('CUDA_MODULE_LOADING')}")
dev = driver.init(0)
rows = []
for im, d in zip(snap.images, datas):
    t = time.perf_counter(); lib = driver.library_load(d); tl = time.perf_counter() - t
    t = time.perf_counter(); mod = call(cu.cuModuleLoadData, d); tm = time.perf_counter() - t
    names = [k.name for k in snap.kernels if k.image == im.hash]
    t = time.perf_counter()
    for n in names:
        fn = driver.library_function(lib, n); driver.func_params(fn)
    tg = time.perf_counter() - t
    rows.append((len(d), tl, tm, tg, len(names)))
    call(cu.cuModuleUnload, mod)
for r in sorted(rows, reverse=True)[:25]:
    print(f"{r[0]/1e6:8.2f} MB  libload {r[1]*1e3:7.2f} ms  modload {r[2]*1e3:7.2f} ms  getfn {r[3]*1e3:6.2f} ms ({r[4]} kernels)")
print("sum libload %.1f ms, modload %.1f ms, getfn %.1f ms" % tuple(sum(r[i] for r in rows)*1e3 for i in (1,2,3)))
# parallel, fresh copies
def load(d):
    call(cu.cuCtxSetCurrent, dev.context); return driver.library_load(d)
for nt in (1, 4, 8, 16):
    t = time.perf_counter()
    with ThreadPoolExecutor(nt) as p: libs = list(p.map(load, datas))
    print(f"parallel {nt} threads: {(time.perf_counter()-t)*1e3:.1f} ms")
