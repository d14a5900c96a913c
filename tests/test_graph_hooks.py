"""Conditional nodes recorded at creation (cgsnap.kernels.graph_hooks) and the kernels that can
set a conditional (cgsnap.binary.calls), without a GPU: the callbacks are fed the parameter
structs the driver would pass, built with ctypes in the layouts of the CUDA 13.0 headers."""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from cgsnap.binary import calls
from cgsnap.errors import BinaryFormatError
from cgsnap.kernels import graph_hooks as gh

FIXTURE = Path(__file__).parent / "fixtures" / "conditional.sm_90.cubin"


@pytest.fixture
def registry(monkeypatch):
    reg = gh.ConditionalRegistry()
    monkeypatch.setattr(gh, "_REGISTRY", reg)
    return reg


class Call:
    """A CUpti_CallbackData for one call, with its parameter struct and CUresult."""

    def __init__(self, params, result: int = 0, site: int = gh.CUPTI_API_EXIT):
        self.params = params
        self.result = ctypes.c_int(result)
        self.data = gh.CallbackData(callbackSite=site,
                                    functionParams=ctypes.addressof(params),
                                    functionReturnValue=ctypes.addressof(self.result))

    @property
    def address(self) -> int:
        return ctypes.addressof(self.data)


def run(cbid: int, call: Call) -> None:
    on_enter, on_exit = gh.handlers()[cbid]
    (on_exit if call.data.callbackSite == gh.CUPTI_API_EXIT else on_enter)(call.address)


def handle_create(graph: int, value: int, default: int, flags: int, result: int = 0):
    out = ctypes.c_uint64(value)
    p = gh.ConditionalHandleCreateParams(pHandle_out=ctypes.addressof(out), hGraph=graph,
                                         ctx=0xC0, defaultLaunchValue=default, flags=flags)
    call = Call(p, result)
    call.keep = out
    run(gh.CBID_GRAPH_CONDITIONAL_HANDLE_CREATE, call)


def add_node(graph: int, node: int, node_type: int, handle=0, cond_type=0, bodies=(),
             v2=True, result=0):
    """cuGraphAddNode(_v2) at exit: the driver has written the node handle and, for a
    conditional node, the body graphs into phGraph_out."""
    out = ctypes.c_void_p(node)
    np_ = gh.GraphNodeParams(type=node_type)
    body_array = (ctypes.c_void_p * max(len(bodies), 1))(*bodies)
    cond = gh.ConditionalNodeParams.from_address(ctypes.addressof(np_) + gh.UNION_OFFSET)
    cond.handle, cond.type, cond.size = handle, cond_type, len(bodies)
    cond.phGraph_out = ctypes.addressof(body_array) if bodies else None
    cls = gh.AddNodeV2Params if v2 else gh.AddNodeParams
    p = cls(phGraphNode=ctypes.addressof(out), hGraph=graph, nodeParams=ctypes.addressof(np_))
    call = Call(p, result)
    call.keep = (out, np_, body_array)
    run(gh.CBID_GRAPH_ADD_NODE_V2 if v2 else gh.CBID_GRAPH_ADD_NODE, call)


def test_layouts_match_the_headers():
    # generated_cuda_meta.h / cuda.h / cupti_callbacks.h, x86-64.
    assert ctypes.sizeof(gh.GraphNodeParams) == 256
    assert gh.AddNodeV2Params.nodeParams.offset == 40 and gh.AddNodeParams.nodeParams.offset == 32
    assert gh.ConditionalHandleCreateParams.flags.offset == 28
    assert gh.CallbackData.functionReturnValue.offset == 24


def test_handles_and_nodes_are_recorded(registry):
    G, B0, B1 = 0x1000, 0x2000, 0x3000
    handle_create(G, 1, default=0, flags=0)
    handle_create(G, 2, default=5, flags=gh.CU_GRAPH_COND_ASSIGN_DEFAULT)
    add_node(G, 0xA0, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=1, cond_type=0, bodies=(B0, B1))
    add_node(G, 0xA1, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=2, cond_type=1,
             bodies=(0x4000,), v2=False)
    add_node(G, 0xA2, 0)            # a kernel node: not recorded
    info = registry.conditional(G, 0xA0)
    assert (info.handle, info.kind, info.size, info.bodies, info.context) == \
        (1, "if", 2, (B0, B1), 0)
    assert registry.conditional(G, 0xA1).kind == "while"
    assert registry.conditional(G, 0xA2) is None
    h = registry.handle(G, 2)
    assert (h.default, h.flags, h.context) == (5, 1, 0xC0)
    assert [x.value for x in registry.handles_of(G)] == [1, 2]
    assert registry.body_parent(B1) == (G, 0xA0, 1)


def test_failed_calls_are_not_recorded(registry):
    handle_create(0x1000, 1, 0, 0, result=1)          # CUDA_ERROR_INVALID_VALUE
    add_node(0x1000, 0xA0, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=1, bodies=(0x2000,),
             result=801)
    assert len(registry) == 0 and registry.errors == 0


def test_destroying_a_graph_forgets_it_and_its_bodies(registry):
    G, B = 0x1000, 0x2000
    handle_create(G, 1, 0, 0)
    add_node(G, 0xA0, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=1, bodies=(B,))
    handle_create(B, 1, 0, 0)           # a nested conditional inside the body
    add_node(B, 0xB0, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=1, cond_type=2,
             bodies=(0x5000, 0x6000, 0x7000))
    handle_create(0x9000, 1, 0, 0)      # another graph: kept
    assert len(registry) == 5
    p = gh.GraphDestroyParams(hGraph=G)
    run(gh.CBID_GRAPH_DESTROY, Call(p, site=gh.CUPTI_API_ENTER))
    assert registry.conditional(B, 0xB0) is None and registry.handle(B, 1) is None
    assert registry.body_parent(B) is None and len(registry) == 1
    # A new graph at the same address starts clean.
    assert registry.conditional(G, 0xA0) is None


def test_destroying_a_node_forgets_its_bodies(registry):
    G, B = 0x1000, 0x2000
    add_node(G, 0xA0, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=1, bodies=(B,))
    add_node(B, 0xB0, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=2, bodies=(0x3000,))
    run(gh.CBID_GRAPH_DESTROY_NODE, Call(gh.GraphDestroyNodeParams(hNode=0xA0),
                                         site=gh.CUPTI_API_ENTER))
    assert registry.conditional(G, 0xA0) is None and registry.conditional(B, 0xB0) is None


def test_clear_forgets_everything(registry):
    handle_create(0x1000, 1, 0, 0)
    add_node(0x1000, 0xA0, gh.CU_GRAPH_NODE_TYPE_CONDITIONAL, handle=1, bodies=(0x2000,))
    registry.clear()
    assert len(registry) == 0 and registry.body_parent(0x2000) is None


def test_bad_callback_data_never_raises(registry):
    gh.on_add_node_v2_exit(0)          # a null cbdata
    p = gh.AddNodeV2Params()           # null pointers everywhere
    run(gh.CBID_GRAPH_ADD_NODE_V2, Call(p))
    assert len(registry) == 0


def test_handlers_cover_the_calls_that_make_and_destroy_conditionals():
    h = gh.handlers()
    assert set(h) == {517, 522, 712, 722, 723}
    assert all(len(v) == 2 and any(v) for v in h.values())


# ---- which kernels set a conditional (binary evidence) ------------------------------------------

@pytest.mark.parametrize("kernel,expected", [("setc", True), ("dec", True), ("via", True),
                                             ("plain", False)])
def test_setter_kernels_are_found_in_the_cubin(kernel, expected):
    data = FIXTURE.read_bytes()
    assert calls.sets_conditionals("cubin", data, kernel) is expected
    assert (calls.SET_CONDITIONAL in calls.kernel_externals(data, kernel)) is expected


def test_setter_evidence_from_other_images():
    assert calls.sets_conditionals("ptx", b"call.uni cudaGraphSetConditional, (", "k") is True
    assert calls.sets_conditionals("ptx", b".entry k() { ret; }", "k") is False
    assert calls.sets_conditionals("fatbin", b"\x50\xed\x55\xba", "k") is None
    assert calls.sets_conditionals("cubin", b"not an elf", "k") is None
    with pytest.raises(BinaryFormatError, match="no function"):
        calls.kernel_externals(FIXTURE.read_bytes(), "missing")


# ---- the recorder's CUPTI dispatcher (cgsnap.kernels.cupti) ----------------------------------

def _driver_event(rec, cbid: int, call: Call) -> None:
    """What CUPTI does: the subscriber's callback, domain DRIVER_API, with the CallbackData."""
    rec._on_event(None, gh.CUPTI_CB_DOMAIN_DRIVER_API, cbid, call.address)


def test_the_recorder_dispatches_graph_calls_to_the_hooks(registry):
    from cgsnap.kernels import cupti
    rec = cupti.ModuleRecorder()
    out = ctypes.c_uint64(5)
    p = gh.ConditionalHandleCreateParams(pHandle_out=ctypes.addressof(out), hGraph=0x1000,
                                         ctx=0xC0, defaultLaunchValue=1, flags=1)
    with rec.suppressed():          # cgsnap's own work on this thread: still recorded
        _driver_event(rec, gh.CBID_GRAPH_CONDITIONAL_HANDLE_CREATE, Call(p))
    _driver_event(rec, gh.CBID_GRAPH_CONDITIONAL_HANDLE_CREATE,
                  Call(p, site=gh.CUPTI_API_ENTER))          # no handler at entry: nothing
    assert registry.handle(0x1000, 5).default == 1 and len(registry) == 1
    node = ctypes.c_void_p(0xA0)
    np_ = gh.GraphNodeParams(type=gh.CU_GRAPH_NODE_TYPE_CONDITIONAL)
    bodies = (ctypes.c_void_p * 1)(0x2000)
    cond = gh.ConditionalNodeParams.from_address(ctypes.addressof(np_) + gh.UNION_OFFSET)
    cond.handle, cond.type, cond.size, cond.phGraph_out = 5, 1, 1, ctypes.addressof(bodies)
    add = gh.AddNodeV2Params(phGraphNode=ctypes.addressof(node), hGraph=0x1000,
                             nodeParams=ctypes.addressof(np_))
    _driver_event(rec, gh.CBID_GRAPH_ADD_NODE_V2, Call(add))
    assert registry.conditional(0x1000, 0xA0).bodies == (0x2000,)
    _driver_event(rec, gh.CBID_GRAPH_DESTROY, Call(gh.GraphDestroyParams(hGraph=0x1000),
                                                   site=gh.CUPTI_API_ENTER))
    assert len(registry) == 0
    assert rec.calls == {} and rec.callback_errors == 0 and registry.errors == 0
    assert not rec._journal             # the module journal saw none of it


class FakeCuptiLib:
    """libcupti as start() / stop() use it; ``refuse``: cbids whose enabling fails."""

    def __init__(self, refuse=()):
        self.enabled: set = set()
        self.refuse = set(refuse)
        self.subscribed = False

    def cuptiGetVersion(self, ref):
        ref._obj.value = 130000
        return 0

    def cuptiSubscribe(self, sub, callback, userdata):
        self.subscribed = True
        return 0

    def cuptiEnableCallback(self, enable, sub, domain, cbid):
        if enable and cbid in self.refuse:
            return 1
        (self.enabled.add if enable else self.enabled.discard)((domain, cbid))
        return 0

    def cuptiUnsubscribe(self, sub):
        self.subscribed = False
        self.enabled.clear()
        return 0


def test_start_enables_the_graph_callbacks_and_stop_forgets_what_they_saw(registry, monkeypatch):
    from cgsnap.kernels import cupti
    monkeypatch.setattr(cupti.atexit, "register", lambda fn: None)
    rec = cupti.ModuleRecorder()
    rec._lib = lib = FakeCuptiLib()
    rec.start()
    graph_cbids = {(gh.CUPTI_CB_DOMAIN_DRIVER_API, c) for c in (517, 522, 712, 722, 723)}
    assert graph_cbids <= lib.enabled and rec.graph_hooks and registry.enabled
    handle_create(0x1000, 1, 0, 0)
    assert len(registry) == 1
    rec.stop()
    assert not registry.enabled and len(registry) == 0 and not rec.graph_hooks


def test_graph_callbacks_are_all_on_or_all_off(registry, monkeypatch):
    from cgsnap.kernels import cupti
    monkeypatch.setattr(cupti.atexit, "register", lambda fn: None)
    rec = cupti.ModuleRecorder()
    rec._lib = lib = FakeCuptiLib(refuse={gh.CBID_GRAPH_DESTROY_NODE})
    rec.start()
    assert not {c for _, c in lib.enabled} & set(gh.handlers())
    assert rec.active and rec.tracking and not rec.graph_hooks and not registry.enabled
    rec.stop()
