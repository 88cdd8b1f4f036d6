"""The product's train step (model + detection head, remat, bf16) sends what its parallelism layout
should between devices, compiled for 8 fake CPU devices: data parallel all-reduces the gradient
once; FSDP gathers each weight for the forward and the (rematerialized) backward and reduces the
gradient once. Activations split by model width instead of rows would show up as many times more.
The same step run on 8 devices equals one device."""
import dataclasses
import pathlib

import numpy as np
import pytest

from bbu_jax.foundation import sharding
from bbu_jax.losses import LossSpec, LossWeights, MatchCost
from bbu_jax.models.detection_head import HeadSpec
from bbu_jax.perf import collectives
from bbu_jax.training import task
from bbu_jax.workflows.config import build_specs, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

HEAD = HeadSpec(width=32, num_queries=8, num_layers=1, num_heads=4, mlp_dim=64, caption_layers=1,
                max_caption_len=8)
DIMS = dict(B=8, L=128, P=64, S=2, M=4, C=8, NV=16, NT=16)


def _model(hf_dir, compute_dtype: str, attention_impl: str) -> task.ModelSpec:
    return task.ModelSpec(hf_dir=str(hf_dir), param_dtype="float32", compute_dtype=compute_dtype, remat_policy="full",
                          scan_layers=True, attention_impl=attention_impl)


def _step_collectives(hf_dir, mesh_shape):
    """The demo run's train step (its optimizer and loss) with the tiny model in bf16 under full remat."""
    mesh = sharding.make_mesh(*mesh_shape)
    demo = build_specs(load_config(ROOT / "configs" / "demo.py"))
    specs = dataclasses.replace(demo, model=_model(hf_dir, "bfloat16", "xla"), head=HEAD,
                                loss=dataclasses.replace(demo.loss, lm_chunk=256))
    modules = task.build_modules(specs.model, specs.head, seed=0, mesh=mesh)
    sent, param_bytes = collectives.train_step_traffic(specs, modules, mesh, DIMS,
                                                       caption_vocab=np.arange(16, dtype=np.int32))
    # data parallel reduces the tied table's two gradients (LM head, token lookup) before adding them
    table = modules["model"].embed_table()
    ratios = {k: v / param_bytes for k, v in sent.items()}
    print(f"mesh {mesh_shape}: x param bytes ({param_bytes / 2**20:.2f} MiB):",
          {k: round(v, 2) for k, v in ratios.items()})
    return ratios, 1 + table.size * table.dtype.itemsize / param_bytes


@pytest.mark.parametrize("mesh_shape,bounds", [
    ((8, 1, 1), {"all-reduce": 1.05, "all-gather": 0.05}),  # gradient once, weights replicated
    # gradient once; weights gathered in bf16 for the forward and the rematerialized forward (2 x 0.5 P),
    # the backward's products reuse the second (an f32 gather there made 1.22 P)
    ((1, 8, 1), {"all-reduce": 1.05, "all-gather": 1.05}),
])
def test_step_collective_volume(tiny_hf_dir, mesh_shape, bounds):
    ratios, with_table = _step_collectives(tiny_hf_dir, mesh_shape)
    reduced = ratios["all-reduce"] + ratios["reduce-scatter"]
    # (a little under 1 P: the detection head's bf16 weight gradients are reduced in bf16)
    assert 0.9 < reduced <= bounds["all-reduce"] * with_table, ratios
    assert ratios["all-gather"] <= bounds["all-gather"], ratios
    assert ratios["all-to-all"] + ratios["collective-permute"] < 0.1, ratios


def test_collective_bytes_follows_loops():
    """A collective in a loop counts once per trip (from XLA's annotation or the loop's bound);
    shapes of every dtype are sized."""
    hlo = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ar = f32[8,4]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %w = (s32[], f32[8,4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %w2 = (s32[], f32[8,4]) while(%t), condition=%cond, body=%body
  %ag = bf16[16,4]{1,0} all-gather(%y), dimensions={0}
}
"""
    sent = collectives.collective_bytes(hlo)
    assert sent["all-reduce"] == (5 + 3) * 8 * 4 * 4
    assert sent["all-gather"] == 16 * 4 * 2
    assert sent["reduce-scatter"] == 0


def _sharded_step(hf_dir, mesh_shape, attention_impl):
    """One product train step (LM loss only, f32) of the real model on ``mesh_shape``: the loss,
    gradient norm and updated params."""
    import jax

    from bbu_jax.data.batch import FIELDS, expected_shapes
    from bbu_jax.perf.synthetic import packed_batch
    from bbu_jax.training import optimizer, train_state
    from bbu_jax.training import step as step_lib

    mesh = sharding.make_mesh(*mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    modules = task.build_modules(_model(hf_dir, "float32", attention_impl), None, seed=0, mesh=mesh)
    weights = LossWeights(lm=1.0, bbox_l1=0.0, bbox_giou=0.0, objectness=0.0, caption=0.0,
                          match=MatchCost(class_weight=0.0, bbox_weight=0.0, giou_weight=0.0, focal_alpha=0.25,
                                          focal_gamma=2.0))
    graphdefs, params, rest = train_state.split_modules(modules)
    loss_fn = task.make_loss_fn(graphdefs, rest, LossSpec(weights=weights, aux_loss=True, lm_chunk=256,
                                                          matcher="scipy"), caption_vocab=None)
    optim = optimizer.OptimSpec(lrs={g: 1e-3 for g in optimizer.GROUPS}, lr_scaling="none", lr_reference_batch=1,
                                warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, mu_dtype="float32",
                                grad_clip_norm=1.0, grad_accum_steps=1, head_freeze_steps=0)
    tx, _ = optimizer.make_optimizer(params, optim, total_steps=10)
    shardings = train_state.state_shardings(train_state.abstract_state(params, tx, 0),
                                            task.param_shardings(modules, mesh), mesh)
    fn = step_lib.jit_train_step(loss_fn=loss_fn, count_fn=task.count_fn, tx=tx,
                                 labels=optimizer.group_labels(params), state_shardings=shardings, mesh=mesh)
    batch, _, _ = packed_batch(modules["model"].config, rows=8, tokens=128, segments=2, image_side=56)
    dims = dict(B=8, L=128, P=batch["patches"].shape[1], S=2, M=1, C=1, NV=1, NT=1)
    for name, shape in expected_shapes(dims).items():
        batch.setdefault(name, np.zeros(shape, FIELDS[name][1]))
    state, out = fn(train_state.create_state(params, tx, 0, shardings), {k: v[None] for k, v in batch.items()})
    return jax.device_get((out["metrics"]["loss"][0], out["metrics"]["grad_norm"][0], state["params"]))


@pytest.fixture(scope="module")
def one_device_step(tiny_hf_dir):
    return _sharded_step(tiny_hf_dir, (1, 1, 1), "xla")


@pytest.mark.parametrize("mesh_shape,attention_impl", [((1, 8, 1), "xla"), ((2, 2, 2), "pallas")])
def test_sharded_step_equals_one_device(tiny_hf_dir, one_device_step, mesh_shape, attention_impl):
    """The real model's train step (constraints active under the step's mesh) on 8 devices gives
    the loss, gradient norm and updated params of one device: FSDP with the "xla" attention, and
    data x FSDP x tensor with the "pallas" flash kernel (interpreted here, per shard via shard_map)."""
    import jax

    loss1, norm1, params1 = one_device_step
    loss8, norm8, params8 = _sharded_step(tiny_hf_dir, mesh_shape, attention_impl)
    print(f"{mesh_shape} {attention_impl}: loss {loss1:.6f} vs {loss8:.6f}, grad norm {norm1:.6f} vs {norm8:.6f}")
    assert loss8 == pytest.approx(loss1, rel=1e-5) and norm8 == pytest.approx(norm1, rel=1e-4)
    # AdamW's first step moves each weight by about lr * g / (|g| + eps): where |g| is near eps the
    # summation order shows, so params are compared to a tenth of the lr (a wrong gradient moves 2 lr)
    for a, b in zip(jax.tree_util.tree_leaves(params1), jax.tree_util.tree_leaves(params8)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
