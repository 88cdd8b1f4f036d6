"""Where a step's time goes on the device, from a ``jax.profiler`` trace (no profiler UI needed).

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes a Chrome/Perfetto trace: complete
events ("ph": "X") with their process and thread named in metadata events. On a GPU the kernels
run in a process named ``/device:GPU:N`` on its "Stream #..." threads; on the CPU backend XLA's
work runs on the host's ``tf_XLA*`` threads, thunks holding the fusions they run. Summing the
kernels' durations by name and by kind (matrix products, attention, the rest of XLA's fusions,
copies, collectives) says what a step spends its device time on, and the device's busy time
against the step's wall time says how much of the step the device waits on the host.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

# Kernel name -> kind, first match wins. cuBLAS / CUTLASS matmuls (nvjet is cuBLAS's Hopper
# generator), the Triton kernels of the flash attention and cuDNN's fused attention, XLA's own
# fusions, and data movement.
KINDS = (("collective", re.compile(r"nccl|all[-_]?(gather|reduce|to[-_]all)|reduce[-_]scatter", re.I)),
         ("attention", re.compile(r"flash|attention|fmha|cudnn", re.I)),
         ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|dot|matmul", re.I)),
         ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
         ("fusion", re.compile(r"fusion|reduce|scatter|gather|select|convert|triton", re.I)))


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if pattern.search(name)), "other")


def trace_file(trace_dir: str | Path) -> Path:
    """The newest Perfetto trace under ``trace_dir`` (the profiler nests it in dated folders)."""
    found = sorted(Path(trace_dir).rglob("*perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir} (trace with create_perfetto_trace=True)")
    return found[-1]


def kernel_times(path: str | Path) -> tuple[str, dict[str, float], float]:
    """(where the kernels ran, {kernel name: total microseconds}, busy microseconds: the union of
    their intervals) of one trace file, counting innermost events only: the device processes' stream
    threads when the trace has any, else XLA's threads of the CPU backend."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in procs.items() if name.startswith("/device:")}
    if devices:  # the kernels on the streams (the "XLA Modules" / "XLA Ops" lines restate them)
        where = ", ".join(sorted(procs[pid] for pid in devices))
        keep = lambda e: (e["pid"] in devices  # noqa: E731
                          and threads.get((e["pid"], e["tid"]), "").startswith("Stream"))
    else:  # less the zero-length "end: ..." markers of the CPU client
        where = "host threads of XLA's CPU client"
        keep = lambda e: (threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")  # noqa: E731
                          and not e["name"].startswith("end: "))
    per_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and keep(e):
            start = float(e["ts"])
            per_thread[e["pid"], e["tid"]].append((start, start + float(e.get("dur", 0.0)), e["name"]))
    totals: collections.Counter = collections.Counter()
    spans = []
    for thread in per_thread.values():
        thread.sort(key=lambda ev: (ev[0], -ev[1]))
        for i, (start, stop, name) in enumerate(thread):
            # leaves only: an event that holds the next one on its thread (a CPU thunk's loop, say)
            # is a container whose time its children already count; one that merely overlaps the
            # next is not (a GPU stream's consecutive kernels do, by up to microseconds of timestamp skew)
            if i + 1 < len(thread) and thread[i + 1][0] < stop and thread[i + 1][1] <= stop:
                continue
            totals[name] += stop - start
            spans.append((start, stop))
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return where, dict(totals), busy


def summary_lines(path: str | Path, wall_s: float, top: int = 12) -> list[str]:
    """Printable lines: busy time against ``wall_s`` (the traced step's wall time), time per kind,
    then the ``top`` kernels by total time."""
    where, totals, busy = kernel_times(path)
    total = sum(totals.values()) or 1.0
    by_kind: collections.Counter = collections.Counter()
    for name, us in totals.items():
        by_kind[kind(name)] += us
    lines = [f"kernels on {where}: busy {busy / 1e3:.1f} ms of the step's {wall_s * 1e3:.1f} ms "
             f"({busy / 1e6 / wall_s:.0%}); kernel time {total / 1e3:.1f} ms (concurrent kernels overlap)",
             "  by kind: " + ", ".join(f"{k} {us / 1e3:.1f} ms ({us / total:.0%})" for k, us in by_kind.most_common())]
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us / 1e3:9.2f} ms {us / total:5.1%}  {kind(name):10} {name[:110]}")
    return lines
