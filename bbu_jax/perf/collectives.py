"""What a compiled step sends between devices: bytes per collective kind, read from its HLO text.

Used to check a parallelism layout against its textbook volume (data parallel: one gradient
all-reduce per step; FSDP: weights gathered for forward and backward, gradients reduced once)
without a multi-GPU machine: the SPMD partitioner makes the same choices for fake CPU devices.
``partitioned_hlo`` reads the module right after partitioning, before the CPU backend widens bf16
to f32. Collectives inside loops count once per iteration; of a conditional's branches the
largest counts.
"""
from __future__ import annotations

import collections
import pathlib
import re
import tempfile

import jax
import numpy as np

from bbu_jax.perf.lowering import lower_train_step
from bbu_jax.training import train_state
from bbu_jax.workflows.config import Specs

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(KINDS) + r")(?:-start)?\(")
_WHILE = re.compile(r" while\(.*body=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_BOUND = re.compile(r"s32\[\] constant\((\d+)\)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), "
                       r"false_computation=%?([\w.\-]+)")
_CALLS = re.compile(r"to_apply=%?([\w.\-]+)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as ``f32[8,512]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        if dtype in _BYTES:
            total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def computations(hlo: str) -> tuple[str, dict[str, str]]:
    """(entry name, {name: body text}) of a module's text."""
    comps, entry = {}, None
    for text in re.split(r"\n(?=\S)", hlo):
        m = re.match(r"(ENTRY )?%?([\w.\-]+) ", text)
        if m:
            comps[m.group(2)] = text
            entry = m.group(2) if m.group(1) else entry
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, comps


def partitioned_hlo(lowered) -> str:
    """Compile a ``jax.jit(...).lower(...)`` result and return its module as the SPMD partitioner
    left it: the collectives and dtypes any backend starts from."""
    with tempfile.TemporaryDirectory() as tmp:
        lowered.compile(compiler_options={"xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        dumps = sorted(pathlib.Path(tmp).glob("*after_spmd-partitioning*.txt"))
        if not dumps:
            raise RuntimeError("XLA wrote no module after SPMD partitioning (was a mesh used?)")
        return dumps[-1].read_text()


def trip_count(line: str, comps: dict[str, str]) -> int:
    """Iterations of a while loop: XLA's annotation, else the one bound its condition compares to
    (scans count up from 0 to a constant)."""
    if m := _TRIPS.search(line):
        return int(m.group(1))
    condition = comps[_CONDITION.search(line).group(1)]
    bounds = set(_BOUND.findall(condition))
    if len(bounds) != 1 or "direction=LT" not in condition:
        raise ValueError(f"cannot tell how often this loop runs: {line.strip()[:200]}")
    return int(bounds.pop())


def collective_bytes(hlo: str) -> dict[str, int]:
    """{kind: bytes of the results of that kind's collectives per execution} (0 for absent kinds).

    The size is the result's: for an all-gather the gathered array, for an all-reduce the reduced one
    (each device's share of the traffic is proportional to it for ring algorithms)."""
    entry, comps = computations(hlo)
    memo: dict[str, collections.Counter] = {}

    def walk(name: str) -> collections.Counter:
        if name in memo:
            return memo[name]
        out: collections.Counter = collections.Counter()
        for line in comps[name].split("\n")[1:]:
            if m := _COLLECTIVE.match(line):
                out[m.group(2)] += shape_bytes(m.group(1))
            elif m := _WHILE.search(line):
                trips = trip_count(line, comps)
                for k, v in walk(m.group(1)).items():
                    out[k] += v * trips
            elif " conditional(" in line and (m := _BRANCHES.search(line)):
                names = m.group(1).split(",") if m.group(1) else [m.group(2), m.group(3)]
                biggest: collections.Counter = collections.Counter()
                for branch in names:
                    for k, v in walk(branch.strip().lstrip("%")).items():
                        biggest[k] = max(biggest[k], v)
                out.update(biggest)
            elif " call(" in line and (m := _CALLS.search(line)):
                out.update(walk(m.group(1)))
        memo[name] = out
        return out

    found = walk(entry)
    return {kind: int(found[kind]) for kind in KINDS}


def train_step_traffic(specs: Specs, modules, mesh, dims: dict[str, int], *, caption_vocab
                       ) -> tuple[dict[str, int], int]:
    """({kind: bytes} per step, parameter bytes) of the train step of a run with ``specs``
    (``lowering.lower_train_step``) for ``modules`` on ``mesh``, micro-batches of ``dims``.
    Compiled only: nothing is allocated or run."""
    lowered = lower_train_step(specs, modules, mesh, dims, caption_vocab=caption_vocab)
    _, params, _ = train_state.split_modules(modules)
    param_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))
    return collective_bytes(partitioned_hlo(lowered)), param_bytes
