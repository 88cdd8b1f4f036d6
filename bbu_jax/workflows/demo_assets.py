"""The demo's assets, made on first use: a tiny random Qwen2.5-VL and converted synthetic scenes
(the `demo` group of the config; configs/demo.py turns both on)."""
from __future__ import annotations

import logging
import os

from bbu_jax.data.convert import convert_dataset
from bbu_jax.data.synthetic import write_labelme_dataset
from bbu_jax.workflows.config import Specs
from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl

log = logging.getLogger(__name__)


def prepare_assets(specs: Specs) -> None:
    """Write the tiny model / the synthetic dataset when the config asks for them and they are missing."""
    demo, data, hf_dir = specs.demo, specs.data, specs.model.hf_dir
    if demo.make_tiny_model_if_missing and not os.path.exists(os.path.join(hf_dir, "config.json")):
        log.info("writing a tiny random Qwen2.5-VL to %s", hf_dir)
        write_tiny_qwen2_5_vl(hf_dir, seed=specs.run.seed)
    if demo.make_synthetic_data_if_missing and not os.path.exists(data.train_jsonl):
        out = os.path.dirname(os.path.abspath(data.train_jsonl))
        raw = out + "_raw"
        log.info("writing %d synthetic scenes to %s, converted into %s", demo.synthetic_num_images, raw, out)
        write_labelme_dataset(raw, demo.synthetic_num_images, specs.run.seed)
        convert_dataset(raw, "labelme", out, min_pixels=data.min_pixels, max_pixels=data.max_pixels,
                        val_ratio=demo.synthetic_val_ratio, teacher_pool_size=demo.synthetic_teacher_pool_size,
                        seed=specs.run.seed, language=data.language,
                        desc_map_path=os.path.join(raw, "desc_map.json"), num_workers=0, progress=False)
