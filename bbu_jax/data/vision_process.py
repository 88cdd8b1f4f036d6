"""Qwen2.5-VL image preprocessing, identical to transformers' Qwen2VLImageProcessor (PIL backend).

transformers 5.24 picks the PIL backend (`Qwen2VLImageProcessorPil`) when torchvision is absent,
as in our environment: RGB uint8 -> PIL bicubic resize to smart_resize(h, w) -> x * (1/255) in
float64 then float32 -> (x - mean) / std -> patch rows. The torchvision backend resizes with
antialiased bicubic on tensors and differs by up to a few 1e-2, so we match the PIL one.
"""
from __future__ import annotations

import math

import numpy as np
from jaxtyping import Float, Int, UInt8
from PIL import Image

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# (3, 256): channel c of a uint8 pixel value v -> (float32(v * (1/255) in float64) - mean) / std,
# the processor's arithmetic done once per value.
NORMALIZED = (((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None] - IMAGE_MEAN)
              / IMAGE_STD).T.copy()
# The 3B checkpoint's preprocessor_config.json.
DEFAULT_MIN_PIXELS = 3136
DEFAULT_MAX_PIXELS = 12845056


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) multiples of `factor`, area within [min_pixels, max_pixels], aspect kept closely."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB image resized to its smart_resize size with PIL bicubic (what conversion stores)."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    return image.resize((w, h), resample=Image.BICUBIC)


def image_pixels(image: Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[UInt8[np.ndarray, "n 588"], Int[np.ndarray, "3"]]:
    """PIL image -> (patch pixels uint8 (N, 588), grid_thw int64 (3,)): what the batch carries.

    Rows are the HF processor's patch order (h-block, w-block, 2x2 inside), each the (C, 14, 14)
    uint8 pixels of one frame; ``normalize_rows`` (or the vision tower, on the device) turns them
    into the processor's float rows. One byte per value instead of the rows' 8 (float32, the frame
    repeated over T)."""
    resized = np.asarray(resize_image(image, min_pixels, max_pixels))  # (H, W, 3) uint8
    h, w, c = resized.shape
    gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
    u = resized.reshape(gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, c)
    u = u.transpose(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, c * PATCH_SIZE * PATCH_SIZE)  # (gh/2, gw/2, 2, 2, C, ..)
    return u, np.array([1, gh, gw], np.int64)


def normalize_rows(pixels: UInt8[np.ndarray, "n 588"]) -> Float[np.ndarray, "n 1176"]:
    """Patch pixels -> the processor's float rows (N, 1176), each (C, T, 14, 14) with the frame
    repeated over T, through NORMALIZED: the same values as normalizing every pixel."""
    n = pixels.shape[0]
    u = pixels.reshape(n, 3, 1, PATCH_SIZE * PATCH_SIZE)
    rows = np.empty((n, 3, TEMPORAL_PATCH_SIZE, PATCH_SIZE * PATCH_SIZE), np.float32)
    for ch in range(3):
        np.take(NORMALIZED[ch], u[:, ch], out=rows[:, ch, :1])
    rows[:, :, 1:] = rows[:, :, :1]
    return rows.reshape(n, -1)


def preprocess_image(image: Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS,
                     max_pixels: int = DEFAULT_MAX_PIXELS
                     ) -> tuple[Float[np.ndarray, "n 1176"], Int[np.ndarray, "3"]]:
    """PIL image -> (pixel rows float32 (N, 1176), grid_thw int64 (3,)) exactly as the HF processor
    gives them (its ``pixel_values``)."""
    pixels, grid = image_pixels(image, min_pixels, max_pixels)
    return normalize_rows(pixels), grid
