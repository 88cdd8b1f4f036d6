"""Chunked LM loss == naive full-logits loss (values and gradients), with teacher/student split."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbu_jax.losses.lm_loss import lm_loss_sums

B, L, D, V = 2, 37, 16, 101  # L*B not a multiple of the chunk: exercises the padding


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(V, D)) * 0.3, jnp.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    kind = rng.integers(0, 3, (B, L)).astype(np.int8)
    targets[kind == 0] = -100  # unsupervised positions may hold any id
    return hidden, lm_head, jnp.asarray(targets), jnp.asarray(kind)


def _naive(hidden, lm_head, targets, kind):
    logp = jax.nn.log_softmax(hidden @ lm_head.T, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.clip(targets, 0)[..., None], -1)[..., 0]
    out = {}
    for name, mask in (("lm_loss", kind > 0), ("teacher_lm_loss", kind == 1), ("student_lm_loss", kind == 2)):
        out[name] = (jnp.where(mask, nll, 0).sum(), mask.sum().astype(jnp.float32))
    return out


@pytest.mark.parametrize("chunk", [8, 32, 1024])
def test_values_match_naive(chunk):
    args = _inputs()
    got = jax.jit(lambda *a: lm_loss_sums(*a, chunk=chunk))(*args)
    ref = _naive(*args)
    for name in ref:
        rel = abs(float(got[name][0] - ref[name][0])) / abs(float(ref[name][0]))
        print(f"{name}: rel err {rel:.2e}")
        assert rel < 1e-5 and float(got[name][1]) == float(ref[name][1])
    split = float(got["teacher_lm_loss"][0] + got["student_lm_loss"][0])
    assert split == pytest.approx(float(got["lm_loss"][0]), rel=1e-6)


def test_gradients_match_naive():
    hidden, lm_head, targets, kind = _inputs(1)

    def mean_of(fn):
        def f(h, w):
            out = fn(h, w, targets, kind)
            return out["teacher_lm_loss"][0] / 3 + out["student_lm_loss"][0] / out["lm_loss"][1]
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    got = mean_of(lambda *a: lm_loss_sums(*a, chunk=16))(hidden, lm_head)
    ref = mean_of(_naive)(hidden, lm_head)
    for g, r in zip(got, ref):
        rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
        print(f"grad rel err {rel:.2e}")
        assert rel < 1e-5


def test_full_logits_never_materialized():
    """Compiled forward+backward keeps far less scratch memory than one (tokens x vocab) f32 block."""
    b, l, d, v, chunk = 2, 512, 64, 4096, 128
    args = (jnp.zeros((b, l, d)), jnp.zeros((v, d)), jnp.zeros((b, l), jnp.int32), jnp.ones((b, l), jnp.int8))
    grad = jax.grad(lambda h, w, t, k: lm_loss_sums(h, w, t, k, chunk=chunk)["lm_loss"][0], argnums=(0, 1))
    memory = jax.jit(grad).lower(*args).compile().memory_analysis()
    full_logits = b * l * v * 4
    print(f"temp {memory.temp_size_in_bytes / 2**20:.1f} MiB vs full logits {full_logits / 2**20:.1f} MiB")
    assert memory.temp_size_in_bytes < full_logits / 2
