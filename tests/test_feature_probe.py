"""The linear probe behind benchmarks/feature_probe.py: it reads a class that is linearly present
in the features and does not invent one that is not."""
import numpy as np

from bbu_jax.evaluation.feature_probe import probe

CLASSES = ["fiber/fiber connector/connected", "label/cable label/readable", "screw point/BBU mounting screw/loose"]


def _data(rng, n, informative):
    y = [CLASSES[i] for i in rng.integers(0, 3, n)]
    x = rng.normal(size=(n, 8))
    if informative:
        x[:, :3] += 4 * np.eye(3)[[CLASSES.index(c) for c in y]]
    return x, y


def test_probe_reads_a_linearly_present_class():
    rng = np.random.default_rng(0)
    (tx, ty), (vx, vy) = _data(rng, 300, True), _data(rng, 100, True)
    assert np.mean([a == b for a, b in zip(probe(tx, ty, vx), vy)]) > 0.95


def test_probe_is_at_chance_on_noise():
    rng = np.random.default_rng(1)
    (tx, ty), (vx, vy) = _data(rng, 300, False), _data(rng, 300, False)
    assert np.mean([a == b for a, b in zip(probe(tx, ty, vx), vy)]) < 0.5
