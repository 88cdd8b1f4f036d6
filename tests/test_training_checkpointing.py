"""Checkpoints: sharded round trip with the data position, fallback past unreadable ones."""
import logging
import os

import grain
import jax
import numpy as np
import pytest

import training_toy as toy
from bbu_jax.training import checkpointing, optimizer as opt, train_state


@pytest.fixture(scope="module")
def sharded_state():
    _, params, _, _ = toy.make_task(seed=0)
    tx, _ = opt.make_optimizer(params, toy.optim_spec(dict(vision=0.0, merger=1e-3, llm=1e-3, detection=1e-3,
                                                          adapter=1e-3), head_freeze_steps=2), total_steps=10)
    mesh = toy.make_mesh(2, 2, 2)
    abstract = train_state.abstract_state(params, tx, 0)
    shardings = train_state.state_shardings(abstract, toy.param_shardings(params, mesh), mesh)
    state = train_state.create_state(params, tx, 0, shardings)
    return state, train_state.with_shardings(abstract, shardings)


def _data():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)),
                                                    jax.tree_util.tree_leaves(jax.device_get(b))))


def _save_two(tmp_path, state):
    ck = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=2, async_save=True)
    data = _data()
    next(data), next(data)
    ck.save(1, state, data_iterator=data, meta={"note": "one"})
    next(data)  # the loop moves on while the first save is still being written
    later = dict(state, step=state["step"] + 5)
    ck.save(2, later, data_iterator=data, meta={"note": "two"})
    next(data)
    ck.save(3, later, data_iterator=data)
    ck.wait()
    return ck, later


def test_round_trip_keeps_shardings_data_position_and_keeps_n(tmp_path, sharded_state):
    state, target = sharded_state
    ck, later = _save_two(tmp_path, state)
    assert ck.all_steps() == [2, 3]  # keep 2
    data = _data()
    restored, meta = ck.restore(2, target, data_iterator=data)
    assert meta["note"] == "two" and meta["step"] == 2
    assert next(data) == 3  # saved after 3 elements were drawn
    assert _equal(restored, later)
    kernel = restored["params"]["model"]["layer"]["kernel"]
    assert kernel.sharding.spec == target["params"]["model"]["layer"]["kernel"].sharding.spec
    assert len(kernel.sharding.device_set) == 8
    ck.close()


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_unreadable_latest_falls_back_with_warning(tmp_path, sharded_state, caplog, keep):
    """Files cut to nothing or to half (read memory-mapped: a clean error, not a SIGBUS)."""
    state, target = sharded_state
    ck, later = _save_two(tmp_path, state)
    for root, _, files in os.walk(ck.path(3) / "state"):  # truncate every array file of step 3
        for f in files:
            os.truncate(os.path.join(root, f), int(os.path.getsize(os.path.join(root, f)) * keep))
    os.makedirs(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-123")  # a save killed midway
    data = _data()
    with caplog.at_level(logging.WARNING):
        step, restored, _ = ck.restore_latest(target, data_iterator=data)
    assert step == 2
    assert any("3 is unreadable" in r.getMessage() for r in caplog.records)
    assert next(data) == 3 and _equal(restored, later)
    ck.close()


def test_no_checkpoint_gives_none(tmp_path, sharded_state):
    ck = checkpointing.Checkpointer(tmp_path / "empty", max_to_keep=1, async_save=False)
    assert ck.restore_latest(sharded_state[1]) is None
    ck.close()


def test_arrays_are_stored_uncompressed_and_read_mapped(tmp_path, sharded_state):
    """A state with 1 MiB of zeros takes 1 MiB on disk: no zstd pass on save or restore; and
    tensorstore reads the files memory-mapped."""
    import jax.numpy as jnp
    from orbax.checkpoint._src.serialization import tensorstore_utils

    assert tensorstore_utils.get_ts_context(use_ocdbt=True)["file_io_mode"].to_json() == {"mode": "memmap"}
    ck = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=1, async_save=False)
    ck.save(1, {"zeros": jnp.zeros(2**18, jnp.float32)})
    on_disk = sum(f.stat().st_size for f in (ck.path(1) / "state").rglob("*") if f.is_file())
    assert on_disk >= 2**20, on_disk
    ck.close()
