"""Orbax checkpoints of the train state, the data iterator's position and a JSON record.

Layout: <dir>/<step>/{state (sharded arrays), data (one JSON per process, grain's handler),
meta (JSON)}. Saves are async (arrays are copied off-device before `save` returns, the write runs
in the background); orbax writes to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact. `restore_latest` walks back from the
newest step when one cannot be read.
"""
from __future__ import annotations

import copy
import json
import logging
import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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


class Checkpointer:
    """Keeps the newest `max_to_keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int, async_save: bool):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def save(self, step: int, state, *, data_iterator=None, meta: dict | None = None) -> bool:
        """Starts saving; returns once arrays are off-device (the write may still be running)."""
        args = {"state": ocp.args.StandardSave(state),
                "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator.get_state()))
        return self._manager.save(int(step), args=ocp.args.Composite(**args), force=True)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def restore(self, step: int, abstract_state, *, data_iterator=None):
        """(state, meta) of `step`; abstract_state holds ShapeDtypeStructs with shardings, so each
        process reads only its shards. The data iterator, when given, is moved to the saved position."""
        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator))
        out = self._manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state, *, data_iterator=None):
        """(step, state, meta) of the newest readable checkpoint, or None when there is none.

        An unreadable checkpoint (truncated files, missing item) is skipped with a warning and the
        previous one is tried; the data iterator is only touched by the one that succeeds.
        """
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
                if data_iterator is not None:
                    self._manager.restore(step, args=ocp.args.Composite(
                        data=grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator))))
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                            self.path(step), type(e).__name__, str(e).splitlines()[0][:300])
                continue
            return step, state, meta
        return None

    def wait(self) -> None:
        """Blocks until the last async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
