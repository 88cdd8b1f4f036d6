"""The product's train step, built for measuring: what the benchmarks and the collectives tests
compile and run is exactly the step a run compiles (workflows.train's optimizer, loss and jit),
on the run's modules or on random ones of any Qwen2.5-VL shape (no weights to download)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bbu_jax.models.detection_head import DetectionHead
from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from bbu_jax.training import task, train_state
from bbu_jax.workflows import train
from bbu_jax.workflows.config import Specs


@dataclasses.dataclass
class ProductStep:
    """The train step of a run (``fn(state, batch) -> (state, out)``, state donated; already
    compiled where remat "auto" compiled its candidates), the optimizer it updates with, the
    state's shardings and abstract shape, and the remat policy it runs with."""
    fn: object
    tx: object
    shardings: dict
    abstract_state: dict
    remat: str


def random_modules(specs: Specs, cfg: Qwen25VLConfig, *, abstract: bool = False) -> dict[str, nnx.Module]:
    """{"model", "head"} as ``task.build_modules`` makes them (the run's dtypes, remat, attention
    kernel, head spec), with random weights of ``cfg``'s shape instead of an HF folder's: a 3B
    step without the 3B download. ``abstract``: shapes only (``nnx.eval_shape``), nothing allocated."""
    m = specs.model
    dtype, param_dtype = task.DTYPES[m.compute_dtype], task.DTYPES[m.param_dtype]

    def make():
        out = {"model": Qwen25VL(cfg, rngs=nnx.Rngs(specs.run.seed), compute_dtype=dtype, param_dtype=param_dtype,
                                 attention_impl=m.attention_impl, remat=m.remat_policy, scan_layers=m.scan_layers)}
        if specs.head is not None:
            out["head"] = DetectionHead(specs.head, llm_hidden=cfg.text.hidden_size, attention_impl=m.attention_impl,
                                        dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(specs.run.seed))
        return out

    return nnx.eval_shape(make) if abstract else make()


def _build(specs: Specs, modules: Mapping[str, nnx.Module], mesh: Mesh, caption_vocab: np.ndarray | None):
    """(workflows.train.Built, tx, abstract state) as the run makes them, for ``modules``."""
    graphdefs, params, rest = train_state.split_modules(modules)
    built = train.Built(mesh, graphdefs, rest, params, task.param_shardings(modules, mesh),
                        modules["model"].config, caption_vocab,
                        task.make_loss_fn(graphdefs, rest, specs.loss, caption_vocab))
    tx, _ = train.make_optimizer(specs, params, max(specs.run.num_train_steps, specs.optim.warmup_steps + 1))
    return built, tx, train_state.abstract_state(params, tx, specs.run.seed)


def product_step(specs: Specs, modules: Mapping[str, nnx.Module], mesh: Mesh, *,
                 caption_vocab: np.ndarray | None) -> ProductStep:
    """The train step a run with ``specs`` compiles for ``modules`` on ``mesh``, through the run's
    own helpers (``workflows.train.make_optimizer`` / ``compile_train_step``, which resolves remat
    "auto" against this device's memory, ``task.make_loss_fn``)."""
    built, tx, abstract = _build(specs, modules, mesh, caption_vocab)
    fn, shardings, remat = train.compile_train_step(specs, built, tx, abstract)
    return ProductStep(fn, tx, shardings, abstract, remat)


def lower_train_step(specs: Specs, modules: Mapping[str, nnx.Module], mesh: Mesh, dims: dict[str, int], *,
                     caption_vocab: np.ndarray | None) -> jax.stages.Lowered:
    """The train step of a run with ``specs`` for ``modules`` (real or ``nnx.eval_shape``d) on
    ``mesh``, lowered for one optimizer step of ``dims`` per micro-batch with the modules' own remat
    policy ("auto" is a run-time choice: a model traced without it remats fully). Abstract:
    nothing is allocated, so a 3B step lowers on a laptop."""
    built, tx, abstract = _build(specs, modules, mesh, caption_vocab)
    fn, _ = train.make_train_step(specs, built, tx, abstract)
    state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    return fn.lower(state, train.step_batch_shapes(specs, dims))
