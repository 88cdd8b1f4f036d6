"""`make demo`: the whole pipeline on CPU in minutes, from nothing.

Creates the tiny model and the synthetic dataset (configs/demo.py), trains the LM and the
detection head together, evaluates on val (losses, the head's COCO mAP, generated answers scored
against the ground truth), checkpoints, exports to HF, then loads the export back with `Predictor`
(no settings given: they travel with the export), draws ground truth vs the head's boxes, answers
one val image, and prints where everything is. Each run starts a fresh run folder (the model and
data are reused).

  python scripts/demo.py [--config.run.num_train_steps=40 ...]
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bbu_jax.foundation.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # before jax starts its threads (the demo trains on the CPU)

from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "demo.py"), "demo config",
                                          lock_config=True)


def check_export(specs, hf_export: pathlib.Path, out: pathlib.Path, num_samples: int) -> dict:
    """Load the HF export back as a user would (Predictor, no settings given), draw the head's
    detections next to the ground truth for the first val records (PNGs in ``out``) and answer
    the first one by generation."""
    from bbu_jax.data.schema import load_records
    from bbu_jax.evaluation.visualize import VisualRecord, write_visualizations
    from bbu_jax.inference import Predictor
    from bbu_jax.inference.answers import truth

    predictor = Predictor.from_pretrained(hf_export)
    records = load_records(specs.data.val_jsonl)[0][:num_samples]
    images = [r.student.images[0] for r in records]
    detections = predictor.detect(images, score_threshold=0.3, batch_size=num_samples)
    pictures, _ = write_visualizations([VisualRecord(image, truth(r), dets, r.source)
                                        for image, r, dets in zip(images, records, detections)],
                                       out, panel_size=384)
    answer = predictor.generate(images[:1], max_new_tokens=specs.eval.generate_max_new_tokens)[0]
    print("\n--- generated answer for", records[0].source, "---\n" + answer["text"][:400])
    return {"sheet": [p for p in pictures if "contact_sheet" in p][0], "parse_status": answer["parse_status"]}


def main(argv) -> int:
    del argv
    import logging
    logging.getLogger().setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)
    t0 = time.time()
    import jax
    from bbu_jax.workflows import data_checks, demo_assets, train
    from bbu_jax.workflows.config import build_specs
    specs = build_specs(_CONFIG.value, device_count=jax.device_count())
    demo_assets.prepare_assets(specs)
    encoder = train.make_encoder(specs)  # one tokenizer load for the checks and the run
    data_checks.check_data(specs, encoder)
    workdir = pathlib.Path(specs.run.workdir)
    if workdir.exists():
        print(f"removing the previous demo run {workdir}")
        shutil.rmtree(workdir)
    result = train.train(specs, encoder)
    summary = json.loads((workdir / "summary.json").read_text())
    from bbu_jax.evaluation.curves import read_metrics, series, write_learning_curves
    curve = series(read_metrics(workdir / "metrics.jsonl"), "train/lm_loss")
    curves_png = write_learning_curves(workdir / "metrics.jsonl", workdir / "pictures" / "learning_curves.png",
                                       title=f"bbu_jax demo: {workdir.absolute()}")
    print("\n=== bbu_jax demo ===")
    print(f"steps {result.step} ({result.stop_reason}) in {time.time() - t0:.0f}s")
    if curve:
        print(f"train/lm_loss: step {curve[0][0]:.0f} {curve[0][1]:.3f} -> step {curve[-1][0]:.0f} {curve[-1][1]:.3f}")
    for k in ("val/lm_loss", "val/student_lm_loss", "val/bbox_l1_loss", "val/bbox_giou_loss",
              "val/objectness_loss", "val/caption_loss", "val/matched_iou", "val/head/box_AP50",
              "val/head/type_mAP50", "val/head/caption_accuracy", "val/generate/complete_json",
              "val/generate/precision", "val/generate/recall", "val/generate/f1"):
        if k in summary:
            print(f"{k:28s} {summary[k]:.4f}")
    if summary.get("hf_export"):
        check = check_export(specs, pathlib.Path(summary["hf_export"]), workdir / "pictures", num_samples=8)
        print(f"pictures         {check['sheet']}")
    print(f"learning curves  {curves_png}")
    print(f"tiny model       {pathlib.Path(specs.model.hf_dir).absolute()}")
    print(f"data             {pathlib.Path(specs.data.train_jsonl).absolute().parent}")
    print(f"run folder       {workdir.absolute()}")
    print(f"tensorboard      tensorboard --logdir {workdir.absolute() / 'tensorboard'}")
    print(f"metrics          {workdir.absolute() / 'metrics.jsonl'}")
    print(f"summary          {workdir.absolute() / 'summary.json'}")
    print(f"last checkpoint  {summary['last_checkpoint']}")
    print(f"HF export        {summary['hf_export']}")
    from bbu_jax.training.loop import EXIT_STATUS
    return EXIT_STATUS[result.stop_reason]


if __name__ == "__main__":
    from bbu_jax.workflows.config import run_config_script
    run_config_script(main, required=False)
