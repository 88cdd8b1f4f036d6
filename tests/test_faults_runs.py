"""Runs survive faults: an overflowing update, a corrupt newest checkpoint, SIGTERM/SIGINT, a full
disk while saving, and the metrics of steps run again after a resume (toy task, real loop)."""
import errno
import json
import logging
import os
import signal
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import training_toy as toy
from training_driver import start, wait
from bbu_jax.training import checkpointing, loop, metrics_logging
from bbu_jax.training import step as step_lib

LRS = toy.LRS


@pytest.fixture(scope="module")
def toy_task():
    return toy.train_setup(LRS)


def _data():
    return iter(grain.MapDataset.range(100).map(lambda i: toy.make_batch(int(i), rows=8)).to_iter_dataset())


def _loop(make, fn, mesh, workdir, *, total_steps, checkpoint_every, max_to_keep=2, on_step=None):
    """loop.train_loop on the toy task with async checkpoints in workdir/ckpt; (result, checkpointer)."""
    data = _data()
    ckpt = checkpointing.Checkpointer(workdir / "ckpt", max_to_keep=max_to_keep, async_save=True)
    logger = metrics_logging.RunLogger(workdir, is_main=True, total_steps=total_steps)
    spec = loop.LoopSpec(total_steps=total_steps, accum=1, log_every=1, eval_every=0,
                         checkpoint_every=checkpoint_every, max_consecutive_nonfinite=2, peak_flops=1.0)
    try:
        result = loop.train_loop(
            spec, state=make(), train_step=fn, batches=data,
            batch_sharding=step_lib.accumulated_batch_sharding(mesh), data_iterator=data, checkpointer=ckpt,
            logger=logger, start_step=0, eval_fn=None, lr_fns={}, step_flops=None, token_count=lambda h: 1,
            meta={}, on_step=on_step)
    finally:
        logger.close()
    return result, ckpt


def _leaves(tree):
    return jax.tree_util.tree_leaves(jax.device_get(tree))


def _abstract(state):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ----------------------------------------------------------------------------- non-finite update
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the lr constant itself is inf in float32
def test_overflowing_update_is_skipped_and_never_saved(tmp_path, caplog):
    """llm_lr=1e39: loss and gradient are finite, the new weights are not. The step keeps the old
    state, the run stops as for NaN losses, and no checkpoint holds an inf."""
    make, fn, mesh = toy.train_setup(dict(LRS, llm=1e39))
    initial = _leaves(make()["params"])
    state, out = fn(make(), toy.make_batch(0, accum=1))
    assert bool(out["grads_ok"]) and not bool(out["ok"])
    for a, b in zip(initial, _leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in _leaves(state["opt_state"]))

    with caplog.at_level(logging.WARNING):
        result, ckpt = _loop(make, fn, mesh, tmp_path, total_steps=4, checkpoint_every=1)
    assert result.stop_reason == "nonfinite" and result.step == 2
    assert ckpt.all_steps() == [] and result.last_checkpoint is None
    assert any("learning rate too high" in r.getMessage() for r in caplog.records)
    ckpt.close()


# ----------------------------------------------------------------------------- corrupt checkpoint
def test_corrupt_newest_checkpoint_is_moved_aside_and_its_step_saved_again(tmp_path, toy_task, caplog):
    make, _, _ = toy_task
    state = make()
    target = _abstract(state)
    ck = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=3, async_save=False)
    ck.save(1, state)
    ck.save(2, state)
    for root, _, files in os.walk(ck.path(2) / "state"):  # truncate every array file of step 2
        for f in files:
            open(os.path.join(root, f), "wb").close()
    with caplog.at_level(logging.WARNING):
        step, _, _ = ck.restore_latest(target)
    assert step == 1
    [warning] = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warning.startswith(f"checkpoint {ck.path(2)} is unreadable (")
    assert warning.endswith("); moved to 2.corrupt, trying the previous one"), warning
    assert (tmp_path / "ckpt" / "2.corrupt" / "state").is_dir()  # kept for the user
    ck.save(2, state)  # the resumed run reaches step 2 again
    assert ck.restore_latest(target)[0] == 2 and ck.all_steps() == [1, 2]
    ck.close()


def test_checkpoint_of_another_layout_is_refused_and_left_in_place(tmp_path, toy_task):
    """A readable checkpoint written with other settings (here: the vision group frozen, so it has
    no Adam state) is not corrupt: one error names the difference, no step is moved aside."""
    make, _, _ = toy_task
    make_frozen, _, _ = toy.train_setup(dict(LRS, vision=0.0))
    ck = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=3, async_save=False)
    ck.save(1, make_frozen())
    with pytest.raises(checkpointing.CheckpointMismatchError) as e:
        ck.restore_latest(_abstract(make()))
    message = str(e.value)
    print(message)
    assert "\n" not in message and message.startswith(f"{ck.path(1)} holds another train state than this run")
    assert "missing from it: " in message and "vision" in message and "only in it" not in message
    assert ck.all_steps() == [1] and not list((tmp_path / "ckpt").glob("*.corrupt*"))
    fresh = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=3, async_save=False)  # a new run's
    with pytest.raises(checkpointing.CheckpointMismatchError):
        fresh.restore_latest(_abstract(make()))
    fresh.close()
    assert ck.restore_latest(_abstract(make_frozen()))[0] == 1  # the settings that wrote it resume
    ck.close()


def test_checkpoint_with_kernels_of_the_old_layout_is_refused_by_name(tmp_path):
    """A step written when Linear weights were (in, out) "kernel" arrays: resuming and reading its
    params (inference, export) both refuse it with one line that says so, before any array is read:
    restored by shape, a square one would have come back transposed."""
    old = {"params": {"model": {"q_proj": {"kernel": np.arange(9, dtype=np.float32).reshape(3, 3)}}}}
    ck = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=3, async_save=False)
    ck.save(1, old)
    wanted = {"params": {"model": {"q_proj": {"weight": jax.ShapeDtypeStruct(
        (3, 3), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}}}}
    for read in (lambda: ck.restore_latest(wanted),
                 lambda: checkpointing.restore_params(ck.path(1), wanted["params"])):
        with pytest.raises(checkpointing.CheckpointMismatchError) as e:
            read()
        message = str(e.value)
        print(message)
        assert "\n" not in message and message.startswith(str(ck.path(1)))
        assert "(in, out) 'kernel' arrays" in message and "params/model/q_proj/weight" in message
    assert ck.all_steps() == [1] and not list((tmp_path / "ckpt").glob("*.corrupt*"))
    ck.close()


# ----------------------------------------------------------------------------- signals
def test_sigint_saves_the_current_step_and_stops(tmp_path, toy_task):
    """Ctrl-C after step 2: step 3 (its batch was already read) is finished, saved with the data
    position, and the loop returns "signal"; the handler is gone afterwards."""
    make, fn, mesh = toy_task
    before = signal.getsignal(signal.SIGINT)

    def on_step(step, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result, ckpt = _loop(make, fn, mesh, tmp_path, total_steps=10, checkpoint_every=5, on_step=on_step)
    assert result.stop_reason == "signal" and result.step == 3 and result.last_checkpoint == 3
    assert signal.getsignal(signal.SIGINT) is before
    data = _data()
    saved, _ = ckpt.restore(3, _abstract(result.state), data_iterator=data)
    for a, b in zip(_leaves(saved), _leaves(result.state)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(next(data)["input_ids"], toy.make_batch(3, rows=8)["input_ids"])
    ckpt.close()


def test_second_sigint_interrupts_at_once(tmp_path, toy_task):
    make, fn, mesh = toy_task
    # The second SIGINT does what the handler before the loop's did: Python's own raises
    # KeyboardInterrupt. Set it here: a test run started as a background job of a non-interactive
    # shell inherits SIGINT ignored, which Python keeps. Raised in this thread, each signal is
    # handled before the next (os.kill's may land on another thread, and two that arrive before
    # Python runs the handler count as one).
    worker_handler = signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_step(step, state):
        if step == 1:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    try:
        with pytest.raises(KeyboardInterrupt):
            _loop(make, fn, mesh, tmp_path, total_steps=10, checkpoint_every=5, on_step=on_step)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, worker_handler)


@pytest.fixture(scope="module")
def sigterm_runs(tmp_path_factory):
    """A straight 6-step run of the driver, and one sent SIGTERM while paused after step 2, then
    restarted. Checkpoints every 5 steps: only the signal saves step 3."""
    root = tmp_path_factory.mktemp("sigterm")
    args = ("--steps", 6, "--checkpoint_every", 5, "--local_devices", 1, "--mesh", "1,1,1")
    straight = start(root / "straight", root / "straight.log", *args)
    stopped = start(root / "stopped", root / "stopped.log", *args, "--pause_at", 2)
    deadline = time.time() + 400
    while not (root / "stopped" / "paused").exists():
        assert stopped.poll() is None and time.time() < deadline, wait(stopped)
        time.sleep(0.2)
    stopped.send_signal(signal.SIGTERM)
    rc, log = wait(stopped)
    assert rc == 3 and "signal step=3 start=0" in log, log
    out = {"stopped_steps": sorted(os.listdir(root / "stopped" / "checkpoints")),
           "stopped_rows": _rows(root / "stopped")}
    resumed = start(root / "stopped", root / "resumed.log", *args)
    for proc in (straight, resumed):
        rc, log = wait(proc)
        assert rc == 0 and "done step=6" in log, log
    assert "start=3" in log
    for name in ("straight", "stopped"):
        out[name] = dict(np.load(root / name / "final_params.npz")), _rows(root / name)
    return out


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_saves_then_resume_matches_straight_run_bit_for_bit(sigterm_runs):
    assert sigterm_runs["stopped_steps"] == ["3"]
    assert [r["step"] for r in sigterm_runs["stopped_rows"]] == [1, 2, 3]
    (straight, straight_rows), (resumed, resumed_rows) = sigterm_runs["straight"], sigterm_runs["stopped"]
    assert straight.keys() == resumed.keys() and len(straight) > 5
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([r["train/loss"] for r in resumed_rows], [r["train/loss"] for r in straight_rows])


# ----------------------------------------------------------------------------- disk full
def test_disk_full_while_saving_stops_with_one_line_and_keeps_the_previous_checkpoint(
        tmp_path, toy_task, monkeypatch, caplog):
    make, fn, mesh = toy_task
    _fail_writes_from_step(monkeypatch, 3)
    with caplog.at_level(logging.WARNING):
        result, ckpt = _loop(make, fn, mesh, tmp_path, total_steps=6, checkpoint_every=1, max_to_keep=1)
    ckpt.close()
    assert result.stop_reason == "write_failed" and result.last_checkpoint == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "No space left on device" in message and str(tmp_path / "ckpt" / "3") in message, message
    assert message.endswith(f"the newest complete checkpoint is {tmp_path / 'ckpt' / '2'}"), message
    fresh = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=1, async_save=False)
    assert fresh.restore_latest(_abstract(result.state))[0] == 2
    fresh.close()


def _fail_writes_from_step(monkeypatch, step):
    """The disk fills up from checkpoint `step` on: orbax's write of the JSON item (in the background
    commit, like the array writes) fails with ENOSPC."""
    save_fn = ocp.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if int(directory.parent.name.split(".")[0]) >= step:  # <ckpt>/<step>.orbax-checkpoint-tmp*/meta
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
        return await save_fn(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)


# ----------------------------------------------------------------------------- metrics after a resume
def test_resumed_logger_drops_rows_of_the_steps_run_again(tmp_path, caplog):
    rows = [{"step": s, "train/loss": float(s)} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "tr')
    with caplog.at_level(logging.INFO):
        logger = metrics_logging.RunLogger(tmp_path, is_main=True, total_steps=8, initial_step=3)
    logger.log_train(4, {"tokens_per_s": 1.0})
    logger.close()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]
    assert _rows(tmp_path)[2] == rows[2]
    assert any("dropped 2 rows past step 3" in r.getMessage() and "1 unreadable" in r.getMessage()
               for r in caplog.records)
