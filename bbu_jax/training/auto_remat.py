"""remat_policy "auto": the least recomputation whose compiled train step fits the device.

Remat trades memory for FLOPs: "none" keeps every activation of the backward pass, "full" keeps
only each layer's input and runs the forward twice. Between them, the named policies of
``models.layers.SAVED_NAMES`` keep the matmul outputs. Which one fits depends on the model, the
budgets, the mesh and the device, so the choice is made from XLA's own estimate: the candidates
are compiled in order of increasing recomputation for the run's real shapes and shardings, and the
first whose per-device memory fits the device's limit (with a margin) is taken, its executable
reused for the run. Full remat is taken only when nothing else fits.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# least recomputation first; the last one is taken when nothing fits
CANDIDATES = ("none", "save_matmuls", "save_qkv_attn", "full")
# Share of the device's limit a step may plan for: XLA's estimate leaves out allocator
# fragmentation, cuBLAS/cuDNN workspaces and the next batch already transferred to the device.
MARGIN = 0.9


def device_memory_limit() -> int | None:
    """Bytes the allocator of this process's first device may use, the least over all processes
    (every process must choose the same program); None where the platform reports no limit (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = int(stats.get("bytes_limit", -1))
    if jax.process_count() > 1:
        limits = np.asarray(multihost_utils.process_allgather(np.int64(limit)))
        limit = -1 if (limits < 0).any() else int(limits.min())
    return None if limit < 0 else limit


def step_memory(compiled: jax.stages.Compiled) -> int:
    """Per-device bytes of a compiled step: temporaries + arguments + outputs, less the outputs
    that reuse a donated argument's buffer."""
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Choice:
    policy: str
    compiled: Any  # the policy's compiled step; None when nothing was compiled (no limit)
    estimates: dict[str, int]  # bytes per device of each compiled candidate


def choose(compile_fn: Callable[[str], Any], limit: int | None, *, candidates: Sequence[str] = CANDIDATES,
           margin: float = MARGIN, estimate: Callable[[Any], int] = step_memory) -> Choice:
    """The first of ``candidates`` whose ``compile_fn(policy)`` is estimated to fit
    ``limit * margin`` bytes per device, else the last one. Without a limit (CPU: the host's RAM,
    which the process cannot size its share of) the first candidate, nothing compiled."""
    if not candidates:
        raise ValueError("no remat candidates to choose from")
    if limit is None:
        log.info("remat auto -> %s: the device reports no memory limit (CPU), nothing to fit", candidates[0])
        return Choice(candidates[0], None, {})
    budget = limit * margin
    estimates = {}
    for policy in candidates:
        compiled = compile_fn(policy)
        estimates[policy] = estimate(compiled)
        fits = estimates[policy] <= budget
        log.info("remat auto: %s needs %.3g GiB per device (%s %.3g GiB = %.0f%% of %.3g GiB)", policy,
                 estimates[policy] / 2**30, "fits" if fits else "over", budget / 2**30, margin * 100, limit / 2**30)
        if fits:
            break
    else:
        log.warning("remat auto: no policy fits %.3g GiB per device; taking %s (%.3g GiB): expect an "
                    "out-of-memory error unless the mesh shards more (mesh.fsdp), the first Adam moment is "
                    "stored in bf16 (optim.adam_mu_dtype), jax may take more of the device "
                    "(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95) or the budgets shrink",
                    budget / 2**30, policy, estimates[policy] / 2**30)
    log.info("remat auto -> %s", policy)
    return Choice(policy, compiled, estimates)
