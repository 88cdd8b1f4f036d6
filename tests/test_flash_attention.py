"""segment_flash_attention (Pallas; Pallas' interpreter on the CPU): the values and gradients of the
"xla" kernel on packed rows, block ranges that cover every visible (query, key) pair and start and
end on one, and the Triton lowering of the 3B shapes, checked without a GPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbu_jax.models.attention import attention
from bbu_jax.models.flash_attention import visible_block_ranges


def _rel(a, b) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def _packed(rng, rows: int, length: int, max_run: int, padding: bool = True) -> np.ndarray:
    """Runs of 1..max_run rows with increasing ids; with ``padding``, a padding run mid-row (id 0)
    and a padded tail."""
    seg = np.zeros((rows, length), np.int32)
    for row in seg:
        pos, sid = 0, 1
        end = length - int(rng.integers(1, 40)) if padding else length
        while pos < end:
            n = int(rng.integers(1, max_run + 1))
            if padding and sid == 3:
                pos += n  # a padding run between samples
            row[pos:min(pos + n, end)] = sid
            pos, sid = pos + n, sid + 1
    return seg


@pytest.mark.parametrize("causal,hq,hkv,d,length,max_run", [
    (True, 4, 2, 32, 300, 120),   # text: causal samples, grouped KV heads, length not a block multiple
    (False, 2, 2, 80, 256, 64),   # vision windows: not causal, head dim 80 (padded to 128)
])
def test_matches_xla_kernel(causal, hq, hkv, d, length, max_run):
    rng = np.random.default_rng(0)
    seg = jnp.asarray(_packed(rng, 2, length, max_run))
    q = jnp.asarray(rng.normal(size=(2, length, hq, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, length, hkv, d)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def run(impl):
        def f(q, k, v):
            out = attention(q, k, v, seg, seg, causal=causal, implementation=impl)
            return (out * w).sum(), out
        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    with jax.default_matmul_precision("float32"):  # on a GPU, keep XLA's reference off TF32
        out, grads = run("pallas")
        ref_out, ref_grads = run("xla")
    errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    print(f"causal={causal} d={d}: rel err out {errs[0]:.1e}, dq dk dv " + " ".join(f"{e:.1e}" for e in errs[1:]))
    assert max(errs) < 1e-5
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)


def test_bfloat16_inputs():
    """bf16 q/k/v (the GPU compute dtype): products in bf16, softmax in f32; against the f32
    "xla" kernel on the same rounded inputs the error is bf16's (P and dS are rounded to bf16)."""
    rng = np.random.default_rng(2)
    seg = jnp.asarray(_packed(rng, 1, 256, 100))
    q, k, v = (jnp.asarray(rng.normal(size=(1, 256, 4, 64)), jnp.bfloat16) for _ in range(3))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def run(impl, *qkv):
        f = lambda q, k, v: (attention(q, k, v, seg, seg, causal=True, implementation=impl) * w).sum()
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*qkv)[1]

    got = run("pallas", q, k, v)
    want = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    errs = [_rel(g.astype(jnp.float32), r) for g, r in zip(got, want)]
    print("bf16 rel err dq dk dv", " ".join(f"{e:.1e}" for e in errs))
    assert all(g.dtype == jnp.bfloat16 for g in got) and max(errs) < 2e-2


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("of_queries", [True, False])
def test_block_ranges_cover_the_visible_pairs(causal, of_queries):
    """Brute force over random layouts: every block with a visible pair lies in [lo, hi), lo and
    hi - 1 hold one (the loops start and stop on visible blocks), all-padding blocks get lo == hi."""
    rng = np.random.default_rng(1)
    length, block, partner = 512, 64, 32
    seg = _packed(rng, 6, length, 150)
    lo, hi = map(np.asarray, visible_block_ranges(jnp.asarray(seg), block, partner, causal=causal,
                                                  of_queries=of_queries))
    idx = np.arange(length)
    skipped = 0
    for r, row in enumerate(seg):
        vis = (row[:, None] == row[None, :]) & (row[None, :] > 0)  # [query, key]
        if causal:
            vis &= idx[:, None] >= idx[None, :]
        if not of_queries:
            vis = vis.T  # [key, query]
        blocks = vis.reshape(length // block, block, length // partner, partner).any(axis=(1, 3))
        for i, visible in enumerate(blocks):
            cols = np.flatnonzero(visible)
            if cols.size == 0:
                assert lo[r, i] == hi[r, i], (r, i)
                continue
            assert lo[r, i] == cols[0] and hi[r, i] == cols[-1] + 1, (r, i, lo[r, i], hi[r, i], cols)
            skipped += blocks.shape[1] - (hi[r, i] - lo[r, i])
    assert skipped > 0


def test_3b_step_lowers_to_triton(monkeypatch):
    """The 3B train step with attention "pallas" (scanned layers, remat, the vision tower's
    window / full branches, bf16), lowered for CUDA without a GPU: every attention is one of the
    three Triton kernels (forward, run again by remat; dK/dV; dQ), for text and both vision kinds,
    and every weight product, forward and backward, multiplies bf16 operands (f32 gradients
    reaching the products made the backward's f32)."""
    import optax
    from flax import nnx

    from bbu_jax.models import flash_attention
    from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
    from bbu_jax.perf.lm_step import lm_train_step
    from bbu_jax.perf.synthetic import packed_batch

    from packaging.version import Version
    if Version(jax.__version__) >= Version("0.11") and jax.default_backend() != "gpu":
        pytest.skip("jax >= 0.11 lowers the Triton kernels for cuda only where a GPU (or an abstract GPU "
                    "device) is present")
    monkeypatch.setattr(flash_attention, "_interpret_default", lambda: False)
    cfg = Qwen25VLConfig()
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16,
                                            attention_impl="pallas", remat="full"))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-5)
    batch, _, _ = packed_batch(cfg, rows=1, tokens=8192, segments=4, image_side=448)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = jax.jit(lm_train_step(graphdef, rest, tx, lm_chunk=2048))
    text = step.trace(params, jax.eval_shape(tx.init, params), batch).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "([a-z_]+)"', text)
    per_kind = {"segment_flash_forward": 2, "segment_flash_dkdv": 1, "segment_flash_dq": 1}
    assert sorted(calls) == sorted(name for name, n in per_kind.items() for _ in range(3 * n)), calls
    products = re.findall(r"stablehlo\.dot_general .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    matrix = [(a, b) for a, b in products if a.count("x") <= 3]  # (rows, features) x (in, out), LM head
    assert len(matrix) > 50 and all(a.endswith("xbf16>") and b.endswith("xbf16>") for a, b in matrix), \
        sorted({p for p in matrix if "f32" in "".join(p)})
