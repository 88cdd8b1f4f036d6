"""Hungarian matcher: optimal like scipy, under jit and vmap, with padding, no gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from bbu_jax.losses.matcher import hungarian_match, resolve_matcher


def _problems(seed, b=5, q=9, m=6):
    rng = np.random.default_rng(seed)
    cost = rng.normal(size=(b, q, m)).astype(np.float32) * 3
    valid = rng.random((b, m)) < 0.7
    valid[0] = True  # full
    valid[1] = False  # no GT at all
    return cost, valid


def _check_optimal(cost, valid, match):
    """Valid columns matched to distinct queries, padded ones -1, total cost == scipy's."""
    for k in range(cost.shape[0]):
        cols = np.flatnonzero(valid[k])
        assert np.all(match[k][~valid[k]] == -1)
        rows = match[k][cols]
        expected_matches = min(len(cols), cost.shape[1])
        assert np.sum(rows >= 0) == expected_matches
        assert len(set(rows[rows >= 0].tolist())) == expected_matches
        r, c = linear_sum_assignment(cost[k][:, cols])
        got = cost[k][rows[rows >= 0], cols[rows >= 0]].sum()
        np.testing.assert_allclose(got, cost[k][r, cols[c]].sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["scipy", "optax"])
@pytest.mark.parametrize("q, m", [(9, 6), (6, 6), (4, 6)])
def test_same_total_cost_as_scipy_under_jit(method, q, m):
    cost, valid = _problems(q * 10 + m, q=q, m=m)
    match = jax.jit(lambda c, v: hungarian_match(c, v, method=method))(cost, valid)
    assert match.dtype == jnp.int32 and match.shape == valid.shape
    _check_optimal(cost, valid, np.asarray(match))


@pytest.mark.parametrize("method", ["scipy", "optax"])
def test_vmap(method):
    cost, valid = _problems(3, b=6)
    cost, valid = cost.reshape(2, 3, *cost.shape[1:]), valid.reshape(2, 3, -1)
    match = jax.jit(jax.vmap(lambda c, v: hungarian_match(c, v, method=method)))(cost, valid)
    assert match.shape == valid.shape
    _check_optimal(cost.reshape(6, *cost.shape[2:]), valid.reshape(6, -1), np.asarray(match).reshape(6, -1))


def test_non_finite_costs_do_not_crash():
    cost, valid = _problems(4)
    cost[0, 0, 0], cost[2, 1, 1] = np.nan, np.inf
    match = np.asarray(jax.jit(hungarian_match)(cost, valid))
    assert np.all(match[~valid] == -1) and np.all(match[valid] >= 0)


def test_no_gradient_through_matching():
    cost, valid = _problems(5)

    def matched_cost(c):
        match = hungarian_match(c, jnp.asarray(valid))
        taken = jnp.take_along_axis(c, jnp.maximum(match, 0)[:, None, :], axis=1)[:, 0]
        return jnp.where(match >= 0, taken, 0.0).sum() + match.sum().astype(jnp.float32)

    grad = np.asarray(jax.jit(jax.grad(matched_cost))(jnp.asarray(cost)))
    # Only the gather contributes: one 1 at each matched (query, column), zero elsewhere.
    match = np.asarray(hungarian_match(jnp.asarray(cost), jnp.asarray(valid)))
    expected = np.zeros_like(cost)
    for k, j in zip(*np.nonzero(match >= 0)):
        expected[k, match[k, j], j] = 1.0
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("platform, method", [("cpu", "scipy"), ("gpu", "optax"), ("tpu", "optax")])
def test_auto_matcher_stays_on_the_device_of_an_accelerator(platform, method):
    assert resolve_matcher("auto", platform) == method
    assert resolve_matcher("scipy", platform) == "scipy"
    with pytest.raises(ValueError, match="matcher"):
        resolve_matcher("greedy", platform)
    cost, valid = _problems(0)
    with pytest.raises(ValueError, match="auto"):
        hungarian_match(jnp.asarray(cost), jnp.asarray(valid), method="auto")  # resolved where the settings are built, never here
