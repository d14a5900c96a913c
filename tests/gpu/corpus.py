"""Graphs from real producers that cgsnap's own code did not write: each case builds its graph
the way a user of that library would, and says which buffers are its inputs and outputs.

A case is a function returning a :class:`Case`. tests/gpu/test_gpu_corpus.py captures it,
snapshots it, restores it in a fresh process that never imports torch or CuPy, and compares
the outputs of several replays bit for bit with the original's on fresh inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Case:
    graph: object                 # what cgsnap.snapshot() takes
    buffers: dict                 # named buffers: inputs, outputs, weights (cgsnap.Saved)
    inputs: dict                  # name -> callable(rng) -> host array (the buffer's logical view)
    outputs: list                 # names read after each replay
    replay: Callable[[], None]    # one replay of the original, synchronised
    write: Callable[[str, np.ndarray], None]   # write a host array into an original input
    read: Callable[[str], np.ndarray]          # read an original output as a host array
    replays: int = 2
    keep: list = field(default_factory=list)   # objects that must outlive the graph


# ---- torch helpers -------------------------------------------------------------------------

def _torch():
    import torch
    return torch


RAW = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


def to_host(t) -> np.ndarray:
    """A tensor's logical contents as numpy (bfloat16 as its raw 16-bit words)."""
    torch = _torch()
    name = str(t.dtype).replace("torch.", "")
    t = t.detach().contiguous().cpu()
    if name in RAW:
        arr = t.view(getattr(torch, RAW[name])).numpy()
        return arr.view(np.uint16) if name == "bfloat16" else arr
    return t.numpy()


def from_host(t, arr: np.ndarray) -> None:
    torch = _torch()
    name = str(t.dtype).replace("torch.", "")
    src = torch.from_numpy(np.ascontiguousarray(arr))
    if name in RAW:
        src = src.view(torch.int16 if name == "bfloat16" else torch.uint8).view(t.dtype)
    t.copy_(src.reshape(t.shape))


def random_like(t, rng) -> np.ndarray:
    """Fresh values for tensor ``t`` as a host array of its logical view."""
    torch = _torch()
    if t.dtype.is_floating_point:
        vals = torch.from_numpy(rng.standard_normal(tuple(t.shape)).astype(np.float32)).to(t.dtype)
        return to_host(vals)
    if t.dtype == torch.bool:
        return rng.integers(0, 2, tuple(t.shape)).astype(np.bool_)
    hi = 1000 if t.dtype in (torch.int32, torch.int64) else 100
    return rng.integers(0, hi, tuple(t.shape)).astype(to_host(t[:0].reshape(0)).dtype)


def torch_case(fn, inputs: dict, weights=None, replays: int = 2, warmup: int = 3,
               input_fill=None, keep=()) -> Case:
    """Capture ``fn(**inputs)`` (returning a tensor or a tuple/dict of tensors) with
    torch.cuda.graph after warm-up on a side stream, as torch's documentation shows."""
    torch = _torch()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn(**inputs)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        out = fn(**inputs)
    torch.cuda.synchronize()
    if isinstance(out, torch.Tensor):
        out = {"out": out}
    elif isinstance(out, (tuple, list)):
        out = {f"out{i}": t for i, t in enumerate(out)}
    import cgsnap
    buffers = {**inputs, **out}
    if weights is not None:
        buffers["model"] = cgsnap.Saved(weights)
    tensors = {**inputs, **out}

    def replay():
        g.replay()
        torch.cuda.synchronize()
    fill = input_fill or {}
    return Case(graph=g, buffers=buffers,
                inputs={k: (fill[k] if k in fill else (lambda rng, t=t: random_like(t, rng)))
                        for k, t in inputs.items()},
                outputs=list(out), replay=replay,
                write=lambda k, arr: from_host(tensors[k], arr),
                read=lambda k: to_host(tensors[k]), replays=replays,
                keep=[fn, weights, *keep])


# ---- cases ----------------------------------------------------------------------------------

def torch_mlp_fp32():
    torch = _torch()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                            torch.nn.Linear(1024, 256), torch.nn.LayerNorm(256)).cuda().eval()
    x = torch.randn(16, 256, device="cuda")
    with torch.no_grad():
        return torch_case(lambda x: m(x), {"x": x}, m)


def _compiled_mlp(mode: str, dtype):
    torch = _torch()
    import torch._inductor.config as cfg
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 512)
                            ).cuda().to(dtype).eval()
    if mode == "max-autotune-no-cudagraphs":
        cfg.max_autotune_gemm_backends = "TRITON"
    f = torch.compile(m, mode=mode)
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        return torch_case(lambda x: torch.relu(f(x)) * 0.5 + x, {"x": x}, m, keep=[f])


def torch_compile_default():
    return _compiled_mlp("default", _torch().float32)


def torch_compile_max_autotune():
    return _compiled_mlp("max-autotune-no-cudagraphs", _torch().float16)


def _sdpa(backend_name: str):
    torch = _torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)
    torch.manual_seed(2)
    q, k, v = (torch.randn(4, 8, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch_case(fn, {"q": q, "k": k, "v": v})


def sdpa_flash_bf16():
    return _sdpa("FLASH_ATTENTION")


def sdpa_efficient_bf16():
    return _sdpa("EFFICIENT_ATTENTION")


def sdpa_cudnn_bf16():
    return _sdpa("CUDNN_ATTENTION")


def sdpa_math_bf16():
    return _sdpa("MATH")


def resnet18_channels_last():
    torch = _torch()
    import torchvision
    torch.manual_seed(3)
    torch.backends.cudnn.benchmark = False
    m = torchvision.models.resnet18(weights=None).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        return torch_case(lambda x: m(x), {"x": x}, m)


def triton_kernels():
    torch = _torch()
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_rows(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=-float("inf"))
        x = x - tl.max(x, axis=0)
        e = tl.exp(x)
        tl.store(y_ptr + row * n_cols + cols, e / tl.sum(e, axis=0), mask=mask)

    @triton.jit
    def axpy(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        tl.store(out_ptr + i, a * tl.load(x_ptr + i, mask=mask) + tl.load(y_ptr + i, mask=mask),
                 mask=mask)
    x = torch.randn(128, 1000, device="cuda")
    y = torch.empty_like(x)
    z = torch.empty_like(x)

    def fn(x):
        softmax_rows[(x.shape[0],)](x, y, x.shape[1], BLOCK=1024)
        axpy[(triton.cdiv(x.numel(), 1024),)](y, x, z, 0.5, x.numel(), BLOCK=1024)
        return y, z
    return torch_case(fn, {"x": x})


def torch_multistream_int():
    torch = _torch()
    a = torch.randint(0, 1000, (4096,), device="cuda", dtype=torch.int64)
    b = torch.randint(0, 1000, (4096,), device="cuda", dtype=torch.int32)
    side = torch.cuda.Stream()

    def fn(a, b):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            c = torch.cumsum(a * 3 + 1, 0) ^ 0x5A5A
        d = (b.to(torch.int64) << 2) % 977
        main.wait_stream(side)
        return c, d, torch.argmax(c - d), (c > d).to(torch.int32).sum()
    return torch_case(fn, {"a": a, "b": b})


def decode_step_self_advancing():
    """A static KV cache written at a device-side position that the graph itself advances:
    every replay writes the next slot, so replays differ and must match one for one."""
    torch = _torch()
    torch.manual_seed(4)
    d, heads, dh, max_seq, batch, vocab = 256, 4, 64, 32, 4, 512
    emb = torch.nn.Embedding(vocab, d).cuda()
    qkv = torch.nn.Linear(d, 3 * d).cuda()
    head = torch.nn.Linear(d, vocab, bias=False).cuda()
    model = torch.nn.ModuleDict({"emb": emb, "qkv": qkv, "head": head}).eval()
    kv = torch.zeros(2, batch, heads, max_seq, dh, device="cuda")
    pos = torch.zeros(batch, dtype=torch.int64, device="cuda")
    tokens = torch.randint(0, vocab, (batch,), device="cuda")

    def fn(tokens):
        x = emb(tokens)
        q, k, v = qkv(x).view(batch, 3, heads, dh).unbind(1)
        idx = pos.view(batch, 1, 1, 1).expand(batch, heads, 1, dh)
        kv[0].scatter_(2, idx, k.unsqueeze(2))
        kv[1].scatter_(2, idx, v.unsqueeze(2))
        att = (q.unsqueeze(2) @ kv[0].transpose(-1, -2)).squeeze(2) / dh ** 0.5
        steps = torch.arange(max_seq, device="cuda")
        att = att.masked_fill(steps.view(1, 1, -1) > pos.view(batch, 1, 1), float("-inf"))
        out = (att.softmax(-1).unsqueeze(2) @ kv[1]).squeeze(2).reshape(batch, d)
        logits = head(out)
        tokens.copy_(logits.argmax(-1))       # the next step's input, on the device
        pos.add_(1)                            # the graph advances its own position
        return logits
    with torch.no_grad():
        case = torch_case(fn, {"tokens": tokens}, model, replays=4, warmup=1,
                          input_fill={"tokens": lambda rng: rng.integers(0, vocab, (batch,))
                                      .astype(np.int64)})
    # The cache and the position are state the replays advance: name them, reset them.
    kv.zero_()
    pos.zero_()
    case.buffers.update(kv=kv, pos=pos)
    case.outputs += ["kv", "pos", "tokens"]
    tensors = {"kv": kv, "pos": pos, "tokens": tokens}
    old_read = case.read
    case.read = lambda k: to_host(tensors[k]) if k in tensors else old_read(k)
    return case


def gpt2_transformers_fp32():
    torch = _torch()
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(5)
    cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1000, n_positions=64)
    m = GPT2LMHeadModel(cfg).cuda().eval()
    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    with torch.no_grad():
        return torch_case(lambda ids: m(input_ids=ids, use_cache=False).logits, {"ids": ids}, m,
                          input_fill={"ids": lambda rng: rng.integers(0, 1000, (2, 32))
                                      .astype(np.int64)})


def llama_transformers_bf16():
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(6)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                      max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    with torch.no_grad():
        return torch_case(lambda ids: m(input_ids=ids, use_cache=False).logits, {"ids": ids}, m,
                          input_fill={"ids": lambda rng: rng.integers(0, 1000, (2, 32))
                                      .astype(np.int64)})


def train_step_adamw():
    """A whole training step (forward, backward, AdamW with capturable=True) in one graph."""
    torch = _torch()
    torch.manual_seed(7)
    m = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10)).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=True)
    x = torch.randn(64, 128, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def fn(x, y):
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        return loss
    case = torch_case(fn, {"x": x, "y": y}, None, replays=3,
                      input_fill={"y": lambda rng: rng.integers(0, 10, (64,)).astype(np.int64)})
    # Parameters and optimizer state change every step: they are outputs too.
    state = {f"p{i}": p for i, p in enumerate(m.parameters())}
    for i, p in enumerate(m.parameters()):
        st = opt.state[p]
        state[f"exp_avg{i}"], state[f"exp_avg_sq{i}"], state[f"step{i}"] = \
            st["exp_avg"], st["exp_avg_sq"], st["step"]
    case.buffers.update(state)
    case.outputs += sorted(state)
    old_read = case.read
    case.read = lambda k: to_host(state[k]) if k in state else old_read(k)
    case.keep += [m, opt]
    return case


def torch_compile_autotuned_reductions():
    """max-autotune with its default backends over LayerNorm and softmax: Inductor benchmarks
    several configurations of each reduction, loading one module per candidate with the same
    kernel name."""
    torch = _torch()
    import torch._inductor.config as cfg
    cfg.max_autotune_gemm_backends = "ATEN,TRITON"
    torch.manual_seed(10)
    ln = torch.nn.LayerNorm(768).cuda()
    lin = torch.nn.Linear(768, 768).cuda()
    model = torch.nn.ModuleDict({"ln": ln, "lin": lin}).eval()

    def step(x):
        h = ln(x)
        return torch.softmax(lin(h), dim=-1) + h.sum(-1, keepdim=True)
    f = torch.compile(step, mode="max-autotune-no-cudagraphs")
    x = torch.randn(64, 768, device="cuda")
    with torch.no_grad():
        return torch_case(lambda x: f(x), {"x": x}, model, keep=[f])


def torch_sort_topk_scan():
    torch = _torch()
    x = torch.randn(64, 4096, device="cuda")

    def fn(x):
        v, i = torch.sort(x, dim=-1)
        t, ti = torch.topk(x, 16, dim=-1)
        return v, i, t, ti, torch.cumsum(x, dim=-1), torch.argsort(x[:, 0])
    return torch_case(fn, {"x": x})


def torch_host_to_device_copies():
    """Pinned host memory copied in and out inside the graph: memcpy nodes with a host side."""
    torch = _torch()
    host_in = torch.randn(1 << 16).pin_memory()
    dev = torch.empty(1 << 16, device="cuda")
    host_out = torch.empty(1 << 16).pin_memory()
    scale = torch.randn(1 << 16, device="cuda")

    def fn(scale):
        dev.copy_(host_in, non_blocking=True)
        y = dev * scale + 1.0
        host_out.copy_(y, non_blocking=True)
        return y
    case = torch_case(fn, {"scale": scale})
    case.keep += [host_in, dev, host_out]
    return case


def torch_attention_fp16_cudnn_benchmark():
    """nn.MultiheadAttention and a convolution in fp16 with cudnn.benchmark on (algorithms
    chosen by timing)."""
    torch = _torch()
    torch.manual_seed(11)
    torch.backends.cudnn.benchmark = True
    mha = torch.nn.MultiheadAttention(256, 8, batch_first=True).cuda().half().eval()
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda().half().eval()
    model = torch.nn.ModuleDict({"mha": mha, "conv": conv})
    q = torch.randn(4, 64, 256, device="cuda", dtype=torch.float16)
    img = torch.randn(4, 16, 32, 32, device="cuda", dtype=torch.float16)

    def fn(q, img):
        return mha(q, q, q, need_weights=False)[0], torch.relu(conv(img))
    with torch.no_grad():
        case = torch_case(fn, {"q": q, "img": img}, model)
    torch.backends.cudnn.benchmark = False
    return case


# ---- CuPy -------------------------------------------------------------------------------------

def _cupy_case(build, replays=2):
    """``build(xp)`` -> (launch(), inputs {name: array}, outputs {name: array}); captured with
    cgsnap.capture() on a stream CuPy launches on."""
    import cupy as cp

    import cgsnap
    launch, inputs, outputs = build(cp)
    cap = cgsnap.capture()
    # Warm up on the stream that is captured: plans, JIT kernels, and pool blocks (CuPy's pool
    # keeps its free blocks per stream, so a temporary freed on another stream is not reused
    # and the capture would call cudaMalloc).
    with cp.cuda.ExternalStream(cap.stream_handle):
        launch()
    cp.cuda.Device().synchronize()
    with cap:
        with cp.cuda.ExternalStream(cap.stream_handle):
            launch()
    arrays = {**inputs, **outputs}
    exe = {}

    def replay():
        from cgsnap.cuda import graphs
        if "exec" not in exe:
            exe["exec"] = graphs.instantiate(cap.graph)
        graphs.launch(exe["exec"], cap.stream)
        cp.cuda.Device().synchronize()

    def write(k, arr):
        arrays[k].set(np.ascontiguousarray(arr).reshape(arrays[k].shape))
    return Case(graph=cap, buffers=dict(arrays), inputs={
        k: (lambda rng, a=a: (rng.standard_normal(a.shape) + 1j * rng.standard_normal(a.shape))
            .astype(a.dtype) if a.dtype.kind == "c" else rng.standard_normal(a.shape).astype(a.dtype))
        for k, a in inputs.items()}, outputs=list(outputs), replay=replay, write=write,
        read=lambda k: arrays[k].get(), replays=replays,
        keep=[cap, exe, arrays, launch])   # launch holds the cuFFT plan: its module


def cupy_fft_kernels():
    """cuFFT, a JIT-compiled ElementwiseKernel and RawKernel, and CuPy reductions. (CuPy itself
    refuses cuBLAS calls during stream capture: "calling cuBLAS API during stream capture is
    currently unsupported", so matmul is not in the graph.)"""
    def build(cp):
        from cupy.cuda import cufft
        n, batch = 1024, 32
        x = cp.asarray(np.random.default_rng(8).standard_normal((batch, n)).astype(np.complex64))
        y = cp.empty_like(x)
        a = cp.asarray(np.random.default_rng(9).standard_normal((256, 256)).astype(np.float32))
        b = cp.empty_like(a)
        c = cp.empty_like(a)
        s = cp.empty((256,), dtype=np.float32)
        plan = cufft.Plan1d(n, cufft.CUFFT_C2C, batch)
        scale = cp.ElementwiseKernel("float32 v", "float32 w", "w = v * 0.5f + 1.0f", "scale")
        square = cp.RawKernel(r"""
        extern "C" __global__ void square_rows(const float* b, float* c, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) c[i] = b[i] * b[i] - b[(i + 1) % n];
        }""", "square_rows")

        def launch():
            plan.fft(x, y, cufft.CUFFT_FORWARD)
            scale(a, b)
            square(((a.size + 255) // 256,), (256,), (b, c, np.int32(a.size)))
            cp.sum(c, axis=1, out=s)
        return launch, {"x": x, "a": a}, {"y": y, "b": b, "c": c, "s": s}
    return _cupy_case(build)


CASES = {f.__name__: f for f in (
    torch_mlp_fp32, torch_compile_default, torch_compile_max_autotune, sdpa_flash_bf16,
    sdpa_efficient_bf16, sdpa_cudnn_bf16, sdpa_math_bf16, resnet18_channels_last, triton_kernels,
    torch_multistream_int, decode_step_self_advancing, gpt2_transformers_fp32,
    llama_transformers_bf16, train_step_adamw, cupy_fft_kernels, torch_compile_autotuned_reductions,
    torch_sort_topk_scan, torch_host_to_device_copies, torch_attention_fp16_cudnn_benchmark)}
NEEDS = {"cupy_fft_kernels": "cupy", "resnet18_channels_last": "torchvision",
         "gpt2_transformers_fp32": "transformers", "llama_transformers_bf16": "transformers",
         "triton_kernels": "triton"}
