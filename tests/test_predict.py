"""predict_detection: one forward + the head's top-k, boxes in the image's pixels."""
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from bbu_jax.data.encode import SampleEncoder
from bbu_jax.inference.predict import predict_detection, to_pixels
from bbu_jax.models.detection_head import DetectionHead, HeadSpec
from bbu_jax.models.qwen2_5_vl import from_hf


@pytest.fixture(scope="module")
def setup(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(100, 130), (60, 200), (90, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    model = from_hf(tiny_hf_dir)
    head = DetectionHead(HeadSpec(width=32, num_queries=8, num_layers=2, num_heads=2, mlp_dim=64,
                                  caption_layers=1, max_caption_len=6), llm_hidden=64, rngs=nnx.Rngs(0))
    encoder = SampleEncoder(str(tiny_hf_dir), min_pixels=3136, max_pixels=40000, language="en")
    vocab = np.array(sorted({*range(40, 90), encoder.ids["<|im_end|>"]}), np.int32)
    return dict(model=model, head=head, encoder=encoder, caption_vocab=vocab, paths=paths)


def test_to_pixels():
    np.testing.assert_allclose(to_pixels(np.array([[0.5, 0.5, 0.2, 0.4]]), 100, 200), [[80, 30, 120, 70]])


def test_batch_invariant_sorted_and_thresholded(setup):
    s = {k: setup[k] for k in ("model", "head", "encoder", "caption_vocab")}
    paths = setup["paths"]
    # Same budgets (one compilation): rows in the other order, and a row beside padding rows.
    together = predict_detection(images=paths, score_threshold=0.0, top_k=5, batch_size=4, **s)
    swapped = predict_detection(images=paths[::-1], score_threshold=0.0, top_k=5, batch_size=4, **s)[::-1]
    assert len(together) == 3
    for t, a, (h, w) in zip(together, swapped, [(100, 130), (60, 200), (90, 90)]):
        assert t.boxes.shape == (5, 4) and len(t.captions) == 5 and all(isinstance(c, str) for c in t.captions)
        assert np.all(np.diff(t.scores) <= 0)  # best first
        np.testing.assert_allclose(t.boxes, a.boxes, rtol=1e-4, atol=1e-3)  # padding rows never leak
        np.testing.assert_allclose(t.scores, a.scores, rtol=1e-4, atol=1e-6)
        assert t.captions == a.captions
        # sigmoid boxes of the image's own pixel frame: centres inside it
        cx, cy = (t.boxes[:, 0] + t.boxes[:, 2]) / 2, (t.boxes[:, 1] + t.boxes[:, 3]) / 2
        assert np.all((0 <= cx) & (cx <= w) & (0 <= cy) & (cy <= h))
    cut = float(together[0].scores[2])
    kept = predict_detection(images=paths, score_threshold=cut, top_k=5, batch_size=4, **s)[0]
    assert len(kept.scores) == 3 and np.all(kept.scores >= cut)
    assert len(predict_detection(images=paths, score_threshold=1.01, top_k=5, batch_size=4, **s)[0].scores) == 0
