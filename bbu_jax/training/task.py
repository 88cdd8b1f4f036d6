"""The product's training task: Qwen2.5-VL + detection head + multi-task loss, in the protocol
of step.py (count_fn = losses.loss_normalizers, loss_fn). The one place where the model, the head and the losses meet."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bbu_jax.data.batch import FIELDS, MODEL_INPUTS, expected_shapes
from bbu_jax.losses import LossWeights, MatchCost, loss_normalizers, multitask_loss
from bbu_jax.models.detection_head import DetectionHead
from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig, from_hf
from bbu_jax.foundation import sharding
from bbu_jax.training import optimizer, train_state
from bbu_jax.training import step as step_lib


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The detection head's architecture (explicit, from the config)."""
    width: int
    num_queries: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    caption_layers: int
    max_caption_len: int


def build_modules(hf_dir: str, *, param_dtype, compute_dtype, remat: str, attention_impl: str,
                  head: HeadSpec | None, seed: int, mesh: Mesh | None, scan_layers: bool = True
                  ) -> dict[str, nnx.Module]:
    """{"model": Qwen2.5-VL from the HF folder, "head": a freshly initialized head (if any)}."""
    model = from_hf(hf_dir, dtype=param_dtype, mesh=mesh, compute_dtype=compute_dtype,
                    attention_impl=attention_impl, remat=remat, scan_layers=scan_layers)
    modules = {"model": model}
    if head is not None:
        modules["head"] = DetectionHead(
            llm_hidden=model.config.text.hidden_size, width=head.width, num_queries=head.num_queries,
            num_layers=head.num_layers, num_heads=head.num_heads, mlp_dim=head.mlp_dim,
            caption_layers=head.caption_layers, max_caption_len=head.max_caption_len,
            attention_impl=attention_impl, dtype=compute_dtype, param_dtype=param_dtype,
            rngs=nnx.Rngs(seed))
    return modules


def param_shardings(modules: Mapping[str, nnx.Module], mesh: Mesh):
    """Pure-dict tree of NamedShardings matching train_state.split_modules' params."""
    return {name: nnx.to_pure_dict(sharding.param_shardings(nnx.state(m, nnx.Param), mesh))
            for name, m in modules.items()}


def make_loss_fn(graphdefs, rest, *, weights: LossWeights, caption_vocab: np.ndarray | None,
                 lm_chunk: int, matcher: str):
    """loss_fn(params, batch, counts, rng) -> (total, {name: (sum, count)}) for step.py."""
    detection = "head" in graphdefs
    vocab = None if caption_vocab is None else jnp.asarray(caption_vocab, jnp.int32)

    def loss_fn(params, batch, counts, rng):
        del rng  # deterministic model (no dropout)
        mods = train_state.merge_modules(graphdefs, params, rest)
        model = mods["model"]
        hidden = model(**{k: batch[k] for k in MODEL_INPUTS})
        return multitask_loss(hidden, model.lm_head_matrix(), batch, weights,
                              head=mods.get("head"), embed_table=model.embed_table(),
                              caption_vocab=vocab, detection=detection, lm_chunk=lm_chunk,
                              matcher=matcher, normalizers=counts, compute_dtype=model.compute_dtype)

    return loss_fn


def loss_weights(*, lm: float, detection: float, bbox_l1: float, bbox_giou: float,
                 objectness: float, caption: float, match_class: float, match_bbox: float,
                 match_giou: float, focal_alpha: float, focal_gamma: float) -> LossWeights:
    """Detection terms scaled by the overall detection weight."""
    return LossWeights(lm=lm, bbox_l1=detection * bbox_l1, bbox_giou=detection * bbox_giou,
                       objectness=detection * objectness, caption=detection * caption,
                       match=MatchCost(class_weight=match_class, bbox_weight=match_bbox,
                                       giou_weight=match_giou, focal_alpha=focal_alpha,
                                       focal_gamma=focal_gamma))


def model_flops_terms(cfg: Qwen25VLConfig, params) -> dict[str, int]:
    """Sizes for metrics_logging.estimate_step_flops, from the model config and params.

    Input embeddings are a lookup, not a matmul; the LM head is a matmul. Tied: the one table is
    counted once (as the head); untied: the input table is left out."""
    def count(tree):
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))

    model = params["model"]
    vision = count(model["visual"])
    llm = count(model) - vision
    if not cfg.tie_word_embeddings:
        llm -= cfg.text.vocab_size * cfg.text.hidden_size
    return {"llm_params": llm, "vision_params": vision, "head_params": count(params.get("head", {})),
            "llm_layers": cfg.text.num_hidden_layers, "llm_width": cfg.text.hidden_size,
            "vision_layers": cfg.vision.depth, "vision_width": cfg.vision.hidden_size}


count_fn = loss_normalizers  # the units each loss term averages over (step.py's protocol)


def lower_train_step(modules: Mapping[str, nnx.Module], mesh: Mesh, dims: dict[str, int], *,
                     weights: LossWeights, caption_vocab: np.ndarray | None, lm_chunk: int) -> jax.stages.Lowered:
    """The product's train step (this loss, ``make_optimizer``, ``jit_train_step``) for ``modules``
    (real or ``nnx.eval_shape``d) on ``mesh``, lowered for one micro-batch of ``dims``
    (``bbu_jax.data.batch`` budgets). Abstract: nothing is allocated, so a 3B step lowers on a laptop."""
    graphdefs, params, rest = train_state.split_modules(modules)
    loss_fn = make_loss_fn(graphdefs, rest, weights=weights, caption_vocab=caption_vocab, lm_chunk=lm_chunk,
                           matcher="scipy")
    tx, _ = optimizer.make_optimizer(params, lrs={g: 1e-5 for g in optimizer.GROUPS}, warmup_steps=0,
                                     total_steps=10, min_lr_ratio=1.0, weight_decay=0.01, b1=0.9, b2=0.999,
                                     eps=1e-8, grad_clip_norm=1.0, head_freeze_steps=0)
    abstract = train_state.abstract_state(params, tx, 0)
    shardings = train_state.state_shardings(abstract, param_shardings(modules, mesh), mesh)
    fn = step_lib.jit_train_step(loss_fn=loss_fn, count_fn=count_fn, tx=tx, labels=optimizer.group_labels(params),
                                 state_shardings=shardings, mesh=mesh)
    batch = {k: jax.ShapeDtypeStruct((1, *shape), FIELDS[k][1]) for k, shape in expected_shapes(dims).items()}
    state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    return fn.lower(state, batch)
