"""Orbax checkpoints of the train state, the data iterator's position and a JSON record.

Layout: <dir>/<step>/{state (sharded arrays), data (one JSON per process, grain's handler),
meta (JSON)}. Saves are async (arrays are copied off-device before `save` returns, the write runs
in the background); orbax writes to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact.

Faults:
- a save that fails (disk full, no permission) raises `CheckpointWriteError` with one line, at the
  next `save` or `wait`. Old steps are removed here, only once a newer one is complete: orbax's own
  `max_to_keep` removes them when a save ends even if that save failed, which could leave no
  checkpoint at all. Orbax and asyncio log such a failure again from every thread and task
  involved, each with a traceback; those records go to DEBUG (`_OrbaxTracebacks`).
- `restore_latest` walks back from the newest step; an unreadable one is moved aside to
  `<step>.corrupt` (kept for the user, invisible to orbax), so saving that step again later works.
  A readable one whose state is laid out otherwise than the run's (another model size, a group
  frozen or thawed, an older optimizer layout) is not corrupt: `CheckpointMismatchError` names
  what differs and nothing is moved.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import pathlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bbu_jax.training.optimizer import path_str

log = logging.getLogger(__name__)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the earlier ones are intact."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose arrays are not the ones this run or model needs."""


def _read_files_mapped() -> None:
    """Has tensorstore read checkpoint files memory-mapped. By default it preads each file into a
    fresh buffer and copies the arrays out of that, a second pass over new memory as large as the
    checkpoint; mapped, it copies them straight from the page cache. orbax builds every tensorstore
    context from these module defaults and offers no option for it; an orbax without them reads as before."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        getattr(tensorstore_utils, name, {}).setdefault("file_io_mode", {"mode": "memmap"})


_read_files_mapped()


def arrays_handler(tree=None) -> ocp.PyTreeCheckpointHandler:
    """How every tree of arrays bbu_jax saves (train states, params checkpoints) is written:
    uncompressed. zstd saves little on trained float32 weights and Adam moments (their low mantissa
    bits are noise) and costs a single-threaded pass over each array on every save and restore.

    Given the ``tree`` to save, the host memory a save holds at once is bounded by its largest
    array (orbax's limit refuses an array over it): left to itself orbax took a host copy of every
    array before writing, a second copy of the whole model beside the model itself."""
    if tree is None:
        return ocp.PyTreeCheckpointHandler(use_compression=False)
    largest = max((leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)), default=0)
    return ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=max(1, math.ceil(largest / 1e9)))


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    """'/'-joined path -> shape of every leaf; the same names for a live state and orbax's metadata
    of it (dict keys, tuple indices and NamedTuple fields alike)."""
    return {path_str(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_saved_state(step_dir: pathlib.Path, wanted_tree, *, differs: str, advice: str,
                      partial: bool = False) -> None:
    """Raises CheckpointMismatchError when the arrays of a step's state (paths and shapes, from
    orbax's metadata) are not those of ``wanted_tree`` (``partial``: do not hold all of them);
    dtypes may differ (restore casts). Checked before reading, so that one line names what differs
    where orbax would fail on the first leaf it cannot match."""
    saved = _leaf_shapes(arrays_handler().metadata(pathlib.Path(step_dir) / "state").tree)
    wanted = _leaf_shapes(wanted_tree)
    missing = sorted(wanted.keys() - saved.keys())
    extra = [] if partial else sorted(saved.keys() - wanted.keys())
    reshaped = [f"{k} {saved[k]} -> {wanted[k]}" for k in sorted(wanted.keys() & saved.keys())
                if saved[k] != wanted[k]]
    if not (missing or extra or reshaped):
        return
    parts = [f"{what}: {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for what, keys in (("missing from it", missing), ("only in it", extra), ("other shapes", reshaped))
             if keys]
    if any(k.endswith("/weight") and k.removesuffix("weight") + "kernel" in saved for k in missing):
        advice = ("it was written by a bbu_jax that stored Linear weights as (in, out) 'kernel' arrays, "
                  "before they took torch's (out, in) layout: export it to an HF folder with that bbu_jax; "
                  "this one loads and trains from the export")
    raise CheckpointMismatchError(f"{step_dir} holds {differs} ({'; '.join(parts)}); {advice}")


class _IteratorState:
    """Snapshot of a data iterator's state at save time, in the bytes form grain's handler writes.

    Taking the snapshot in `save` matters with async checkpoints: the loop keeps drawing batches
    while the checkpoint is being written.
    """

    def __init__(self, state: Any):
        self._state = copy.deepcopy(state)

    def get_state(self) -> bytes:
        if isinstance(self._state, bytes):
            return b"B" + self._state
        return b"J" + json.dumps(self._state).encode()


class _IteratorRestorer:
    """Receives the saved bytes from grain's handler and hands them to the real iterator."""

    def __init__(self, iterator):
        self._iterator = iterator

    def set_state(self, raw: bytes) -> None:
        kind, body = raw[:1], raw[1:]
        self._iterator.set_state(body if kind == b"B" else json.loads(body))

    def start_prefetch(self) -> None:
        if hasattr(self._iterator, "start_prefetch"):
            self._iterator.start_prefetch()


class _OrbaxTracebacks(logging.Filter):
    """Turns orbax's error records that carry a traceback (and asyncio's "Task exception was never
    retrieved" for orbax's tasks, logged as late as interpreter exit) into DEBUG records of this
    module. Every failure they describe reaches the caller as an exception: a failed write as
    CheckpointWriteError, a failed read from `restore`."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname or (
            record.name == "asyncio" and "orbax" in record.getMessage())
        if record.levelno < logging.ERROR or record.exc_info is None or not from_orbax:
            return True
        log.debug("%s: %s", record.name, record.getMessage(), exc_info=record.exc_info)
        return False


_ORBAX_TRACEBACKS = _OrbaxTracebacks()


def _first_line(error: BaseException) -> str:
    """`Type: first line` of the OS error behind `error` when there is one (disk full, permission
    denied: what the user can act on), else of `error` itself."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    shown = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), error)
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[0][:300] if lines else ''}"


def _on_every_process(ok: bool) -> bool:
    """True when `ok` holds on every process: they must agree on which step they restore."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
    """Keeps the newest `max_to_keep` complete checkpoints of a run under `directory`."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int, async_save: bool):
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._async = async_save
        for name in ("absl", "asyncio"):  # orbax logs through absl; adding the same filter twice is a no-op
            logging.getLogger(name).addFilter(_ORBAX_TRACEBACKS)
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": arrays_handler(), "meta": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})
        self._pending: int | None = None  # the step being written, not yet known to be complete

    def save(self, step: int, state, *, data_iterator=None, meta: dict | None = None) -> None:
        """Starts saving; returns once arrays are off-device (the write may still be running).

        Raises CheckpointWriteError when this save, or the previous one, could not be written.
        """
        self._finish_pending()
        args = {"state": ocp.args.PyTreeSave(state),
                "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator.get_state()))
        self._pending = int(step)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 - a synchronous write failed: same report as an async one
            self._pending = None
            raise self._write_error(int(step), e) from e
        if not self._async:
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Waits for the save in flight; raises if it did not complete, else removes old steps."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        error = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported below with the step it concerns
            error = e
        # orbax logs a failed async write and carries on; the step folder's presence is the truth.
        self._manager.reload()
        if step not in self._manager.all_steps():
            raise self._write_error(step, error)
        for old in self.all_steps()[:-self.max_to_keep]:
            self._manager.delete(old)

    def _write_error(self, step: int, error: BaseException | None) -> CheckpointWriteError:
        self._manager.reload()
        previous = self.latest_step()
        reason = _first_line(error) if error is not None else "the write did not complete"
        return CheckpointWriteError(
            f"cannot write checkpoint {self.path(step)} ({reason}); the newest complete checkpoint is "
            f"{'none' if previous is None else self.path(previous)}")

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def restore(self, step: int, abstract_state, *, data_iterator=None):
        """(state, meta) of `step`; abstract_state holds ShapeDtypeStructs with shardings, so each
        process reads only its shards. The data iterator, when given, is moved to the saved position."""
        args = {"state": ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
                "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator))
        out = self._manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state, *, data_iterator=None):
        """(step, state, meta) of the newest readable checkpoint, or None when there is none.

        An unreadable checkpoint (truncated files, missing item) is moved aside to `<step>.corrupt`
        with a warning and the previous one is tried; the data iterator is only touched by the one
        that succeeds.
        """
        for step in reversed(self.all_steps()):
            error = None
            try:
                check_saved_state(self.path(step), abstract_state, differs="another train state than this run builds",
                                  advice="resume with the settings and bbu_jax version that wrote it, "
                                         "or train in another workdir")
                state, meta = self.restore(step, abstract_state)
                if data_iterator is not None:
                    self._manager.restore(step, args=ocp.args.Composite(
                        data=grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator))))
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                error = e
            if _on_every_process(error is None):
                return step, state, meta
            self._set_aside(step, error)
        return None

    def _set_aside(self, step: int, error: BaseException | None) -> None:
        """Renames an unreadable step folder to <step>.corrupt (-N when taken) and forgets it."""
        if jax.process_index() == 0:
            path = self.path(step)
            target, n = path.with_name(f"{step}.corrupt"), 1
            while target.exists():
                target, n = path.with_name(f"{step}.corrupt-{n}"), n + 1
            os.rename(path, target)
            reason = _first_line(error) if error is not None else "unreadable on another process"
            log.warning("checkpoint %s is unreadable (%s); moved to %s, trying the previous one",
                        path, reason, target.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the last async save is on disk; raises CheckpointWriteError if it failed."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self._manager.close()


# ----------------------------------------------------------------------------- reading a step
# Without a Checkpointer: inference and export read a step without ever changing the run folder
# (no corrupt step is set aside, nothing is deleted).
def step_dirs(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """The complete step folders under a checkpoints folder, newest first."""
    directory = pathlib.Path(directory)
    steps = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()] if directory.is_dir() else []
    return sorted(steps, key=lambda p: int(p.name), reverse=True)


def is_step_dir(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return (path / "state").is_dir() and (path / "meta").is_dir()


def read_meta(step_dir: str | pathlib.Path) -> dict:
    """The JSON record saved with a step (the run's settings and the step)."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(pathlib.Path(step_dir).absolute() / "meta")


def restore_params(step_dir: str | pathlib.Path, abstract_params):
    """Only the ``params`` subtree of a step's train state (no optimizer state is read), as
    ``abstract_params`` describes it (ShapeDtypeStructs: the dtype to cast to, and a sharding)."""
    abstract = {"params": abstract_params}
    check_saved_state(step_dir, abstract, differs="other params than its settings' model has", partial=True,
                      advice="read it with the bbu_jax version that wrote it")
    args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    return ocp.PyTreeCheckpointer().restore(pathlib.Path(step_dir).absolute() / "state", args=args)["params"]
