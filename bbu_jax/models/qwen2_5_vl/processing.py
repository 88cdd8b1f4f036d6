"""Qwen2.5-VL's own input processing, on the host (numpy): one module for the model's contract.

Images: identical to transformers' Qwen2VLImageProcessor (PIL backend). transformers picks the PIL
backend (`Qwen2VLImageProcessorPil`) when torchvision is absent: RGB uint8 (transparency composited
on white, `to_rgb`) -> PIL bicubic resize to smart_resize(h, w) -> x * (1/255) in float64 then
float32 -> (x - mean) / std -> patch rows. The torchvision backend resizes with antialiased bicubic
on tensors and differs slightly, so we match the PIL one. Batches carry uint8 pixels in patch order
(`image_pixels`); the vision tower maps them through `NORMALIZED` on the device. Every photo file
is read with `load_image` (upright by its EXIF orientation, then `to_rgb`), so conversion,
training, evaluation and pictures see the same pixels.

Indices: everything data-dependent in the model -- M-RoPE positions, the vision tower's window
permutation, 2D rotary positions, attention segment ids, where merged vision tokens land in the
text -- is computed here, so the jitted model only ever sees fixed-shape arrays and a new image
size never recompiles. Each function mirrors one piece of transformers' Qwen2.5-VL exactly:
``rope_index`` <-> ``Qwen2_5_VLModel.get_rope_index``; ``vision_layout`` <->
``vision_utils.get_vision_window_index`` / ``get_vision_position_ids`` / ``get_vision_cu_seqlens``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int, UInt8
from PIL import Image, ImageOps

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


PROCESSOR_FILE = "preprocessor_config.json"


def read_pixel_limits(folder: str | os.PathLike) -> tuple[int, int]:
    """(min_pixels, max_pixels) a model folder's processor config sets, read as transformers reads
    it (``size`` shortest/longest edge, overridden by the legacy keys); the defaults without one."""
    path = os.path.join(folder, PROCESSOR_FILE)
    if not os.path.isfile(path):
        return DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    size = config.get("size") or {}
    low = config.get("min_pixels", size.get("shortest_edge", DEFAULT_MIN_PIXELS))
    high = config.get("max_pixels", size.get("longest_edge", DEFAULT_MAX_PIXELS))
    return int(low), int(high)


def with_pixel_limits(config: dict, min_pixels: int, max_pixels: int) -> dict:
    """A processor config that resizes with these limits, in both forms transformers reads."""
    return {**config, "min_pixels": min_pixels, "max_pixels": max_pixels,
            "size": {**(config.get("size") or {}), "shortest_edge": min_pixels, "longest_edge": max_pixels}}


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


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB exactly as transformers' image processor makes it (``image_transforms.convert_to_rgb``):
    an image with an "A" band or a transparency entry (RGBA, LA, PA, P/L/RGB with tRNS) is
    composited on white; any other mode is PIL's ``convert("RGB")``. Dropping the alpha instead
    would show the model whatever colour hides under the transparent pixels."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


# What every image argument accepts: a file path (JSONL records), a PIL image or a uint8 array.
ImageInput = str | os.PathLike | Image.Image | np.ndarray


def load_image(source: ImageInput) -> Image.Image:
    """A photo as people and transformers see it: upright, RGB (``to_rgb``).

    A file or PIL image is turned by its EXIF orientation (``ImageOps.exif_transpose``): phones
    store pixels sideways with an Orientation tag, and viewers, LabelMe (whose boxes are coordinates
    of the turned view) and transformers' ``load_image`` all show the turned view. An (H, W) or
    (H, W, 1|3|4) uint8 array is the image ``Image.fromarray`` makes of it (4 channels: RGBA), which
    gives the processor's own conversion of such an array. Raises OSError or ValueError for a file
    PIL cannot read or refuses to (over twice ``Image.MAX_IMAGE_PIXELS``)."""
    if isinstance(source, np.ndarray):
        if source.ndim == 3 and source.shape[2] == 1:
            source = source[..., 0]
        if source.dtype != np.uint8 or not (source.ndim == 2 or source.ndim == 3 and source.shape[2] in (3, 4)):
            raise ValueError(f"an image array must be uint8 (H, W) or (H, W, 1|3|4), got {source.dtype} "
                             f"{source.shape}")
        return to_rgb(Image.fromarray(source))
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    try:
        with Image.open(source) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:  # not an OSError: callers would not count it as a bad image
        raise ValueError(str(e)) from None


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB image (``to_rgb``) resized to its smart_resize size with PIL bicubic (what conversion stores)."""
    image = to_rgb(image)
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


GridTHW = Sequence[int | np.integer]  # (t, h, w) in patches; numpy ints as read from image_grid_thw


def _grid(thw: GridTHW, spatial_merge_size: int) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in thw)
    if t < 1 or h % spatial_merge_size or w % spatial_merge_size or h < 1 or w < 1:
        raise ValueError(f"grid_thw {tuple(thw)} must be positive with h, w multiples of {spatial_merge_size}")
    return t, h, w


def num_image_tokens(thw: GridTHW, spatial_merge_size: int = 2) -> int:
    """Number of `<|image_pad|>` tokens (merged vision tokens) of one image."""
    t, h, w = _grid(thw, spatial_merge_size)
    return t * h * w // spatial_merge_size**2


def rope_index(input_ids: np.ndarray, grid_thws: Sequence[GridTHW], *, image_token_id: int,
               vision_start_token_id: int, spatial_merge_size: int = 2) -> tuple[np.ndarray, int]:
    """M-RoPE positions (3, L) int32 of one sequence starting at position 0, and its rope delta.

    Text tokens get the same running position on all three rows; each image's tokens get
    (t, h, w) = start + (frame, merged row, merged col), and the text after it continues at
    start + max(h, w) / merge (transformers' rule). ``rope_delta = max + 1 - L`` is what decoding adds.
    Images are consumed in order: the k-th run of image tokens is ``grid_thws[k]`` and must have
    exactly its token count. ``vision_start_token_id`` is checked to precede every image.
    """
    ids = np.asarray(input_ids).reshape(-1)
    length = ids.shape[0]
    positions = np.zeros((3, length), np.int64)
    grids = [_grid(g, spatial_merge_size) for g in grid_thws]
    is_image = ids == image_token_id
    i = cur = image = 0
    while i < length:
        if not is_image[i]:
            j = i
            while j < length and not is_image[j]:
                j += 1
            positions[:, i:j] = np.arange(j - i) + cur
            cur += j - i
            i = j
            continue
        if image >= len(grids):
            raise ValueError(f"image token at index {i} but only {len(grids)} grid(s) given")
        if i == 0 or ids[i - 1] != vision_start_token_id:
            raise ValueError(f"image {image} at index {i} is not preceded by vision_start ({vision_start_token_id})")
        t, h, w = grids[image]
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        n = t * gh * gw
        if i + n > length or not is_image[i:i + n].all():
            raise ValueError(f"image {image} at index {i}: expected {n} image tokens for grid {(t, h, w)}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        positions[:, i:i + n] = np.stack([tt, hh, ww]).reshape(3, n) + cur
        cur += max(gh, gw)
        i += n
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} grid(s) given but {image} image(s) found in the tokens")
    delta = int(positions.max()) + 1 - length if length else 0
    return positions.astype(np.int32), delta


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Window-ordered layout of the concatenated patches of several images (N patches).

    perm:         (N,) processor row feeding each window-ordered patch (groups of 4 rows kept together).
    pos:          (N, 2) (row, col) of each permuted patch in its image's patch grid (2D RoPE).
    window_ids:   (N,) 1-based window id of each permuted patch (window-attention segments).
    image_ids:    (N,) 1-based image (frame) id of each permuted patch (full-attention segments).
    merged_index: (N/4,) for merged token k in processor/text order, its index in the
                  window-ordered merger output (inverse of Qwen's window_index).
    """
    perm: np.ndarray
    pos: np.ndarray
    window_ids: np.ndarray
    image_ids: np.ndarray
    merged_index: np.ndarray


def vision_layout(grid_thws: Sequence[GridTHW], *, window_size: int = 112, patch_size: int = 14,
                  spatial_merge_size: int = 2) -> VisionLayout:
    """Qwen2.5-VL's window permutation, rotary positions and attention segments for these images."""
    m = spatial_merge_size
    unit = m * m
    win = window_size // m // patch_size  # window side in merged tokens
    window_index, merged_window, pos, frame_ids = [], [], [], []
    offset = n_windows = n_frames = 0
    for thw in grid_thws:
        t, h, w = _grid(thw, m)
        gh, gw = h // m, w // m
        # transformers pads by win - n % win (a whole empty window when n % win == 0) and drops
        # empty windows, which gives the same windows as padding to the next multiple.
        ph, pw = -(-gh // win) * win, -(-gw // win) * win
        index = np.full((t, ph, pw), -1, np.int64)
        index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        blocks = index.reshape(t, ph // win, win, pw // win, win).transpose(0, 1, 3, 2, 4)
        blocks = blocks.reshape(t * (ph // win) * (pw // win), win * win)
        for block in blocks:
            block = block[block >= 0]
            if block.size:
                n_windows += 1
                window_index.append(block + offset)
                merged_window.append(np.full(block.size, n_windows))
        # processor rows: (t, h-block, w-block, inner row, inner col)
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        rows = rows.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1)
        pos.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
        frame_ids.append(np.repeat(np.arange(t) + n_frames + 1, h * w))
        n_frames += t
        offset += t * gh * gw
    if not grid_thws:
        empty = np.zeros((0,), np.int32)
        return VisionLayout(empty, np.zeros((0, 2), np.int32), empty, empty, empty)
    window_index = np.concatenate(window_index)
    perm = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
    return VisionLayout(
        perm=perm.astype(np.int32),
        pos=np.concatenate(pos)[perm].astype(np.int32),
        window_ids=np.repeat(np.concatenate(merged_window), unit).astype(np.int32),
        image_ids=np.concatenate(frame_ids)[perm].astype(np.int32),
        merged_index=np.argsort(window_index).astype(np.int32),
    )


def prepare_hf_batch(input_ids: np.ndarray, attention_mask: np.ndarray | None,
                     pixel_values: np.ndarray | None, image_grid_thw: np.ndarray | None, *,
                     image_token_id: int, vision_start_token_id: int, spatial_merge_size: int = 2,
                     window_size: int = 112, patch_size: int = 14,
                     patch_budget: int | None = None) -> dict[str, np.ndarray]:
    """Turn one HF processor output (a batch, left or right padded) into the model's inputs.

    Each row becomes one segment (id 1, padding 0) with positions restarting at 0 on its first real
    token. The processor concatenates all images of the batch in row order; row b's patches are
    permuted into window order and padded to ``patch_budget`` (default: the largest row, rounded up
    to a multiple of 4, at least 4). Returns the batch.py fields the model consumes.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, L), got {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in np.asarray(image_grid_thw)]
    pixels = np.zeros((0, 0), np.float32) if pixel_values is None else np.asarray(pixel_values, np.float32)
    unit = spatial_merge_size**2

    # assign images to rows in order of appearance
    row_grids, row_rows = [], []
    next_image, next_row = 0, 0
    for b in range(batch):
        n_tokens = int(((input_ids[b] == image_token_id) & mask[b]).sum())
        grids_b = []
        while n_tokens > 0:
            if next_image >= len(grids):
                raise ValueError(f"row {b} has more image tokens than image_grid_thw describes")
            grids_b.append(grids[next_image])
            n_tokens -= num_image_tokens(grids[next_image], spatial_merge_size)
            next_image += 1
        if n_tokens < 0:
            raise ValueError(f"row {b}: image tokens do not match image_grid_thw")
        n_rows = sum(int(np.prod(g)) for g in grids_b)
        row_grids.append(grids_b)
        row_rows.append(np.arange(next_row, next_row + n_rows))
        next_row += n_rows
    if next_image != len(grids) or next_row != (pixels.shape[0] if grids else 0):
        raise ValueError(f"{len(grids)} grids / {pixels.shape[0]} patch rows, but the tokens use "
                         f"{next_image} images / {next_row} rows")

    need = max([len(r) for r in row_rows] + [unit])
    budget = -(-need // unit) * unit if patch_budget is None else patch_budget
    if budget % unit or budget < need:
        raise ValueError(f"patch_budget {budget} must be a multiple of {unit} and >= {need}")

    out = {
        "input_ids": np.where(mask, input_ids, 0).astype(np.int32),
        "positions": np.zeros((batch, 3, length), np.int32),
        "segment_ids": mask.astype(np.int32),
        "patches": np.zeros((batch, budget, pixels.shape[1] if grids else 3 * 2 * patch_size**2), np.float32),
        "patch_pos": np.zeros((batch, budget, 2), np.int32),
        "patch_window_ids": np.zeros((batch, budget), np.int32),
        "patch_image_ids": np.zeros((batch, budget), np.int32),
        "vision_token_index": np.full((batch, length), -1, np.int32),
    }
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        pos, _ = rope_index(input_ids[b, real], row_grids[b], image_token_id=image_token_id,
                            vision_start_token_id=vision_start_token_id,
                            spatial_merge_size=spatial_merge_size)
        out["positions"][b][:, real] = pos
        if not row_grids[b]:
            continue
        lay = vision_layout(row_grids[b], window_size=window_size, patch_size=patch_size,
                            spatial_merge_size=spatial_merge_size)
        n = lay.perm.shape[0]
        out["patches"][b, :n] = pixels[row_rows[b][lay.perm]]
        out["patch_pos"][b, :n] = lay.pos
        out["patch_window_ids"][b, :n] = lay.window_ids
        out["patch_image_ids"][b, :n] = lay.image_ids
        image_positions = real[input_ids[b, real] == image_token_id]
        out["vision_token_index"][b, image_positions] = lay.merged_index
    return out
