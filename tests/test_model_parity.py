"""Logits parity of the NNX Qwen2.5-VL with transformers' PyTorch model on the tiny checkpoint.

Tolerance: max |jax - torch| <= 1e-4 * max |torch| over the real (unpadded) tokens, float32 on CPU.
"""
import numpy as np
import pytest
from PIL import Image

from bbu_jax.models.qwen2_5_vl import from_hf, hf_forward, processing
from bbu_jax.testing import hf_reference

pytest.importorskip("torch")

TOL = 1e-4


def image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# merged grids: A 4x5 (height a multiple of the 4-token window), B 3x9 (not; 3 windows wide),
# C 9x9 (padded windows in both directions)
IMG_A, IMG_B, IMG_C = image(112, 140, 0), image(84, 252, 1), image(252, 252, 2)


def user(text: str, n_images: int = 0) -> str:
    pads = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{pads}{text}"
            "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="session")
def torch_model(tiny_hf_dir):
    return hf_reference.torch_reference_model(tiny_hf_dir)


@pytest.fixture(scope="session")
def jax_model(tiny_hf_dir):
    return from_hf(tiny_hf_dir)


def reference_logits(model, inputs: dict) -> np.ndarray:
    """transformers' logits; inputs carry mm_token_type_ids (without them transformers silently
    falls back to 1D positions for image tokens)."""
    assert "mm_token_type_ids" in inputs
    return hf_reference.torch_logits(model, inputs)


def rel_err(out: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        out, ref = out[mask.astype(bool)], ref[mask.astype(bool)]
    return float(np.abs(out - ref).max() / np.abs(ref).max())


CASES = {
    "text_only": ([user("Detect every BBU screw.")], None, "right"),
    "one_image": ([user("Detect every BBU screw.", 1)], [[IMG_A]], "right"),
    "two_images": ([user("螺丝连接点 compare", 2)], [[IMG_A, IMG_C]], "right"),
    "batch_right_pad": ([user("label port", 1), user("a much longer question about the fiber cable", 1)],
                        [[IMG_B], [IMG_A]], "right"),
    "batch_left_pad": ([user("label port", 2), user("a much longer text-only question about the fiber cable")],
                       [[IMG_B, IMG_A], []], "left"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity(case, tiny_hf_dir, torch_model, jax_model):
    texts, images, side = CASES[case]
    inputs = hf_reference.processor_inputs(tiny_hf_dir, texts, images, padding_side=side)
    ref = reference_logits(torch_model, inputs)
    out = hf_forward(jax_model, **inputs)
    assert out.shape == ref.shape
    err = rel_err(out, ref, inputs["attention_mask"])
    print(f"{case}: logits max rel err {err:.2e} (L={ref.shape[1]})")
    assert err <= TOL


def test_vision_tower_parity(tiny_hf_dir, torch_model, jax_model):
    import jax.numpy as jnp
    import torch

    inputs = hf_reference.processor_inputs(tiny_hf_dir, [user("x", 3)], [[IMG_A, IMG_B, IMG_C]])
    grids = inputs["image_grid_thw"]
    with torch.no_grad():
        ref = torch_model.model.visual(torch.from_numpy(inputs["pixel_values"]),
                                       grid_thw=torch.from_numpy(grids)).pooler_output.numpy()
    lay = processing.vision_layout([tuple(g) for g in grids])
    feats = jax_model.visual(jnp.asarray(inputs["pixel_values"][lay.perm])[None], jnp.asarray(lay.pos)[None],
                             jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.image_ids)[None])[0]
    out = np.asarray(feats)[lay.merged_index]  # window order -> processor/text order
    err = rel_err(out, ref)
    print(f"vision tower max rel err {err:.2e}")
    assert out.shape == ref.shape and err <= TOL


def test_bf16_compute_error(tiny_hf_dir, jax_model):
    import jax.numpy as jnp

    inputs = hf_reference.processor_inputs(tiny_hf_dir, [user("Detect every BBU screw.", 1)], [[IMG_A]])
    ref = hf_forward(jax_model, **inputs)
    out = hf_forward(from_hf(tiny_hf_dir, compute_dtype=jnp.bfloat16), **inputs)
    err = rel_err(out, ref)
    print(f"bf16 compute vs f32: logits max rel err {err:.2e}, max abs {np.abs(out - ref).max():.3e}")
    assert np.isfinite(out).all() and err < 0.1


def test_unrolled_layers_match(tiny_hf_dir, torch_model):
    """scan_layers=False (unrolled layer loops) computes the same model."""
    texts, images, side = CASES["two_images"]
    inputs = hf_reference.processor_inputs(tiny_hf_dir, texts, images, padding_side=side)
    ref = reference_logits(torch_model, inputs)
    err = rel_err(hf_forward(from_hf(tiny_hf_dir, scan_layers=False), **inputs), ref, inputs["attention_mask"])
    print(f"unrolled: logits max rel err {err:.2e}")
    assert err <= TOL
