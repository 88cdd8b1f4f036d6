"""The product's train step, lowered without running: what the benchmarks and the collectives
tests compile is exactly the step a run compiles (workflows.train's optimizer, loss and jit)."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bbu_jax.data.batch import FIELDS, expected_shapes
from bbu_jax.training import task, train_state
from bbu_jax.workflows import train
from bbu_jax.workflows.config import Specs


def lower_train_step(specs: Specs, modules: Mapping[str, nnx.Module], mesh: Mesh, dims: dict[str, int], *,
                     caption_vocab: np.ndarray | None) -> jax.stages.Lowered:
    """The train step of a run with ``specs`` for ``modules`` (real or ``nnx.eval_shape``d) on
    ``mesh``, lowered for one optimizer step of ``dims`` (``bbu_jax.data.batch`` budgets) per
    micro-batch. Abstract: nothing is allocated, so a 3B step lowers on a laptop."""
    graphdefs, params, rest = train_state.split_modules(modules)
    built = train.Built(mesh, graphdefs, rest, params, task.param_shardings(modules, mesh),
                        modules["model"].config, caption_vocab,
                        task.make_loss_fn(graphdefs, rest, specs.loss, caption_vocab))
    tx, _ = train.make_optimizer(specs, params, max(specs.run.num_train_steps, specs.optim.warmup_steps + 1))
    abstract = train_state.abstract_state(params, tx, specs.run.seed)
    fn, _ = train.make_train_step(specs, built, tx, abstract)
    accum = specs.optim.grad_accum_steps
    batch = {k: jax.ShapeDtypeStruct((accum, *shape), FIELDS[k][1]) for k, shape in expected_shapes(dims).items()}
    state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    return fn.lower(state, batch)
