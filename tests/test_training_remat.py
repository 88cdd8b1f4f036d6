"""Remat policies: the named ones (models.layers.SAVED_NAMES) keep the matmul outputs they name and
give the gradients of no remat; "auto" takes the least recomputation whose compiled train step
fits the device (training.auto_remat), resolved once by workflows.train.compile_train_step."""
import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bbu_jax.data.batch import FIELDS, MODEL_INPUTS, expected_shapes
from bbu_jax.foundation import sharding
from bbu_jax.models.qwen2_5_vl import from_hf
from bbu_jax.perf.synthetic import packed_batch
from bbu_jax.training import auto_remat, task, train_state
from bbu_jax.training import step as step_lib
from bbu_jax.workflows import train
from bbu_jax.workflows.config import build_specs, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
POLICIES = ("none", "save_matmuls", "save_qkv_attn", "save_qkv_proj", "full")  # least recomputation first
ROWS, TOKENS, SEGMENTS, IMAGE_SIDE = 2, 128, 2, 56


@pytest.fixture(scope="module")
def batch(tiny_hf_dir):
    """Two packed rows of two samples with an image each (vision tower and decoder both run)."""
    b, _, _ = packed_batch(from_hf(tiny_hf_dir).config, rows=ROWS, tokens=TOKENS, segments=SEGMENTS,
                           image_side=IMAGE_SIDE)
    return b


@pytest.fixture(scope="module")
def remat_runs(tiny_hf_dir, batch):
    """policy -> (loss, flat grads, dot products in the lowered value-and-grad)."""
    inputs = {k: jnp.asarray(batch[k]) for k in MODEL_INPUTS}
    out = {}
    for policy in POLICIES:
        graphdef, params, rest = nnx.split(from_hf(tiny_hf_dir, remat=policy), nnx.Param, ...)

        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            return jnp.mean(m.logits(m(**inputs)) ** 2)

        fn = jax.jit(jax.value_and_grad(loss))
        value, grads = fn(params)
        dots = fn.lower(params).as_text().count("stablehlo.dot_general")
        out[policy] = (float(value), [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)], dots)
    return out


def test_named_policies_give_the_gradients_of_no_remat(remat_runs):
    loss0, grads0, _ = remat_runs["none"]
    for policy in POLICIES[1:]:
        loss, grads, _ = remat_runs[policy]
        worst = max(float(np.linalg.norm(g - g0) / max(np.linalg.norm(g0), 1e-30)) for g, g0 in zip(grads, grads0))
        print(f"{policy}: loss rel err {abs(loss - loss0) / abs(loss0):.1e}, worst grad leaf rel err {worst:.1e}")
        assert loss == pytest.approx(loss0, rel=1e-6) and worst < 1e-5


def test_named_policies_keep_the_named_products(remat_runs):
    """Each name a policy keeps spares recomputing its product in the backward pass, in both
    towers: q, k, v (decoder) and the fused qkv (vision) = 4 products, the attention blocks'
    outputs = 2, the MLPs' gate and up = 4. No remat recomputes nothing; between no remat and
    save_matmuls lie the attention scores (QK and PV of the decoder and of both vision branches)."""
    dots = {p: remat_runs[p][2] for p in POLICIES}
    print("dot products in the lowered step:", dots)
    assert dots["full"] - dots["save_qkv_proj"] == 4
    assert dots["save_qkv_proj"] - dots["save_qkv_attn"] == 2
    assert dots["save_qkv_attn"] - dots["save_matmuls"] == 4
    assert dots["save_matmuls"] - dots["none"] == 6


def test_unknown_policy_is_refused_in_one_line():
    from bbu_jax.workflows.config import _remat

    assert _remat("auto") is None and _remat("save_matmuls") is None and _remat("dots_saveable") is None
    msg = _remat("save_everything")
    assert "save_everything" in msg and "save_qkv_attn" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- "auto"
class _Compiled:
    def __init__(self, policy):
        self.policy = policy


@pytest.mark.parametrize("limit,want,compiled", [
    (None, "none", []),  # no limit (CPU): nothing compiled
    (2000, "none", ["none"]),  # everything fits: the first candidate, compiled once
    (800, "save_qkv_attn", ["none", "save_matmuls", "save_qkv_attn"]),  # 0.9 x 800 = 720 >= 700
    (700, "full", ["none", "save_matmuls", "save_qkv_attn", "full"]),  # 630: only full fits
    (100, "full", ["none", "save_matmuls", "save_qkv_attn", "full"]),  # nothing fits: full, with a warning
])
def test_auto_takes_least_recomputation_that_fits(limit, want, compiled, caplog):
    estimates = {"none": 1000, "save_matmuls": 900, "save_qkv_attn": 700, "full": 500}
    calls = []

    def compile_fn(policy):
        calls.append(policy)
        return _Compiled(policy)

    with caplog.at_level(logging.INFO, logger="bbu_jax.training.auto_remat"):
        choice = auto_remat.choose(compile_fn, limit, estimate=lambda c: estimates[c.policy])
    assert choice.policy == want and calls == compiled
    assert choice.estimates == {p: estimates[p] for p in compiled}
    assert (choice.compiled is None) if limit is None else (choice.compiled.policy == want)
    assert any("remat auto -> " + want in r.message for r in caplog.records)
    assert any(r.levelno == logging.WARNING for r in caplog.records) == (limit == 100)


def test_cpu_reports_no_memory_limit():
    assert jax.devices()[0].platform == "cpu" and auto_remat.device_memory_limit() is None


def _specs(hf_dir, remat_policy, patches):
    demo = build_specs(load_config(ROOT / "configs" / "demo.py"))
    model = task.ModelSpec(hf_dir=str(hf_dir), param_dtype="float32", compute_dtype="float32",
                           remat_policy=remat_policy, scan_layers=True, attention_impl="xla")
    data = dataclasses.replace(demo.data, batch_rows=ROWS, token_budget=TOKENS, patch_budget=patches,
                               segments_per_row=SEGMENTS, max_objects=1, caption_tokens=2, vision_memory_tokens=1,
                               text_memory_tokens=1)
    return dataclasses.replace(demo, model=model, head=None, data=data,
                               loss=dataclasses.replace(demo.loss, lm_chunk=TOKENS))


def test_auto_compiles_for_the_run_and_reuses_the_chosen(tiny_hf_dir, batch, caplog):
    """The product's step (tiny model, LM loss) with remat "auto" and an injected ample limit: the
    first candidate is compiled for the run's batch shapes and shardings, fits, and its executable
    runs the step with the loss and gradient norm of the lazily jitted step with full remat
    (which candidates get compiled for which limit: test_auto_takes_least_recomputation_that_fits).
    Without a limit (CPU) nothing is compiled and the policy is "none"."""
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    specs = _specs(tiny_hf_dir, "auto", batch["patches"].shape[1])
    built = train.build(specs, mesh, None)
    tx, _ = train.make_optimizer(specs, built.params, 10)
    abstract = train_state.abstract_state(built.params, tx, 0)

    fn, _, policy = train.compile_train_step(specs, built, tx, abstract, memory_limit=lambda: None)
    assert policy == "none" and not isinstance(fn, jax.stages.Compiled)
    fixed = dataclasses.replace(specs, model=dataclasses.replace(specs.model, remat_policy="save_qkv_attn"))
    assert train.compile_train_step(fixed, built, tx, abstract, memory_limit=lambda: 1)[2] == "save_qkv_attn"

    with caplog.at_level(logging.INFO, logger="bbu_jax.training.auto_remat"):
        compiled, shardings, policy = train.compile_train_step(specs, built, tx, abstract,
                                                               memory_limit=lambda: 2**50)
    first = auto_remat.CANDIDATES[0]
    assert policy == first and isinstance(compiled, jax.stages.Compiled)
    needs = [r.message for r in caplog.records if "needs" in r.message]
    assert [m.split()[2] for m in needs] == [first], needs
    print("\n".join(needs))

    dims = specs.data.budgets(rows=ROWS, segments=SEGMENTS).dims()
    host = {k: batch.get(k, np.zeros(shape, FIELDS[k][1]))[None] for k, shape in expected_shapes(dims).items()}
    step_batch = jax.device_put(host, step_lib.accumulated_batch_sharding(mesh))
    lazy, _ = train.make_train_step(specs, built, tx, abstract, remat="full")
    _, out_auto = compiled(train_state.create_state(built.params, tx, 0, shardings), step_batch)
    _, out_full = lazy(train_state.create_state(built.params, tx, 0, shardings), step_batch)
    for key in ("loss", "grad_norm"):
        a, b = float(out_auto["metrics"][key][0]), float(out_full["metrics"][key][0])
        print(f"{key}: auto ({first}) {a:.6f} full {b:.6f}")
        assert a == pytest.approx(b, rel=1e-5) and a > 0
