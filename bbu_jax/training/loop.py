"""The training loop: batches in, steps, logging, evaluation, checkpoints, NaN stop, stop on signal.

Library code with explicit arguments; scripts/train.py builds them from the config.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from bbu_jax.data.collate import fill_counts
from bbu_jax.training.checkpointing import Checkpointer, CheckpointWriteError
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


# stop reason -> the exit status of the scripts that run the loop (scripts/train.py documents them;
# 1 is left for a bad config or bad data, found before the loop)
EXIT_STATUS = {"done": 0, "nonfinite": 2, "signal": 3, "write_failed": 4}


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    stop_reason: str  # a key of EXIT_STATUS
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


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) turned into a request to stop after the current step.

    The handler only sets `received`; the loop finishes the step, saves it and returns. A second
    signal acts as it would without the handler (SIGINT raises KeyboardInterrupt, SIGTERM ends the
    process), for a user who will not wait for the save. Python only lets the main thread install
    handlers; elsewhere (a loop run from a thread) signals keep their usual effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back from here.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.received is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving it, then stopping (send it again to stop "
                    "at once, losing the steps since the last checkpoint)", self.received)


def _on_any_process(flag: bool) -> bool:
    """True when `flag` is set on some process (every process must stop after the same step: the
    save is collective)."""
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _global_fill_counts(host_batch: Mapping[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """fill_counts of the global batch: each process holds only its rows of it."""
    counts = fill_counts(host_batch)
    if jax.process_count() == 1 or not counts:
        return counts
    totals = multihost_utils.process_allgather(np.asarray(list(counts.values()), np.int32)).sum(axis=0, dtype=np.int64)
    return {name: (int(n), int(size)) for name, (n, size) in zip(counts, totals)}


def train_loop(spec: LoopSpec, *, state, train_step: Callable, batches: Iterator[dict],
               batch_sharding: NamedSharding, data_iterator, checkpointer: Checkpointer,
               logger: RunLogger, start_step: int,
               eval_fn: Callable[[Any, int], dict[str, Any]] | None,
               lr_fns: Mapping[str, Callable[[int], float]],
               step_flops: Callable[[Mapping[str, np.ndarray]], float] | None,
               token_count: Callable[[Mapping[str, np.ndarray]], int],
               meta: dict, on_step: Callable[[int, Any], None] | None = None) -> LoopResult:
    """Runs optimizer steps start_step+1 .. spec.total_steps.

    A step whose loss, gradient or update is non-finite leaves params and optimizer state unchanged
    (the step does it) and is not checkpointed; `spec.max_consecutive_nonfinite` of them in a row
    stop the run, so the newest checkpoint is the last good one. Checkpoints hold the data
    iterator's position. SIGTERM or SIGINT: the current step is finished and saved, then the loop
    returns with stop_reason "signal"; a restart resumes exactly there. A checkpoint that cannot
    be written, or a full disk under the logs, stops the run with one error line and stop_reason
    "write_failed"; the earlier checkpoints stay usable.
    eval_fn returns scalars, and optionally (N, H, W, 3) uint8 image grids (e.g. predicted vs true
    boxes), which go to TensorBoard as images.
    """
    total_steps, accum, log_every = spec.total_steps, spec.accum, spec.log_every
    eval_every, checkpoint_every = spec.eval_every, spec.checkpoint_every
    step = start_step
    last_ckpt = checkpointer.latest_step()
    interval_steps, interval_tokens, interval_flops, interval_time = 0, 0, 0.0, 0.0
    train_vals: dict[str, float] = {}
    eval_vals: dict[str, float] = {}
    stop = "done"
    save_due = False
    single = jax.process_count() == 1
    stop_agreed = False  # with several processes: a signal arrived on one of them, known to all

    def fetch() -> tuple[dict[str, np.ndarray], dict]:
        host = next_step_batch(batches, accum)
        return host, to_global(host, batch_sharding)

    def save() -> None:
        nonlocal last_ckpt
        checkpointer.save(step, state, data_iterator=data_iterator, meta=meta)
        last_ckpt = step

    ahead = None  # (host batch, device batch) of the next step, fetched while this one ran
    t_last = time.perf_counter()
    try:
        with StopSignals() as signals:
            while step < total_steps:
                host, batch = ahead or fetch()
                ahead = None
                state, out = train_step(state, batch)  # dispatched; the device runs it from here
                step += 1
                interval_steps += 1
                # Host work overlaps the device step: counting, and reading, stacking and sending the
                # next batch. Not the fetch when this step may be checkpointed (on schedule or to stop):
                # the saved iterator position must be this state's.
                interval_tokens += token_count(host)
                if step_flops is not None:
                    interval_flops += step_flops(host)
                # One process reads its own flag (read once: a signal may land at any moment);
                # several stop after the step at which they all know of it.
                requested = stop_agreed or (single and signals.received is not None)
                if step < total_steps and not (save_due or step % checkpoint_every == 0 or requested):
                    ahead = fetch()
                # Stop after this step when nothing was read past it (a batch already read ahead is
                # trained on first).
                stopping = requested and ahead is None and step < total_steps
                out = jax.device_get(out)
                logger.train.add(out["metrics"])
                logger.train.add(_global_fill_counts(host))  # train/token_fill, train/patch_fill
                now = time.perf_counter()
                interval_time += now - t_last
                t_last = now
                if not out["ok"]:
                    what = ("updated parameters or optimizer state (learning rate too high?)" if out["grads_ok"]
                            else "loss or gradient")
                    log.warning("step %d: non-finite %s, update skipped (%d in a row)",
                                step, what, int(out["nonfinite_streak"]))
                loss_sum, loss_n = out["metrics"]["loss"]
                logger.progress(step, float(loss_sum) if loss_n else None,
                                interval_tokens / interval_time if interval_time else None)
                if int(out["nonfinite_streak"]) >= spec.max_consecutive_nonfinite:
                    log.error("stopping: %d consecutive non-finite steps; the last good checkpoint is %s",
                              int(out["nonfinite_streak"]), last_ckpt)
                    stop = "nonfinite"
                    break
                if step % log_every == 0 or step == total_steps or stopping:
                    extra = {f"lr/{g}": fn(step - 1) for g, fn in lr_fns.items()}
                    extra["tokens_per_s"] = interval_tokens / interval_time
                    extra["step_time_s"] = interval_time / interval_steps
                    if step_flops is not None:
                        extra["mfu"] = interval_flops / interval_time / spec.peak_flops
                    train_vals = logger.log_train(step, extra)
                    interval_steps, interval_tokens, interval_flops, interval_time = 0, 0, 0.0, 0.0
                # A stopping run saves first: a preempted machine has seconds, not an evaluation's worth.
                if eval_fn is not None and not stopping and (
                        (eval_every and step % eval_every == 0) or step == total_steps):
                    results = eval_fn(state, step)
                    for name, value in results.items():  # (N, H, W, 3) uint8 arrays are image grids
                        if isinstance(value, np.ndarray) and value.ndim == 4:
                            logger.log_images(step, f"val/{name}", value)
                    eval_vals = logger.log_eval(step, {k: v for k, v in results.items()
                                                       if not (isinstance(v, np.ndarray) and v.ndim == 4)})
                    t_last = time.perf_counter()  # evaluation time is not training time
                # A checkpoint due during a non-finite streak waits for the next good step; a stop
                # saves whatever the step gave (a skipped step kept the old, finite, values).
                save_due = save_due or step % checkpoint_every == 0 or step == total_steps
                if (save_due and out["ok"]) or stopping:
                    save()
                    save_due = False
                    t_last = time.perf_counter()
                if on_step is not None:
                    on_step(step, state)
                if stopping:
                    log.warning("stopped by %s after step %d, saved to %s; run again to resume there",
                                signals.received or "a signal on another process", step,
                                checkpointer.path(step))
                    stop = "signal"
                    break
                if not single and not stop_agreed:
                    stop_agreed = _on_any_process(signals.received is not None)
        checkpointer.wait()
    except CheckpointWriteError as e:
        log.error("stopping: %s", e)
        stop = "write_failed"
    except OSError as e:  # the logs (metrics.jsonl, TensorBoard) on a full disk
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            checkpointer.wait()
        except CheckpointWriteError:
            pass  # the save in flight met the same full disk; the line below names what is left
        newest = checkpointer.latest_step()
        log.error("stopping: cannot write the run's logs under %s (%s); the newest complete checkpoint is %s",
                  logger.workdir, e.strerror, "none" if newest is None else checkpointer.path(newest))
        stop = "write_failed"
    return LoopResult(state, step, stop, checkpointer.latest_step(), train_vals, eval_vals)
