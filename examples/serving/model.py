"""A Llama-style decoder run the way a serving engine's model runner runs it, plus what both
start-up paths share (weights file, KV cache, fixed inputs, replay timing).

bf16; grouped-query attention (head dim 128, 4 query heads per KV head); RMSNorm; SwiGLU MLP;
rotary embeddings from precomputed cos/sin tables (buffers, stored in the weights file); a
static KV cache ``[layers, 2, max_batch, kv_heads, max_seq, head_dim]`` outside the model (a
serving engine owns it), bound at restore. The decode step takes ``tokens[b]`` and
``positions[b]`` (device tensors), writes each row's K/V at its position, attends over the
cache with a mask by position (explicit matmuls: deterministic, no fused-attention backend) and
returns bf16 logits ``[b, vocab]``.

Both processes build the model from the same safetensors file, so the weights are equal but live
at other addresses. The model's shape is stored in the file's metadata."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics

import torch
from torch import nn
from torch.nn import functional as F

from sizes import DEFAULT_SIZES, QUICK_SIZES, check_sizes, parse_sizes  # noqa: F401

DTYPE = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 32
    hidden: int = 2048
    vocab: int = 32000
    max_seq: int = 256
    max_batch: int = 512
    head_dim: int = 128
    kv_group: int = 4           # query heads per KV head
    eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden % self.head_dim or self.hidden < self.head_dim:
            raise ValueError(f"hidden {self.hidden} is not a multiple of head_dim {self.head_dim}")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads do not split into {self.kv_heads} groups")
        for k in ("layers", "vocab", "max_seq", "max_batch"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // self.kv_group)

    @property
    def intermediate(self) -> int:      # 2.75x hidden, a multiple of 128 (5632 at 2048)
        return 128 * max(1, round(self.hidden * 2.75 / 128))

    @property
    def kv_shape(self) -> tuple:
        return (self.layers, 2, self.max_batch, self.kv_heads, self.max_seq, self.head_dim)

    def kv_bytes(self) -> int:
        return math.prod(self.kv_shape) * 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls(**json.loads(text))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPE))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rotate(x, cos, sin):
    """Rotary embedding, "rotate half" form: ``x [b, heads, 1, d]``, ``cos``/``sin``
    ``[b, 1, 1, d/2]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads, self.kv_heads, self.dh = c.heads, c.kv_heads, c.head_dim
        self.qkv = nn.Linear(c.hidden, (c.heads + 2 * c.kv_heads) * c.head_dim, bias=False,
                             dtype=DTYPE)
        self.o = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False, dtype=DTYPE)

    def forward(self, x, cos, sin, positions, kv_cache, layer: int):
        b = x.shape[0]
        h, hk, dh = self.heads, self.kv_heads, self.dh
        # Shaped [b, heads, 1, dh] before q, k and v are split off: a view of a non-contiguous
        # slice would make the compiler tell a batch of 1 apart and compile it on its own.
        q, k, v = self.qkv(x).view(b, h + 2 * hk, 1, dh).split([h, hk, hk], dim=1)
        q = rotate(q, cos, sin)
        k = rotate(k, cos, sin)
        # This step's key and value, at each row's position: one index_put_ on the whole cache
        # tensor, which the compiler does in place. Writing through a view of it (cache[layer])
        # would be compiled as a copy of the whole cache, every step.
        dev = x.device
        kv_cache.index_put_(
            (torch.full((1, 1, 1), layer, dtype=torch.long, device=dev),
             torch.arange(2, device=dev).view(2, 1, 1),
             torch.arange(b, device=dev).view(1, b, 1),
             torch.arange(hk, device=dev).view(1, 1, hk),
             positions.view(1, b, 1)),
            torch.stack((k, v)).view(2, b, hk, dh))          # [2, b, kv_heads, dh]
        keys = kv_cache[layer, 0].narrow(0, 0, b)          # [b, kv_heads, seq, dh]
        values = kv_cache[layer, 1].narrow(0, 0, b)
        # Batched over (row, KV head): the query heads of a group against that head's cache.
        # Plain bmm on contiguous operands (matmul's own reshapes of a transposed view would,
        # again, single out a batch of 1).
        g, seq = h // hk, keys.shape[2]
        qg = q.reshape(b * hk, g, dh)
        scores = torch.bmm(qg, keys.reshape(b * hk, seq, dh).transpose(1, 2))
        scores = scores.view(b, hk, g, seq).float() * (1.0 / math.sqrt(dh))
        steps = torch.arange(seq, device=x.device)
        scores = scores.masked_fill(steps.view(1, 1, 1, -1) > positions.view(b, 1, 1, 1),
                                    float("-inf"))
        probs = scores.softmax(-1).to(x.dtype).view(b * hk, g, seq)
        out = torch.bmm(probs, values.reshape(b * hk, seq, dh))      # [b * kv_heads, group, dh]
        return self.o(out.view(b, h * dh))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_up = nn.Linear(c.hidden, 2 * c.intermediate, bias=False, dtype=DTYPE)
        self.down = nn.Linear(c.intermediate, c.hidden, bias=False, dtype=DTYPE)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden, c.eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden, c.eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, positions, kv_cache, layer: int):
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, kv_cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        # Given its (uninitialised) weight: on the meta device Embedding's own random init
        # would import torch._dynamo, which start_restored.py shows is never imported.
        self.embed = nn.Embedding(c.vocab, c.hidden,
                                  _weight=torch.empty(c.vocab, c.hidden, dtype=DTYPE))
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False, dtype=DTYPE)
        self.register_buffer("rope_cos", torch.zeros(c.max_seq, c.head_dim // 2))
        self.register_buffer("rope_sin", torch.zeros(c.max_seq, c.head_dim // 2))

    def forward(self, tokens, positions, kv_cache):
        """One decode step for ``tokens.shape[0]`` sequences: logits ``[b, vocab]`` (bf16)."""
        # The batch never exceeds the cache: said once, so a dynamic batch compiles as one
        # symbolic size (slicing the cache by it would otherwise specialise it).
        torch._check(tokens.shape[0] <= kv_cache.shape[2])
        x = self.embed(tokens)
        cos = self.rope_cos[positions][:, None, None, :]     # [b, 1, 1, head_dim / 2]
        sin = self.rope_sin[positions][:, None, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, kv_cache, i)
        return self.lm_head(self.norm(x))


# ---- weights: random, written once, loaded by both start-up paths ---------------------------

def rope_tables(c: Config) -> tuple:
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    angles = torch.outer(torch.arange(c.max_seq, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def random_state(c: Config, seed: int = 0, device: str = "cpu") -> dict:
    """Every parameter and buffer of :class:`Decoder`: normal(0, 0.02) matrices, unit norm
    weights, exact rotary tables."""
    with torch.device("meta"):
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in Decoder(c).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)
    cos, sin = rope_tables(c)
    state = {}
    for name, (shape, dtype) in shapes.items():
        if name == "rope_cos":
            state[name] = cos.to(device)
        elif name == "rope_sin":
            state[name] = sin.to(device)
        elif name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
            state[name] = t.normal_(0.0, 0.02, generator=g)
    return state


def write_weights(path: str, c: Config, seed: int = 0, device: str = "cpu") -> int:
    """Write the weights file once (safetensors, the config in its metadata); returns bytes."""
    from safetensors.torch import save_file
    state = {k: v.contiguous().cpu() for k, v in random_state(c, seed, device).items()}
    save_file(state, path, metadata={"config": c.to_json(), "seed": str(seed)})
    return sum(t.numel() * t.element_size() for t in state.values())


def read_config(path: str) -> Config:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no config in the safetensors metadata (not a weights file "
                         "written by make_weights.py)")
    return Config.from_json(meta["config"])


def load_model(path: str, device: str = "cuda") -> Decoder:
    """The model skeleton (no memory), then the weights from the file, assigned in place."""
    from safetensors.torch import load_file
    c = read_config(path)
    with torch.device("meta"):
        model = Decoder(c)
    model.load_state_dict(load_file(path, device=device), strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---- KV cache and inputs ----------------------------------------------------------------------

def new_kv_cache(c: Config, device: str = "cuda") -> torch.Tensor:
    return torch.empty(c.kv_shape, dtype=DTYPE, device=device)


def fill_kv(kv: torch.Tensor, seed: int = 1) -> None:
    """The same cache contents in every process on the same GPU (Philox, fixed seed)."""
    kv.normal_(0.0, 1.0, generator=torch.Generator(device=kv.device).manual_seed(seed))


def step_inputs(c: Config, batch: int, seed: int = 2) -> tuple:
    """Fixed tokens and positions (CPU) for the first ``batch`` rows; the rest zero."""
    g = torch.Generator().manual_seed(seed * 100003 + batch)
    tokens = torch.zeros(c.max_batch, dtype=torch.long)
    positions = torch.zeros(c.max_batch, dtype=torch.long)
    tokens[:batch] = torch.randint(0, c.vocab, (batch,), generator=g)
    positions[:batch] = torch.randint(0, c.max_seq, (batch,), generator=g)
    return tokens, positions


# ---- replay timing ----------------------------------------------------------------------------

QUEUE_CYCLES = 20_000_000      # ~10 ms of GPU sleep at ~2 GHz: the host queues a batch behind it


def replay_medians(replays: dict, rounds: int = 3, reps: int = 10, warmup: int = 3) -> dict:
    """``{name: median ms}`` of each replay function, on the current stream, one CUDA event pair
    per replay: the graph's time on the GPU. Each batch of replays is queued behind a GPU sleep,
    so the host's time between two launches (torch's ``replay()`` first runs its RNG prologue,
    two ``fill_`` launches; a restored graph's launch is one call) does not leave the GPU idle
    inside an event pair. With several entries per graph (original and restored) the rounds
    interleave them, so clock drift hits both alike."""
    times = {k: [] for k in replays}
    for fn in replays.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in replays.items():
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
            torch.cuda._sleep(QUEUE_CYCLES)
            for s, e in ev:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times[name].extend(s.elapsed_time(e) for s, e in ev)
    return {k: statistics.median(v) for k, v in times.items()}


def _launcher(cu, exe):
    """A function launching the executable graph ``exe`` alone on the current stream."""
    def launch():
        err, = cu.cuGraphLaunch(exe, cu.CUstream(torch.cuda.current_stream().cuda_stream))
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuGraphLaunch: {err}")
    return launch


def clone_launcher(graph, flags: int = 0):
    """A launch function for a copy of ``graph``'s own ``cudaGraph_t`` (``keep_graph=True``),
    cloned and instantiated here with ``flags`` (torch instantiates with
    CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH = 1): the same nodes on the same memory as
    the original, a new executable graph -- what tells memory placement apart from the
    executable graph in a replay-time difference. None where torch gives no graph; a driver
    error raises RuntimeError naming the call."""
    get = getattr(graph, "raw_cuda_graph", None)
    if get is None:
        return None
    from cuda.bindings import driver as cu
    err, clone = cu.cuGraphClone(cu.CUgraph(int(get())))
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuGraphClone: {err}")
    err, exe = cu.cuGraphInstantiate(clone, flags)
    if err != cu.CUresult.CUDA_SUCCESS:
        cu.cuGraphDestroy(clone)
        raise RuntimeError(f"cuGraphInstantiate(flags={flags}) of the clone: {err}")
    _CLONES.append((clone, exe))        # kept for the process: the launches name them
    return _launcher(cu, exe)


_CLONES: list = []


def exec_launcher(graph):
    """A function launching ``graph``'s executable graph (a ``torch.cuda.CUDAGraph``) on the
    current stream with nothing around it -- the graph alone, as a restored graph's launch is --
    or ``graph.replay`` where this torch does not expose the handle."""
    get = getattr(graph, "raw_cuda_graph_exec", None)
    if get is None:
        return graph.replay
    try:
        handle = int(get())
    except Exception:
        return graph.replay
    from cuda.bindings import driver as cu
    launch = _launcher(cu, cu.CUgraphExec(handle))
    launch.raw = True
    return launch


def compile_evidence() -> dict:
    """What this process compiled: whether Dynamo, Inductor and Triton were imported at all,
    Dynamo's compiled graphs and Inductor's events (cache lookups, autotuning, codegen). A
    restore must show none of it."""
    import sys
    out = {"dynamo_imported": "torch._dynamo" in sys.modules,
           "inductor_imported": "torch._inductor" in sys.modules,
           "triton_imported": "triton" in sys.modules, "dynamo_graphs": 0, "inductor_events": 0}
    if out["dynamo_imported"]:
        from torch._dynamo.utils import counters
        out["dynamo_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        out["inductor_events"] = int(sum(counters["inductor"].values()))
    return out


def compiled_anything(evidence: dict) -> bool:
    """Compiling leaves Dynamo graphs or Inductor events behind, and GPU code needs Triton;
    torch may import torch._dynamo (and with it Inductor's config) without compiling."""
    return bool(evidence["triton_imported"] or evidence["dynamo_graphs"]
                or evidence["inductor_events"])
