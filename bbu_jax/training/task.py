"""The product's training task: Qwen2.5-VL + detection head + multi-task loss, in the protocol
of step.py (count_fn = losses.loss_normalizers, loss_fn). The one place where the model, the head and the losses meet."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bbu_jax.data.batch import MODEL_INPUTS
from bbu_jax.losses import LossSpec, loss_normalizers, multitask_loss
from bbu_jax.models.detection_head import DetectionHead, HeadSpec
from bbu_jax.models.qwen2_5_vl import from_hf
from bbu_jax.foundation import sharding
from bbu_jax.training import train_state


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model group of the config: which HF folder, dtypes, remat, layer loop, attention kernel."""
    hf_dir: str
    param_dtype: str  # a DTYPES name
    compute_dtype: str  # a DTYPES name
    remat_policy: str  # auto | none | full | a models.layers.SAVED_NAMES policy | a jax.checkpoint_policies name
    scan_layers: bool
    attention_impl: str  # one of models.attention.KERNELS (a config's "auto" is resolved by build_specs)


def build_modules(model: ModelSpec, head: HeadSpec | None, *, seed: int, mesh: Mesh | None
                  ) -> dict[str, nnx.Module]:
    """{"model": Qwen2.5-VL from the HF folder, "head": a freshly initialized head (if any)}."""
    param_dtype, compute_dtype = DTYPES[model.param_dtype], DTYPES[model.compute_dtype]
    qwen = from_hf(model.hf_dir, dtype=param_dtype, mesh=mesh, compute_dtype=compute_dtype,
                   attention_impl=model.attention_impl, remat=model.remat_policy, scan_layers=model.scan_layers)
    modules = {"model": qwen}
    if head is not None:
        modules["head"] = DetectionHead(head, llm_hidden=qwen.config.text.hidden_size,
                                        attention_impl=model.attention_impl, dtype=compute_dtype,
                                        param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    return modules


def param_shardings(modules: Mapping[str, nnx.Module], mesh: Mesh):
    """Pure-dict tree of NamedShardings matching train_state.split_modules' params."""
    return {name: nnx.to_pure_dict(sharding.param_shardings(nnx.state(m, nnx.Param), mesh))
            for name, m in modules.items()}


def make_loss_fn(graphdefs, rest, loss: LossSpec, caption_vocab: np.ndarray | None, *, remat: str | None = None):
    """loss_fn(params, batch, counts, rng) -> (total, {name: (sum, count)}) for step.py.
    ``remat``: the model's remat policy in this loss (a candidate of "auto"); None: as built."""
    detection = "head" in graphdefs
    vocab = None if caption_vocab is None else jnp.asarray(caption_vocab, jnp.int32)

    def loss_fn(params, batch, counts, rng):
        del rng  # deterministic model (no dropout)
        mods = train_state.merge_modules(graphdefs, params, rest)
        model = mods["model"]
        if remat is not None:
            model.set_remat(remat)
        hidden = model(**{k: batch[k] for k in MODEL_INPUTS})
        return multitask_loss(hidden, model.lm_head_matrix(), batch, loss, head=mods.get("head"),
                              embed_table=model.embed_table(), caption_vocab=vocab, detection=detection,
                              normalizers=counts, compute_dtype=model.compute_dtype)

    return loss_fn


count_fn = loss_normalizers  # the units each loss term averages over (step.py's protocol)
