"""``cgsnap replay FILE --sanitize [--tool T]``: the replay under NVIDIA's compute-sanitizer,
each finding named by node and kernel.

compute-sanitizer (memcheck by default; racecheck, initcheck, synccheck with ``--tool``) runs a
child process, ``python -m cgsnap.tools.sanitize --child FILE``, that restores the file and runs
each top-level graph node by node (:mod:`cgsnap.restore.stepper`; whole, where the graph has
nodes that do not run alone), printing a marker line before each step. A finding's block in the
sanitizer's output names the kernel ("at KERNEL+0x90" or, in older releases, "at 0x90 in
KERNEL"); it is attributed to the node of the step it follows when that node launches the kernel,
else to every node of the file that launches it. memcheck by default destroys the context at the
first device error: the step whose synchronisation then failed is named too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..binary.demangle import demangle

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
MARK = "@@cgsnap-sanitize"
PREFIX = "========="
_NOT_FINDINGS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "LEAK SUMMARY", "RACECHECK SUMMARY",
                 "Target application returned an error", "This tool is deprecated")
_AT_NEW = re.compile(r"\bat (.+?)\+0x[0-9a-fA-F]+(?: in \S.*)?$")
_AT_OLD = re.compile(r"\bat 0x[0-9a-fA-F]+ in (.+)$")
_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: .*?\((\d+) error")


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer: $CGSNAP_COMPUTE_SANITIZER, on PATH, or in $CUDA_HOME/bin or
    /usr/local/cuda/bin."""
    forced = os.environ.get("CGSNAP_COMPUTE_SANITIZER")
    if forced:
        return forced if os.path.isfile(forced) and os.access(forced, os.X_OK) else None
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            cand = os.path.join(root, "bin", "compute-sanitizer")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return None


@dataclass
class Finding:
    what: str                       # the block's first line, e.g. "Invalid __global__ write ..."
    details: list = field(default_factory=list)
    kernel: Optional[str] = None    # as the sanitizer printed it
    step: Optional[dict] = None     # the marker before it: graph, step, node
    nodes: list = field(default_factory=list)   # [{"graph", "node", "kernel"}] it is attributed to

    def to_json(self) -> dict:
        return {"what": self.what, "details": self.details, "kernel": self.kernel,
                "step": self.step, "nodes": self.nodes}


@dataclass
class Report:
    findings: list
    summary_errors: Optional[int]   # from "ERROR SUMMARY: N errors"
    failed_step: Optional[dict]     # the step whose synchronisation failed
    done: bool                      # the child ran every step
    other: list                     # the child's own lines that are not markers (its messages)


def _marker(line: str) -> Optional[tuple]:
    if not line.startswith(MARK + " "):
        return None
    kind, _, rest = line[len(MARK) + 1:].partition(" ")
    try:
        return kind, json.loads(rest) if rest else {}
    except ValueError:
        return None


def kernel_of(lines) -> Optional[str]:
    """The kernel a finding's lines name ("at NAME+0x1f0 [in file:line]", older "at 0x1f0 in
    NAME"), or None."""
    for line in lines:
        text = line.strip()
        if text.startswith(("Host Frame", "Device Frame", "Saved host backtrace")):
            continue
        m = _AT_OLD.search(text) or _AT_NEW.search(text)
        if m:
            name = m.group(1).strip()
            # Older releases print "file.cu:12:kernel(args)".
            name = re.sub(r"^\S+\.(?:cu|cuh|h|hpp|cpp|cc|ptx):\d+:", "", name)
            return name
    return None


def parse_output(text: str) -> Report:
    """Findings of compute-sanitizer's text output, in order, each with the child's step marker
    that came before it."""
    findings, current, step = [], None, None
    summary, failed, done, other = None, None, False, []
    for raw in text.splitlines():
        line = raw.rstrip("\n")
        cut = line.find(PREFIX)
        if cut > 0:          # the program's own output, not ended by a newline, then a report
            other.append(line[:cut])
            line = line[cut:]
        m = _marker(line)
        if m is not None:
            kind, data = m
            if kind == "step":
                step = data
            elif kind == "failed":
                failed = data
            elif kind == "done":
                done = True
            current = None
            continue
        if not line.startswith(PREFIX):
            if line.strip():
                other.append(line)
            current = None
            continue
        body = line[len(PREFIX):]
        if not body.strip():
            current = None
            continue
        s = _SUMMARY.search(body)
        if s:
            summary = (summary or 0) + int(s.group(1) or s.group(2))
            current = None
            continue
        if body.startswith(" ") and not body.startswith("  "):
            head = body.strip()
            if head.startswith(_NOT_FINDINGS):
                current = None
                continue
            current = Finding(head, step=step)
            findings.append(current)
        elif current is not None:
            current.details.append(body.strip())
    for f in findings:
        f.kernel = kernel_of([f.what] + f.details)
    return Report(findings, summary, failed, done, other)


def base_name(name: str) -> str:
    """``void ns::add_into<float>(float*, float const*, int)`` -> ``ns::add_into``: the name
    without return type, template arguments or parameters (printed differently by the
    sanitizer and by the demangler)."""
    out, depth = [], 0
    for ch in name.strip().replace("(anonymous namespace)", "{anonymous}"):
        if ch == "<":
            depth += 1
            continue
        if ch == ">":
            depth = max(0, depth - 1)
            continue
        if ch == "(" and depth == 0:
            break
        if depth == 0:
            out.append(ch)
    words = "".join(out).split()
    return words[-1] if words else name


def _last(name: str) -> str:
    return name.rsplit("::", 1)[-1]


def attribute(report: Report, snap) -> None:
    """Fill each finding's ``nodes``: the node of its step when that launches the kernel, else
    every node of the file that launches it."""
    graphs = {g.name: g for g in snap.graphs}
    names = {k.id: base_name(demangle(k.name)) for k in snap.kernels}

    def kernel_nodes(graph):
        for n in graph.nodes:
            if n.TYPE == "kernel":
                yield graph.name, n
            elif n.TYPE == "graph":
                yield from kernel_nodes(graphs[n.graph])

    def matches(n, want, loose):
        have = names[n.kernel]
        return have == want or (loose and _last(have) == _last(want))

    for f in report.findings:
        if f.kernel is None:
            continue
        want = base_name(f.kernel)
        for loose in (False, True):
            found = []
            if f.step is not None and f.step.get("graph") in graphs:
                g = graphs[f.step["graph"]]
                node = next((n for n in g.nodes if n.id == f.step.get("node")), None)
                if node is not None and node.TYPE == "kernel" and matches(node, want, loose):
                    found = [(g.name, node)]
                elif node is not None and node.TYPE == "graph":
                    found = [(gn, n) for gn, n in kernel_nodes(graphs[node.graph])
                             if matches(n, want, loose)]
            if not found:
                found = [(g.name, n) for g in snap.graphs for n in g.nodes
                         if n.TYPE == "kernel" and matches(n, want, loose)]
            if found:
                break
        f.nodes = [{"graph": gn, "node": n.id, "kernel": demangle(snap.kernels[n.kernel].name)}
                   for gn, n in found]


def report_text(path: str, tool: str, report: Report, shown_details: int = 6) -> str:
    n = len(report.findings)
    summary = "" if report.summary_errors is None else \
        f" (sanitizer's ERROR SUMMARY: {report.summary_errors} error(s))"
    out = [f"sanitize {path} with compute-sanitizer --tool {tool}: {n} finding(s){summary}"]
    for f in report.findings:
        if f.nodes:
            where = "; ".join(f"node {x['node']} of graph {x['graph']!r}, kernel {x['kernel']}"
                              for x in f.nodes[:4])
            if len(f.nodes) > 4:
                where += f"; and {len(f.nodes) - 4} more nodes"
        elif f.kernel:
            where = f"kernel {f.kernel} (launched by no node of the file)"
        elif f.step is not None:
            where = f"during step {f.step.get('step')} (node {f.step.get('node')} of graph " \
                    f"{f.step.get('graph')!r})"
        else:
            where = "outside the graphs' steps"
        out.append(f"  {where}: {f.what}")
        details = [d for d in f.details if not d.startswith(("Host Frame", "Saved host",
                                                             "in /", "Device Frame"))]
        out.extend(f"      {d}" for d in details[:shown_details])
    if report.failed_step is not None:
        s = report.failed_step
        out.append(f"  the replay stopped at step {s.get('step')} (node {s.get('node')} of graph "
                   f"{s.get('graph')!r}): {s.get('error')}")
    elif not report.done:
        out.append("  the replay did not finish; its last output:")
        out.extend(f"      {line}" for line in report.other[-8:])
    return "\n".join(out) + "\n"


def sanitizer_command(exe: str, tool: str, path: str, graph: Optional[str], device: int,
                      print_limit: int, allow_jit: bool) -> list:
    # API errors are not reported: cuda-bindings and cgsnap probe the driver on purpose (a
    # failed page-lock falls back to staging); a failed call of the replay fails its step.
    cmd = [exe, "--tool", tool, "--print-limit", str(print_limit), "--report-api-errors", "no",
           sys.executable, "-m",
           "cgsnap.tools.sanitize", "--child", path, "--device", str(device)]
    if graph is not None:
        cmd += ["--graph", graph]
    if allow_jit:
        cmd.append("--allow-jit")
    return cmd


def run_sanitize(path: str, tool: str = "memcheck", graph: Optional[str] = None,
                 device: int = 0, print_limit: int = 100, allow_jit: bool = False,
                 as_json: bool = False, key=None) -> int:
    """0: no finding; 1: findings (or the replay failed); 2: no compute-sanitizer here."""
    from ..format.snapfile import read
    if key is not None:
        from ..format.signing import verify
        verify(path, key)
    snap, f = read(path, load_images=False)       # a bad file fails here, not in the child
    f.close()
    names = [g.name for g in snap.graphs if g.top_level]
    if graph is not None and graph not in names:
        from . import UsageError
        raise UsageError(f"{path}: no top-level graph named {graph!r} (graphs: "
                         f"{', '.join(names)})")
    exe = find_sanitizer()
    if exe is None:
        print("cgsnap: compute-sanitizer not found (looked at $CGSNAP_COMPUTE_SANITIZER, on PATH, "
              "in $CUDA_HOME/bin and /usr/local/cuda/bin); it comes with the CUDA toolkit",
              file=sys.stderr)
        return 2
    import cgsnap
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cgsnap.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    # The sanitizer holds CUPTI in its target, and a replay needs no module recorder: an
    # inherited CGSNAP_RECORD=1 would make `import cgsnap` there fail before any GPU work.
    env.pop("CGSNAP_RECORD", None)
    env.pop("CGSNAP_RECORD_LAUNCHES", None)
    proc = subprocess.run(sanitizer_command(exe, tool, path, graph, device, print_limit,
                                            allow_jit),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          errors="replace")
    report = parse_output(proc.stdout)
    attribute(report, snap)
    if as_json:
        sys.stdout.write(json.dumps({"schema": 1, "file": path, "tool": tool,
                                     "findings": [x.to_json() for x in report.findings],
                                     "summary_errors": report.summary_errors,
                                     "failed_step": report.failed_step, "done": report.done},
                                    indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(report_text(path, tool, report))
    clean = not report.findings and report.done and not report.summary_errors
    return 0 if clean else 1


# ---- the child: restore and run node by node, saying where it is ------------------------------

def _say(kind: str, **data) -> None:
    print(f"{MARK} {kind} {json.dumps(data, sort_keys=True)}", flush=True)


def child(path: str, graph: Optional[str], device: int, allow_jit: bool) -> int:
    from .. import load
    from ..errors import CgsnapError
    from ..restore.stepper import Stepper
    from ..restore.trace import plan_steps, trace_order
    try:
        with load(path, device=device, allow_jit=allow_jit) as r:
            machine = Stepper(r)
            names = [graph] if graph else r.graph_names
            for name in names:
                g = r.snapshot.graph(name)
                try:
                    steps = plan_steps(r.snapshot, g, trace_order(g), what="sanitize")
                except CgsnapError as exc:      # not steppable: the whole graph at once
                    print(f"{MARK}-note {exc}; running the graph whole", flush=True)
                    _say("step", graph=name, step=None, node=None)
                    try:
                        r.graph(name).launch()
                        r.synchronize()
                    except CgsnapError as exc2:
                        _say("failed", graph=name, step=None, node=None, error=str(exc2))
                        return 3
                    continue
                machine.reset()
                for step in steps:
                    _say("step", graph=name, step=step.position, node=step.node.id)
                    try:
                        machine.run(step, name)
                    except CgsnapError as exc:
                        _say("failed", graph=name, step=step.position, node=step.node.id,
                             error=str(exc))
                        return 3
            _say("done")
    except CgsnapError as exc:
        print(f"cgsnap: {exc}", flush=True)
        return 3
    return 0


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m cgsnap.tools.sanitize")
    p.add_argument("--child", required=True, metavar="FILE")
    p.add_argument("--graph")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--allow-jit", action="store_true")
    a = p.parse_args(argv)
    return child(a.child, a.graph, a.device, a.allow_jit)


if __name__ == "__main__":
    sys.exit(main())
