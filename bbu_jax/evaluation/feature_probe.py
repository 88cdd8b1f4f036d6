"""How much of a part's identity the features at its centre token carry: the ceiling for the head.

For each object, the merged token whose 28 x 28 pixel cell holds the box centre is taken, and three
features of it are read: the mean colour of its four patches (a control), the vision tower's merged
output, and the LLM's final hidden state there (what the detection head reads as memory). A ridge
linear probe on one-hot descs fitted on train objects and scored on val objects says how much of
the desc each feature carries; a head whose caption accuracy stays far below it does not attend to
the token of the box it predicts (benchmarks/feature_probe.py prints the table).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.data.pipeline import build_inference_inputs

FEATURES = ("pixels", "merger", "hidden")
MODEL_FIELDS = ("input_ids", "positions", "segment_ids", "patches", "patch_pos", "patch_window_ids",
                "patch_image_ids", "vision_token_index")


def centre_features(predictor, records) -> tuple[dict[str, np.ndarray], list[str]]:
    """{feature: (N, dim)} and the N descs of the records' objects whose centre token exists."""
    @nnx.jit
    def forward(model, batch):
        merged = model.visual(batch["patches"], batch["patch_pos"], batch["patch_window_ids"],
                              batch["patch_image_ids"])[0]
        return merged, model(*(batch[k] for k in MODEL_FIELDS))[0]

    encoder = predictor.encoder
    pad = encoder.ids["<|image_pad|>"]
    feats: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
    descs = []
    for rec in records:
        batch, info = build_inference_inputs(encoder, rec.student.images[:1], source=rec.source)
        merged, hidden = forward(predictor.model, {k: jnp.asarray(batch[k]) for k in MODEL_FIELDS})
        pads = np.flatnonzero(batch["input_ids"][0] == pad)
        token = batch["vision_token_index"][0, pads]  # merged-token index of each image pad
        cell = batch["patch_pos"][0, 4 * token] // 2  # (row, col) of each merged token
        colour = batch["patches"][0].reshape(-1, 3, 14 * 14).astype(np.float32).mean(-1)
        (h, w), (sh, sw) = info["resized_hw"], info["stored_hw"]
        for obj in rec.student.objects:
            x1, y1, x2, y2 = obj.bbox
            row, col = int((y1 + y2) / 2 * h / sh) // 28, int((x1 + x2) / 2 * w / sw) // 28
            hit = np.flatnonzero((cell[:, 0] == row) & (cell[:, 1] == col))
            if hit.size == 0:
                continue
            j = hit[0]
            feats["pixels"].append(colour[4 * token[j]:4 * token[j] + 4].ravel())
            feats["merger"].append(np.asarray(merged[token[j]]))
            feats["hidden"].append(np.asarray(hidden[pads[j]]))
            descs.append(obj.desc)
    return {k: np.stack(v) for k, v in feats.items()}, descs


def probe(train_x: np.ndarray, train_y: list[str], val_x: np.ndarray, ridge: float = 1.0) -> list[str]:
    """Ridge regression on standardized features onto one-hot labels; the val predictions."""
    classes = sorted(set(train_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    targets = np.eye(len(classes))[[classes.index(y) for y in train_y]]
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ targets)
    b = np.c_[(val_x - mean) / std, np.ones(len(val_x))]
    return [classes[i] for i in (b @ weights).argmax(1)]
