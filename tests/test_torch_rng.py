"""cgsnap.torch's RNG handling with torch's generator and graph replaced by fakes that do what
torch 2.11's do (CPU; needs torch importable, skipped where it is not, e.g. CI): the probe at save
measures the increment with every node disabled and puts the generator back; a restored replay
writes the live generator's seed and offset before the launch and then advances it."""
from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
from test_philox import rng_snapshot

from cgsnap.format.hashing import region_hash
from cgsnap.format.model import Ref, RngState

torch = pytest.importorskip("torch")
ct = pytest.importorskip("cgsnap.torch")

SEG = 0x7F00_0000_0000              # the RNG words' segment (region 1 of rng_snapshot)


class FakeGenerator:
    """torch.Generator's state API as a CUDA generator has it: the seed and offset live in a
    state object that graphsafe_get_state() shares; setting them marks the generator's cuDNN
    RNN dropout state stale (``resets``)."""

    def __init__(self, seed: int = 0, offset: int = 0, state=None):
        self.state = state or types.SimpleNamespace(seed=seed, offset=offset)
        self.resets = 0

    seed = property(lambda self: self.state.seed)
    offset = property(lambda self: self.state.offset)

    def graphsafe_get_state(self):
        return FakeGenerator(state=self.state)

    def get_state(self):
        return (self.state.seed, self.state.offset)

    def set_state(self, st):
        self.state.seed, self.state.offset = st
        self.resets += 1

    def initial_seed(self):
        return self.state.seed

    def get_offset(self):
        return self.state.offset

    def set_offset(self, offset):
        assert offset % 4 == 0
        self.state.offset = offset
        self.resets += 1

    def manual_seed(self, seed):
        self.state.seed, self.state.offset = seed, 0
        self.resets += 1


class FakeGraph:
    """CUDAGraph.replay of torch: fill the generator's words, advance it, launch."""

    def __init__(self, memory, gen, increment, disabled):
        self.memory, self.gen, self.increment, self.disabled = memory, gen, increment, disabled
        self.launches = []

    def raw_cuda_graph_exec(self):
        return 0x1234

    def replay(self):
        self.memory[SEG + 0x200] = self.gen.seed
        self.memory[SEG + 0x400] = self.gen.offset
        self.gen.state.offset += self.increment
        self.launches.append(set(self.disabled))


@pytest.fixture
def fake_cuda(monkeypatch):
    memory: dict = {}
    disabled: set = set()

    @contextlib.contextmanager
    def nodes_disabled(exe, nodes):
        assert exe == 0x1234
        disabled.update(nodes)
        yield
        disabled.clear()
    monkeypatch.setattr(ct, "graph_handle", lambda g: "cugraph")
    monkeypatch.setattr(ct.cuda_graphs, "graph_nodes", lambda h: ["n0", "n1"])
    monkeypatch.setattr(ct.cuda_graphs, "node_type", lambda n: "kernel")
    monkeypatch.setattr(ct.cuda_graphs, "nodes_disabled", nodes_disabled)
    monkeypatch.setattr(ct, "_read_u64", lambda addr: memory[addr])
    monkeypatch.setattr(ct, "_rng_tensor_blocks", lambda: set())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return memory, disabled


def snapshot_with_origins():
    snap = rng_snapshot()
    snap.regions[0].origin, snap.regions[1].origin = SEG + (4 << 20), SEG
    return snap


def test_probe_measures_the_increment_and_restores_the_generator(fake_cuda):
    from cgsnap.capture import philox
    memory, disabled = fake_cuda
    gen = FakeGenerator(seed=42, offset=1000)
    g = FakeGraph(memory, gen, 24, disabled)
    snap = snapshot_with_origins()
    states = ct._probe_rng(snap, "step", g, philox.find_states(snap), [(None, gen)], 0)
    assert states == [RngState(seed=Ref(1, 0x200), offset=Ref(1, 0x400), increment=24, device=0,
                               saved_seed=42, saved_offset=1000)]
    assert g.launches == [{"n0", "n1"}], "one replay, every node disabled"
    assert (gen.seed, gen.offset) == (42, 1000), "the generator is put back"
    assert gen.resets == 0, "through a view of its state: cuDNN's RNN dropout state stays valid"
    ct._write_saved_words(snap, states)
    data = snap.regions[1].data
    assert int(data[0x200:0x208].view("<u8")[0]) == 42
    assert int(data[0x400:0x408].view("<u8")[0]) == 1000
    assert snap.regions[1].content_hash == region_hash(np.asarray(data).tobytes())


def test_a_graph_without_rng_is_probed_and_left_alone(fake_cuda):
    memory, disabled = fake_cuda
    gen = FakeGenerator(seed=1, offset=8)
    assert ct._probe_rng(rng_snapshot(), "step", FakeGraph(memory, gen, 0, disabled), [],
                         [(None, gen)], 0) == []
    with pytest.raises(ct.CaptureError, match="advances the default generator by 8, but no"):
        ct._probe_rng(rng_snapshot(), "step", FakeGraph(memory, gen, 8, disabled), [],
                      [(None, gen)], 0)
    assert (gen.seed, gen.offset) == (1, 8)


def test_probe_refuses_a_graph_it_cannot_replay_harmlessly(fake_cuda, monkeypatch):
    from cgsnap.capture import philox
    memory, disabled = fake_cuda
    monkeypatch.setattr(ct.cuda_graphs, "node_type", lambda n: "host" if n == "n1" else "kernel")
    gen = FakeGenerator(seed=1, offset=8)
    g = FakeGraph(memory, gen, 8, disabled)
    snap = snapshot_with_origins()
    with pytest.raises(ct.CaptureError, match="its host node.* cannot be disabled"):
        ct._probe_rng(snap, "step", g, philox.find_states(snap), [(None, gen)], 0)
    assert ct._probe_rng(snap, "step", g, [], [(None, gen)], 0) == []
    assert g.launches == []


def test_restored_replays_write_then_advance_then_launch(monkeypatch):
    calls = []
    entry = RngState(seed=Ref(1, 0x200), offset=Ref(1, 0x400), increment=24, device=0,
                     saved_seed=42, saved_offset=1000)
    rg = types.SimpleNamespace(
        rng=(entry,),
        set_rng=lambda seed, offset, generator=None, stream=None:
            calls.append(("set_rng", seed, offset, generator, stream)),
        launch=lambda stream: calls.append(("launch", stream)))
    restored = types.SimpleNamespace(graph=lambda name: rg, graph_names=["step"],
                                     snapshot=types.SimpleNamespace(graphs=[]), path="f")
    gen = FakeGenerator(seed=42, offset=1000)
    monkeypatch.setattr(ct, "_load_generator", lambda restored, graph, e, generators: gen)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda: types.SimpleNamespace(cuda_stream=99))
    g = ct.TorchGraph(restored, "step")
    for _ in range(3):
        g.replay()
    assert calls == [("set_rng", 42, 1000, None, 99), ("launch", 99),
                     ("set_rng", 42, 1024, None, 99), ("launch", 99),
                     ("set_rng", 42, 1048, None, 99), ("launch", 99)]
    assert gen.offset == 1072 and gen.resets == 0


def test_unknown_generators_are_refused_at_load():
    restored = types.SimpleNamespace(graph_names=[], path="f.cgsnap",
                                     snapshot=types.SimpleNamespace(graphs=[]))
    with pytest.raises(ct.RestoreError, match="generators 'sampler' are drawn from by no graph"):
        ct.TorchGraphs(restored, {"sampler": object()})
