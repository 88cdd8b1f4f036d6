"""The jitted train step: sharding invariance, exact accumulation, the NaN guard."""
import json

import grain
import jax
import numpy as np
import pytest

import training_toy as toy
from bbu_jax.training import checkpointing, loop, metrics_logging
from bbu_jax.training import step as step_lib

LRS = toy.LRS


@pytest.fixture(scope="module")
def single():
    return toy.train_setup(LRS)


def _run(state, fn, batches):
    losses = []
    for b in batches:
        state, out = fn(state, b)
        losses.append(float(out["metrics"]["loss"][0]))
    return state, losses


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def test_sharded_step_matches_one_device(single):
    batches = [toy.make_batch(s, accum=2) for s in range(3)]
    make1, fn1, _ = single
    s1, l1 = _run(make1(), fn1, batches)
    make8, fn8, _ = toy.train_setup(LRS, (2, 2, 2))
    state8 = make8()
    assert len(state8["params"]["model"]["layer"]["kernel"].sharding.device_set) == 8
    s8, l8 = _run(state8, fn8, batches)
    print("losses 1 device", l1, "8 devices", l8)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(_host(s1["params"])), jax.tree_util.tree_leaves(_host(s8["params"]))):
        rel = np.abs(a - b).max() / (np.abs(a).max() + 1e-12)
        assert rel < 1e-5, rel



def _train_loop(make, mesh, *, train_step, batches, data_iterator, ckpt, logger, total_steps, checkpoint_every,
                eval_every=0, eval_fn=None):
    """loop.train_loop on the toy task: one micro-batch, a log line every step, no FLOP count."""
    spec = loop.LoopSpec(total_steps=total_steps, accum=1, log_every=1, eval_every=eval_every,
                         checkpoint_every=checkpoint_every, max_consecutive_nonfinite=2, peak_flops=1.0)
    return loop.train_loop(
        spec, state=make(), train_step=train_step, batches=batches,
        batch_sharding=step_lib.accumulated_batch_sharding(mesh), data_iterator=data_iterator, checkpointer=ckpt,
        logger=logger, start_step=0, eval_fn=eval_fn, lr_fns={}, step_flops=None, token_count=lambda h: 1,
        meta={})

def test_accumulation_equals_one_big_batch(single):
    """2 micro-batches of 4 rows == 1 batch of 8 rows: token-weighted, not mean of means."""
    big = toy.make_batch(7, rows=8, accum=1)
    split = {k: v.reshape(2, 4, *v.shape[2:]) for k, v in big.items()}
    # Uneven supervision between the halves makes a mean of per-micro-batch means differ.
    split["target_kind"][0, :, 3:] = 0
    big["target_kind"] = split["target_kind"].reshape(1, 8, -1)
    make, fn, _ = single
    sa, la = _run(make(), fn, [big])
    sb, lb = _run(make(), fn, [split])
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(_host(sa["params"])), jax.tree_util.tree_leaves(_host(sb["params"]))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_nonfinite_loss_skips_update(single):
    make, fn, _ = single
    state, _ = fn(make(), toy.make_batch(0, accum=1))
    before = _host(state)
    bad = toy.make_batch(1, accum=1)
    bad["feats"][0, 0, 0] = np.nan
    state, out = fn(state, bad)
    assert not bool(out["ok"]) and int(out["nonfinite_streak"]) == 1
    after = _host(state)
    for a, b in zip(jax.tree_util.tree_leaves(before["params"]), jax.tree_util.tree_leaves(after["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(before["opt_state"]), jax.tree_util.tree_leaves(after["opt_state"])):
        np.testing.assert_array_equal(a, b)
    assert int(after["skipped"]) == 1 and int(after["step"]) == 2
    metrics = jax.device_get(out["metrics"])
    assert all(np.isfinite(s) for s, _ in metrics.values())  # nothing poisons the log averages
    assert metrics["skipped_steps"][0] == 1.0
    state, out = fn(state, bad)
    assert int(out["nonfinite_streak"]) == 2
    state, out = fn(state, toy.make_batch(2, accum=1))
    assert bool(out["ok"]) and int(out["nonfinite_streak"]) == 0


def test_loop_stops_after_k_nonfinite_steps_keeping_last_good_checkpoint(single, tmp_path):
    make, fn, mesh = single

    def batch(i):  # steps 3 and 4 see NaN inputs
        b = toy.make_batch(int(i), rows=8)
        if i >= 2:
            b["feats"][:] = np.nan
        return b

    data = iter(grain.MapDataset.range(100).map(batch).to_iter_dataset())
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5, async_save=True)
    logger = metrics_logging.RunLogger(tmp_path, is_main=True, total_steps=10)
    result = _train_loop(make, mesh, train_step=fn, batches=data, data_iterator=data, ckpt=ckpt, logger=logger,
                         total_steps=10, checkpoint_every=1)
    logger.close()
    assert result.stop_reason == "nonfinite" and result.step == 4
    assert ckpt.all_steps() == [1, 2] and result.last_checkpoint == 2
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      result.state)
    saved, _ = ckpt.restore(2, abstract)
    for a, b in zip(jax.tree_util.tree_leaves(_host(saved["params"])), jax.tree_util.tree_leaves(_host(result.state["params"]))):
        np.testing.assert_array_equal(a, b)  # the skipped steps changed nothing
    ckpt.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # step 4 stopped the run before logging
    assert lines[2]["train/skipped_steps"] == 1.0 and "train/lm_loss" not in lines[2]



def test_loop_fetches_next_batch_while_the_step_runs(single, tmp_path, monkeypatch):
    """The next batch is read (and sent) after a step is dispatched and before its results are
    waited for, so host work overlaps the device; never before a possible checkpoint, whose saved
    iterator position must be that of the saved state."""
    make, fn, mesh = single
    events = []
    source = iter(grain.MapDataset.range(100).map(lambda i: toy.make_batch(int(i), rows=8)).to_iter_dataset())

    class Batches:
        def __iter__(self):
            return self

        def __next__(self):
            events.append("fetch")
            return next(source)

    def step(state, batch):
        events.append("step")
        return fn(state, batch)

    class Recorder(checkpointing.Checkpointer):
        def save(self, step, state, **kw):
            events.append("save")
            return super().save(step, state, **kw)

    get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: (events.append("wait"), get(x))[1])
    ckpt = Recorder(tmp_path / "ckpt", max_to_keep=2, async_save=False)
    logger = metrics_logging.RunLogger(tmp_path, is_main=True, total_steps=5)
    result = _train_loop(make, mesh, train_step=step, batches=Batches(), data_iterator=source, ckpt=ckpt,
                         logger=logger, total_steps=5, checkpoint_every=2)
    logger.close()
    ckpt.close()
    assert result.step == 5 and result.stop_reason == "done"
    # steps 1, 3 read ahead before waiting; 2, 4 (checkpoint_every) and 5 (the last) are saved first
    two_steps = ["fetch", "step", "fetch", "wait", "step", "wait", "save"]
    assert events == two_steps * 2 + ["fetch", "step", "wait", "save"]


def test_loop_logs_eval_scalars_and_image_grids(single, tmp_path):
    make, fn, mesh = single
    data = iter(grain.MapDataset.range(100).map(lambda i: toy.make_batch(int(i), rows=8)).to_iter_dataset())
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=1, async_save=False)
    logger = metrics_logging.RunLogger(tmp_path, is_main=True, total_steps=2)
    seen = []

    def eval_fn(state, step):
        seen.append(step)
        return {"mAP50": 0.5, "boxes": np.zeros((2, 4, 4, 3), np.uint8)}

    result = _train_loop(make, mesh, train_step=fn, batches=data, data_iterator=data, ckpt=ckpt, logger=logger,
                         total_steps=2, checkpoint_every=5, eval_every=1, eval_fn=eval_fn)
    logger.close()
    ckpt.close()
    assert seen == [1, 2] and result.last_eval_metrics == {"val/mAP50": 0.5}
    assert result.last_checkpoint == 2  # the last step is always saved
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in lines if "val/mAP50" in x] == [{"step": 1, "val/mAP50": 0.5}, {"step": 2, "val/mAP50": 0.5}]


def _frozen_setup(lrs, frozen, grad_clip_norm=1.0):
    """The toy step with ``lrs`` that leaves the loss undifferentiated w.r.t. the ``frozen`` groups."""
    from bbu_jax.training import optimizer as opt
    from bbu_jax.training import train_state

    _, params, _, loss_fn = toy.make_task(seed=0)
    tx, _ = opt.make_optimizer(params, toy.optim_spec(lrs, grad_clip_norm=grad_clip_norm), total_steps=10)
    mesh = toy.make_mesh(1, 1, 1)
    shardings = train_state.state_shardings(train_state.abstract_state(params, tx, 0),
                                            toy.param_shardings(params, mesh), mesh)
    fn = step_lib.jit_train_step(loss_fn=loss_fn, count_fn=toy.count_fn, tx=tx, labels=opt.group_labels(params),
                                 state_shardings=shardings, mesh=mesh, frozen=frozenset(frozen))
    return lambda: train_state.create_state(params, tx, 0, shardings), fn


FROZEN_VISION = {**LRS, "vision": 0.0}


def test_frozen_group_gets_no_gradient_and_same_updates():
    """vision at lr 0: differentiating only the trainable groups gives the loss, params and
    optimizer state of differentiating everything (the state's layout included, so checkpoints of
    either restore into the other); the frozen params stay as loaded and the frozen group has no
    gn/ metric. Without clipping the updates are the same; the global norm (logged, clipped to)
    no longer counts the frozen group's gradient, as it never counted a frozen head's."""
    from bbu_jax.training import optimizer as opt

    assert opt.frozen_groups(toy.optim_spec(FROZEN_VISION)) == {"vision"}
    batches = [toy.make_batch(s, accum=2) for s in range(2)]
    make_all, fn_all = _frozen_setup(FROZEN_VISION, (), grad_clip_norm=0.0)
    make_live, fn_live = _frozen_setup(FROZEN_VISION, ("vision",), grad_clip_norm=0.0)
    start = _host(make_all())
    s_all, s_live = make_all(), make_live()
    for b in batches:
        s_all, out_all = fn_all(s_all, b)
        s_live, out_live = fn_live(s_live, b)
        m_all, m_live = jax.device_get(out_all["metrics"]), jax.device_get(out_live["metrics"])
        assert set(m_all) - set(m_live) == {"gn/vision"} and "gn/merger" in m_live
        for k in set(m_live) - {"grad_norm"}:
            np.testing.assert_allclose(m_live[k][0], m_all[k][0], rtol=1e-6, err_msg=k)
        np.testing.assert_allclose(m_live["grad_norm"][0] ** 2,
                                   m_all["grad_norm"][0] ** 2 - m_all["gn/vision"][0] ** 2, rtol=1e-5)
    assert jax.tree_util.tree_structure(s_all) == jax.tree_util.tree_structure(s_live)
    for a, b in zip(jax.tree_util.tree_leaves(_host(s_all)), jax.tree_util.tree_leaves(_host(s_live))):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)
    live = _host(s_live["params"])
    np.testing.assert_array_equal(live["model"]["visual"]["patch_embed"]["kernel"],
                                  start["params"]["model"]["visual"]["patch_embed"]["kernel"])
    assert not np.array_equal(live["model"]["layer"]["kernel"], start["params"]["model"]["layer"]["kernel"])


def test_frozen_group_backward_is_not_compiled():
    """The step's compiled FLOPs with vision frozen are below those with vision trainable by at
    least vision's weight-gradient products (2 x rows x its kernel size); differentiating
    everything at the same lrs (the frozen group's gradient computed, then dropped) keeps them."""
    rows = 256
    batch = toy.make_batch(0, rows=rows, accum=1)

    def flops(lrs, frozen):
        make, fn = _frozen_setup(lrs, frozen)
        state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), make())
        cost = fn.lower(state, batch).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    trainable, frozen, computed = flops(LRS, ()), flops(FROZEN_VISION, ("vision",)), flops(FROZEN_VISION, ())
    weight_grads = 2 * rows * toy.FEAT * toy.DIM
    print(f"step FLOPs: vision trainable {trainable:.0f}, frozen {frozen:.0f}, lr 0 but differentiated "
          f"{computed:.0f}; vision weight-gradient products {weight_grads}")
    assert frozen <= trainable - weight_grads
    assert frozen <= computed - weight_grads
