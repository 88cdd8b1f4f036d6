"""Fused chunked LM loss == naive full-logits loss (metrics, total and its gradient); unsupervised
chunks are really skipped; bf16 matmuls stay close; full logits are never materialized; under a mesh
the head's gradient is reduced once per step, not once per chunk."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bbu_jax.losses.lm_loss import lm_loss
from bbu_jax.foundation import sharding

B, L, D, V = 2, 37, 16, 101  # L not a multiple of the chunk: exercises the padding


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(V, D)) * 0.3, jnp.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    kind = rng.integers(0, 3, (B, L)).astype(np.int8)
    kind[:, :11] = 0  # a long unsupervised prompt, as in real rows
    targets[kind == 0] = -100  # unsupervised positions may hold any id
    return hidden, lm_head, jnp.asarray(targets), jnp.asarray(kind)


def _naive_nll(hidden, lm_head, targets):
    logp = jax.nn.log_softmax(hidden @ lm_head.T, axis=-1)
    return -jnp.take_along_axis(logp, jnp.clip(targets, 0)[..., None], -1)[..., 0]


def _naive_metrics(hidden, lm_head, targets, kind):
    nll = _naive_nll(hidden, lm_head, targets)
    return {name: (jnp.where(mask, nll, 0).sum(), mask.sum().astype(jnp.float32))
            for name, mask in (("lm_loss", kind > 0), ("teacher_lm_loss", kind == 1),
                               ("student_lm_loss", kind == 2))}


def _rel(a, b):
    return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


@pytest.mark.parametrize("chunk", [8, 32, 1024])
def test_metrics_and_total_match_naive(chunk):
    args = _inputs()
    total, got = jax.jit(lambda *a: lm_loss(*a, chunk=chunk, scale=0.25))(*args)
    ref = _naive_metrics(*args)
    for name in ref:
        rel = abs(float(got[name][0] - ref[name][0])) / abs(float(ref[name][0]))
        print(f"{name}: rel err {rel:.2e}")
        assert rel < 1e-5 and float(got[name][1]) == float(ref[name][1])
    assert float(total) == pytest.approx(0.25 * float(ref["lm_loss"][0]), rel=1e-5)
    split = float(got["teacher_lm_loss"][0] + got["student_lm_loss"][0])
    assert split == pytest.approx(float(got["lm_loss"][0]), rel=1e-6)


@pytest.mark.parametrize("chunk", [6, 16, 1024])
def test_gradient_matches_naive(chunk):
    hidden, lm_head, targets, kind = _inputs(1)
    scale = 1.0 / float((kind > 0).sum())

    def naive(h, w):
        return scale * jnp.where(kind > 0, _naive_nll(h, w, targets), 0).sum()

    def fused(h, w):
        return lm_loss(h, w, targets, kind, chunk=chunk, scale=scale)[0]

    (value, grads) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, lm_head)
    (ref_value, ref_grads) = jax.value_and_grad(naive, argnums=(0, 1))(hidden, lm_head)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for name, g, r in zip(("hidden", "lm_head"), grads, ref_grads):
        print(f"d {name}: rel err {_rel(g, r):.2e}")
        assert _rel(g, r) < 1e-5
    # gradient of a scaled total scales (the backward multiplies by the cotangent)
    g3 = jax.grad(lambda h: 3.0 * fused(h, lm_head))(hidden)
    assert _rel(g3, 3.0 * grads[0]) < 1e-6


def test_unsupervised_chunks_are_skipped():
    """Each row has 16 supervised tokens scattered over 64; sorted first they fill exactly two
    8-position chunks, and the other six chunks hold none. Unsupervised hidden states are NaN: if
    any of those chunks were computed, the LM head's gradient would be NaN."""
    b, l, d, v = 2, 64, 8, 50
    rng = np.random.default_rng(3)
    kind = np.zeros((b, l), np.int8)
    for r in range(b):
        kind[r, rng.choice(l, 16, replace=False)] = rng.integers(1, 3, 16)
    hidden = rng.normal(size=(b, l, d)).astype(np.float32)
    clean = jnp.asarray(np.where(kind[..., None] > 0, hidden, 0.0))
    poisoned = jnp.asarray(np.where(kind[..., None] > 0, hidden, np.nan))
    lm_head = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    targets, kind = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32), jnp.asarray(kind)

    def loss(h, w):
        return lm_loss(h, w, targets, kind, chunk=16, scale=1 / 32)[0]

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(poisoned, lm_head)
    ref = jax.grad(lambda h, w: jnp.where(kind > 0, _naive_nll(h, w, targets), 0).sum() / 32,
                   argnums=(0, 1))(clean, lm_head)
    assert bool(jnp.isfinite(grads[1]).all()), "an all-unsupervised chunk was computed"
    assert _rel(grads[1], ref[1]) < 1e-5
    assert _rel(jnp.where(kind[..., None] > 0, grads[0], 0), ref[0]) < 1e-5
    assert float(jnp.abs(jnp.where(kind[..., None] > 0, 0, grads[0])).max()) == 0.0


def test_bfloat16_matmuls_stay_close():
    args = _inputs(2)
    f32 = lm_loss(*args, chunk=16)[0]
    bf16 = lm_loss(*args, chunk=16, compute_dtype=jnp.bfloat16)[0]
    rel = abs(float(bf16 - f32)) / abs(float(f32))
    print(f"bf16 vs f32 total: rel err {rel:.2e}")
    assert 0 < rel < 2e-2


def test_full_logits_never_materialized():
    """Compiled forward+backward keeps far less scratch memory than one (tokens x vocab) f32 block."""
    b, l, d, v, chunk = 2, 512, 64, 4096, 128
    args = (jnp.zeros((b, l, d)), jnp.zeros((v, d)), jnp.zeros((b, l), jnp.int32), jnp.ones((b, l), jnp.int8))
    grad = jax.grad(lambda h, w, t, k: lm_loss(h, w, t, k, chunk=chunk)[0], argnums=(0, 1))
    memory = jax.jit(grad).lower(*args).compile().memory_analysis()
    full_logits = b * l * v * 4
    print(f"temp {memory.temp_size_in_bytes / 2**20:.1f} MiB vs full logits {full_logits / 2**20:.1f} MiB")
    assert memory.temp_size_in_bytes < full_logits / 2


def _collectives_by_computation(hlo: str) -> dict[str, list[str]]:
    """{computation header: [result shape of each collective]} of a compiled module's text."""
    found = {}
    for comp in re.split(r"\n(?=\S)", hlo):
        shapes = re.findall(r"= (\S+) (?:all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", comp)
        if shapes:
            found[comp.split("\n", 1)[0]] = shapes
    return found


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_head_gradient_reduced_once(mesh_shape):
    """Under a mesh, no (vocab x hidden) collective runs inside the chunk loop (one all-reduce of
    the head's gradient per step, one gather of the head), and the gradient equals the unsharded one."""
    b, l, d, v = 8, 64, 16, 64
    rng = np.random.default_rng(3)
    args = (jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32), jnp.asarray(rng.normal(size=(v, d)), jnp.float32),
            jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32), jnp.asarray(rng.integers(0, 3, (b, l)), jnp.int8))
    mesh = sharding.make_mesh(*mesh_shape)

    def loss(h, w, t, k):
        with sharding.mesh_context(mesh):
            return lm_loss(h, w, t, k, chunk=4 * b)[0]

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    head = NamedSharding(mesh, sharding.logical_to_spec(("vocab", "embed"), (v, d), mesh))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(rows, head, rows, rows),
                   out_shardings=(rows, head))
    compiled = grad.lower(*args).compile()
    head_sizes = {v * d, v * d // mesh.shape["tensor"]}
    for header, shapes in _collectives_by_computation(compiled.as_text()).items():
        if header.startswith("ENTRY"):
            continue
        sizes = [int(np.prod([int(n) for n in re.findall(r"\d+", s.split("{")[0].split("[", 1)[1])]))
                 for s in shapes]
        assert not head_sizes & set(sizes), f"head-sized collective inside the loop: {header} {shapes}"
    want = jax.grad(lambda *a: lm_loss(*a, chunk=4 * b)[0], argnums=(0, 1))(*args)
    got = compiled(*args)
    for name, g, w in zip(("hidden", "lm_head"), got, want):
        rel = _rel(g, w)
        print(f"mesh {mesh_shape} d {name}: rel err {rel:.2e}")
        assert rel < 1e-6
