"""The real run: Qwen2.5-VL-3B + detection head on the BBU dataset, bf16 compute on GPUs.

Every key the code reads is written here (no defaults hidden in code), in one group per concern;
each group becomes one typed spec (bbu_jax.workflows.config.build_specs), validated before any
heavy work. The returned config is locked, so a typo in `--config.group.key=...` fails.

    python scripts/train.py --config configs/base.py --config.optim.llm_lr=1e-5
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- run: where it writes, how long, how often it logs ---
    c.run = ml_collections.ConfigDict()
    c.run.workdir = "runs/bbu_3b"  # checkpoints/, tensorboard/, metrics.jsonl, summary.json
    c.run.seed = 0
    c.run.log_level = "INFO"
    c.run.num_train_steps = 5000  # optimizer steps; 0 = derive from num_epochs
    c.run.num_epochs = 0  # used only when num_train_steps == 0
    c.run.log_every = 10
    c.run.max_consecutive_nonfinite = 5  # K non-finite steps in a row stop the run
    c.run.export_hf_at_end = True  # <workdir>/hf_export: HF folder + detection_head.safetensors
    c.run.peak_tflops_per_device = 989.0  # H100 SXM bf16 dense (datasheet), for the MFU estimate

    # --- model ---
    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = "models/Qwen2.5-VL-3B-Instruct"  # local HF folder (no hub download)
    c.model.param_dtype = "float32"  # master weights
    c.model.compute_dtype = "bfloat16"  # matmul dtype; norms, softmax and losses stay float32
    # Decoder/vision blocks: auto | none | save_matmuls | save_qkv_attn | save_qkv_proj | full (or a
    # jax.checkpoint_policies name). auto: the least recomputation whose compiled step fits the
    # device's memory (training.auto_remat; full only when nothing else fits; "none" on the CPU).
    c.model.remat_policy = "auto"
    c.model.scan_layers = True  # False unrolls the layer loops: faster small-model CPU steps, compile grows with depth
    # auto | xla | jax | cudnn | pallas. auto: pallas on GPU, xla elsewhere (resolved by build_specs).
    # pallas: fused, only the blocks a block can see; cudnn: fused, multiplies every pair of a
    # packed row (segment mask as a bias; causal half skipped); benchmarks/mfu.py --pairs_only
    # counts both.
    c.model.attention_impl = "auto"

    # --- data and the fixed batch budgets (one compile for the whole run) ---
    c.data = ml_collections.ConfigDict()
    c.data.train_jsonl = "data/train.jsonl"
    c.data.val_jsonl = "data/val.jsonl"
    c.data.teacher_pool_jsonl = "data/teacher_pool.jsonl"  # "" disables teacher demonstrations
    c.data.teacher_ratio = 0.7  # fraction of samples that get teacher demonstrations
    c.data.max_teachers = 1
    c.data.language = "zh"  # zh | en: instruction and answer language
    c.data.collator = "packed"  # packed: several samples per row | standard: one sample per row
    c.data.min_pixels = 3136
    c.data.max_pixels = 451584  # must equal the limits the dataset was converted with
    c.data.skip_bad_samples = True  # skip (and count) unreadable records instead of failing
    # grain worker processes (0 = in the main process); benchmarks/loader.py prints how many GPUs
    # one worker keeps busy with these budgets (RESULTS.md has the figures).
    c.data.workers = 4
    c.data.check_budgets_on_start = True  # encode every train record once: fail early if one cannot fit
    c.data.batch_rows = 8  # rows per optimizer micro-step, global over all devices and hosts
    # Every token and patch slot of a row costs the step the same, padding or not, so the patch
    # budget and segments per row must match the data: plan them for these rows and this token
    # budget with `python scripts/plan_budgets.py --config configs/base.py` (it draws samples as
    # training does and prints the budgets and the fill they give) and copy them here; re-plan
    # when the data, pixel limits, teacher settings or tokenizer change. The values below are
    # planned on field-like synthetic photos (benchmarks/packing.py, RESULTS.md "packing").
    c.data.token_budget = 8192  # L: memory and attention cost per row; the other budgets follow it
    c.data.patch_budget = 12992  # P (multiple of 4)
    c.data.segments_per_row = 5  # S (1 for the standard collator)
    # Samples the packer chooses rows from, held encoded in each worker: more fill gaps better
    # but cost memory (each holds its patches) and re-encoding on resume.
    c.data.pack_buffer = 256
    c.data.max_objects = 64  # M per sample
    c.data.caption_tokens = 24  # C per object, incl. the end token
    c.data.vision_memory_tokens = 2048  # NV per segment
    c.data.text_memory_tokens = 256  # NT per segment

    # --- detection head architecture ---
    c.head = ml_collections.ConfigDict()
    c.head.enabled = True
    c.head.num_queries = 100
    c.head.hidden_dim = 256
    c.head.num_layers = 6
    c.head.num_heads = 8
    c.head.mlp_dim = 1024
    c.head.caption_layers = 2  # small caption decoder on top of each matched query

    # --- losses ---
    c.loss = ml_collections.ConfigDict()
    c.loss.lm_weight = 1.0
    c.loss.lm_chunk = 1024  # tokens per chunk of the LM loss (never the full tokens x vocab logits)
    c.loss.detection_weight = 1.0  # multiplies every detection term below
    c.loss.bbox_l1_weight = 5.0
    c.loss.bbox_giou_weight = 2.0
    c.loss.objectness_weight = 2.0
    c.loss.caption_weight = 1.0
    c.loss.match_class_weight = 2.0  # Hungarian matching cost: 2 focal + 5 L1 + 2 GIoU
    c.loss.match_bbox_weight = 5.0
    c.loss.match_giou_weight = 2.0
    c.loss.focal_alpha = 0.25
    c.loss.focal_gamma = 2.0
    c.loss.aux_loss = True  # box losses on every decoder layer's predictions, not only the last
    # auto | scipy (host callback) | optax (on device); auto: optax on an accelerator (no device
    # stall every step), scipy on the CPU. Both exact.
    c.loss.matcher = "auto"

    # --- optimizer: one AdamW per parameter group; lr == 0 freezes a group (no state) ---
    c.optim = ml_collections.ConfigDict()
    c.optim.vision_lr = 5e-7
    c.optim.merger_lr = 1e-5
    c.optim.llm_lr = 5e-6
    c.optim.detection_lr = 1e-5
    c.optim.adapter_lr = 5e-3
    # lr * (effective_batch / lr_reference_batch) ** p, p = 1 linear, 0.5 sqrt, 0 none;
    # effective_batch = batch_rows * grad_accum_steps * (segments_per_row if packed else 1).
    c.optim.lr_scaling = "sqrt"
    c.optim.lr_reference_batch = 8
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    c.optim.weight_decay = 0.01  # never on norms or biases
    c.optim.adam_b1 = 0.9
    c.optim.adam_b2 = 0.999
    c.optim.adam_eps = 1e-8
    # Adam's first moment: "bfloat16" halves it (-7 GiB for the 3B: one 80 GB GPU then fits, see
    # benchmarks/memory_3b.py); the second moment stays float32.
    c.optim.adam_mu_dtype = "float32"
    c.optim.grad_clip_norm = 1.0  # global norm; 0 disables
    c.optim.grad_accum_steps = 1
    c.optim.head_freeze_steps = 200  # head (detection + adapter groups) frozen at first

    # --- parallelism ---
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 8
    c.mesh.tensor = 1
    c.mesh.distributed = False  # jax.distributed.initialize (multi-host)
    c.mesh.coordinator_address = ""  # "" = auto-detect (SLURM, TPU, ...)
    c.mesh.num_processes = 0  # 0 = auto-detect
    c.mesh.process_id = -1  # -1 = auto-detect

    # --- evaluation on val ---
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 500  # 0 = only at the end
    c.eval.num_batches = 16  # 0 = the whole val set
    # val records also answered by generation at each evaluation (val/generate/*): -1 all, 0 none
    c.eval.generate_samples = 32
    c.eval.generate_max_new_tokens = 1024

    # --- checkpoints ---
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    # --- demo assets (configs/demo.py): made on first use when missing ---
    c.demo = ml_collections.ConfigDict()
    c.demo.make_tiny_model_if_missing = False  # write a tiny random model into model.hf_dir
    c.demo.make_synthetic_data_if_missing = False  # synthetic scenes + conversion into data.train_jsonl's folder
    c.demo.synthetic_num_images = 0
    c.demo.synthetic_val_ratio = 0.1
    c.demo.synthetic_teacher_pool_size = 0

    c.lock()
    return c
