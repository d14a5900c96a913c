"""Exact kernel identity on the GPU: several loaded modules hold a kernel of the same name with
different code, and the snapshot must carry the very image each node runs (docs/RELIABILITY.md,
"Kernel identity"). Each capture runs in a fresh process (tests/gpu/identity_worker.py: the
recorder starts before anything loads, CUDA_MODULE_LOADING is read at cuInit), each restore in
another one that never imports torch (restore_worker.py), compared bit for bit with what the
original graph computed from the same inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_gpu_roundtrip import assert_bit_equal, restore_in_fresh_process

pytestmark = pytest.mark.gpu
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "identity_worker.py")


def run_worker(tmp_path, scenario: str, opts: dict = None, record: bool = True, timeout=600,
               **env) -> dict:
    """The worker's report; fails the test (with its output) when the worker failed."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("CGSNAP_RECORD", "CGSNAP_RECORD_LAUNCHES", "CUDA_MODULE_LOADING")}
    full.update({k: str(v) for k, v in env.items()},
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if record:
        full["CGSNAP_RECORD"] = "1"
    proc = subprocess.run([sys.executable, WORKER, scenario, str(tmp_path), json.dumps(opts or {})],
                          capture_output=True, text=True, env=full, timeout=timeout)
    path = tmp_path / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    print(proc.stdout[-6000:])
    artifacts = os.environ.get("CGSNAP_TEST_ARTIFACTS")
    if artifacts and report:        # the measurements, for the coordinator's notes
        with open(os.path.join(artifacts, "identity.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in report.items() if k != "traceback"},
                               default=str) + "\n")
    assert proc.returncode == 0, f"worker {scenario} {opts} failed:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    if report.get("recorder"):
        assert report["recorder"]["callback_errors"] == 0, report["recorder"]
    return report


def restore_and_compare(tmp_path, report: dict, graph: str) -> None:
    with np.load(tmp_path / "inputs.npz") as f:
        inputs = {k: f[k] for k in f.files}
    with np.load(tmp_path / "expected.npz") as f:
        expected = {k: f[k] for k in f.files}
    restored = restore_in_fresh_process(tmp_path / "snap.cgsnap", inputs, sorted(expected), graph,
                                        tmp_path)
    assert_bit_equal(restored, expected)


def test_the_recorder_ties_each_load_handle_to_its_image(tmp_path):
    """The callback reads the real CUPTI structures right: cuModuleLoadData's and
    cuLibraryLoadData's handles, cuLibraryGetKernel's kernel, cuKernelGetFunction's function
    (eager and lazy loading), and unloads drop them. Prints where the driver delivered each
    cubin (inside the load call, or later)."""
    for loading in ("EAGER", "LAZY"):
        out = tmp_path / loading
        out.mkdir()
        r = run_worker(out, "handles", CUDA_MODULE_LOADING=loading)
        print(loading, "module:", r["module"], "library:", r["library"])
        assert r["module"] is not None, f"{loading}: no record for the module handle: {r}"
        assert r["module"]["api"] == "cuModuleLoadData"
        assert r["module"]["eager"] == [r["cubin_hash"]] or r["module"]["input_kept"], r["module"]
        assert r["module_function"], "cuModuleGetFunction's function is not tied to its module"
        assert r["library"] is not None, f"{loading}: no record for the library handle: {r}"
        assert r["library"]["api"] == "cuLibraryLoadData"
        assert r["library"]["eager"] or r["library"]["lazy"] or r["library"]["input_is_the_cubin"]
        assert r["kernel"] == [r["ids"]["library"], "k"], r["kernel"]
        assert r["function"] == [r["ids"]["kernel"]], r["function"]
        assert r["after_unload"] == {"module": False, "library": False, "kernel": False,
                                     "function": False}, r["after_unload"]


@pytest.mark.parametrize("loading", ["EAGER", "LAZY"])
@pytest.mark.parametrize("loader", ["module", "library", "library_kernel"])
def test_same_named_nvrtc_kernels_are_told_apart_by_their_loads(tmp_path, loader, loading):
    """k(float*, int) in two NVRTC modules (y *= 2, y *= 3), loaded like Triton
    (cuModuleLoadData + cuModuleGetFunction) or like cuDNN (cuLibraryLoadData +
    cuLibraryGetKernel, then cuKernelGetFunction, or the CUkernel launched itself), one graph
    launching both: each node gets its own image, found by the recorder, and the restore
    computes what the original did."""
    r = run_worker(tmp_path, "nvrtc", {"loader": loader}, CUDA_MODULE_LOADING=loading)
    assert "ambiguous" not in r, r.get("ambiguous")
    assert r["host_check"], "the original graph did not compute y*2 and y*3 (test premise)"
    kernels = r["kernels"]
    assert [k["name"] for k in kernels] == ["k", "k"], kernels
    assert kernels[0]["image"] != kernels[1]["image"], "both nodes got one image"
    assert all(k["source"].startswith("recorder: ") for k in kernels), kernels
    restore_and_compare(tmp_path, r, "ident")


def test_without_the_recorder_attributes_tell_registered_images_apart(tmp_path):
    """Recorder off, both images registered: the second kernel uses static shared
    memory, so loading each candidate and comparing its attributes with the live kernel's
    settles each node."""
    r = run_worker(tmp_path, "nvrtc", {"loader": "module", "variant": "shared", "register": True},
                   record=False, CGSNAP_NO_SCAN=1)
    a, b = r["attrs"]
    assert a["shared_size_bytes"] != b["shared_size_bytes"], f"test premise: {a} vs {b}"
    assert r["host_check"], "the original graph did not compute what the kernels say"
    kernels = r["kernels"]
    assert {k["image"] for k in kernels} == set(r["hashes"]), kernels
    assert all(k["source"].endswith("[by attributes]") for k in kernels), kernels
    restore_and_compare(tmp_path, r, "ident")


def test_without_the_recorder_identical_attributes_are_ambiguous(tmp_path):
    """Recorder off, both images registered, equal on every discriminator: the snapshot refuses,
    naming both candidates and what to do."""
    r = run_worker(tmp_path, "nvrtc", {"loader": "module", "register": True}, record=False,
                   CGSNAP_NO_SCAN=1)
    a, b = r["attrs"]
    if a != b:
        pytest.fail(f"test premise: y*2 and y*3 were expected to compile to kernels with equal "
                    f"attributes, got {a} vs {b}")
    msg = r.get("ambiguous")
    assert msg, f"the snapshot should have refused: {r.get('kernels')}"
    for part in ("nvrtc:A " + r["hashes"][0][:16], "nvrtc:B " + r["hashes"][1][:16],
                 "differ only in their bytes", "start_recorder", "register_image"):
        assert part in msg, (part, msg)


def test_torch_compile_max_autotune_graph_restores_bit_exact(tmp_path):
    """torch.compile(mode="max-autotune-no-cudagraphs") of relu(x @ w + b) in fp16 with Triton
    GEMM templates only: autotuning loads one module per candidate configuration, all with the
    kernel's name; the graph captured after warm-up snapshots with every Triton kernel tied to
    its own load, and restores bit-exact on fresh inputs."""
    pytest.importorskip("torch")
    caches = tmp_path / "caches"
    r = run_worker(tmp_path, "compile", timeout=900,
                   TORCHINDUCTOR_CACHE_DIR=caches / "inductor", TRITON_CACHE_DIR=caches / "triton",
                   TORCHINDUCTOR_FORCE_DISABLE_CACHES=1)
    print("same-named recorded images:", r["same_named_images"])
    print("kernels:", [(k["name"][:60], k["source"]) for k in r["kernels"]])
    triton = [k for k in r["kernels"] if k["name"].startswith("triton")]
    assert triton, r["kernels"]
    assert max(r["same_named_images"][k["name"]] for k in triton) >= 2, \
        f"test premise: autotuning should load several same-named modules: {r['same_named_images']}"
    assert all(k["source"].startswith("recorder: module") for k in triton), triton
    restore_and_compare(tmp_path, r, "torch")


@pytest.mark.parametrize("launches", [False, True], ids=["default", "launch-tracking"])
def test_sdpa_cudnn_graph_restores_bit_exact(tmp_path, launches):
    """Scaled dot-product attention on cuDNN's backend in bf16: its runtime-compiled kernels
    load through cuLibraryLoadData, lazily, one name in several libraries. Also with launch
    tracking, which ties a cubin a launch loads to the launched function."""
    pytest.importorskip("torch")
    env = {"CGSNAP_RECORD_LAUNCHES": 1} if launches else {}
    r = run_worker(tmp_path, "sdpa", **env)
    if r.get("skip"):
        pytest.skip(r["skip"])
    print("same-named recorded images:", r["same_named_images"])
    print("kernels:", [(k["name"][:60], k["source"]) for k in r["kernels"]])
    print("recorder:", r["recorder"])
    assert r["recorder"]["launches"] == launches
    restore_and_compare(tmp_path, r, "torch")


def test_tracked_driver_calls_stay_off_eager_torch_launches(tmp_path):
    """The recorder's Python callback runs only for load / kernel-lookup calls: 2,500 warm
    eager launches (matmul, GELU, add, LayerNorm, sum) must make (almost) none of them; if
    cudart looked kernels up per launch, this would say which call."""
    pytest.importorskip("torch")
    r = run_worker(tmp_path, "torch_calls")
    during = r["tracked_calls_during"]
    print("tracked calls during", r["launches"], "launches:", during, "recorder:", r["recorder"])
    assert sum(during.values()) <= 10, during
