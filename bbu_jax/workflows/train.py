"""A training run from its specs: the one module that puts the library together.

`train(specs)` reads top to bottom: mesh -> data -> model and optimizer -> restore -> step ->
evaluation -> loop -> export. scripts/train.py builds the specs from a config
(workflows.config.build_specs) and calls it; scripts/demo.py and tests call the same functions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bbu_jax.data.batch import FIELDS, expected_shapes
from bbu_jax.data.encode import SampleEncoder, build_caption_vocab, load_caption_vocab, save_caption_vocab
from bbu_jax.data.pipeline import make_train_iterator
from bbu_jax.evaluation.evaluator import eval_step
from bbu_jax.foundation import sharding
from bbu_jax.inference.settings import Settings, package_versions
from bbu_jax.training.flops import batch_flops, head_param_count
from bbu_jax.training import auto_remat, checkpointing, loop, metrics_logging, task, train_state
from bbu_jax.training import optimizer as opt_lib
from bbu_jax.training import step as step_lib
from bbu_jax.workflows.config import Specs
from bbu_jax.workflows.evaluators import Evaluator, val_evaluator
from bbu_jax.workflows.export import export_trained

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers
def make_encoder(specs: Specs) -> SampleEncoder:
    """The run's one sample encoder (tokenizer and image processing); grain workers get copies."""
    d = specs.data
    return SampleEncoder(specs.model.hf_dir, min_pixels=d.min_pixels, max_pixels=d.max_pixels, language=d.language)


def caption_vocab(specs: Specs, encoder: SampleEncoder, workdir: pathlib.Path) -> np.ndarray | None:
    """Built once per run from the train data (+ teacher pool) and kept in the workdir, so resume
    and inference see the same vocabulary."""
    if specs.head is None:
        return None
    path = workdir / "caption_vocab.json"
    if path.exists():
        return load_caption_vocab(str(path))
    vocab = build_caption_vocab([p for p in (specs.data.train_jsonl, specs.data.teacher_pool_jsonl) if p],
                                encoder.tokenizer, skip_bad_samples=specs.data.skip_bad_samples)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        save_caption_vocab(str(path), vocab)
    return vocab


def run_settings(specs: Specs, encoder: SampleEncoder, vocab: np.ndarray | None, model_config) -> Settings:
    """What the run's checkpoints and exports record about how to use the weights."""
    d = specs.data
    summary = pathlib.Path(d.train_jsonl).parent / "summary.json"  # written by dataset conversion
    training_data = json.loads(summary.read_text(encoding="utf-8")).get("params") if summary.is_file() else None
    return Settings(
        base_model=str(pathlib.Path(specs.model.hf_dir).absolute()), model_config=model_config.to_hf_dict(),
        language=d.language, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
        system_prompt=encoder.system_prompt, instruction=encoder.instruction,
        # most training prompts had a demonstration when the ratio is above one half
        num_teachers=1 if d.teacher_ratio > 0.5 and d.max_teachers else 0,
        teacher_pool=str(pathlib.Path(d.teacher_pool_jsonl).absolute()) if d.teacher_pool_jsonl else "",
        caption_vocab=None if vocab is None else [int(i) for i in vocab],
        head=None if specs.head is None else {"llm_hidden": model_config.text.hidden_size,
                                              **dataclasses.asdict(specs.head)},
        specs=dataclasses.asdict(specs), training_data=training_data, versions=package_versions())


def train_iterator(specs: Specs, encoder: SampleEncoder):
    """This process's shard of the endless training batches."""
    return make_train_iterator(specs.data, encoder, seed=specs.run.seed, shard_index=jax.process_index(),
                               shard_count=jax.process_count())


@dataclasses.dataclass
class Built:
    """The model and head as graph + params, placed on the mesh, and the loss over them."""
    mesh: Any
    graphdefs: dict
    rest: dict
    params: dict | None  # handed to the train state, then None
    param_shardings: dict
    model_config: Any
    caption_vocab: np.ndarray | None
    loss_fn: Callable

    def modules(self, params) -> dict:
        return train_state.merge_modules(self.graphdefs, params, self.rest)


def build(specs: Specs, mesh, vocab: np.ndarray | None) -> Built:
    """Model (+ head) placed on their shardings, and the loss function."""
    modules = task.build_modules(specs.model, specs.head, seed=specs.run.seed, mesh=mesh)
    shardings = task.param_shardings(modules, mesh)
    graphdefs, params, rest = train_state.split_modules(modules)
    loss_fn = task.make_loss_fn(graphdefs, rest, specs.loss, vocab)
    return Built(mesh, graphdefs, rest, params, shardings, modules["model"].config, vocab, loss_fn)


def make_optimizer(specs: Specs, params, total_steps: int):
    """(tx, per-group lr schedules): the optim spec with lrs scaled to the effective batch."""
    optim = specs.optim
    scale = opt_lib.lr_scale(optim.lr_scaling, specs.samples_per_step(), optim.lr_reference_batch)
    log.info("lr scale %.3f for %d samples per step", scale, specs.samples_per_step())
    return opt_lib.make_optimizer(params, optim, total_steps=total_steps, batch_scale=scale)


def make_train_step(specs: Specs, built: Built, tx, abstract_state, *, remat: str | None = None):
    """The jitted train step and the train state's shardings. ``remat``: the model's policy in this
    step (a candidate of "auto"); None: the one it was built with. Groups at lr 0 are not differentiated."""
    shardings = train_state.state_shardings(abstract_state, built.param_shardings, built.mesh)
    loss_fn = built.loss_fn if remat is None else task.make_loss_fn(built.graphdefs, built.rest, specs.loss,
                                                                    built.caption_vocab, remat=remat)
    fn = step_lib.jit_train_step(loss_fn=loss_fn, count_fn=task.count_fn, tx=tx,
                                 labels=opt_lib.group_labels(abstract_state["params"]),
                                 state_shardings=shardings, mesh=built.mesh,
                                 frozen=opt_lib.frozen_groups(specs.optim))
    return fn, shardings


def step_batch_shapes(specs: Specs, dims: dict[str, int] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one optimizer step (micro-batches stacked), as the loop hands it over;
    ``dims``: other budgets per micro-batch (``bbu_jax.data.batch``) than the run's."""
    if dims is None:
        d = specs.data
        rows = d.batch_rows // jax.process_count() * jax.process_count()  # each process loads its share
        dims = d.budgets(rows=rows, segments=d.segments_per_row).dims()
    return {k: jax.ShapeDtypeStruct((specs.optim.grad_accum_steps, *shape), FIELDS[k][1])
            for k, shape in expected_shapes(dims).items()}


def compile_train_step(specs: Specs, built: Built, tx, abstract_state, *,
                       memory_limit: Callable[[], int | None] = auto_remat.device_memory_limit):
    """(train step, state shardings, remat policy) of the run. remat_policy "auto" is resolved here,
    once: the candidates are compiled for the run's batch shapes and shardings and the first that
    fits ``memory_limit()`` (auto_remat.choose) is returned compiled, ready to run. Any other
    policy: the jitted step, compiled at its first call."""
    policy = specs.model.remat_policy
    if policy != "auto":
        return *make_train_step(specs, built, tx, abstract_state), policy
    shardings = train_state.state_shardings(abstract_state, built.param_shardings, built.mesh)
    state = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                   abstract_state, shardings)
    batch_sharding = step_lib.accumulated_batch_sharding(built.mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in step_batch_shapes(specs).items()}

    def compile_with(candidate):
        return make_train_step(specs, built, tx, abstract_state, remat=candidate)[0].lower(state, batch).compile()

    choice = auto_remat.choose(compile_with, memory_limit())
    if choice.compiled is None:
        return *make_train_step(specs, built, tx, abstract_state, remat=choice.policy), choice.policy
    return choice.compiled, shardings, choice.policy


def make_eval_fn(built: Built, evaluators: list[Evaluator]):
    """eval_fn(state, step) -> the evaluators' metrics on the current params."""
    if not evaluators:
        return None

    def eval_fn(state, step):
        modules = built.modules(state["params"])
        out = {}
        for evaluator in evaluators:
            out.update(evaluator(modules, step))
        return out

    return eval_fn


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ----------------------------------------------------------------------------- the run
def train(specs: Specs, encoder: SampleEncoder, *, on_step=None, extra_eval: Evaluator | None = None
          ) -> loop.LoopResult:
    """The whole run; resumes from the newest readable checkpoint of the workdir when there is one.
    ``encoder``: the run's one sample encoder (``make_encoder``), the one the data checks used.

    Every evaluation reports the val loss terms and, with the head, its COCO metrics and a picture
    grid. extra_eval(modules, step) -> {name: value}: more val metrics computed at every
    evaluation with the NNX modules {"model", "head"} of the current params; a value that is an
    (N, H, W, 3) uint8 array (e.g. predicted vs true boxes) is logged as an image grid.
    """
    started = time.time()
    run = specs.run
    workdir = pathlib.Path(run.workdir)

    # --- mesh ---
    mesh = sharding.make_mesh(specs.mesh.data, specs.mesh.fsdp, specs.mesh.tensor)

    # --- data ---
    vocab = caption_vocab(specs, encoder, workdir)
    data_it = train_iterator(specs, encoder)
    total_steps = specs.train_steps(_count_lines(specs.data.train_jsonl))

    # --- model and optimizer ---
    built = build(specs, mesh, vocab)
    tx, schedules = make_optimizer(specs, built.params, total_steps)
    labels = opt_lib.group_labels(built.params)
    log.info("groups (params, peak lr): %s",
             {g: (n, specs.optim.lrs[g]) for g, n in opt_lib.group_sizes(built.params, labels).items()})
    abstract = train_state.abstract_state(built.params, tx, run.seed)

    # --- the step ---
    train_step, shardings, remat = compile_train_step(specs, built, tx, abstract)
    specs = dataclasses.replace(specs, model=dataclasses.replace(specs.model, remat_policy=remat))  # recorded

    # --- restore ---
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=specs.checkpoint.keep,
                                      async_save=specs.checkpoint.async_save)
    restored = ckpt.restore_latest(train_state.with_shardings(abstract, shardings), data_iterator=data_it)
    if restored is None:
        state = train_state.create_state(built.params, tx, run.seed, shardings)
        start = 0
        log.info("starting from %s", specs.model.hf_dir)
    else:
        start, state, _ = restored
        log.info("resumed from %s", ckpt.path(start))
    built.params = None  # the state holds them now (on their shardings)

    # --- evaluation ---
    settings = run_settings(specs, encoder, vocab, built.model_config)
    evaluators = [val_evaluator(specs, encoder, vocab, num_teachers=settings.num_teachers)
                  ] if specs.data.val_jsonl else []
    evaluators += [extra_eval] if extra_eval is not None else []

    # --- the loop ---
    head_params = head_param_count(abstract["params"])
    logger = metrics_logging.RunLogger(workdir, is_main=jax.process_index() == 0,
                                       total_steps=total_steps, initial_step=start)
    spec = loop.LoopSpec(total_steps=total_steps, accum=specs.optim.grad_accum_steps, log_every=run.log_every,
                         eval_every=specs.eval.every, checkpoint_every=specs.checkpoint.every,
                         max_consecutive_nonfinite=run.max_consecutive_nonfinite,
                         peak_flops=run.peak_tflops_per_device * 1e12 * jax.device_count())
    try:
        result = loop.train_loop(
            spec, state=state, train_step=train_step, batches=data_it,
            batch_sharding=step_lib.accumulated_batch_sharding(mesh), data_iterator=data_it,
            checkpointer=ckpt, logger=logger, start_step=start, eval_fn=make_eval_fn(built, evaluators),
            lr_fns=schedules,
            step_flops=lambda h: batch_flops(built.model_config, h, head_params=head_params) * jax.process_count(),
            token_count=lambda h: int((h["segment_ids"] > 0).sum()) * jax.process_count(),
            meta=settings.to_dict(), on_step=on_step)

        # --- export ---
        hf_export = None
        if run.export_hf_at_end and result.stop_reason == "done":
            hf_export = str(export_state(built, result.state["params"], workdir.absolute() / "hf_export",
                                         settings.at_step(result.step), logger.last))
            if jax.process_index() == 0:  # the one that wrote it
                log.info("exported to %s", hf_export)
        summary = {**logger.last, "step": result.step, "stop_reason": result.stop_reason,
                   "wall_time_s": time.time() - started, "versions": settings.versions,
                   "last_checkpoint": None if result.last_checkpoint is None
                   else str(ckpt.path(result.last_checkpoint)),
                   "hf_export": hf_export}
        logger.write_summary(summary)
    finally:
        logger.close()
        ckpt.close()
    return result


def export_state(built: Built, params, out: pathlib.Path, settings: Settings, metrics) -> pathlib.Path:
    """Gathers the params on every process, then process 0 writes the HF export."""
    replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(built.mesh, P()))(params)
    host = jax.device_get(replicated)
    if jax.process_index() != 0:
        return out
    return export_trained(built.modules(host), out, settings, metrics, overwrite=True)


def test_forward_pass(specs: Specs, encoder: SampleEncoder) -> dict[str, float]:
    """One forward + loss on one train batch; prints each term (sum / count) and returns them."""
    mesh = sharding.make_mesh(specs.mesh.data, specs.mesh.fsdp, specs.mesh.tensor)
    vocab = caption_vocab(specs, encoder, pathlib.Path(specs.run.workdir))
    built = build(specs, mesh, vocab)
    params = jax.device_put(built.params, built.param_shardings)
    modules = built.modules(params)
    batch = next(train_iterator(specs, encoder))
    end_id = encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with sharding.mesh_context(mesh):
        metrics, _ = eval_step(modules["model"], modules.get("head"), batch,
                               None if vocab is None else np.asarray(vocab, np.int32), np.int32(end_id),
                               loss=specs.loss, top_k=0 if specs.head is None else 1)
    means = {k: float(s) / max(float(n), 1.0) for k, (s, n) in jax.device_get(metrics).items()}
    for k, v in sorted(means.items()):
        print(f"{k:24s} {v:.6f}")
    return means
