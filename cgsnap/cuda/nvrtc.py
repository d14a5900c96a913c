"""NVRTC: compile CUDA C++ source to a cubin at run time (the demo and the GPU tests use it)."""
from __future__ import annotations

from ..errors import CgsnapError


class CompileError(CgsnapError):
    """NVRTC refused the source; the message holds its log."""


def compile_cubin(source: str, arch: int, name: str = "kernels.cu", options=(),
                  name_expressions=()) -> tuple:
    """``(cubin bytes, {expression: lowered (mangled) name})`` for sm_``arch``."""
    from cuda.bindings import nvrtc

    def nv(res):
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC: {res[0]}")
        return res[1] if len(res) > 1 else None
    prog = nv(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        for expr in name_expressions:
            nv(nvrtc.nvrtcAddNameExpression(prog, expr.encode()))
        opts = [f"--gpu-architecture=sm_{arch}".encode()] + [o.encode() for o in options]
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = b" " * nv(nvrtc.nvrtcGetProgramLogSize(prog))
            nv(nvrtc.nvrtcGetProgramLog(prog, log))
            raise CompileError(f"NVRTC could not compile {name}: {log.decode(errors='replace')}")
        lowered = {}
        for expr in name_expressions:
            got = nv(nvrtc.nvrtcGetLoweredName(prog, expr.encode()))
            lowered[expr] = got.decode() if isinstance(got, bytes) else got
        cubin = b" " * nv(nvrtc.nvrtcGetCUBINSize(prog))
        nv(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
