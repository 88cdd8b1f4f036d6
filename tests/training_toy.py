"""A tiny stand-in for the VLM + detection head with the real parameter layout (visual/merger,
language model, head with adapters) and the task protocol of bbu_jax.training.step, so the
training machinery is tested in milliseconds, independently of the real model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bbu_jax.training import optimizer as opt
from bbu_jax.training import step as step_lib
from bbu_jax.training import train_state
from bbu_jax.training.optimizer import OptimSpec

VOCAB, DIM, FEAT = 32, 16, 8
LRS = dict(vision=1e-3, merger=2e-3, llm=1e-3, detection=4e-3, adapter=8e-3)  # every group trains


def optim_spec(lrs, *, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.01, eps=1e-8, grad_clip_norm=1.0,
               head_freeze_steps=0, mu_dtype="float32") -> OptimSpec:
    """AdamW (0.9, 0.999) per group with these peak lrs and no batch scaling."""
    return OptimSpec(lrs=dict(lrs), lr_scaling="none", lr_reference_batch=1, warmup_steps=warmup_steps,
                     min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, b1=0.9, b2=0.999, eps=eps, mu_dtype=mu_dtype,
                     grad_clip_norm=grad_clip_norm, grad_accum_steps=1, head_freeze_steps=head_freeze_steps)


class _Merger(nnx.Module):
    def __init__(self, rngs):
        self.ln_q = nnx.RMSNorm(DIM, rngs=rngs)
        self.mlp = nnx.Linear(DIM, DIM, rngs=rngs)


class _Visual(nnx.Module):
    def __init__(self, rngs):
        self.patch_embed = nnx.Linear(FEAT, DIM, rngs=rngs)
        self.merger = _Merger(rngs)

    def __call__(self, feats):
        return self.merger.mlp(self.merger.ln_q(jax.nn.gelu(self.patch_embed(feats))))


class ToyVLM(nnx.Module):
    def __init__(self, rngs):
        self.visual = _Visual(rngs)
        self.embed_tokens = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.layer = nnx.Linear(DIM, DIM, rngs=rngs)
        self.norm = nnx.RMSNorm(DIM, rngs=rngs)

    def __call__(self, input_ids, feats):
        x = self.embed_tokens(input_ids) + self.visual(feats)[:, None, :]
        return self.norm(x + jnp.tanh(self.layer(x)))


class ToyHead(nnx.Module):
    def __init__(self, rngs):
        self.vision_adapter = nnx.Linear(DIM, DIM, rngs=rngs)
        self.box = nnx.Linear(DIM, 4, rngs=rngs)

    def __call__(self, hidden):
        return jax.nn.sigmoid(self.box(jnp.tanh(self.vision_adapter(hidden.mean(1)))))


def count_fn(batch):
    return {"lm": jnp.sum(batch["target_kind"] > 0), "box": jnp.sum(batch["gt_valid"])}


def make_task(seed: int = 0):
    """(graphdefs, params, rest, loss_fn): loss_fn follows bbu_jax.training.step's protocol."""
    rngs = nnx.Rngs(seed)
    graphdefs, params, rest = train_state.split_modules({"model": ToyVLM(rngs), "head": ToyHead(rngs)})

    def loss_fn(params, batch, counts, rng):
        del rng
        mods = train_state.merge_modules(graphdefs, params, rest)
        hidden = mods["model"](batch["input_ids"], batch["feats"])
        logits = hidden @ mods["model"].embed_tokens.embedding[...].T
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
        kind = batch["target_kind"]
        l1 = jnp.abs(mods["head"](hidden) - batch["gt_boxes"]).sum(-1) * batch["gt_valid"]
        lm_sum, box_sum = jnp.sum(ce * (kind > 0)), jnp.sum(l1)
        total = lm_sum / counts["lm"] + 5.0 * box_sum / counts["box"]
        metrics = {
            "lm_loss": (lm_sum, jnp.sum(kind > 0)),
            "teacher_lm_loss": (jnp.sum(ce * (kind == 1)), jnp.sum(kind == 1)),
            "student_lm_loss": (jnp.sum(ce * (kind == 2)), jnp.sum(kind == 2)),
            "bbox_l1_loss": (box_sum, jnp.sum(batch["gt_valid"])),
        }
        return total, metrics

    return graphdefs, params, rest, loss_fn


def make_batch(seed: int, rows: int = 8, length: int = 6, accum: int | None = None) -> dict:
    """One toy batch; with accum, A micro-batches stacked on a leading axis."""
    r = np.random.default_rng(seed)
    lead = (accum,) if accum else ()
    ids = r.integers(0, VOCAB, lead + (rows, length), dtype=np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=-1),
        "target_kind": r.integers(0, 3, lead + (rows, length)).astype(np.int8),
        "feats": r.normal(size=lead + (rows, FEAT)).astype(np.float32),
        "gt_boxes": r.uniform(size=lead + (rows, 4)).astype(np.float32),
        "gt_valid": r.uniform(size=lead + (rows,)) < 0.7,
    }


def param_shardings(params, mesh):
    """Matrices split over fsdp (rows) and tensor (columns) where divisible; rest replicated."""
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]

    def spec(x):
        if x.ndim != 2:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P("fsdp" if x.shape[0] % fsdp == 0 else None,
                                     "tensor" if x.shape[1] % tensor == 0 else None))

    return jax.tree_util.tree_map(spec, params)


def make_mesh(data: int, fsdp: int, tensor: int):
    """Auto-sharded mesh like the product's (GSPMD propagates shardings inside the step)."""
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:data * fsdp * tensor])


def train_setup(lrs, mesh_shape=(1, 1, 1), *, head_freeze_steps=0, total_steps=10):
    """(make_state, jitted product train step, mesh) of the toy task: a fresh state per call (the
    step donates its input state), the step compiled once per mesh."""
    _, params, _, loss_fn = make_task(seed=0)
    tx, _ = opt.make_optimizer(params, optim_spec(lrs, head_freeze_steps=head_freeze_steps), total_steps=total_steps)
    mesh = make_mesh(*mesh_shape)
    shardings = train_state.state_shardings(train_state.abstract_state(params, tx, 0),
                                            param_shardings(params, mesh), mesh)
    fn = step_lib.jit_train_step(loss_fn=loss_fn, count_fn=count_fn, tx=tx,
                                 labels=opt.group_labels(params), state_shardings=shardings, mesh=mesh)
    return lambda: train_state.create_state(params, tx, 0, shardings), fn, mesh
