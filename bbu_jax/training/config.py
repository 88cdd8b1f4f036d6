"""Config validation, run before anything heavy (model load, compile, data reading).

The schema below says what each key must be; it holds no values (those live only in the config
files). `validate` reports every problem at once so a user fixes a config in one go.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "jax", "cudnn", "pallas")
MATCHERS = ("scipy", "optax")
LANGUAGES = ("zh", "en")
COLLATORS = ("packed", "standard")
LR_SCALING = ("none", "sqrt", "linear")


class ConfigError(ValueError):
    """A config that must not be run; the message lists every problem found."""


def _choice(options):
    return lambda v: None if v in options else f"must be one of {options}, got {v!r}"


def _at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v!r}"


def _positive(v):
    return None if v > 0 else f"must be > 0, got {v!r}"


def _unit(v):
    return None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v!r}"


def _beta(v):
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v!r}"


def _any(v):
    return None


def _remat(v):
    import jax  # only for the names of its checkpoint policies
    if v in ("none", "full") or hasattr(jax.checkpoint_policies, v):
        return None
    return f"must be 'none', 'full' or a jax.checkpoint_policies name, got {v!r}"


_NONNEG = _at_least(0)

# key -> (type, check). float keys accept ints (a CLI override like `--config.llm_lr=0`).
SCHEMA: dict[str, tuple[type, Callable[[Any], str | None]]] = {
    "workdir": (str, lambda v: None if v else "must not be empty"),
    "seed": (int, _NONNEG),
    "log_level": (str, _choice(LOG_LEVELS)),
    "hf_dir": (str, lambda v: None if v else "must not be empty"),
    "make_tiny_model_if_missing": (bool, _any),
    "param_dtype": (str, _choice(DTYPES)),
    "compute_dtype": (str, _choice(DTYPES)),
    "remat_policy": (str, _remat),
    "scan_layers": (bool, _any),
    "attention_impl": (str, _choice(ATTENTION_IMPLS)),
    "train_jsonl": (str, lambda v: None if v else "must not be empty"),
    "val_jsonl": (str, _any),
    "teacher_pool_jsonl": (str, _any),
    "make_synthetic_data_if_missing": (bool, _any),
    "synthetic_num_images": (int, _NONNEG),
    "synthetic_val_ratio": (float, _unit),
    "synthetic_teacher_pool_size": (int, _NONNEG),
    "teacher_ratio": (float, _unit),
    "max_teachers": (int, _NONNEG),
    "language": (str, _choice(LANGUAGES)),
    "collator": (str, _choice(COLLATORS)),
    "min_pixels": (int, _positive),
    "max_pixels": (int, _positive),
    "skip_bad_samples": (bool, _any),
    "data_workers": (int, _NONNEG),
    "check_budgets_on_start": (bool, _any),
    "batch_rows": (int, _positive),
    "token_budget": (int, _positive),
    "patch_budget": (int, lambda v: None if v > 0 and v % 4 == 0
                     else f"must be a positive multiple of 4 (2x2 patch merge), got {v!r}"),
    "segments_per_row": (int, _positive),
    "max_objects": (int, _positive),
    "caption_tokens": (int, _at_least(2)),
    "vision_memory_tokens": (int, _positive),
    "text_memory_tokens": (int, _positive),
    "vision_lr": (float, _NONNEG),
    "merger_lr": (float, _NONNEG),
    "llm_lr": (float, _NONNEG),
    "detection_lr": (float, _NONNEG),
    "adapter_lr": (float, _NONNEG),
    "lr_scaling": (str, _choice(LR_SCALING)),
    "lr_reference_batch": (int, _positive),
    "warmup_steps": (int, _NONNEG),
    "min_lr_ratio": (float, _unit),
    "weight_decay": (float, _NONNEG),
    "adam_b1": (float, _beta),
    "adam_b2": (float, _beta),
    "adam_eps": (float, _positive),
    "grad_clip_norm": (float, _NONNEG),
    "grad_accum_steps": (int, _positive),
    "num_train_steps": (int, _NONNEG),
    "num_epochs": (int, _NONNEG),
    "log_every": (int, _positive),
    "eval_every": (int, _NONNEG),
    "num_eval_batches": (int, _NONNEG),
    "checkpoint_every": (int, _positive),
    "keep_checkpoints": (int, _positive),
    "async_checkpointing": (bool, _any),
    "max_consecutive_nonfinite": (int, _positive),
    "export_hf_at_end": (bool, _any),
    "detection_enabled": (bool, _any),
    "detection_num_queries": (int, _positive),
    "detection_hidden_dim": (int, _positive),
    "detection_num_layers": (int, _positive),
    "detection_num_heads": (int, _positive),
    "detection_mlp_dim": (int, _positive),
    "detection_caption_layers": (int, _positive),
    "detection_matcher": (str, _choice(MATCHERS)),
    "detection_freeze_steps": (int, _NONNEG),
    "lm_loss_weight": (float, _NONNEG),
    "lm_loss_chunk": (int, _positive),
    "detection_loss_weight": (float, _NONNEG),
    "bbox_l1_weight": (float, _NONNEG),
    "bbox_giou_weight": (float, _NONNEG),
    "objectness_weight": (float, _NONNEG),
    "caption_weight": (float, _NONNEG),
    "match_class_weight": (float, _NONNEG),
    "match_bbox_weight": (float, _NONNEG),
    "match_giou_weight": (float, _NONNEG),
    "focal_alpha": (float, _unit),
    "focal_gamma": (float, _NONNEG),
    "aux_loss": (bool, _any),
    "mesh_data": (int, _positive),
    "mesh_fsdp": (int, _positive),
    "mesh_tensor": (int, _positive),
    "distributed": (bool, _any),
    "coordinator_address": (str, _any),
    "num_processes": (int, _NONNEG),
    "process_id": (int, _at_least(-1)),
    "peak_tflops_per_device": (float, _positive),
}


def _type_ok(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _cross_field(c: Mapping[str, Any]) -> list[str]:
    """Rules between keys; only called once every key has the right type and range."""
    problems = []
    if c["num_train_steps"] == 0 and c["num_epochs"] == 0:
        problems.append("num_train_steps and num_epochs are both 0: set one of them")
    if 0 < c["num_train_steps"] <= c["warmup_steps"]:
        problems.append(f"warmup_steps={c['warmup_steps']} must be < num_train_steps="
                        f"{c['num_train_steps']}")
    if c["collator"] == "standard" and c["segments_per_row"] != 1:
        problems.append(f"collator='standard' puts one sample per row: segments_per_row must be 1, "
                        f"got {c['segments_per_row']}")
    if c["max_pixels"] < c["min_pixels"]:
        problems.append(f"max_pixels={c['max_pixels']} < min_pixels={c['min_pixels']}")
    shards = c["mesh_data"] * c["mesh_fsdp"]
    if c["batch_rows"] % shards:
        problems.append(f"batch_rows={c['batch_rows']} must be divisible by mesh_data*mesh_fsdp="
                        f"{shards} (the batch is split over both axes)")
    if c["detection_hidden_dim"] % c["detection_num_heads"]:
        problems.append(f"detection_hidden_dim={c['detection_hidden_dim']} must be divisible by "
                        f"detection_num_heads={c['detection_num_heads']}")
    if c["teacher_ratio"] > 0 and c["max_teachers"] == 0:
        problems.append(f"teacher_ratio={c['teacher_ratio']} > 0 needs max_teachers >= 1")
    lrs = ["vision_lr", "merger_lr", "llm_lr"]
    if c["detection_enabled"]:
        lrs += ["detection_lr", "adapter_lr"]
    if all(c[k] == 0 for k in lrs):
        problems.append(f"every trained group has lr 0 ({', '.join(lrs)}): nothing would train")
    steps = c["num_train_steps"]
    if c["detection_enabled"] and steps and c["detection_freeze_steps"] >= steps:
        problems.append(f"detection_freeze_steps={c['detection_freeze_steps']} >= num_train_steps="
                        f"{c['num_train_steps']}: the head would never train")
    if c["make_synthetic_data_if_missing"] and c["synthetic_num_images"] < 2:
        problems.append("make_synthetic_data_if_missing needs synthetic_num_images >= 2")
    if c["distributed"] and c["num_processes"] == 1:
        problems.append("distributed=True with num_processes=1: use distributed=False")
    return problems


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ConfigError listing every unknown/missing key, wrong type, bad value and broken rule.

    device_count: the number of devices the mesh must cover (jax.device_count()); None skips the
    check, e.g. for `--validate_only` on a machine other than the training one.
    """
    c = config.to_dict()
    problems = [f"unknown key {k!r}" for k in sorted(set(c) - set(SCHEMA))]
    problems += [f"missing key {k!r}" for k in SCHEMA if k not in c]
    for key, (expected, check) in SCHEMA.items():
        if key not in c:
            continue
        value = c[key]
        if not _type_ok(value, expected):
            problems.append(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
            continue
        msg = check(value)
        if msg:
            problems.append(f"{key}: {msg}")
    if not problems:
        problems += _cross_field(c)
        mesh = c["mesh_data"] * c["mesh_fsdp"] * c["mesh_tensor"]
        if device_count is not None and mesh != device_count:
            problems.append(f"mesh_data*mesh_fsdp*mesh_tensor = {c['mesh_data']}*{c['mesh_fsdp']}*"
                            f"{c['mesh_tensor']} = {mesh} but there are {device_count} devices")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


# Budget key -> what the data reports as the longest sample's need.
BUDGET_KEYS = ("token_budget", "patch_budget", "max_objects", "caption_tokens",
               "vision_memory_tokens", "text_memory_tokens")


def validate_budgets(config: ml_collections.ConfigDict,
                     longest: Mapping[str, tuple[int, str]]) -> None:
    """Raises ConfigError when a budget cannot hold the longest sample of the data.

    longest: budget key (BUDGET_KEYS) -> (largest need in the data, where it occurs, e.g.
    "data/train.jsonl line 17"). Called by the train script after reading the data, because a
    sample that does not fit would otherwise have to be truncated or dropped.
    """
    problems = []
    for key, (need, where) in longest.items():
        if key not in BUDGET_KEYS:
            raise KeyError(f"{key!r} is not a budget key {BUDGET_KEYS}")
        if need > config[key]:
            problems.append(f"{key}={config[key]} is smaller than the longest sample's {need} ({where})")
    if problems:
        raise ConfigError("budgets too small for the data:\n  " + "\n  ".join(problems))


def num_train_steps(config: ml_collections.ConfigDict, samples_per_epoch: int) -> int:
    """Optimizer steps of the run: num_train_steps, or num_epochs worth of samples."""
    if config.num_train_steps:
        return config.num_train_steps
    per_step = config.batch_rows * config.grad_accum_steps * config.segments_per_row
    return max(1, -(-config.num_epochs * samples_per_epoch // per_step))
