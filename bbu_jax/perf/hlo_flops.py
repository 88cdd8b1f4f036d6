"""The FLOPs a compiled step executes, read from its optimized HLO: the hardware side of MFU.

``compiled.cost_analysis()["flops"]`` counts a while loop's body once, so for a step whose
layers run in ``nnx.scan`` (and whose LM loss scans chunks) it reports a fraction of the work.
Here every matrix product -- ``dot``, ``convolution`` and cuBLAS gemm custom calls -- counts
2 x (result elements) x (contracted size), loops times their trip counts, fusions and calls as
their bodies. A conditional counts its largest branch: an upper bound where the step skips work
at run time (the LM loss's chunks without supervised tokens). Other custom calls (fused attention
kernels: cuDNN, Triton) hide their products; they are returned by target, with how often they run,
so a reader knows what the figure leaves out; so are loops whose trip count depends on the data
(the on-device Hungarian matcher), counted once.
"""
from __future__ import annotations

import collections
import re

import numpy as np

from bbu_jax.perf.collectives import _BRANCHES, _WHILE, computations, trip_count

UNKNOWN_TRIPS = "while loop of data-dependent trips (body counted once)"
_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_GEMM_CONTRACT = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_DIM_LABELS = re.compile(r"dim_labels=\w+_(\w+)->")


def _dims(shape: str) -> list[int]:
    """Dimensions of the first array in an HLO shape (a tuple's first element)."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _product_flops(opcode: str, shape: str, rest: str, shapes: dict[str, str]) -> float | None:
    """FLOPs of one instruction if it is a matrix product, else None."""
    operands = _OPERAND.findall(rest.split(")", 1)[0])
    if opcode == "dot" and (m := _CONTRACT.search(rest)):
        lhs = _dims(shapes[operands[0]])
        contracted = np.prod([lhs[int(i)] for i in m.group(1).split(",") if i])
        return 2.0 * float(np.prod(_dims(shape))) * float(contracted)
    if opcode == "convolution" and (m := _DIM_LABELS.search(rest)):
        kernel = _dims(shapes[operands[1]])
        out_features = kernel[m.group(1).index("o")]
        return 2.0 * float(np.prod(_dims(shape))) * float(np.prod(kernel)) / out_features
    if opcode == "custom-call" and (m := _GEMM_CONTRACT.search(rest)):  # cuBLAS gemm: dims in its config
        lhs = _dims(shapes[operands[0]])
        contracted = np.prod([lhs[int(i.strip('" '))] for i in m.group(1).split(",") if i.strip()])
        return 2.0 * float(np.prod(_dims(shape))) * float(contracted)
    return None


def executed_flops(hlo: str) -> tuple[float, dict[str, int]]:
    """(FLOPs of the matrix products one execution of the module runs, {custom-call target whose
    work is not counted: executions}) of an optimized HLO module's text (``compiled.as_text()``)."""
    entry, comps = computations(hlo)
    shapes, parsed = {}, {}
    for name, text in comps.items():
        rows = []
        for line in text.split("\n")[1:]:
            if m := _INSTR.match(line):
                shapes[m.group(1)] = m.group(2)
                rows.append((line, *m.groups()[1:]))
        parsed[name] = rows
    memo: dict[str, tuple[float, collections.Counter]] = {}

    def walk(name: str) -> tuple[float, collections.Counter]:
        if name in memo:
            return memo[name]
        flops, hidden = 0.0, collections.Counter()
        for line, shape, opcode, rest in parsed.get(name, []):
            if opcode == "while" and (m := _WHILE.search(line)):
                try:
                    trips = trip_count(line, comps)
                except ValueError:  # data-dependent (the on-device matcher's loop): counted once, listed
                    trips = 1
                    hidden[UNKNOWN_TRIPS] += 1
                f, h = walk(m.group(1))
                flops += trips * f
                hidden.update({k: v * trips for k, v in h.items()})
            elif opcode == "conditional" and (m := _BRANCHES.search(line)):
                names = m.group(1).split(",") if m.group(1) else [m.group(2), m.group(3)]
                f, h = max((walk(b.strip().lstrip("%")) for b in names), key=lambda x: x[0])
                flops += f
                hidden.update(h)
            elif (f := _product_flops(opcode, shape, rest, shapes)) is not None:
                flops += f
            elif opcode == "custom-call":
                hidden[_TARGET.search(rest).group(1) if _TARGET.search(rest) else "?"] += 1
            elif not opcode.endswith("-done"):
                for called in _CALLED.findall(rest):
                    f, h = walk(called)
                    flops += f
                    hidden.update(h)
        memo[name] = (flops, hidden)
        return memo[name]

    flops, hidden = walk(entry)
    return flops, dict(hidden)
