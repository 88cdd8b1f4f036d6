"""Raw annotations -> rescaled images + train/val/teacher_pool JSONL + summary.json.

Every photo is resized with smart_resize(min_pixels, max_pixels) — the SAME limits the model sees,
so the stored image is exactly what the processor feeds the tower and the JSONL boxes are
Qwen2.5-VL's absolute pixel coordinates of that image. Boxes are scaled, rounded and clamped to
integers. The teacher pool is a greedy set cover of the desc types (excluded from train/val); the
rest is split by a seeded shuffle. Deterministic for a seed whatever the number of workers.

Nothing is lost silently. A box overhanging the photo is clipped to it, and an object that is
still unusable (degenerate, empty desc) is dropped alone; both are counted and listed in
summary.json (``strict`` instead rejects the whole photo, as a bad record). Photos of the same
file name in different folders are stored under distinct names. The dataset is written into a
temporary folder beside output_dir and swapped in whole at the end, so an existing dataset is
replaced completely (only with ``overwrite``) or, if the conversion fails, left as it was.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from bbu_jax.data.chat import LANGUAGES
from bbu_jax.data.desc import DescMap, normalize_desc
from bbu_jax.data.readers import RawRecord, read_raw
from bbu_jax.foundation.files import atomic_dir, atomic_file, atomic_path, write_json_atomic
from bbu_jax.models.qwen2_5_vl.processing import load_image, resize_image

# Raw boxes may overshoot the photo by this many pixels (clamped silently: a click on the border);
# beyond it a box is clipped and counted, or rejects the photo when strict.
BOUNDS_TOLERANCE = 1.0


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    output_dir: str
    min_pixels: int
    max_pixels: int
    language: str | None  # None: keep the annotated wording
    desc_map: DescMap | None
    strict: bool = False  # a bad object rejects its photo instead of being clipped / dropped


def convert_object(box: tuple[float, float, float, float], desc: str, size: tuple[int, int],
                   resized: tuple[int, int], opts: ConvertOptions) -> tuple[dict[str, Any], bool]:
    """One raw object -> ({"bbox_2d", "desc"} of the resized photo, whether it was clipped);
    ValueError when it cannot be kept."""
    (x1, y1, x2, y2), (w, h) = box, size
    what = f"box {[x1, y1, x2, y2]} ({desc})"
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{what} is degenerate or inverted")
    tol = BOUNDS_TOLERANCE
    overhangs = x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol
    if overhangs:
        if opts.strict:
            raise ValueError(f"{what} is out of the image bounds {w}x{h}")
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"{what} lies outside the {w}x{h} image")
    desc = normalize_desc(desc)
    if not desc:
        raise ValueError(f"{what}: empty desc")
    if opts.language and opts.desc_map:
        desc = opts.desc_map.to(desc, opts.language) or desc
    scaled = scale_box((x1, y1, x2, y2), (w, h), resized)
    if scaled is None:
        raise ValueError(f"{what} vanishes when rescaled to {resized[0]}x{resized[1]}")
    return {"bbox_2d": scaled, "desc": desc}, overhangs


def convert_one(raw: RawRecord, name: str, opts: ConvertOptions) -> dict[str, Any]:
    """One photo, stored as images/NAME.jpg|png -> {"record": JSONL dict, "clipped": [...],
    "dropped": [...]} or {"error": "SOURCE: reason"} (no image written then)."""
    try:
        if raw.error:
            raise ValueError(raw.error)
        try:
            im = load_image(raw.image_path)  # upright: annotation tools show and label that view
            w, h = im.size
            resized = resize_image(im, opts.min_pixels, opts.max_pixels)
        except (OSError, ValueError) as e:
            raise ValueError(f"image {raw.image_path}: {e}") from None
        objects, clipped, dropped = [], [], []
        for box, desc in raw.objects:
            try:
                obj, was_clipped = convert_object(box, desc, (w, h), resized.size, opts)
            except ValueError as e:
                if opts.strict:
                    raise
                dropped.append(f"{raw.source}: {e}")
                continue
            objects.append(obj)
            if was_clipped:
                clipped.append(f"{raw.source}: box {list(box)} ({desc}) clipped to the {w}x{h} image")
    except ValueError as e:
        return {"error": f"{raw.source}: {e}"}
    ext = ".png" if raw.image_path.lower().endswith(".png") else ".jpg"
    rel = f"images/{name}{ext}"
    path = os.path.join(opts.output_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)  # a name may keep the photo's subfolder
    with atomic_path(path) as tmp:
        resized.save(tmp, format="PNG" if ext == ".png" else "JPEG", quality=95)
    return {"record": {"id": name, "images": [rel], "objects": objects, "orig_size": [h, w]},
            "clipped": clipped, "dropped": dropped}


def stored_names(raws: list[RawRecord], input_dir: str) -> dict[str, str]:
    """image path -> record id and stored file name (no extension), for every readable record.

    The photo's file stem where it is unique, else its path under input_dir (without, then with,
    its extension), so photos of the same name in different folders are all kept. One photo
    annotated twice, or a repeated name that cannot be told apart, is a ValueError.
    """
    paths = [r.image_path for r in raws if not r.error]
    twice = sorted(p for p, n in collections.Counter(paths).items() if n > 1)
    if twice:
        by = {p: [r.source for r in raws if not r.error and r.image_path == p] for p in twice}
        raise ValueError(f"{len(twice)} photo(s) annotated more than once: "
                         + "; ".join(f"{p} by {', '.join(by[p])}" for p in twice))
    root = os.path.abspath(input_dir)

    def under_input(path: str, keep_ext: bool) -> str:
        rel = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
        return rel if keep_ext else os.path.splitext(rel)[0]

    def stem(path: str) -> str:
        return os.path.splitext(os.path.basename(path))[0]

    stems = collections.Counter(stem(p) for p in paths)
    names = {p: stem(p) if stems[stem(p)] == 1 else under_input(p, False) for p in paths}
    repeated = collections.Counter(names.values())
    names = {p: n if repeated[n] == 1 else under_input(p, True) for p, n in names.items()}
    clash = collections.Counter(names.values())
    bad = sorted(p for p, n in names.items() if clash[n] > 1 or n.startswith("../"))
    if bad:
        raise ValueError(f"photos of the same file name could not be given distinct stored names (a photo "
                         f"outside {input_dir}?), rename them: {bad}")
    return names


def scale_box(box, src_wh, dst_wh) -> list[int] | None:
    """Scale (x1,y1,x2,y2) from src to dst pixels, round, clamp; None if it collapses."""
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    x1 = min(max(round(box[0] * sx), 0), dst_wh[0])
    y1 = min(max(round(box[1] * sy), 0), dst_wh[1])
    x2 = min(max(round(box[2] * sx), 0), dst_wh[0])
    y2 = min(max(round(box[3] * sy), 0), dst_wh[1])
    return [x1, y1, x2, y2] if x1 < x2 and y1 < y2 else None


def greedy_teacher_pool(descs_per_record: list[set[str]], size: int, seed: int) -> list[int]:
    """Indices of <= size records covering every desc (greedy set cover, seeded tie-break).

    Once everything is covered the pool is filled up to `size` with the records holding the most
    distinct descs, so the demonstrations stay informative.
    """
    order = np.random.default_rng(seed).permutation(len(descs_per_record))
    rank = {int(i): r for r, i in enumerate(order)}
    uncovered = set().union(*descs_per_record) if descs_per_record else set()
    chosen: list[int] = []
    while uncovered and len(chosen) < size:
        best = max(order, key=lambda i: (len(descs_per_record[i] & uncovered), -rank[int(i)]))
        if not descs_per_record[best] & uncovered:
            break
        chosen.append(int(best))
        uncovered -= descs_per_record[best]
    taken = set(chosen)
    rest = sorted((i for i in order if int(i) not in taken), key=lambda i: (-len(descs_per_record[i]), rank[int(i)]))
    chosen += [int(i) for i in rest[:max(0, size - len(chosen))]]
    return chosen


def split_indices(n: int, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    perm = np.random.default_rng(seed + 1).permutation(n)
    n_val = int(round(n * val_ratio))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def summarize(splits: dict[str, list[dict]], skipped: list[str], params: dict, uncovered: list[str],
              clipped: list[str], dropped: list[str]) -> dict:
    all_recs = [r for recs in splits.values() for r in recs]
    per_desc = collections.Counter(o["desc"] for r in all_recs for o in r["objects"])
    per_level: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for desc, n in per_desc.items():
        for lvl, name in enumerate(desc.split("/")):
            per_level[f"level{lvl}"][name] += n
    boxes = [len(r["objects"]) for r in all_recs]
    return {
        "params": params,
        "images": {k: len(v) for k, v in splits.items()},
        "objects": sum(boxes),
        "per_desc": dict(sorted(per_desc.items())),
        "per_level": {k: dict(sorted(v.items())) for k, v in sorted(per_level.items())},
        "boxes_per_image": {"min": min(boxes, default=0), "max": max(boxes, default=0),
                            "mean": float(np.mean(boxes)) if boxes else 0.0,
                            "histogram": dict(sorted(collections.Counter(boxes).items()))},
        "teacher_pool_uncovered_descs": uncovered,
        "skipped": {"count": len(skipped), "records": skipped},
        "clipped_boxes": {"count": len(clipped), "boxes": clipped},
        "dropped_objects": {"count": len(dropped), "objects": dropped},
    }


def _write_jsonl(path: str, records: list[dict]) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _convert_star(args):
    return convert_one(*args)


def convert_dataset(input_dir: str, fmt: str, output_dir: str, *, min_pixels: int, max_pixels: int,
                    val_ratio: float, teacher_pool_size: int, seed: int, language: str | None = None,
                    desc_map_path: str | None = None, skip_bad_samples: bool = False, strict: bool = False,
                    overwrite: bool = False, num_workers: int = 0, progress: bool = True) -> dict:
    """Convert a raw folder; returns the summary (also written to output_dir/summary.json).

    Raises ValueError listing every bad record unless skip_bad_samples (then they are counted), and
    when nothing usable comes out (no input, no convertible record, an empty train split). A
    non-empty output_dir is replaced only with overwrite (else FileExistsError), never one related
    to input_dir; on any error it is left as it was.
    """
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels {min_pixels}, max_pixels {max_pixels}")
    if teacher_pool_size < 0:
        raise ValueError(f"teacher_pool_size must be >= 0, got {teacher_pool_size}")
    raws = read_raw(input_dir, fmt)
    names = stored_names(raws, input_dir)
    if desc_map_path is None and os.path.exists(os.path.join(input_dir, "desc_map.json")):
        desc_map_path = os.path.join(input_dir, "desc_map.json")
    desc_map = DescMap.load(desc_map_path) if desc_map_path else None
    if language and desc_map is None:
        raise ValueError("--language needs a desc map (--desc_map or INPUT/desc_map.json)")
    with atomic_dir(output_dir, overwrite=overwrite, sources=[input_dir]) as tmp:
        os.makedirs(tmp / "images")
        opts = ConvertOptions(str(tmp), min_pixels, max_pixels, language, desc_map, strict)
        jobs = [(r, names.get(r.image_path, ""), opts) for r in raws]
        bar = dict(total=len(jobs), desc="convert", disable=not progress)
        if num_workers > 0:
            with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
                results = list(tqdm(pool.imap(_convert_star, jobs, chunksize=8), **bar))
        else:
            results = [convert_one(*j) for j in tqdm(jobs, **bar)]
        errors = [r["error"] for r in results if "error" in r]
        if errors and not skip_bad_samples:
            raise ValueError(f"{len(errors)} bad record(s) (use --skip_bad_samples to skip):\n" + "\n".join(errors))
        records = [r["record"] for r in results if "record" in r]
        if not records:
            raise ValueError(f"{input_dir}: none of the {len(raws)} record(s) could be converted, the first: "
                             f"{errors[0]}")
        if teacher_pool_size >= len(records):
            raise ValueError(f"teacher_pool_size {teacher_pool_size} >= the {len(records)} converted record(s): "
                             "train and val would be empty")
        descs = [{o["desc"] for o in r["objects"]} for r in records]
        pool_idx = greedy_teacher_pool(descs, teacher_pool_size, seed)
        uncovered = sorted(set().union(*descs) - set().union(*(descs[i] for i in pool_idx))) if descs else []
        in_pool = set(pool_idx)
        rest = [i for i in range(len(records)) if i not in in_pool]
        train_pos, val_pos = split_indices(len(rest), val_ratio, seed)
        if not train_pos:
            raise ValueError(f"val_ratio {val_ratio} leaves no train record of the {len(rest)} outside the "
                             "teacher pool")
        splits = {"train": [records[rest[i]] for i in train_pos], "val": [records[rest[i]] for i in val_pos],
                  "teacher_pool": [records[i] for i in sorted(pool_idx)]}
        for name, recs in splits.items():
            _write_jsonl(os.path.join(tmp, f"{name}.jsonl"), recs)
        params = dict(input_dir=input_dir, format=fmt, min_pixels=min_pixels, max_pixels=max_pixels,
                      val_ratio=val_ratio, teacher_pool_size=teacher_pool_size, seed=seed, language=language,
                      desc_map=desc_map_path, strict=strict)
        clipped = [c for r in results for c in r.get("clipped", ())]
        dropped = [d for r in results for d in r.get("dropped", ())]
        summary = summarize(splits, errors, params, uncovered, clipped, dropped)
        if language and desc_map:  # descs the table could not put into `language` (kept as annotated)
            summary["unmapped_descs"] = sorted(d for d in summary["per_desc"] if desc_map.to(d, language) is None)
        write_json_atomic(os.path.join(tmp, "summary.json"), summary, indent=1)
    return summary
