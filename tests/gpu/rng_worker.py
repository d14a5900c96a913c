"""The processes of test_gpu_rng.py: a graph that draws random numbers (dropout on a large tensor,
torch.rand, multinomial sampling), saved in one process and replayed in fresh ones.

usage: rng_worker.py MODE DIR [named]
  save   capture, save DIR/rng.cgsnap, then replay K times from the generator state at save time
         (an eager torch.rand between the first two replays); outputs -> DIR/save.npz, generator
         states and offsets -> DIR/meta.json
  torch  fresh process: cgsnap.torch.load, set the generators to that state, the same sequence
         -> DIR/torch.npz
  plain  fresh process without torch: cgsnap.load, launch() twice, then set_rng to the state of
         the original's replay 2 and launch -> DIR/plain.npz
``named``: the torch.rand draws from a torch.Generator of its own (passed as ``sampler``).
Every process checks what it can itself and exits non-zero with a message otherwise."""
import json
import os
import sys

import numpy as np

K = 3
N = 1 << 22
OUTPUTS = ("y", "r", "idx")
mode, out_dir = sys.argv[1], sys.argv[2]
named = len(sys.argv) > 3 and sys.argv[3] == "named"
path = os.path.join(out_dir, "rng.cgsnap")


def step(torch, x, probs, gen):
    y = torch.nn.functional.dropout(x, p=0.5, training=True)
    r = torch.rand(4096, device="cuda", generator=gen)
    idx = torch.multinomial(probs, 64, replacement=True)
    return y, r, idx


def replays(torch, replay, tensor, gens):
    """K replays; the default generator's eager draw after the first. Returns (outputs,
    {generator: [offset before each replay]})."""
    out, offsets = {}, {name: [] for name in gens}
    for k in range(K):
        for name, gen in gens.items():
            offsets[name].append(gen.get_offset())
        replay()
        torch.cuda.synchronize()
        for name in OUTPUTS:
            out[f"{name}{k}"] = tensor(name).cpu().numpy()
        if k == 0:
            out["eager"] = torch.rand(1000, device="cuda").cpu().numpy()
    for name, gen in gens.items():
        offsets[name].append(gen.get_offset())
    return out, offsets


def save():
    import cgsnap
    cgsnap.start_recorder()
    import torch

    import cgsnap.torch
    torch.manual_seed(1234)
    x = torch.randn(N, device="cuda")
    probs = torch.softmax(torch.randn(32, 1000, device="cuda"), -1)
    gen = None
    if named:
        gen = torch.Generator(device="cuda")
        gen.manual_seed(99)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(torch, x, probs, gen)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    if gen is not None and hasattr(g, "register_generator_state"):
        g.register_generator_state(gen)          # torch 2.11; a deprecated no-op later
    with torch.cuda.graph(g):
        y, r, idx = step(torch, x, probs, gen)
    torch.cuda.synchronize()
    tensors = {"x": x, "probs": probs, "y": y, "r": r, "idx": idx}
    before = {k: t.cpu().clone() for k, t in tensors.items()}
    gens = {"default": torch.cuda.default_generators[0]}
    if gen is not None:
        gens["sampler"] = gen
    states = {k: [v.initial_seed(), v.get_offset()] for k, v in gens.items()}
    cgsnap.torch.save(path, {"sample": g}, tensors=tensors,
                      generators={"sampler": gen} if gen is not None else None)
    torch.cuda.synchronize()
    for k, t in tensors.items():
        assert torch.equal(t.cpu(), before[k]), f"save() changed tensor {k}: it ran a kernel"
    for k, v in gens.items():
        assert [v.initial_seed(), v.get_offset()] == states[k], f"save() moved generator {k}"
    rng = {e.generator or "default": e for e in cgsnap.read(path).graph("sample").rng}
    assert set(rng) == set(gens), f"rng entries {sorted(rng)}, expected {sorted(gens)}"
    for k, e in rng.items():
        assert [e.saved_seed, e.saved_offset] == states[k], (k, e)
        assert e.increment > 0 and e.increment % 4 == 0, (k, e)
        assert e.device == 0, (k, e)
    out, offsets = replays(torch, g.replay, tensors.__getitem__, gens)
    for k in gens:
        # torch advanced each generator by the recorded increment per replay, and the default
        # one by the eager draw too after the first replay
        steps, inc = np.diff(offsets[k]).tolist(), rng[k].increment
        assert steps[1:] == [inc, inc] and (steps[0] > inc if k == "default" else steps[0] == inc), \
            f"generator {k}: offsets {offsets[k]}, recorded increment {inc}"
    np.savez(os.path.join(out_dir, "save.npz"), **out)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"states": states, "offsets": offsets,
                   "increments": {k: e.increment for k, e in rng.items()}}, f)


def restore_torch():
    import torch

    import cgsnap.torch
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    sampler = torch.Generator(device="cuda") if named else None
    graphs = cgsnap.torch.load(path, generators={"sampler": sampler} if named else None)
    gens = {"default": torch.cuda.default_generators[0]}
    if named:
        gens["sampler"] = sampler
    for k, gen in gens.items():
        seed, offset = meta["states"][k]
        gen.manual_seed(seed)
        gen.set_offset(offset)
    out, offsets = replays(torch, graphs["sample"].replay, graphs.tensor, gens)
    assert offsets == meta["offsets"], f"generator offsets {offsets}, original {meta['offsets']}"
    np.savez(os.path.join(out_dir, "torch.npz"), **out)
    graphs.close()


def restore_plain():
    import cgsnap
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    out = {}
    with cgsnap.load(path) as rs:
        g = rs.graph("sample")
        for k in range(2):
            g.launch()
            rs.synchronize()
            for name in OUTPUTS:
                out[f"launch{k}_{name}"] = rs.buffer(name).to_numpy()
        for e in g.rng:
            key = e.generator or "default"
            assert [e.saved_seed, e.saved_offset] == meta["states"][key], (key, e)
            g.set_rng(e.saved_seed, meta["offsets"][key][2], generator=e.generator)
        g.launch()
        rs.synchronize()
        for name in OUTPUTS:
            out[f"set2_{name}"] = rs.buffer(name).to_numpy()
    assert "torch" not in sys.modules, "the restore path imported torch"
    np.savez(os.path.join(out_dir, "plain.npz"), **out)


{"save": save, "torch": restore_torch, "plain": restore_plain}[mode]()
print(f"{mode} ok")
