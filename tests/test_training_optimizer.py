"""Parameter groups, frozen groups, schedules and the lr scaling rule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import training_toy as toy
from bbu_jax.training import optimizer as opt
from bbu_jax.training import train_state

LRS = dict(vision=0.0, merger=2e-3, llm=1e-3, detection=4e-3, adapter=8e-3)
HP = dict(warmup_steps=4, min_lr_ratio=0.1, weight_decay=0.0, eps=1e-12, grad_clip_norm=0.0)
TOTAL_STEPS = 20


@pytest.fixture(scope="module")
def task():
    return toy.make_task(seed=0)


def _stepper(loss_fn, tx):
    """One jitted optimizer step on toy batch `seed`: (params, state, seed) -> (params, state, grads)."""
    @jax.jit
    def run(params, state, batch):
        counts = {k: jnp.maximum(v, 1).astype(jnp.float32) for k, v in toy.count_fn(batch).items()}
        grads = jax.grad(lambda p: loss_fn(p, batch, counts, None)[0])(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    return lambda params, state, seed: run(params, state, toy.make_batch(seed))


def test_every_param_in_exactly_one_group(task):
    _, params, _, _ = task
    labels = opt.group_labels(params)
    flat = dict((opt.path_str(k), v) for k, v in jax.tree_util.tree_leaves_with_path(labels))
    assert len(flat) == len(jax.tree_util.tree_leaves(params))
    assert set(flat.values()) == set(opt.GROUPS)
    assert flat["model/visual/merger/mlp/kernel"] == "merger"
    assert flat["model/visual/patch_embed/kernel"] == "vision"
    assert flat["model/embed_tokens/embedding"] == "llm"
    assert flat["head/vision_adapter/kernel"] == "adapter"
    assert flat["head/box/kernel"] == "detection"
    with pytest.raises(ValueError, match="matches no rule"):
        opt.group_labels({"stray": {"kernel": jnp.zeros(2)}})


def test_no_weight_decay_on_norms_and_biases(task):
    _, params, _, _ = task
    mask = {opt.path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(opt.decay_mask(params))}
    assert not mask["model/norm/scale"] and not mask["model/visual/merger/ln_q/scale"]
    assert not mask["model/layer/bias"] and not mask["head/box/bias"]
    assert mask["model/layer/kernel"] and mask["model/embed_tokens/embedding"]


def test_frozen_group_does_not_move_and_holds_no_state(task):
    _, params, _, loss_fn = task
    tx, _ = opt.make_optimizer(params, toy.optim_spec(LRS, **HP), total_steps=TOTAL_STEPS)
    state = tx.init(params)
    # No optimizer array mirrors a vision parameter.
    vision_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(params["model"]["visual"]["patch_embed"])}
    vision_state = state[-1].inner_states["vision"]
    assert jax.tree_util.tree_leaves(vision_state) == []
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
    n_trained = sum(x.size for k, x in jax.tree_util.tree_leaves_with_path(params)
                    if opt.group_of(opt.path_str(k)) != "vision")
    # Adam mu and nu of the trained params + the update count of each of the 4 live groups
    assert n_state == 2 * n_trained + 4
    assert vision_shapes  # sanity: the group exists
    new, state, grads = _stepper(loss_fn, tx)(params, state, 1)
    for a, b, g in zip(jax.tree_util.tree_leaves(params["model"]["visual"]["patch_embed"]),
                       jax.tree_util.tree_leaves(new["model"]["visual"]["patch_embed"]),
                       jax.tree_util.tree_leaves(grads["model"]["visual"]["patch_embed"])):
        assert float(jnp.abs(g).max()) > 0  # it had gradients, and still did not move
        np.testing.assert_array_equal(a, b)


def test_group_lrs_follow_schedule_and_scaling(task):
    """Adam's first update is lr * sign(grad) elementwise: read each group's lr off the params."""
    _, params, _, loss_fn = task
    scale = opt.lr_scale("sqrt", 32, 8)
    assert scale == pytest.approx(2.0)
    assert opt.lr_scale("linear", 32, 8) == 4.0 and opt.lr_scale("none", 32, 8) == 1.0
    lrs = {g: v * scale for g, v in LRS.items()}
    tx, schedules = opt.make_optimizer(params, toy.optim_spec(LRS, head_freeze_steps=2, **HP),
                                       total_steps=TOTAL_STEPS, batch_scale=scale)
    state = tx.init(params)
    labels = jax.tree_util.tree_leaves(opt.group_labels(params))
    step_fn = _stepper(loss_fn, tx)
    for step in range(4):
        new, state, grads = step_fn(params, state, step)
        flat = [np.asarray(x) for x in jax.tree_util.tree_leaves((new, params, grads))]
        n = len(labels)
        new_l, par_l, grad_l = flat[:n], flat[n:2 * n], flat[2 * n:]
        for group in opt.GROUPS:
            expected = schedules[group](step)
            frozen_head = group in opt.HEAD_GROUPS and step < 2
            want = 0.0 if (group == "vision" or frozen_head) else lrs[group] * min(
                (step + 1 - (2 if group in opt.HEAD_GROUPS else 0)) / 4, 1.0)
            assert expected == pytest.approx(want, rel=1e-6), (group, step)
            got = max(float(np.abs(a - b)[np.abs(g) > 1e-6].max(initial=0.0))
                      for a, b, g, lab in zip(new_l, par_l, grad_l, labels) if lab == group)
            if step == 0 or (group in opt.HEAD_GROUPS and step == 2):  # a group's first real update
                assert got == pytest.approx(want, rel=1e-3), (group, step)
            elif want == 0.0:
                assert got == 0.0, (group, step)
        params = new


def test_warmup_cosine_shape():
    s = opt.warmup_cosine(1.0, 4, 20, 0.1)
    np.testing.assert_allclose([float(s(i)) for i in (0, 3, 4, 12, 20, 30)],
                               [0.25, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-5)


def test_state_shardings_follow_params(task):
    _, params, _, _ = task
    mesh = toy.make_mesh(2, 2, 2)
    tx, _ = opt.make_optimizer(params, toy.optim_spec(LRS, **HP), total_steps=TOTAL_STEPS)
    shard = toy.param_shardings(params, mesh)
    sh = train_state.state_shardings(train_state.abstract_state(params, tx, 0), shard, mesh)
    mu = sh["opt_state"][-1].inner_states["llm"].inner_state.mu
    assert mu["model"]["layer"]["kernel"].spec == shard["model"]["layer"]["kernel"].spec
    assert sh["step"].spec == jax.sharding.PartitionSpec()


def test_frozen_groups_are_the_lr_zero_ones_not_a_delayed_head():
    """Only groups at lr 0 for the whole run skip their gradient: a head frozen for its first steps
    (head_freeze_steps) needs it once it thaws."""
    assert opt.frozen_groups(toy.optim_spec(LRS)) == {"vision"}
    assert opt.frozen_groups(toy.optim_spec({**LRS, "detection": 0, "adapter": 0.0})) == {
        "vision", "detection", "adapter"}
    assert opt.frozen_groups(toy.optim_spec({g: 1e-3 for g in opt.GROUPS}, head_freeze_steps=5)) == frozenset()


def test_bf16_first_moment_halves_it_and_follows_the_f32_run(task):
    """adam_mu_dtype="bfloat16": mu stored in bf16, nu in f32; five steps land where f32 moments do
    up to bf16 rounding of mu."""
    _, params, _, loss_fn = task
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tx, _ = opt.make_optimizer(params, toy.optim_spec(LRS, mu_dtype=dtype, **HP), total_steps=TOTAL_STEPS)
        state = tx.init(params)
        adam = state[-1].inner_states["llm"].inner_state
        assert {x.dtype for x in jax.tree_util.tree_leaves(adam.mu)} == {jnp.dtype(dtype)}
        assert {x.dtype for x in jax.tree_util.tree_leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
        p, step = params, _stepper(loss_fn, tx)
        for seed in range(5):
            p, state, _ = step(p, state, seed)
        runs[dtype] = p
    moved = [np.abs(np.asarray(b) - np.asarray(a)).max()
             for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(runs["float32"]))]
    diff = [np.abs(np.asarray(b) - np.asarray(a)).max()
            for a, b in zip(jax.tree_util.tree_leaves(runs["float32"]), jax.tree_util.tree_leaves(runs["bfloat16"]))]
    rel = max(diff) / max(moved)
    print(f"bf16 mu vs f32 mu after 5 steps: max |diff| / max |move| = {rel:.2e}")
    assert 0 < rel < 0.05


def test_adamw_is_optax_adamw_and_apply_false_leaves_the_state(task):
    """The hand-written AdamW (optimizer.adamw: the guard decides before the update) computes what
    optax.adamw computes, weight decay masked the same way; apply=False changes nothing and
    returns zero updates, and the following step is the one optax would have taken."""
    _, params, _, loss_fn = task
    sched = opt.warmup_cosine(1e-2, 2, 10, 0.1)
    ours = opt.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    ref = optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, mask=opt.decay_mask)

    @jax.jit
    def step(p, s_ours, s_ref, batch, apply):
        counts = {k: jnp.maximum(v, 1).astype(jnp.float32) for k, v in toy.count_fn(batch).items()}
        grads = jax.grad(lambda q: loss_fn(q, batch, counts, None)[0])(p)
        u_ours, s_ours = ours.update(grads, s_ours, p, apply=apply)
        u_ref, s_ref = ref.update(grads, s_ref, p)
        return u_ours, s_ours, u_ref, s_ref

    s_ours, s_ref, p = ours.init(params), ref.init(params), params
    worst = 0.0
    for seed in range(4):
        skipped = ours.update(jax.tree_util.tree_map(jnp.ones_like, p), s_ours, p, apply=False)
        assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(skipped[0]))
        for a, b in zip(jax.tree_util.tree_leaves(skipped[1]), jax.tree_util.tree_leaves(s_ours)):
            np.testing.assert_array_equal(a, b)
        u_ours, s_ours, u_ref, s_ref = step(p, s_ours, s_ref, toy.make_batch(seed), True)
        for a, b in zip(jax.tree_util.tree_leaves(u_ours), jax.tree_util.tree_leaves(u_ref)):
            worst = max(worst, float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30)))
        p = optax.apply_updates(p, u_ref)
    print(f"optimizer.adamw vs optax.adamw, 4 steps: max relative error {worst:.1e}")
    assert worst < 1e-5
    assert int(s_ours.count) == 4
