"""Tiny CPU run of the whole pipeline (`make demo`): derived from base.py, only sizes changed.

The model is a tiny random Qwen2.5-VL (bbu_jax.workflows.tiny_model) and the data are synthetic
scenes converted like real data; both are created on first use (the demo group).
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
    c.run.workdir = "demo_out/run"
    c.run.num_train_steps = 800  # complete JSON answers need this many steps at this size
    c.run.log_every = 10
    c.run.peak_tflops_per_device = 1.0  # nominal for a CPU core; MFU is indicative only

    c.model.hf_dir = "demo_out/tiny_qwen2_5_vl"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"  # CPU
    c.model.remat_policy = "none"
    c.model.attention_impl = "xla"

    c.data.train_jsonl = "demo_out/data/train.jsonl"
    c.data.val_jsonl = "demo_out/data/val.jsonl"
    c.data.teacher_pool_jsonl = "demo_out/data/teacher_pool.jsonl"
    c.data.language = "en"
    c.data.min_pixels = 3136
    # 280x280 images: 400 patches, 100 image tokens; at 224x224 (64 tokens) a label or a fiber is a
    # fraction of one merged token.
    c.data.max_pixels = 78400
    c.data.workers = 0  # the tiny step is fed from the main process; no worker start-up on a laptop
    c.data.batch_rows = 2  # more, smaller steps learn faster at this size
    c.data.token_budget = 1280
    c.data.patch_budget = 1600  # two samples with a demonstration each
    c.data.segments_per_row = 2
    c.data.pack_buffer = 16
    c.data.max_objects = 8
    c.data.caption_tokens = 24
    c.data.vision_memory_tokens = 100  # one image's tokens
    c.data.text_memory_tokens = 64

    c.head.num_queries = 16
    c.head.hidden_dim = 64
    c.head.num_layers = 3  # each layer refines the previous one's boxes
    c.head.num_heads = 4
    c.head.mlp_dim = 128
    c.head.caption_layers = 1

    c.optim.vision_lr = 1e-4
    c.optim.merger_lr = 2e-3
    c.optim.llm_lr = 2e-3
    c.optim.detection_lr = 1e-3
    c.optim.adapter_lr = 1e-3
    c.optim.lr_scaling = "none"
    c.optim.warmup_steps = 10
    c.optim.head_freeze_steps = 0

    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.eval.every = 400
    c.eval.num_batches = 0
    c.eval.generate_samples = -1  # the whole val set
    c.eval.generate_max_new_tokens = 384  # a synthetic scene's answer is well under this

    c.checkpoint.every = 400
    c.checkpoint.keep = 2

    c.demo.make_tiny_model_if_missing = True
    c.demo.make_synthetic_data_if_missing = True
    c.demo.synthetic_num_images = 240
    c.demo.synthetic_val_ratio = 0.1
    c.demo.synthetic_teacher_pool_size = 8
    return c
