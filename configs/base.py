"""The real run: Qwen2.5-VL-3B + detection head on the BBU dataset, bf16 compute on GPUs.

Every key the code reads is written here (no defaults hidden in code); the returned config is
locked, so a typo in `--config.some_key=...` fails instead of silently adding a key.
`bbu_jax.training.config.validate` checks types, ranges and cross-field rules before heavy work.

    python scripts/train.py --config configs/base.py --config.llm_lr=1e-5
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- run ---
    c.workdir = "runs/bbu_3b"  # checkpoints/, tensorboard/, metrics.jsonl, summary.json
    c.seed = 0
    c.log_level = "INFO"

    # --- model ---
    c.hf_dir = "models/Qwen2.5-VL-3B-Instruct"  # local HF folder (no hub download)
    c.make_tiny_model_if_missing = False  # demo only: write a tiny random model into hf_dir
    c.param_dtype = "float32"  # master weights
    c.compute_dtype = "bfloat16"  # matmul dtype; norms, softmax and losses stay float32
    c.remat_policy = "full"  # none | full | a jax.checkpoint_policies name (decoder/vision blocks)
    c.scan_layers = True  # False unrolls the layer loops: faster small-model CPU steps, compile grows with depth
    # xla | jax | cudnn | pallas. cudnn: fused, multiplies every pair of a packed row (segment mask
    # as a bias); pallas: fused, only the blocks a block can see (8x less text attention work on
    # 4-sample 8192-token rows, benchmarks/mfu.py --pairs_only). Neither has run on a GPU yet.
    c.attention_impl = "cudnn"

    # --- data ---
    c.train_jsonl = "data/train.jsonl"
    c.val_jsonl = "data/val.jsonl"
    c.teacher_pool_jsonl = "data/teacher_pool.jsonl"  # "" disables teacher demonstrations
    c.make_synthetic_data_if_missing = False  # demo only: synthetic scenes + conversion
    c.synthetic_num_images = 0  # scenes written when the synthetic data are made
    c.synthetic_val_ratio = 0.1
    c.synthetic_teacher_pool_size = 0
    c.teacher_ratio = 0.7  # fraction of samples that get teacher demonstrations
    c.max_teachers = 1
    c.language = "zh"  # zh | en: instruction and answer language
    c.collator = "packed"  # packed: several samples per row | standard: one sample per row
    c.min_pixels = 3136
    c.max_pixels = 451584  # must equal the limits the dataset was converted with
    c.skip_bad_samples = True  # skip (and count) unreadable records instead of failing
    # grain worker processes (0 = in the main process). One loader process keeps ~5-7 H100s busy at
    # 50% MFU with these budgets (benchmarks/loader.py, one core of a shared VM), so an 8-GPU host
    # needs >= 2; 4 leave room for larger photos and slower cores. Each worker peaks at ~0.8 GB.
    c.data_workers = 4
    c.check_budgets_on_start = True  # encode every train record once: fail early if one cannot fit

    # --- fixed batch budgets (one compile for the whole run) ---
    c.batch_rows = 8  # rows per optimizer micro-step, global over all devices and hosts
    c.token_budget = 8192  # L
    c.patch_budget = 16384  # P (multiple of 4)
    c.segments_per_row = 4  # S (1 for the standard collator)
    c.max_objects = 64  # M per sample
    c.caption_tokens = 24  # C per object, incl. the end token
    c.vision_memory_tokens = 2048  # NV per segment
    c.text_memory_tokens = 256  # NT per segment

    # --- optimizer: one AdamW per parameter group; lr == 0 freezes a group (no state) ---
    c.vision_lr = 5e-7
    c.merger_lr = 1e-5
    c.llm_lr = 5e-6
    c.detection_lr = 1e-5
    c.adapter_lr = 5e-3
    # lr * (effective_batch / lr_reference_batch) ** p, p = 1 linear, 0.5 sqrt, 0 none;
    # effective_batch = batch_rows * grad_accum_steps * (segments_per_row if packed else 1).
    c.lr_scaling = "sqrt"
    c.lr_reference_batch = 8
    c.warmup_steps = 100
    c.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    c.weight_decay = 0.01  # never on norms or biases
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.grad_clip_norm = 1.0  # global norm; 0 disables
    c.grad_accum_steps = 1

    # --- schedule of the run ---
    c.num_train_steps = 5000  # optimizer steps; 0 = derive from num_epochs
    c.num_epochs = 0  # used only when num_train_steps == 0
    c.log_every = 10
    c.eval_every = 500  # 0 = only at the end
    c.num_eval_batches = 16  # 0 = the whole val set
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.max_consecutive_nonfinite = 5  # K non-finite losses in a row stop the run
    c.export_hf_at_end = True  # <workdir>/hf_export: HF folder + detection_head.safetensors

    # --- detection head and losses ---
    c.detection_enabled = True
    c.detection_num_queries = 100
    c.detection_hidden_dim = 256
    c.detection_num_layers = 6
    c.detection_num_heads = 8
    c.detection_mlp_dim = 1024
    c.detection_caption_layers = 2  # small caption decoder on top of each matched query
    c.detection_freeze_steps = 200  # head (detection + adapter groups) frozen at first
    c.detection_matcher = "scipy"  # scipy (host callback, exact) | optax (on device)
    c.lm_loss_weight = 1.0
    c.lm_loss_chunk = 1024  # tokens per chunk of the LM loss (never the full tokens x vocab logits)
    c.detection_loss_weight = 1.0
    c.bbox_l1_weight = 5.0
    c.bbox_giou_weight = 2.0
    c.objectness_weight = 2.0
    c.caption_weight = 1.0
    c.match_class_weight = 2.0  # Hungarian matching cost: 2 focal + 5 L1 + 2 GIoU
    c.match_bbox_weight = 5.0
    c.match_giou_weight = 2.0
    c.focal_alpha = 0.25
    c.focal_gamma = 2.0
    c.aux_loss = True  # loss on every decoder layer's predictions

    # --- parallelism ---
    c.mesh_data = 1
    c.mesh_fsdp = 8
    c.mesh_tensor = 1
    c.distributed = False  # jax.distributed.initialize (multi-host)
    c.coordinator_address = ""  # "" = auto-detect (SLURM, TPU, ...)
    c.num_processes = 0  # 0 = auto-detect
    c.process_id = -1  # -1 = auto-detect

    # --- throughput accounting ---
    c.peak_tflops_per_device = 989.0  # H100 SXM bf16 dense (datasheet) for the MFU estimate

    c.lock()
    return c
