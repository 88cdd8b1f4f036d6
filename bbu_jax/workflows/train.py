"""A training run from a validated config: the one module that turns config keys into the explicit
arguments of the library (model, head, data, optimizer, step, checkpoints, logging).

scripts/train.py parses flags and calls prepare_assets / check_budgets / train; scripts/demo.py
and tests call the same functions.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bbu_jax.training import checkpointing, config as config_lib, loop, metrics_logging
from bbu_jax.training import optimizer as opt_lib
from bbu_jax.foundation import sharding
from bbu_jax.training import step as step_lib, task, train_state

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- assets and data
def prepare_assets(c: ml_collections.ConfigDict) -> None:
    """Demo configs: write the tiny model / the synthetic dataset when they are missing."""
    if c.make_tiny_model_if_missing and not os.path.exists(os.path.join(c.hf_dir, "config.json")):
        from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl
        log.info("writing a tiny random Qwen2.5-VL to %s", c.hf_dir)
        write_tiny_qwen2_5_vl(c.hf_dir, seed=c.seed)
    if c.make_synthetic_data_if_missing and not os.path.exists(c.train_jsonl):
        from bbu_jax.data.convert import convert_dataset
        from bbu_jax.data.synthetic import write_labelme_dataset
        out = os.path.dirname(os.path.abspath(c.train_jsonl))
        raw = out + "_raw"
        log.info("writing %d synthetic scenes to %s, converted into %s", c.synthetic_num_images, raw, out)
        write_labelme_dataset(raw, c.synthetic_num_images, c.seed)
        convert_dataset(raw, "labelme", out, min_pixels=c.min_pixels, max_pixels=c.max_pixels,
                        val_ratio=c.synthetic_val_ratio, teacher_pool_size=c.synthetic_teacher_pool_size,
                        seed=c.seed, language=c.language, desc_map_path=os.path.join(raw, "desc_map.json"),
                        num_workers=0, progress=False)
    check_data_pixels(c)


def check_data_pixels(c: ml_collections.ConfigDict) -> None:
    """The pixel limits the data were converted with must be the model's: images were resized and
    boxes rescaled for them (scripts/convert_dataset.py records them in summary.json)."""
    import json
    summary = os.path.join(os.path.dirname(os.path.abspath(c.train_jsonl)), "summary.json")
    if not os.path.exists(summary):
        return
    with open(summary, encoding="utf-8") as f:
        params = json.load(f).get("params", {})
    for key in ("min_pixels", "max_pixels"):
        if key in params and params[key] != c[key]:
            raise ValueError(f"{summary}: the data were converted with {key}={params[key]} but config.{key}="
                             f"{c[key]}; convert them again with the config's limits (or delete the "
                             f"folder when it is the demo's synthetic data)")


def budgets(c: ml_collections.ConfigDict, *, rows: int, segments: int):
    from bbu_jax.data.collate import Budgets
    return Budgets(rows=rows, tokens=c.token_budget, patches=c.patch_budget, segments=segments,
                   objects=c.max_objects, caption_tokens=c.caption_tokens,
                   vision_memory=c.vision_memory_tokens, text_memory=c.text_memory_tokens)


def check_budgets(c: ml_collections.ConfigDict) -> None:
    """Encodes every train record's student once: a sample whose own needs exceed a budget can
    never be packed, so that is a config error found before compiling. Teachers are sampled per
    step, so a student + the largest teachers over budget is only warned about (the loader then
    raises or skips that draw, per skip_bad_samples)."""
    from bbu_jax.data.encode import SampleEncoder
    from bbu_jax.data.schema import load_records
    encoder = SampleEncoder(c.hf_dir, min_pixels=c.min_pixels, max_pixels=c.max_pixels, language=c.language)
    records, _ = load_records(c.train_jsonl, skip_bad_samples=c.skip_bad_samples)
    longest: dict[str, tuple[int, str]] = {}

    def need(key, value, where):
        if value > longest.get(key, (-1, ""))[0]:
            longest[key] = (int(value), where)

    for r in records:
        s = encoder.encode(r.student, r.teachers or (), source=r.source, record_id=r.id, orig_size=r.orig_size)
        need("token_budget", s.num_tokens, r.source)
        need("patch_budget", s.num_patches, r.source)
        need("max_objects", len(s.gt_caption_ids), r.source)
        need("caption_tokens", max((len(x) for x in s.gt_caption_ids), default=0), r.source)
        need("vision_memory_tokens", len(s.det_vision_index), r.source)
        need("text_memory_tokens", len(s.det_text_index), r.source)
    config_lib.validate_budgets(c, longest)
    if c.teacher_pool_jsonl and c.teacher_ratio > 0 and c.max_teachers > 0:
        pool, _ = load_records(c.teacher_pool_jsonl, skip_bad_samples=c.skip_bad_samples)
        t = sorted((encoder.encode(p.student, (), source=p.source, record_id=p.id) for p in pool),
                   key=lambda s: s.num_tokens)[-c.max_teachers:]
        worst = longest["token_budget"][0] + sum(s.num_tokens for s in t)
        if worst > c.token_budget:
            log.warning("token_budget=%d may be exceeded when the longest student (%d tokens) gets the "
                        "%d longest teachers (about %d tokens)", c.token_budget,
                        longest["token_budget"][0], len(t), worst)
    log.info("budgets hold every train sample: %s", {k: v for k, (v, _) in longest.items()})


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ----------------------------------------------------------------------------- FLOPs
def _attention_work(host: Mapping[str, np.ndarray], fullatt_layers: int, depth: int):
    """(tokens, patches, mean causal keys per token, mean keys per patch) of a step's batch."""
    seg = host["segment_ids"].reshape(-1, host["segment_ids"].shape[-1])
    tokens, pairs = 0, 0.0
    for row in seg:
        n = np.bincount(row[row > 0])
        tokens += int(n.sum())
        pairs += float((n * (n + 1) / 2).sum())
    win = host["patch_window_ids"].reshape(-1, host["patch_window_ids"].shape[-1])
    img = host["patch_image_ids"].reshape(-1, host["patch_image_ids"].shape[-1])
    patches, vpairs = 0, 0.0
    for w, i in zip(win, img):
        nw, ni = np.bincount(w[w > 0]), np.bincount(i[i > 0])
        patches += int(nw.sum())
        vpairs += (depth - fullatt_layers) * float((nw ** 2).sum()) + fullatt_layers * float((ni ** 2).sum())
    return tokens, patches, pairs / max(tokens, 1), vpairs / max(patches, 1) / max(depth, 1)


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Built:
    mesh: Any
    graphdefs: dict
    rest: dict
    params: dict | None
    param_shardings: dict
    model_config: Any
    caption_vocab: np.ndarray | None
    loss_fn: Callable


def _mesh(c):
    return sharding.make_mesh(c.mesh_data, c.mesh_fsdp, c.mesh_tensor)


def _caption_vocab(c, workdir: pathlib.Path) -> np.ndarray | None:
    """Built once per run from the train data (+ teacher pool) and kept in the workdir, so resume
    and inference see the same vocabulary."""
    if not c.detection_enabled:
        return None
    from bbu_jax.data.encode import SampleEncoder, build_caption_vocab, load_caption_vocab, save_caption_vocab
    path = workdir / "caption_vocab.json"
    if path.exists():
        return load_caption_vocab(str(path))
    tok = SampleEncoder(c.hf_dir, min_pixels=c.min_pixels, max_pixels=c.max_pixels, language=c.language).tokenizer
    vocab = build_caption_vocab([p for p in (c.train_jsonl, c.teacher_pool_jsonl) if p], tok)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        save_caption_vocab(str(path), vocab)
    return vocab


def build(c: ml_collections.ConfigDict) -> Built:
    """Mesh, model (+ head) placed on their shardings, the loss function."""
    mesh = _mesh(c)
    workdir = pathlib.Path(c.workdir)
    head = None
    if c.detection_enabled:
        head = task.HeadSpec(width=c.detection_hidden_dim, num_queries=c.detection_num_queries,
                             num_layers=c.detection_num_layers, num_heads=c.detection_num_heads,
                             mlp_dim=c.detection_mlp_dim, caption_layers=c.detection_caption_layers,
                             max_caption_len=c.caption_tokens)
    modules = task.build_modules(c.hf_dir, param_dtype=task.DTYPES[c.param_dtype],
                                 compute_dtype=task.DTYPES[c.compute_dtype], remat=c.remat_policy,
                                 attention_impl=c.attention_impl, head=head, seed=c.seed, mesh=mesh,
                                 scan_layers=c.scan_layers)
    shardings = task.param_shardings(modules, mesh)
    model_config = modules["model"].config
    graphdefs, params, rest = train_state.split_modules(modules)
    vocab = _caption_vocab(c, workdir)
    weights = task.loss_weights(
        lm=c.lm_loss_weight, detection=c.detection_loss_weight, bbox_l1=c.bbox_l1_weight,
        bbox_giou=c.bbox_giou_weight, objectness=c.objectness_weight, caption=c.caption_weight,
        match_class=c.match_class_weight, match_bbox=c.match_bbox_weight,
        match_giou=c.match_giou_weight, focal_alpha=c.focal_alpha, focal_gamma=c.focal_gamma)
    loss_fn = task.make_loss_fn(graphdefs, rest, weights=weights, caption_vocab=vocab,
                                lm_chunk=c.lm_loss_chunk, matcher=c.detection_matcher)
    return Built(mesh, graphdefs, rest, params, shardings, model_config, vocab, loss_fn)


def _local_rows(batch: Mapping[str, np.ndarray], axis: int) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global batch's rows."""
    n, p = jax.process_count(), jax.process_index()
    return {k: np.split(np.asarray(v), n, axis=axis)[p] for k, v in batch.items()}


def _eval_batches(c):
    """(batch, metas) of the val set, the first num_eval_batches of them (0: all)."""
    from bbu_jax.data.pipeline import make_eval_batches
    it = make_eval_batches(c.val_jsonl, c.hf_dir, budgets(c, rows=c.batch_rows, segments=1),
                           min_pixels=c.min_pixels, max_pixels=c.max_pixels, language=c.language,
                           skip_bad_samples=c.skip_bad_samples)
    for i, pair in enumerate(it):
        if c.num_eval_batches and i >= c.num_eval_batches:
            return
        yield pair


def detection_eval(c, built: Built, *, num_pictures: int = 4, draw_min_score: float = 0.3):
    """extra_eval for runs with the head: its COCO metrics on val (mAP, mAP50, per type, caption
    accuracy) and a picture grid of ground truth vs predictions for TensorBoard."""
    from bbu_jax.data.encode import SampleEncoder
    from bbu_jax.data.schema import load_records
    from bbu_jax.evaluation.evaluator import evaluate
    from bbu_jax.evaluation.visualize import comparison_grid

    records, _ = load_records(c.val_jsonl, skip_bad_samples=c.skip_bad_samples)
    tokenizer = SampleEncoder(c.hf_dir, min_pixels=c.min_pixels, max_pixels=c.max_pixels,
                              language=c.language).tokenizer

    def fn(modules, step):
        del step
        report, preds = evaluate(modules["model"], modules["head"], _eval_batches(c), records, tokenizer,
                                 caption_vocab=built.caption_vocab, weights=None, matcher=c.detection_matcher,
                                 top_k=min(100, c.detection_num_queries), prefix="")
        shown = [(p["image"], p["gt"], [o for o in p["pred"] if o["score"] >= draw_min_score])
                 for p in preds[:num_pictures]]
        return {**report, "predictions": comparison_grid(shown, panel_size=256)[None]}

    return fn


def make_eval_fn(c, built: Built, extra_evals=()):
    """eval_fn(state, step) -> val metrics: loss terms over the val set (+ each extra_eval's)."""
    if not c.val_jsonl:
        return None
    fn = step_lib.jit_eval_step(loss_fn=built.loss_fn, count_fn=task.count_fn,
                                param_shardings=built.param_shardings, mesh=built.mesh)
    rows = NamedSharding(built.mesh, P(step_lib.BATCH_AXES))
    rng = jax.random.key(0)

    def eval_fn(state, step):
        acc = metrics_logging.SumCountAccumulator()
        for batch, _ in _eval_batches(c):
            acc.add(jax.device_get(fn(state["params"], loop.to_global(_local_rows(batch, 0), rows), rng)))
        out = acc.averages()
        if extra_evals:
            modules = train_state.merge_modules(built.graphdefs, state["params"], built.rest)
            for extra in extra_evals:
                out.update(extra(modules, step))
        return out

    return eval_fn


def test_forward_pass(c) -> dict[str, float]:
    """One forward + loss on one train batch; prints each term (sum / count) and returns them."""
    built = build(c)
    it = _train_iterator(c)
    fn = step_lib.jit_eval_step(loss_fn=built.loss_fn, count_fn=task.count_fn,
                                param_shardings=built.param_shardings, mesh=built.mesh)
    params = jax.device_put(built.params, built.param_shardings)
    rows = NamedSharding(built.mesh, P(step_lib.BATCH_AXES))
    out = jax.device_get(fn(params, loop.to_global(next(it), rows), jax.random.key(0)))
    means = {k: float(s) / max(float(n), 1.0) for k, (s, n) in out.items()}
    for k, v in sorted(means.items()):
        print(f"{k:24s} {v:.6f}")
    return means


def _train_iterator(c):
    from bbu_jax.data.pipeline import make_train_iterator
    n = jax.process_count()
    return make_train_iterator(
        c.train_jsonl, c.teacher_pool_jsonl or None, c.hf_dir,
        budgets(c, rows=c.batch_rows // n, segments=c.segments_per_row),
        collator=c.collator, teacher_ratio=c.teacher_ratio, max_teachers=c.max_teachers,
        min_pixels=c.min_pixels, max_pixels=c.max_pixels, language=c.language, seed=c.seed,
        num_workers=c.data_workers, skip_bad_samples=c.skip_bad_samples,
        shard_index=jax.process_index(), shard_count=n)


def export_hf(c, built: Built, params, out: pathlib.Path) -> pathlib.Path:
    """HF folder for the trained model (transformers loads it) plus the detection head as
    detection_head.safetensors + detection_head_config.json (architecture + caption vocabulary)."""
    from bbu_jax.models.detection_head_files import save_detection_head
    from bbu_jax.workflows.export import export
    replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(built.mesh, P()))(params)
    host = jax.device_get(replicated)
    if jax.process_index() != 0:
        return out
    mods = train_state.merge_modules(built.graphdefs, host, built.rest)
    export(mods["model"], out, c.hf_dir)
    if "head" in mods:
        head_config = {"llm_hidden": built.model_config.text.hidden_size, "width": c.detection_hidden_dim,
                       "num_queries": c.detection_num_queries, "num_layers": c.detection_num_layers,
                       "num_heads": c.detection_num_heads, "mlp_dim": c.detection_mlp_dim,
                       "caption_layers": c.detection_caption_layers, "max_caption_len": c.caption_tokens}
        save_detection_head(mods["head"], out, head_config, built.caption_vocab)
    return out


def train(c: ml_collections.ConfigDict, *, on_step=None, extra_eval=None) -> loop.LoopResult:
    """The whole run; resumes from the newest readable checkpoint of c.workdir when there is one.

    With the head on, every evaluation also reports its COCO metrics (val/mAP50 ...) and a picture
    grid (detection_eval). extra_eval(modules, step) -> {name: value}: more val metrics computed at
    every evaluation with the NNX modules {"model", "head"} of the current params; a value that is
    an (N, H, W, 3) uint8 array (e.g. predicted vs true boxes) is logged as an image grid.
    """
    workdir = pathlib.Path(c.workdir)
    built = build(c)
    extra_evals = [f for f in (detection_eval(c, built) if c.detection_enabled and c.val_jsonl else None,
                               extra_eval) if f is not None]
    total_steps = config_lib.num_train_steps(c, _count_lines(c.train_jsonl))
    scale = opt_lib.lr_scale(c.lr_scaling, opt_lib.effective_batch_size(
        c.batch_rows, c.grad_accum_steps, c.collator, c.segments_per_row), c.lr_reference_batch)
    lrs = {g: getattr(c, f"{g}_lr") * scale for g in opt_lib.GROUPS}
    tx, schedules = opt_lib.make_optimizer(
        built.params, lrs=lrs, warmup_steps=c.warmup_steps, total_steps=total_steps,
        min_lr_ratio=c.min_lr_ratio, weight_decay=c.weight_decay, b1=c.adam_b1, b2=c.adam_b2,
        eps=c.adam_eps, grad_clip_norm=c.grad_clip_norm,
        head_freeze_steps=c.detection_freeze_steps if c.detection_enabled else 0)
    labels = opt_lib.group_labels(built.params)
    sizes = opt_lib.group_sizes(built.params, labels)
    log.info("lr scale %.3f; groups (params, peak lr): %s", scale,
             {g: (sizes[g], lrs[g]) for g in sizes})

    abstract = train_state.abstract_state(built.params, tx, c.seed)
    shardings = train_state.state_shardings(abstract, built.param_shardings, built.mesh)
    data_it = _train_iterator(c)
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=c.keep_checkpoints,
                                      async_save=c.async_checkpointing)
    restored = ckpt.restore_latest(train_state.with_shardings(abstract, shardings), data_iterator=data_it)
    if restored is None:
        state = train_state.create_state(built.params, tx, c.seed, shardings)
        start = 0
        log.info("starting from %s", c.hf_dir)
    else:
        start, state, _ = restored
        log.info("resumed from %s", ckpt.path(start))
    built.params = None  # the state holds them now (on their shardings)

    train_step = step_lib.jit_train_step(loss_fn=built.loss_fn, count_fn=task.count_fn, tx=tx,
                                         labels=labels, state_shardings=shardings, mesh=built.mesh)
    terms = task.model_flops_terms(built.model_config, abstract["params"])
    full_layers = len(built.model_config.vision.fullatt_block_indexes)

    def step_flops(host):
        tokens, patches, ctx, vctx = _attention_work(host, full_layers, terms["vision_layers"])
        return metrics_logging.estimate_step_flops(
            llm_params=terms["llm_params"], vision_params=terms["vision_params"],
            head_params=terms["head_params"], tokens=tokens, patches=patches,
            llm_layers=terms["llm_layers"], llm_width=terms["llm_width"], llm_context=ctx,
            vision_layers=terms["vision_layers"], vision_width=terms["vision_width"], vision_context=vctx)

    logger = metrics_logging.RunLogger(workdir, is_main=jax.process_index() == 0,
                                       total_steps=total_steps, initial_step=start)
    meta = {"config": c.to_dict(), "caption_vocab": str(workdir / "caption_vocab.json")}
    try:
        result = loop.train_loop(
            state=state, train_step=train_step, batches=data_it, accum=c.grad_accum_steps,
            batch_sharding=step_lib.accumulated_batch_sharding(built.mesh), data_iterator=data_it,
            checkpointer=ckpt, logger=logger, start_step=start, total_steps=total_steps,
            log_every=c.log_every, checkpoint_every=c.checkpoint_every, eval_every=c.eval_every,
            eval_fn=make_eval_fn(c, built, extra_evals), max_consecutive_nonfinite=c.max_consecutive_nonfinite,
            lr_fns=schedules, step_flops=step_flops,
            peak_flops=c.peak_tflops_per_device * 1e12 * jax.device_count(),
            token_count=lambda h: int((h["segment_ids"] > 0).sum()) * jax.process_count(),
            meta=meta, on_step=on_step)
        hf_export = None
        if c.export_hf_at_end and result.stop_reason == "done":
            hf_export = str(export_hf(c, built, result.state["params"], workdir.absolute() / "hf_export"))
            log.info("exported to %s", hf_export)
        summary = {**result.last_eval_metrics, **result.last_train_metrics,
                   "step": result.step, "stop_reason": result.stop_reason,
                   "last_checkpoint": None if result.last_checkpoint is None
                   else str(ckpt.path(result.last_checkpoint)),
                   "hf_export": hf_export}
        logger.write_summary(summary)
    finally:
        logger.close()
        ckpt.close()
    return result
