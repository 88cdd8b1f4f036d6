"""Run-folder logging: TensorBoard, metrics.jsonl, summary.json and a progress bar.

Every loss is logged as sum / count accumulated over the steps of the logging interval (the
step already summed over micro-batches and devices), so a term is weighted by its tokens or
boxes, never averaged as a mean of means. Only the main process writes.

A resumed run repeats the steps after its checkpoint: the logger starts by dropping what was
logged past that step (metrics.jsonl rewritten atomically, TensorBoard events purged), so each
step has one row, from the run that the checkpoints continue.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import pathlib
from collections.abc import Mapping

import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from bbu_jax.foundation.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Reported as interval totals rather than averages.
SUMMED = frozenset({"skipped_steps"})


class SumCountAccumulator:
    """Adds (sum, count) pairs in float64 on the host; `averages` gives sum/count per name."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}

    def add(self, metrics: Mapping[str, tuple]) -> None:
        for name, (s, c) in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(np.asarray(s, np.float64))
            self._counts[name] = self._counts.get(name, 0.0) + float(np.asarray(c, np.float64))

    def averages(self) -> dict[str, float]:
        out = {}
        for name, s in self._sums.items():
            if name in SUMMED:
                out[name] = s
            elif self._counts[name] > 0:
                out[name] = s / self._counts[name]
        return out


def _drop_rows_after(path: pathlib.Path, step: int) -> None:
    """Rewrites metrics.jsonl without its rows past `step` (and a line cut short by a killed run)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept, dropped, unreadable = [], 0, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, TypeError, KeyError):
            unreadable += 1
            continue
        if row_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped or unreadable:
        write_text_atomic(path, "".join(x + "\n" for x in kept))
        log.log(logging.WARNING if unreadable else logging.INFO,
                "%s: dropped %d rows past step %d (run again from there)%s", path, dropped, step,
                f" and {unreadable} unreadable lines" if unreadable else "")


class RunLogger:
    """TensorBoard + metrics.jsonl + summary.json under workdir; inert on non-main processes."""

    def __init__(self, workdir: str | pathlib.Path, *, is_main: bool, total_steps: int,
                 initial_step: int = 0):
        self.workdir = pathlib.Path(workdir)
        self.is_main = is_main
        self.train = SumCountAccumulator()
        self._writer = None
        self._bar = None
        self.last: dict[str, float] = {}  # the newest value of every metric logged (summary.json)
        if is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            _drop_rows_after(self.workdir / "metrics.jsonl", initial_step)
            self._writer = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=initial_step + 1)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
            self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                                  desc="train")

    def _emit(self, step: int, values: Mapping[str, float]) -> None:
        if not self.is_main:
            return
        self.last.update({k: float(v) for k, v in values.items()})
        for k, v in values.items():
            if math.isfinite(v):
                self._writer.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}},
                                     allow_nan=True) + "\n")
        self._jsonl.flush()
        self._writer.flush()

    def progress(self, step: int, loss: float | None, tokens_per_s: float | None) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            post["tok/s"] = f"{tokens_per_s:.0f}"
        self._bar.set_postfix(post, refresh=True)

    def log_train(self, step: int, extra: Mapping[str, float]) -> dict[str, float]:
        """Writes the interval's averages (as train/<name>) plus extra scalars; resets the interval."""
        values = {f"train/{k}": v for k, v in self.train.averages().items()}
        values.update({f"train/{k}": float(v) for k, v in extra.items()})
        self.train.reset()
        self._emit(step, values)
        return values

    def log_eval(self, step: int, metrics: Mapping[str, float], prefix: str = "val") -> dict:
        values = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        self._emit(step, values)
        return values

    def log_images(self, step: int, tag: str, images: np.ndarray) -> None:
        """images: (N, H, W, 3) uint8, written as one grid."""
        if self.is_main and len(images):
            self._writer.add_images(tag, images, step, dataformats="NHWC")
            self._writer.flush()

    def write_summary(self, summary: Mapping) -> None:
        """summary.json; on a full disk one error line instead (the run's outcome is in the log)."""
        if not self.is_main:
            return
        try:
            write_json_atomic(self.workdir / "summary.json", dict(summary), indent=2, sort_keys=True)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.error("cannot write %s (%s)", self.workdir / "summary.json", e.strerror)

    def close(self) -> None:
        if self.is_main:
            self._bar.close()
            self._jsonl.close()
            self._writer.close()
