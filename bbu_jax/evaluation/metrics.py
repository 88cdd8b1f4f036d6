"""Detection metrics for the head's scored boxes and for the generated JSON answers.

Inputs are plain Python / numpy, one entry per image, so the metrics run without the model:

* ground truth: a list of objects ``{"bbox_2d": [x1, y1, x2, y2], "desc": str}`` (original pixels);
* head predictions: ``{"boxes": (N, 4) xyxy, "scores": (N,), "captions": [str] * N}`` (what
  predict_detection returns) or a list of objects with a ``"score"``;
* generated predictions: the object list ``parse_response`` returns, plus its status.

COCO AP / AR come from faster-coco-eval (pycocotools' algorithm, numpy-only, several times faster);
IoUs everywhere use its box IoU so the greedy matches below agree with AP's. A desc's *type* is its
first `/` level; descs are compared after ``normalize_desc`` (full-width marks, spaces).
"""
from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as coco_mask
from jaxtyping import Float, Real

from bbu_jax.data.desc import normalize_desc
from bbu_jax.inference.parser import EMPTY, NO_JSON, OK, TRUNCATED, ParseStatus

MAX_DETS = 100  # COCO counts only the top 100 detections per image
IOU_THRESHOLD = 0.5


def desc_type(desc: str) -> str:
    """The first level of a desc's `/` hierarchy (e.g. '螺丝连接点' of '螺丝连接点/BBU安装螺丝/连接正确')."""
    return normalize_desc(desc).split("/")[0]


def box_iou(pred_xyxy: Real[np.ndarray, "n 4"] | Sequence[Sequence[float]],
            gt_xyxy: Real[np.ndarray, "m 4"] | Sequence[Sequence[float]]) -> Float[np.ndarray, "n m"]:
    """Pairwise IoU with COCO's own box IoU (no eps: an IoU of exactly 0.5 stays 0.5). Boxes come as
    arrays or as the objects' ``bbox_2d`` lists."""
    pred_xyxy = np.asarray(pred_xyxy, np.float64).reshape(-1, 4)
    gt_xyxy = np.asarray(gt_xyxy, np.float64).reshape(-1, 4)
    if len(pred_xyxy) == 0 or len(gt_xyxy) == 0:
        return np.zeros((len(pred_xyxy), len(gt_xyxy)))
    ious = coco_mask.iou(_xywh(pred_xyxy), _xywh(gt_xyxy), [0] * len(gt_xyxy))
    return np.asarray(ious, np.float64).reshape(len(pred_xyxy), len(gt_xyxy))


def greedy_match(iou: Float[np.ndarray, "n m"], threshold: float = IOU_THRESHOLD,
                 allowed: np.ndarray | None = None,
                 pred_order: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """One-to-one (pred, gt) pairs with IoU >= threshold.

    Without ``pred_order`` pairs are taken greedily by IoU, highest first (for unscored generated
    boxes). With it (preds sorted by score) each pred in turn takes its best free GT, as COCO does.
    ``allowed`` (n, m) bool additionally restricts the pairs (e.g. to equal descs).
    """
    ok = iou >= threshold
    if allowed is not None:
        ok &= allowed
    pairs: list[tuple[int, int]] = []
    if pred_order is None:
        p_idx, g_idx = np.nonzero(ok)
        order = np.argsort(-iou[p_idx, g_idx], kind="stable")
        used_p, used_g = set(), set()
        for k in order:
            p, g = int(p_idx[k]), int(g_idx[k])
            if p not in used_p and g not in used_g:
                used_p.add(p)
                used_g.add(g)
                pairs.append((p, g))
        return pairs
    free = np.ones(iou.shape[1], bool)
    for p in pred_order:
        cand = np.where(ok[p] & free, iou[p], -1.0)
        if cand.size and cand.max() >= 0:
            g = int(cand.argmax())
            free[g] = False
            pairs.append((int(p), g))
    return pairs


def type_key(desc_type_name: str) -> str:
    """A desc type as a metric-name part: TensorBoard replaces characters outside [-/\\w.] in tags
    with "_", so the keys use its form and metrics.jsonl, summary.json and TensorBoard agree."""
    return re.sub(r"[^-/\w.]", "_", desc_type_name)


def head_metrics(gt: Sequence[Sequence[Mapping[str, Any]]],
                 pred: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]],
                 max_dets: int = MAX_DETS) -> dict[str, float]:
    """COCO AP / AR of the head's scored predictions, class-agnostic and per desc type.

    Keys: ``head/box_AP`` (AP@[.5:.95]), ``head/box_AP50``, ``head/box_AR100`` (class-agnostic: boxes only);
    ``head/type_mAP``, ``head/type_mAP50`` (COCO mean over desc types, the prediction's type taken
    from its caption); ``head/AP/<type>``, ``head/AP50/<type>``, ``head/AR100/<type>`` for each
    type with ground truth (``type_key``); ``head/caption_accuracy*`` on COCO-style matches at IoU 0.5 (see
    ``caption_scores``); counts. A metric without any ground truth to measure is NaN.
    Only the ``max_dets`` highest-scoring predictions of an image count.
    """
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} ground-truth images but {len(pred)} predictions")
    preds = [_top_k(_head_objects(p, i), max_dets) for i, p in enumerate(pred)]
    gts = [list(g) for g in gt]
    out: dict[str, float] = {}

    agnostic, _ = _coco_eval(gts, preds, lambda o: "object", max_dets)
    prec, rec = agnostic.eval["precision"], agnostic.eval["recall"]
    out["head/box_AP"] = _mean_valid(prec[:, :, :, 0, -1])
    out["head/box_AP50"] = _mean_valid(prec[0, :, :, 0, -1])
    out["head/box_AR100"] = _mean_valid(rec[:, :, 0, -1])

    types = sorted({desc_type(o["desc"]) for g in gts for o in g})
    if types:
        typed, cat_names = _coco_eval(gts, preds, lambda o: desc_type(o["desc"]), max_dets)
        prec, rec = typed.eval["precision"], typed.eval["recall"]
        out["head/type_mAP"] = _mean_valid(prec[:, :, :, 0, -1])
        out["head/type_mAP50"] = _mean_valid(prec[0, :, :, 0, -1])
        for t in types:
            k = cat_names.index(t)
            out[f"head/AP/{type_key(t)}"] = _mean_valid(prec[:, :, k, 0, -1])
            out[f"head/AP50/{type_key(t)}"] = _mean_valid(prec[0, :, k, 0, -1])
            out[f"head/AR100/{type_key(t)}"] = _mean_valid(rec[:, k, 0, -1])
    else:
        out["head/type_mAP"] = out["head/type_mAP50"] = float("nan")

    pairs = []
    for g, p in zip(gts, preds):
        iou = box_iou(_boxes(p), _boxes(g))
        matches = greedy_match(iou, pred_order=range(len(p)))  # preds are sorted by score
        pairs += [(p[i]["desc"], g[j]["desc"]) for i, j in matches]
    out.update({f"head/{k}": v for k, v in caption_scores(pairs).items()})
    out["head/num_images"] = len(gts)
    out["head/num_gt"] = sum(len(g) for g in gts)
    out["head/num_pred"] = sum(len(p) for p in preds)
    return out


def generate_metrics(gt: Sequence[Sequence[Mapping[str, Any]]],
                     pred: Sequence[Sequence[Mapping[str, Any]]],
                     statuses: Sequence[ParseStatus | None] | None = None,
                     iou_threshold: float = IOU_THRESHOLD) -> dict[str, float]:
    """Precision / recall / F1 of generated answers, caption accuracy and parse counts.

    A true positive is a (pred, GT) pair with IoU >= ``iou_threshold`` and equal normalized descs,
    matched one-to-one greedily by IoU within an image; micro-averaged over all images. With no
    predictions precision is 0 (1 when there is no GT either); likewise recall with no GT.

    Keys: ``generate/precision``, ``generate/recall``, ``generate/f1`` and the same per GT desc
    type (``generate/f1/<type>`` ...); ``generate/box_precision``/``box_recall`` (IoU only, desc
    ignored); ``generate/caption_accuracy`` and ``.../level<k>`` on the IoU-only matches;
    ``generate/complete_json`` (fraction of answers parsed whole), ``generate/parse_failures`` (no
    answer found), ``generate/empty_outputs``, ``generate/truncated``, ``generate/dropped_objects``
    from the parse statuses; counts.
    """
    if len(gt) != len(pred) or (statuses is not None and len(statuses) != len(gt)):
        raise ValueError(f"lengths differ: {len(gt)} ground truth, {len(pred)} predictions, "
                         f"{None if statuses is None else len(statuses)} statuses")
    counts: collections.Counter[str] = collections.Counter()  # tp / npred / ngt, per type too
    box_tp, pairs = 0, []
    for g, p in zip(gt, pred):
        iou = box_iou(_boxes(p), _boxes(g))
        pd = [normalize_desc(o["desc"]) for o in p]
        gd = [normalize_desc(o["desc"]) for o in g]
        same = np.array([[a == b for b in gd] for a in pd], bool).reshape(len(pd), len(gd))
        tp = greedy_match(iou, iou_threshold, allowed=same)
        counts["tp"] += len(tp)
        counts["pred"] += len(p)
        counts["gt"] += len(g)
        for i, _ in tp:
            counts["tp/" + desc_type(pd[i])] += 1
        for d in pd:
            counts["pred/" + desc_type(d)] += 1
        for d in gd:
            counts["gt/" + desc_type(d)] += 1
        box_matches = greedy_match(iou, iou_threshold)
        box_tp += len(box_matches)
        pairs += [(pd[i], gd[j]) for i, j in box_matches]

    out: dict[str, float] = {}
    out.update(_prf("generate", counts["tp"], counts["pred"], counts["gt"]))
    types = sorted(k[3:] for k in counts if k.startswith("gt/"))
    for t in types:
        prf = _prf("generate", counts["tp/" + t], counts["pred/" + t], counts["gt/" + t])
        out.update({f"{k}/{type_key(t)}": v for k, v in prf.items()})
    box = _prf("generate/box", box_tp, counts["pred"], counts["gt"])
    out["generate/box_precision"] = box["generate/box/precision"]
    out["generate/box_recall"] = box["generate/box/recall"]
    out.update({f"generate/{k}": v for k, v in caption_scores(pairs).items()})
    codes = collections.Counter(s.code for s in statuses or () if s is not None)
    if statuses is not None:
        out["generate/complete_json"] = codes[OK] / len(statuses) if statuses else float("nan")
    out["generate/parse_failures"] = codes[NO_JSON]
    out["generate/empty_outputs"] = codes[EMPTY]
    out["generate/truncated"] = codes[TRUNCATED]
    out["generate/dropped_objects"] = sum(s.num_dropped for s in statuses or () if s is not None)
    out["generate/num_images"] = len(gt)
    out["generate/num_gt"] = counts["gt"]
    out["generate/num_pred"] = counts["pred"]
    return out


def caption_scores(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Caption accuracy over matched (pred desc, GT desc) pairs: exact and per hierarchy level.

    ``caption_accuracy``: normalized descs equal. ``caption_accuracy/level<k>``: the k-th level
    (1 = type, 2 = part, 3 = status ...) equal, over pairs whose GT has that level — so a status
    error shows at level 3 while levels 1-2 stay right. NaN without pairs.
    """
    out = {"caption_accuracy": float("nan"), "caption_matched": len(pairs)}
    if not pairs:
        return out
    split = [(normalize_desc(p).split("/"), normalize_desc(g).split("/")) for p, g in pairs]
    out["caption_accuracy"] = float(np.mean([p == g for p, g in split]))
    depth = max(len(g) for _, g in split)
    for k in range(depth):
        levels_ok = [len(p) > k and p[k] == g[k] for p, g in split if len(g) > k]
        out[f"caption_accuracy/level{k + 1}"] = float(np.mean(levels_ok))
    return out


def _prf(prefix: str, tp: int, npred: int, ngt: int) -> dict[str, float]:
    precision = tp / npred if npred else float(ngt == 0)
    recall = tp / ngt if ngt else float(npred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {f"{prefix}/precision": precision, f"{prefix}/recall": recall, f"{prefix}/f1": f1}


def _head_objects(p: Any, index: int) -> list[dict[str, Any]]:
    """Objects with bbox_2d / desc / score from either head-prediction form."""
    if isinstance(p, Mapping):
        boxes = np.asarray(p["boxes"], np.float64).reshape(-1, 4)
        scores = np.asarray(p["scores"], np.float64).reshape(-1)
        captions = list(p["captions"])
        if not len(boxes) == len(scores) == len(captions):
            raise ValueError(f"image {index}: {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(captions)} captions")
        return [{"bbox_2d": b.tolist(), "desc": c, "score": float(s)}
                for b, s, c in zip(boxes, scores, captions)]
    for o in p:
        if "score" not in o:
            raise ValueError(f"image {index}: head predictions need a 'score' per object")
    return [dict(o) for o in p]


def _top_k(objs: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    return sorted(objs, key=lambda o: -o["score"])[:k]


def _boxes(objs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([o["bbox_2d"] for o in objs], np.float64).reshape(-1, 4)


def _xywh(xyxy: np.ndarray) -> np.ndarray:
    return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)


def _mean_valid(x: np.ndarray) -> float:
    """Mean over the entries COCO filled (-1 marks 'no ground truth'), as its summarize() does."""
    x = x[x > -1]
    return float(x.mean()) if x.size else float("nan")


def _coco_eval(gts, preds, category_of, max_dets) -> tuple[COCOeval_faster, list[str]]:
    """Accumulated COCOeval over all images, categories named by ``category_of``; + the names.

    Images without ground truth stay in (their detections are false positives).
    """
    names = sorted({category_of(o) for objs in (*gts, *preds) for o in objs}) or ["object"]
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images = [{"id": i + 1} for i in range(len(gts))]
    categories = [{"id": i, "name": n} for n, i in cat_id.items()]

    def anns(per_image, scored):
        out = []
        for img, objs in enumerate(per_image):
            for o in objs:
                (x, y, w, h), = _xywh(_boxes([o]))
                a = {"id": len(out) + 1, "image_id": img + 1, "category_id": cat_id[category_of(o)],
                     "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
                if scored:
                    a["score"] = float(o["score"])
                out.append(a)
        return out

    quiet = lambda *args, **kwargs: None  # noqa: E731
    coco_gt = COCO({"images": images, "categories": categories, "annotations": anns(gts, False)},
                   print_function=quiet)
    coco_dt = COCO({"images": images, "categories": categories, "annotations": anns(preds, True)},
                   print_function=quiet)
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet)
    ev.params.maxDets = [1, 10, max_dets]
    ev.evaluate()
    ev.accumulate()
    return ev, names
