"""A decoder-only transformer in plain torch with a static KV cache, and its decode step.

Shared by save_graphs.py and restore_graphs.py: both processes build the same model from the
same seed, so the weights are equal but live at different addresses."""
from __future__ import annotations

import math
import os

import torch
from torch import nn

CONFIG = dict(vocab=4096, d_model=768, layers=int(os.environ.get("WARM_LAYERS", 12)), heads=12,
              max_seq=128, max_batch=64)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DTYPE = torch.bfloat16


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, pos, kv):
        b = x.shape[0]
        q, k, v = self.qkv(self.ln1(x)).view(b, 3, self.heads, self.dh).unbind(1)
        idx = pos.view(b, 1, 1, 1).expand(b, self.heads, 1, self.dh)
        kv[0, :b].scatter_(2, idx, k.unsqueeze(2))          # write this step's key and value
        kv[1, :b].scatter_(2, idx, v.unsqueeze(2))
        keys, values = kv[0, :b], kv[1, :b]                  # [b, heads, max_seq, dh]
        att = (q.unsqueeze(2) @ keys.transpose(-1, -2)).squeeze(2) / math.sqrt(self.dh)
        steps = torch.arange(keys.shape[2], device=x.device)
        att = att.masked_fill(steps.view(1, 1, -1) > pos.view(b, 1, 1), float("-inf"))
        out = (att.softmax(-1).unsqueeze(2) @ values).squeeze(2).reshape(b, -1)
        x = x + self.proj(out)
        return x + self.mlp(self.ln2(x))


class Decoder(nn.Module):
    def __init__(self, vocab, d_model, layers, heads, max_seq, max_batch):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens, pos, kv_cache):
        x = self.embed(tokens) + self.pos(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, kv_cache[i])
        return self.head(self.norm(x))


def build(seed: int = 0):
    """``(model, kv_cache, kv_init)``: the same weights and cache contents in every process."""
    torch.manual_seed(seed)
    c = CONFIG
    model = Decoder(**c).to(device="cuda", dtype=DTYPE).eval()
    dh = c["d_model"] // c["heads"]
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    kv_init = torch.randn(c["layers"], 2, c["max_batch"], c["heads"], c["max_seq"], dh,
                          device="cuda", dtype=DTYPE, generator=g)
    return model, kv_init.clone(), kv_init


def step_inputs(batch: int, seed: int = 2):
    """Fixed tokens and positions for a check."""
    g = torch.Generator(device="cpu").manual_seed(seed + batch)
    tokens = torch.randint(0, CONFIG["vocab"], (CONFIG["max_batch"],), generator=g)
    pos = torch.randint(0, CONFIG["max_seq"], (CONFIG["max_batch"],), generator=g)
    return tokens, pos


def capture_graphs(model, kv_cache, tokens, pos):
    """Warm up, then capture one decode-step graph per batch size into one shared graph pool,
    largest first as servers do: ``({"bs64": graph, ...}, {64: logits, ...})``."""
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for b in BATCH_SIZES:
                model(tokens[:b], pos[:b], kv_cache)
        torch.cuda.current_stream().wait_stream(s)
        pool = torch.cuda.graph_pool_handle()
        graphs, outputs = {}, {}
        for b in sorted(BATCH_SIZES, reverse=True):
            g = torch.cuda.CUDAGraph(keep_graph=True)
            with torch.cuda.graph(g, pool=pool):
                outputs[b] = model(tokens[:b], pos[:b], kv_cache)
            graphs[f"bs{b}"] = g
    torch.cuda.synchronize()
    return graphs, outputs
