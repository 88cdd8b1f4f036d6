"""Per-component AdamW: parameter groups by path, one schedule each, frozen groups without state.

The trainable tree is `{"model": <Qwen2.5-VL params>, "head": <detection head params>}` (see
train_state.py); a parameter's group is decided by the first rule of GROUP_RULES that matches its
'/'-joined path. Gradients arrive already averaged (exact token weighting happens in the step).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

GROUPS = ("vision", "merger", "llm", "detection", "adapter")
HEAD_GROUPS = ("detection", "adapter")

# (regex on the parameter path, group): first match wins. One table, read by everything.
GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"^head/(.*/)?[^/]*adapter[^/]*/", "adapter"),  # the head's vision/text stream adapters
    (r"^head/", "detection"),
    (r"^model/(.*/)?visual/merger/", "merger"),
    (r"^model/(.*/)?visual/", "vision"),
    (r"^model/", "llm"),  # decoder, embeddings, final norm, lm head
)

# Leaves that never get weight decay: biases and every norm's parameters.
_NO_DECAY = re.compile(r"(^|/)[^/]*(norm|bias)[^/]*(/|$)|(^|/)(scale|bias)$", re.IGNORECASE)


def path_str(key_path) -> str:
    """'/'-joined names of a jax key path (dict keys, attributes, sequence indices)."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def group_of(path: str, rules=GROUP_RULES) -> str:
    for pattern, group in rules:
        if re.search(pattern, path):
            return group
    raise ValueError(f"parameter {path!r} matches no rule of GROUP_RULES; add one")


def group_labels(params, rules=GROUP_RULES):
    """Same tree as params with each leaf replaced by its group name."""
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(path_str(p), rules), params)


def decays(path: str) -> bool:
    return _NO_DECAY.search(path) is None


def decay_mask(params):
    """True where weight decay applies (not norms, not biases); works on optax-masked subtrees."""
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(path_str(p)), params)


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The optimizer group of the config: peak lrs per group (before batch scaling), the schedule,
    AdamW, clipping, accumulation and the head's initial freeze."""
    lrs: Mapping[str, float]  # group (GROUPS) -> peak lr; 0 freezes the group
    lr_scaling: str  # one of LR_SCALING
    lr_reference_batch: int
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    mu_dtype: str  # one of MU_DTYPES; bfloat16 saves 2 bytes per trained param (a 3B on one 80 GB GPU)
    grad_clip_norm: float  # 0 disables
    grad_accum_steps: int
    head_freeze_steps: int


LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # rule -> power of the batch ratio
# Storage dtypes of Adam's first moment. The second stays f32: its per-step increment (1 - b2) is
# below bf16's 8-bit mantissa, so a bf16 second moment stops following the gradient's scale.
MU_DTYPES = ("float32", "bfloat16")


def frozen_groups(spec: OptimSpec) -> frozenset[str]:
    """Groups at lr 0 for the whole run (batch scaling keeps a zero at zero): no optimizer state,
    and the train step computes no gradient for them. A head frozen only for its first
    head_freeze_steps is not one of them: its gradient is needed once it thaws."""
    return frozenset(g for g in GROUPS if float(spec.lrs[g]) == 0.0)


def lr_scale(rule: str, effective_batch: int, reference_batch: int) -> float:
    """Multiplier of every group's lr: (effective / reference) ** power of the rule."""
    return (effective_batch / reference_batch) ** LR_SCALING[rule]


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup where update k gets peak*(k+1)/warmup_steps (optax's
    warmup_cosine_decay_schedule starts at init_value, so its first update would be wasted at 0),
    then cosine from peak to peak*min_lr_ratio at total_steps."""
    cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1), alpha=min_lr_ratio)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(peak / warmup_steps, peak, warmup_steps - 1)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


class AdamState(NamedTuple):
    count: jax.Array  # updates applied (skipped steps do not count)
    mu: Any
    nu: Any


def adamw(lr: optax.Schedule, *, b1: float, b2: float, eps: float, weight_decay: float,
          mu_dtype=jnp.float32) -> optax.GradientTransformationExtraArgs:
    """optax.adamw's arithmetic (bias-corrected moments, weight decay off norms and biases, lr of
    the schedule at the update count), plus ``update(..., apply=False)``: moments and count stay
    as they are and the updates are zero.

    Hand-written because optax.adamw derives its update from the new moments before the train
    step's guard can choose between them and the old ones; XLA then fuses the moment arithmetic
    into both the update and the state's write and keeps a copy of every old moment for it
    (benchmarks/RESULTS.md, memory_3b). Here the update reads the moments as stored -- with a
    bf16 first moment, its rounded value (optax would use the f32 one of this step).
    """
    mu_dtype = jnp.dtype(mu_dtype)

    def init(params):
        return AdamState(count=jnp.zeros([], jnp.int32),
                         mu=jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, mu_dtype), params),
                         nu=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, apply=True, **extra):
        del extra
        apply = jnp.asarray(apply)

        def moment(m, g, decay, power):
            new = (1 - decay) * g ** power + decay * m.astype(g.dtype)
            return jnp.where(apply, new, m.astype(g.dtype)).astype(m.dtype)

        mu = jax.tree_util.tree_map(lambda m, g: moment(m, g, b1, 1), state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: moment(v, g, b2, 2), state.nu, grads)
        count = jnp.where(apply, optax.safe_increment(state.count), state.count)
        t = jnp.maximum(count, 1)  # a skipped first step divides by nothing below
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        scale = -lr(state.count)

        def step(m, v, p, decays):
            u = (m.astype(v.dtype) / c1.astype(v.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + eps)
            if decays and weight_decay:
                u = u + weight_decay * p
            return jnp.where(apply, u * scale, 0).astype(p.dtype)

        updates = jax.tree_util.tree_map(step, mu, nu, params, decay_mask(params))
        return updates, AdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


class _FreezeState(NamedTuple):
    count: jax.Array
    inner: Any


class _CountState(NamedTuple):
    count: jax.Array


def freeze_for(num_steps: int, inner: optax.GradientTransformationExtraArgs
               ) -> optax.GradientTransformationExtraArgs:
    """Zero updates for the first num_steps applied steps and leave the inner state (an `adamw`)
    untouched meanwhile, so its schedule, moments and weight decay all start when the group is
    unfrozen."""
    if num_steps == 0:
        return inner

    def init(params):
        return _FreezeState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None, *, apply=True, **extra):
        active = state.count >= num_steps
        new_updates, new_inner = inner.update(updates, state.inner, params, apply=active & apply, **extra)
        count = jnp.minimum(state.count + jnp.asarray(apply).astype(jnp.int32), num_steps)
        return new_updates, _FreezeState(count=count, inner=new_inner)

    return optax.GradientTransformationExtraArgs(init, update)


def mask_until(num_steps: int, frozen: Callable[[Any], Any]) -> optax.GradientTransformationExtraArgs:
    """Zero the gradients of leaves where frozen(params) is True for the first num_steps applied
    steps, so a frozen head does not count in the global gradient norm used for clipping."""
    if num_steps == 0:
        return optax.identity()

    def init(params):
        del params
        return _CountState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, apply=True, **extra):
        del params, extra
        mask = frozen(updates)
        live = state.count >= num_steps
        updates = jax.tree_util.tree_map(
            lambda g, m: jnp.where(live | ~m, g, jnp.zeros_like(g)), updates, mask)
        count = jnp.minimum(state.count + jnp.asarray(apply).astype(jnp.int32), num_steps)
        return updates, _CountState(count=count)

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(params, spec: OptimSpec, *, total_steps: int, batch_scale: float = 1.0,
                   rules=GROUP_RULES) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """AdamW per group (peak lr = spec.lrs[group] * batch_scale), global-norm clipping, frozen
    groups at lr 0.

    Returns the transformation and each group's lr as a function of the optimizer step (for
    logging); a group with lr 0 gets optax.set_to_zero and so no optimizer state at all.
    ``update(grads, state, params, apply=False)`` leaves the state as it is (the train step's
    non-finite guard).
    """
    labels = group_labels(params, rules)
    present = set(jax.tree_util.tree_leaves(labels))
    frozen = frozen_groups(spec)
    txs, schedules = {}, {}
    for group in GROUPS:
        if group not in present:
            continue
        lr = float(spec.lrs[group]) * batch_scale
        if group in frozen:
            txs[group] = optax.set_to_zero()
            schedules[group] = lambda step: 0.0
            continue
        freeze = spec.head_freeze_steps if group in HEAD_GROUPS else 0
        sched = warmup_cosine(lr, spec.warmup_steps, max(total_steps - freeze, 1), spec.min_lr_ratio)
        txs[group] = freeze_for(freeze, adamw(sched, b1=spec.b1, b2=spec.b2, eps=spec.eps,
                                              weight_decay=spec.weight_decay, mu_dtype=spec.mu_dtype))
        schedules[group] = (lambda s, f=freeze, g=sched: 0.0 if s < f else float(g(s - f)))
    chain = []
    if spec.head_freeze_steps:
        is_head = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda p, _: group_of(path_str(p), rules) in HEAD_GROUPS, tree)
        chain.append(mask_until(spec.head_freeze_steps, is_head))
    if spec.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(spec.grad_clip_norm))
    chain.append(optax.partition(txs, labels))
    return optax.chain(*chain), schedules


def group_norms(tree, labels) -> dict[str, jax.Array]:
    """L2 norm of each group's leaves (for wn/<group> and gn/<group>)."""
    sq = {}
    for leaf, group in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(labels)):
        sq[group] = sq.get(group, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return {g: jnp.sqrt(v) for g, v in sq.items()}


def group_sizes(params, labels) -> dict[str, int]:
    sizes = {}
    for leaf, group in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels)):
        sizes[group] = sizes.get(group, 0) + math.prod(leaf.shape)
    return sizes
