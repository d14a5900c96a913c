"""cgsnap.torch refuses what it cannot record -- torch.compile's CUDA graph trees
(mode="reduce-overhead"), compiled functions, graphs without keep_graph=True -- with a typed
error that says why and what to do instead, before any work. Duck-typed fakes: no torch, no GPU
(tests/gpu/test_gpu_reduce_overhead.py does it with the real thing)."""
import sys
import types

import pytest

import cgsnap
import cgsnap.torch as ct

TREES = "torch._inductor.cudagraph_trees"


class KeptNoGraph:
    """A captured torch.cuda.CUDAGraph made with keep_graph=False."""

    def raw_cuda_graph(self):
        raise RuntimeError("You cannot access the raw cudaGraph_t instance unless CUDAGraph was "
                           "initialized with keep_graph=True")


def compiled_function():
    """What torch.compile(fn) returns: a wrapper carrying the original callable."""
    def wrapper(*a):
        return a
    wrapper._torchdynamo_orig_callable = lambda *a: a
    return wrapper


class FakeOptimizedModule:          # torch.compile(module)
    def __init__(self):
        self._orig_mod = object()
        self.dynamo_ctx = object()


def tree_object(name):
    return type(name, (), {"__module__": TREES})()


@pytest.fixture
def trees(monkeypatch):
    """A cudagraph-trees module holding two graphs (a root and its child) on cuda:0."""
    held = KeptNoGraph(), KeptNoGraph()
    child = types.SimpleNamespace(graph=held[1], id="GraphID(id=1)", children={})
    root = types.SimpleNamespace(graph=held[0], id="GraphID(id=0)", children={"fn": [child]})
    manager = types.SimpleNamespace(graph=None, roots={"fn": [root]})
    mod = types.ModuleType(TREES)
    mod.local = types.SimpleNamespace(
        tree_manager_containers={0: types.SimpleNamespace(tree_manager=manager)})
    monkeypatch.setitem(sys.modules, TREES, mod)
    return held


def check_advice(msg: str) -> None:
    for needed in ("reduce-overhead", "max-autotune-no-cudagraphs", "keep_graph=True",
                   "capture_sizes", "examples/serving"):
        assert needed in msg, (needed, msg)


def test_a_compiled_function_is_refused_with_the_reason_and_the_way_out(tmp_path):
    path = tmp_path / "graphs.cgsnap"
    with pytest.raises(ct.GraphTreesError) as info:
        ct.save(path, {"step": compiled_function()})
    msg = str(info.value)
    assert "graphs['step'] is a function compiled by torch.compile" in msg
    assert "graph trees" in msg and "cudaGraph_t" in msg
    check_advice(msg)
    assert not path.exists()
    assert isinstance(info.value, cgsnap.CaptureError)      # callers catching CaptureError see it


def test_a_compiled_function_passed_instead_of_the_mapping():
    with pytest.raises(ct.GraphTreesError, match=r"^graphs is a function compiled by torch"):
        ct.snapshot(compiled_function())


def test_a_compiled_module_is_refused():
    with pytest.raises(ct.GraphTreesError, match=r"graphs\['m'\] is a function compiled"):
        ct.snapshot({"m": FakeOptimizedModule()})


@pytest.mark.parametrize("name", ["CUDAGraphNode", "CUDAGraphTreeManager", "CUDAWarmupNode"])
def test_the_trees_own_objects_are_refused(name):
    with pytest.raises(ct.GraphTreesError) as info:
        ct.snapshot({"bs8": tree_object(name)})
    msg = str(info.value)
    assert f"graphs['bs8'] is a {name} of torch.compile's CUDA graph trees" in msg
    assert "keep_graph=False" in msg and "Dynamo guards" in msg
    check_advice(msg)


def test_a_graph_the_trees_hold_is_refused_as_theirs(trees):
    for g, node in zip(trees, ("GraphID(id=0)", "GraphID(id=1)")):
        with pytest.raises(ct.GraphTreesError) as info:
            ct.snapshot({"g": g})
        msg = str(info.value)
        assert f"owned by torch.compile's CUDA graph trees (graph tree node {node} of cuda:0" in msg
        check_advice(msg)


def test_a_graph_without_keep_graph_is_a_capture_error_naming_the_fix(trees):
    with pytest.raises(cgsnap.CaptureError) as info:
        ct.snapshot({"mine": KeptNoGraph()})           # not one of the trees' graphs
    assert not isinstance(info.value, ct.GraphTreesError)
    msg = str(info.value)
    assert msg.startswith("graphs['mine']: this torch.cuda.CUDAGraph keeps no cudaGraph_t")
    assert "torch.cuda.CUDAGraph(keep_graph=True)" in msg


@pytest.mark.parametrize("layout", ["no local", "containers not a dict", "roots raise"])
def test_trees_of_an_unknown_layout_never_crash(monkeypatch, layout):
    mod = types.ModuleType(TREES)
    if layout == "containers not a dict":
        mod.local = types.SimpleNamespace(tree_manager_containers=42)
    elif layout == "roots raise":
        class Manager:
            graph = None

            @property
            def roots(self):
                raise AttributeError("moved")
        mod.local = types.SimpleNamespace(
            tree_manager_containers={0: types.SimpleNamespace(tree_manager=Manager())})
    monkeypatch.setitem(sys.modules, TREES, mod)
    assert ct._tree_graphs() == {}
    with pytest.raises(cgsnap.CaptureError, match="keeps no cudaGraph_t"):
        ct.snapshot({"g": KeptNoGraph()})


def test_the_tree_walk_is_bounded(monkeypatch):
    """A cycle in (hostile or corrupted) tree state ends the walk instead of hanging it."""
    node = types.SimpleNamespace(graph=KeptNoGraph(), id=0, children={})
    node.children["fn"] = [node]
    mod = types.ModuleType(TREES)
    mod.local = types.SimpleNamespace(tree_manager_containers={0: types.SimpleNamespace(
        tree_manager=types.SimpleNamespace(graph=None, roots={"fn": [node]}))})
    monkeypatch.setitem(sys.modules, TREES, mod)
    assert list(ct._tree_graphs()) == [id(node.graph)]


@pytest.mark.parametrize("graphs, match", [
    ([KeptNoGraph()], "graphs must be a mapping"),
    ({"": KeptNoGraph()}, "graph names must be non-empty strings"),
    ({3: KeptNoGraph()}, "graph names must be non-empty strings"),
])
def test_malformed_graph_arguments(graphs, match):
    with pytest.raises(cgsnap.CaptureError, match=match):
        ct.snapshot(graphs)


def test_the_checks_come_before_anything_else():
    """Before the memory_pointers check and before torch is needed."""
    with pytest.raises(ct.GraphTreesError):
        ct.snapshot({"s": compiled_function()}, memory_pointers="bogus")


@pytest.mark.skipif(ct.torch is not None, reason="torch is installed here")
def test_without_torch_a_good_looking_graph_asks_for_torch():
    class Kept:
        def raw_cuda_graph(self):
            return 0x1234
    with pytest.raises(ImportError, match="cgsnap.torch needs PyTorch"):
        ct.snapshot({"g": Kept()})
