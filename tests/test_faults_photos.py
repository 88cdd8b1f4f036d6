"""Photos are read the way people and transformers see them (issue 17).

A phone photo stores its pixels sideways with an EXIF Orientation tag; viewers and LabelMe show,
and label, the turned view, so conversion, encoding, validation and pictures must turn it too.
Transparent photos are composited on white as transformers' image processor does, bit for bit,
for every PIL mode a file can hold.
"""
import json

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data import convert, schema
from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.validate import validate_jsonl
from bbu_jax.evaluation.visualize import draw_comparison
from bbu_jax.models.qwen2_5_vl.processing import (load_image, preprocess_image, smart_resize,
                                                  vision_layout)

PIX = dict(min_pixels=3136, max_pixels=56 * 56 * 16)
RED = (220, 30, 30)
RAW_W, RAW_H = 240, 160  # the stored, sideways pixels (landscape); the upright view is 160 x 240
OBJ_RAW = (100, 90, 200, 150)  # x1, y1, x2, y2 of the red object in the stored pixels
# Orientation 6 turns the stored pixels 90 degrees clockwise for viewing: stored (x, y) is shown
# at (RAW_H - 1 - y, x). The object is therefore 60 wide and 100 tall upright, and its upright
# box reaches y = 200, outside the stored 240 x 160 frame.
OBJ_UPRIGHT = (RAW_H - OBJ_RAW[3], OBJ_RAW[0], RAW_H - OBJ_RAW[1], OBJ_RAW[2])
DESC = "cable/red/ok"


def sideways_photo(path) -> None:
    rng = np.random.default_rng(0)
    px = np.repeat(rng.integers(60, 180, (RAW_H, RAW_W, 1), dtype=np.uint8), 3, axis=2)  # grey noise
    x1, y1, x2, y2 = OBJ_RAW
    px[y1:y2, x1:x2] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(px).save(path, quality=95, exif=exif)


def red_fraction(pixels: np.ndarray, box) -> float:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    patch = np.asarray(pixels, np.int32)[y1:y2, x1:x2]
    assert patch.size, box
    return float(((patch[..., 0] > 128) & (patch[..., 0] - patch[..., 1] > 60)
                  & (patch[..., 0] - patch[..., 2] > 60)).mean())


def test_sideways_photo_is_converted_and_validated_upright(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    sideways_photo(raw / "phone.jpg")
    x1, y1, x2, y2 = OBJ_UPRIGHT
    (raw / "phone.json").write_text(json.dumps({  # what LabelMe saves: the upright view's size and boxes
        "imagePath": "phone.jpg", "imageWidth": RAW_H, "imageHeight": RAW_W,
        "shapes": [{"label": DESC, "shape_type": "rectangle", "points": [[x1, y1], [x2, y2]]}]}))
    out = tmp_path / "out"
    summary = convert.convert_dataset(str(raw), "labelme", str(out), val_ratio=0.0, teacher_pool_size=0,
                                      seed=0, progress=False, **PIX)
    assert summary["skipped"]["count"] == 0, summary["skipped"]
    (rec,) = schema.load_records(out / "train.jsonl")[0]
    h, w = smart_resize(RAW_W, RAW_H, **PIX)  # portrait
    assert rec.orig_size == (RAW_W, RAW_H)
    with Image.open(rec.student.images[0]) as stored:  # its own pixels, no orientation applied
        assert stored.getexif().get(0x0112, 1) == 1
        pixels = np.asarray(stored.convert("RGB"))
    assert pixels.shape == (h, w, 3)
    (obj,) = rec.student.objects
    covered = red_fraction(pixels, obj.bbox)
    print(f"stored box {obj.bbox}: {covered:.1%} object pixels")
    assert covered > 0.9
    assert validate_jsonl(out / "train.jsonl") == []
    # A JSONL pointing at the phone photo itself: its upright box is in bounds
    (tmp_path / "direct.jsonl").write_text(json.dumps(
        {"images": ["raw/phone.jpg"], "objects": [{"bbox_2d": list(OBJ_UPRIGHT), "desc": DESC}]}) + "\n")
    assert validate_jsonl(tmp_path / "direct.jsonl") == []


def unpatch(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Processor-order patch pixels (N, 588) back to the (h, w, 3) image (image_pixels inverted)."""
    gh, gw = h // 14, w // 14
    u = pixels.reshape(gh // 2, gw // 2, 2, 2, 3, 14, 14).transpose(0, 2, 5, 1, 3, 6, 4)
    return u.reshape(h, w, 3)


def test_encoder_and_pictures_see_the_upright_photo(tmp_path, tiny_hf_dir):
    sideways_photo(tmp_path / "phone.jpg")
    ex = schema.Example((str(tmp_path / "phone.jpg"),), (schema.Obj(OBJ_UPRIGHT, DESC),))
    s = SampleEncoder(str(tiny_hf_dir), language="en", **PIX).encode(ex, (), source="phone:1", record_id="p")
    assert s.meta["stored_hw"] == (RAW_W, RAW_H)
    rh, rw = s.meta["resized_hw"]
    assert (rh, rw) == smart_resize(RAW_W, RAW_H, **PIX)
    lay = vision_layout([(1, rh // 14, rw // 14)])
    pixels = np.empty_like(s.patches)
    pixels[lay.perm] = s.patches  # window order -> processor order
    cx, cy, bw, bh = s.gt_boxes[0] * np.array([rw, rh, rw, rh])
    covered = red_fraction(unpatch(pixels, rh, rw), (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2))
    print(f"encoded target box: {covered:.1%} object pixels")
    assert covered > 0.9
    # the picture shows the upright photo: the object is taller than wide, as annotated
    picture = np.asarray(draw_comparison(tmp_path / "phone.jpg", [{"bbox_2d": list(OBJ_UPRIGHT), "desc": DESC}],
                                         None, panel_size=240, font_path=""), np.int32)
    ys, xs = np.nonzero((picture[..., 0] > 150) & (picture[..., 1] < 90) & (picture[..., 2] < 90))
    assert ys.size and np.ptp(ys) > 1.3 * np.ptp(xs), (np.ptp(ys), np.ptp(xs))


def _pattern(rng, shape) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _write_mode(case: str, path, rng) -> None:
    """One small photo file in `case`'s PIL mode; transparency varies over the image."""
    hw = (45, 71)
    rgb = _pattern(rng, (*hw, 3))
    if case == "1":
        Image.fromarray(rng.random(hw) > 0.5).save(path)
    elif case in ("L", "L+tRNS"):
        gray = _pattern(rng, hw) & 0xF0  # few levels, so the transparent one covers many pixels
        Image.fromarray(gray).save(path, **({"transparency": 0x80} if case == "L+tRNS" else {}))
    elif case == "LA":
        Image.fromarray(_pattern(rng, (*hw, 2))).save(path)
    elif case.startswith("P"):
        im = Image.fromarray(rgb).quantize(64)
        extra = {"P+index": {"transparency": 3},
                 "P+alphas": {"transparency": bytes(_pattern(rng, (64,)))}}.get(case, {})
        im.save(path, **extra)
    elif case in ("RGB", "RGB+tRNS"):
        rgb[::3, ::2] = (10, 200, 30)
        Image.fromarray(rgb).save(path, **({"transparency": (10, 200, 30)} if case == "RGB+tRNS" else {}))
    elif case == "RGBA":
        Image.fromarray(_pattern(rng, (*hw, 4))).save(path)
    elif case == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    elif case == "I;16":
        Image.fromarray(rng.integers(0, 400, hw).astype(np.uint16)).save(path)  # 16-bit PNG
    elif case == "I":
        Image.fromarray(rng.integers(-50, 400, hw).astype(np.int32)).save(path)
    elif case == "F":
        Image.fromarray((rng.random(hw) * 300 - 20).astype(np.float32)).save(path)
    elif case == "RGB+EXIF6":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rgb).save(path, quality=95, exif=exif)
    else:
        raise AssertionError(case)


TRANSPARENT = {"L+tRNS", "LA", "P+index", "P+alphas", "RGB+tRNS", "RGBA"}
CASES = {"1": "png", "L": "png", "L+tRNS": "png", "LA": "png", "P": "png", "P+index": "png", "P+alphas": "png",
         "RGB": "png", "RGB+tRNS": "png", "RGBA": "png", "CMYK": "jpg", "I;16": "png", "I": "tif", "F": "tif",
         "RGB+EXIF6": "jpg"}


@pytest.mark.filterwarnings("ignore:Palette images with Transparency expressed in bytes")  # PIL's advice
@pytest.mark.parametrize("case", list(CASES))
def test_rows_match_transformers_for_every_mode(case, tmp_path):
    import transformers
    from packaging.version import Version
    from transformers.image_utils import load_image as hf_load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if case in TRANSPARENT and Version(transformers.__version__) < Version("5.24"):
        pytest.skip("the reference moved: transformers 5.24's PIL processor composites transparency on white "
                    "(what bbu_jax matches); older 5.x releases convert it otherwise")
    path = tmp_path / f"photo.{CASES[case]}"
    _write_mode(case, path, np.random.default_rng(sorted(CASES).index(case)))
    with Image.open(path) as im:
        mode = im.mode
        assert mode == case.split("+")[0], (case, mode)
        assert (im.info.get("transparency") is not None or "A" in im.getbands()) == (case in TRANSPARENT)
    proc = Qwen2VLImageProcessorPil(**PIX)
    rows, grid = preprocess_image(load_image(path), **PIX)

    def ref(image):
        out = proc(images=[image], return_tensors="np")
        np.testing.assert_array_equal(grid, out["image_grid_thw"][0])
        return out["pixel_values"]

    hf_loaded = ref(hf_load_image(str(path)))  # upright, but it drops alpha (convert("RGB"))
    # The processor's own conversion of the file's image; for the EXIF case of the upright view
    # load_image gives, as the processor itself does not turn images.
    with Image.open(path) as im:
        expected = hf_loaded if case == "RGB+EXIF6" else ref(im)
    print(f"{case} ({mode}): max abs diff vs processor {np.abs(rows - expected).max():.3g}, "
          f"vs load_image {np.abs(rows - hf_loaded).max():.3g}")
    np.testing.assert_array_equal(rows, expected)
    if case in TRANSPARENT:  # transparency matters here: dropping it gives other rows
        with Image.open(path) as im:
            dropped, _ = preprocess_image(Image.fromarray(np.asarray(im.convert("RGB"))), **PIX)
        assert np.abs(rows - dropped).max() > 0.5
    else:
        np.testing.assert_array_equal(rows, hf_loaded)


def test_arrays_read_as_the_processor_reads_them():
    rgba = np.random.default_rng(1).integers(0, 256, (30, 44, 4), dtype=np.uint8)
    alpha = rgba[..., 3:] / 255
    white = np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)  # convert_to_rgb on arrays
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), white)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(rgba))), white)
    np.testing.assert_array_equal(np.asarray(load_image(rgba[..., :1])), np.repeat(rgba[..., :1], 3, -1))
    with pytest.raises(ValueError, match="uint8"):
        load_image(rgba.astype(np.float32))


def test_oversized_photo_is_a_bad_image_not_a_crash(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses more than twice this
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(tmp_path / "huge.png")


def test_transparent_photo_is_stored_composited_on_white(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (90, 130, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 130).astype(np.uint8)  # transparent left .. opaque right
    Image.fromarray(rgba).save(raw / "logo.png")
    (raw / "logo.json").write_text(json.dumps({"imagePath": "logo.png", "imageWidth": 130, "imageHeight": 90,
                                               "shapes": [{"label": DESC, "shape_type": "rectangle",
                                                           "points": [[10, 10], [60, 50]]}]}))
    out = tmp_path / "out"
    convert.convert_dataset(str(raw), "labelme", str(out), val_ratio=0.0, teacher_pool_size=0, seed=0,
                            progress=False, **PIX)
    (rec,) = schema.load_records(out / "train.jsonl")[0]
    with Image.open(rec.student.images[0]) as im:
        stored = np.asarray(im)
    h, w = smart_resize(90, 130, **PIX)
    alpha = rgba[..., 3:] / 255
    white = np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(white).resize((w, h), Image.BICUBIC))
    dropped = np.asarray(Image.fromarray(rgba[..., :3]).resize((w, h), Image.BICUBIC))
    print("stored vs white-composited: max abs diff", np.abs(stored.astype(int) - expected).max())
    np.testing.assert_array_equal(stored, expected)
    assert np.abs(stored.astype(int) - dropped).max() > 100
