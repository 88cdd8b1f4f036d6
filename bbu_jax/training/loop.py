"""The training loop: batches in, steps, logging, evaluation, checkpoints, NaN stop.

Library code with explicit arguments; scripts/train.py builds them from the config.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from bbu_jax.training.checkpointing import Checkpointer
from bbu_jax.training.metrics_logging import RunLogger

log = logging.getLogger(__name__)


def next_step_batch(batches: Iterator[dict], accum: int) -> dict[str, np.ndarray]:
    """Stacks `accum` host batches on a new leading micro-batch axis (a view when accum is 1: a
    3B batch holds every patch of the step, not worth a copy)."""
    micro = [next(batches) for _ in range(accum)]
    if accum == 1:
        return {k: np.asarray(v)[None] for k, v in micro[0].items()}
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def to_global(host_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """This process's rows -> global arrays laid out by `sharding` (each process passes its own
    contiguous slice of the rows; with one process that is the whole batch)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in host_batch.items()}


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    stop_reason: str  # "done" | "nonfinite"
    last_checkpoint: int | None
    last_train_metrics: dict[str, float]
    last_eval_metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """How long the loop runs and how often it logs, evaluates and checkpoints."""
    total_steps: int
    accum: int  # micro-batches per optimizer step
    log_every: int
    eval_every: int  # 0: only at the last step
    checkpoint_every: int
    max_consecutive_nonfinite: int
    peak_flops: float  # of all devices together, for the MFU log


def train_loop(spec: LoopSpec, *, state, train_step: Callable, batches: Iterator[dict],
               batch_sharding: NamedSharding, data_iterator, checkpointer: Checkpointer,
               logger: RunLogger, start_step: int,
               eval_fn: Callable[[Any, int], dict[str, Any]] | None,
               lr_fns: Mapping[str, Callable[[int], float]],
               step_flops: Callable[[Mapping[str, np.ndarray]], float] | None,
               token_count: Callable[[Mapping[str, np.ndarray]], int],
               meta: dict, on_step: Callable[[int, Any], None] | None = None) -> LoopResult:
    """Runs optimizer steps start_step+1 .. spec.total_steps.

    A step whose loss or gradient is non-finite leaves params and optimizer state unchanged (the
    step does it) and is not checkpointed; `spec.max_consecutive_nonfinite` of them in a row stop the
    run, so the newest checkpoint is the last good one. Checkpoints hold the data iterator's position.
    eval_fn returns scalars, and optionally (N, H, W, 3) uint8 image grids (e.g. predicted vs true
    boxes), which go to TensorBoard as images.
    """
    total_steps, accum, log_every = spec.total_steps, spec.accum, spec.log_every
    eval_every, checkpoint_every = spec.eval_every, spec.checkpoint_every
    step = start_step
    last_ckpt = checkpointer.latest_step()
    interval_tokens, interval_flops, interval_time = 0, 0.0, 0.0
    train_vals: dict[str, float] = {}
    eval_vals: dict[str, float] = {}
    stop = "done"
    save_due = False

    def fetch() -> tuple[dict[str, np.ndarray], dict]:
        host = next_step_batch(batches, accum)
        return host, to_global(host, batch_sharding)

    ahead = None  # (host batch, device batch) of the next step, fetched while this one ran
    t_last = time.perf_counter()
    while step < total_steps:
        host, batch = ahead or fetch()
        ahead = None
        state, out = train_step(state, batch)  # dispatched; the device runs it from here
        step += 1
        # Host work overlaps the device step: counting, and reading, stacking and sending the next
        # batch. Not the fetch when this step may be checkpointed: the saved iterator position
        # must be this state's.
        interval_tokens += token_count(host)
        if step_flops is not None:
            interval_flops += step_flops(host)
        if step < total_steps and not (save_due or step % checkpoint_every == 0):
            ahead = fetch()
        out = jax.device_get(out)
        logger.train.add(out["metrics"])
        now = time.perf_counter()
        interval_time += now - t_last
        t_last = now
        if not out["ok"]:
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        step, int(out["nonfinite_streak"]))
        loss_sum, loss_n = out["metrics"]["loss"]
        logger.progress(step, float(loss_sum) if loss_n else None,
                        interval_tokens / interval_time if interval_time else None)
        if int(out["nonfinite_streak"]) >= spec.max_consecutive_nonfinite:
            log.error("stopping: %d consecutive non-finite steps; the last good checkpoint is %s",
                      int(out["nonfinite_streak"]), last_ckpt)
            stop = "nonfinite"
            break
        if step % log_every == 0 or step == total_steps:
            steps_in = log_every if step % log_every == 0 else step % log_every
            extra = {f"lr/{g}": fn(step - 1) for g, fn in lr_fns.items()}
            extra["tokens_per_s"] = interval_tokens / interval_time
            extra["step_time_s"] = interval_time / steps_in
            if step_flops is not None:
                extra["mfu"] = interval_flops / interval_time / spec.peak_flops
            train_vals = logger.log_train(step, extra)
            interval_tokens, interval_flops, interval_time = 0, 0.0, 0.0
        if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == total_steps):
            results = eval_fn(state, step)
            for name, value in results.items():  # (N, H, W, 3) uint8 arrays are image grids
                if isinstance(value, np.ndarray) and value.ndim == 4:
                    logger.log_images(step, f"val/{name}", value)
            eval_vals = logger.log_eval(step, {k: v for k, v in results.items()
                                               if not (isinstance(v, np.ndarray) and v.ndim == 4)})
            t_last = time.perf_counter()  # evaluation time is not training time
        # A checkpoint due during a non-finite streak waits for the next good step.
        save_due = save_due or step % checkpoint_every == 0 or step == total_steps
        if save_due and out["ok"]:
            checkpointer.save(step, state, data_iterator=data_iterator, meta=meta)
            last_ckpt, save_due = step, False
            t_last = time.perf_counter()
        if on_step is not None:
            on_step(step, state)
    checkpointer.wait()
    return LoopResult(state, step, stop, last_ckpt, train_vals, eval_vals)
