"""Tiny CPU run of the whole pipeline (`make demo`): derived from base.py, only sizes changed.

The model is a tiny random Qwen2.5-VL written by bbu_jax.workflows.tiny_model and the data are
synthetic scenes converted like real data; both are created on first use (the *_if_missing keys).
"""
import importlib.util
import pathlib

import ml_collections


def _base() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("base.py")
    spec = importlib.util.spec_from_file_location("bbu_jax_config_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = _base()
    # base's config is locked: only its keys can be set here.
    c.workdir = "demo_out/run"
    c.hf_dir = "demo_out/tiny_qwen2_5_vl"
    c.make_tiny_model_if_missing = True
    c.param_dtype = "float32"
    c.compute_dtype = "float32"  # CPU
    c.remat_policy = "none"
    c.attention_impl = "xla"

    c.train_jsonl = "demo_out/data/train.jsonl"
    c.val_jsonl = "demo_out/data/val.jsonl"
    c.teacher_pool_jsonl = "demo_out/data/teacher_pool.jsonl"
    c.make_synthetic_data_if_missing = True
    c.synthetic_num_images = 240
    c.synthetic_val_ratio = 0.1
    c.synthetic_teacher_pool_size = 8
    c.language = "en"
    c.min_pixels = 3136
    c.max_pixels = 50176  # 224x224 images: 256 patches, 64 image tokens (112x112 was too coarse for boxes)
    c.data_workers = 0  # the tiny step is fed from the main process; no worker start-up on a laptop

    c.batch_rows = 2  # more, smaller steps learn faster at this size
    c.token_budget = 1024
    c.patch_budget = 1024  # two samples with a demonstration each
    c.segments_per_row = 2
    c.max_objects = 8
    c.caption_tokens = 24
    c.vision_memory_tokens = 64
    c.text_memory_tokens = 64

    c.vision_lr = 1e-4
    c.merger_lr = 2e-3
    c.llm_lr = 2e-3
    c.detection_lr = 1e-3
    c.adapter_lr = 1e-3
    c.lr_scaling = "none"
    c.warmup_steps = 10
    c.num_train_steps = 800  # 400 gave val mAP50 0.55 but no complete JSON answer yet
    c.log_every = 10
    c.eval_every = 400
    c.num_eval_batches = 0
    c.checkpoint_every = 400
    c.keep_checkpoints = 2

    c.detection_num_queries = 16
    c.detection_hidden_dim = 64
    c.detection_num_layers = 2
    c.detection_num_heads = 4
    c.detection_mlp_dim = 128
    c.detection_caption_layers = 1
    c.detection_freeze_steps = 0

    c.mesh_data = 1
    c.mesh_fsdp = 1
    c.mesh_tensor = 1
    c.peak_tflops_per_device = 1.0  # nominal for a CPU core; MFU is indicative only
    return c
