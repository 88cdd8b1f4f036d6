"""Vision preprocessing parity with transformers' Qwen2VLImageProcessor."""
import numpy as np
import pytest
from PIL import Image

from bbu_jax.models.qwen2_5_vl.processing import image_pixels, preprocess_image, smart_resize


@pytest.mark.parametrize("hw", [(224, 224), (300, 451), (97, 640), (513, 200), (20, 30), (1000, 700)])
@pytest.mark.parametrize("limits", [(3136, 12845056), (3136, 50176), (56 * 56, 200704)])
def test_preprocess_matches_transformers(hw, limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(hash(hw) % 1000)
    img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil(min_pixels=limits[0], max_pixels=limits[1])(images=[img], return_tensors="np")
    rows, grid = preprocess_image(img, *limits)
    assert smart_resize(*hw, min_pixels=limits[0], max_pixels=limits[1]) == hf_smart_resize(
        *hw, min_pixels=limits[0], max_pixels=limits[1])
    assert rows.dtype == np.float32 and rows.shape == ref["pixel_values"].shape
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    err = np.abs(rows - ref["pixel_values"]).max()
    print(f"{hw} {limits}: max abs diff {err:.3g}")
    np.testing.assert_array_equal(rows, ref["pixel_values"])  # the same float32 arithmetic, bit for bit


def test_tower_turns_batch_pixels_into_the_processor_rows():
    """The batch carries uint8 pixels of one frame; the tower's patch_rows (on the device) must give
    the HF processor's float rows bit for bit, and pass float rows (hf_forward's input) through."""
    import jax.numpy as jnp
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from bbu_jax.models.qwen2_5_vl.config import VisionConfig
    from bbu_jax.models.qwen2_5_vl.vision import patch_rows

    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (230, 410, 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=200704)(images=[img], return_tensors="np")
    pixels, grid = image_pixels(img, 3136, 200704)
    assert pixels.dtype == np.uint8 and pixels.shape == (int(np.prod(grid)), 588)
    cfg = VisionConfig()
    rows = np.asarray(patch_rows(jnp.asarray(pixels)[None], cfg))[0]
    np.testing.assert_array_equal(rows, ref["pixel_values"])
    floats = jnp.asarray(ref["pixel_values"])[None]
    assert patch_rows(floats, cfg) is floats
    with pytest.raises(ValueError, match="uint8 patches have 1176 values"):
        patch_rows(jnp.zeros((1, 4, 1176), jnp.uint8), cfg)
    with pytest.raises(ValueError, match="float patch rows have 588 values"):
        patch_rows(jnp.zeros((1, 4, 588), jnp.float32), cfg)


def test_auto_image_processor_is_the_pil_backend(tiny_hf_dir):
    """Documents which backend we match: without torchvision AutoImageProcessor gives the PIL one."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(tiny_hf_dir)
    except ImportError as e:  # releases (e.g. transformers 5.17) whose AutoImageProcessor needs torchvision
        pytest.skip(f"AutoImageProcessor has no PIL backend in this transformers: {str(e).splitlines()[0]}")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 260, 3), dtype=np.uint8))
    ref = proc(images=[img], return_tensors="np")
    rows, grid = preprocess_image(img, proc.min_pixels if hasattr(proc, "min_pixels") else 3136,
                                  proc.max_pixels if hasattr(proc, "max_pixels") else 12845056)
    print(type(proc).__name__, np.abs(rows - ref["pixel_values"]).max())
    np.testing.assert_allclose(rows, ref["pixel_values"], atol=1e-6 if "Pil" in type(proc).__name__ else 0.1)


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)
