"""The config, validated once and turned into one typed spec per group (`build_specs`).

configs/*.py write every key in groups (run, model, data, head, loss, optim, mesh, eval,
checkpoint, demo). The schema below says what each key must be and holds no values; the allowed
names of enumerated keys come from the module that owns them. `validate` reports every problem at
once, one line each, so a user fixes a config in one go; after it, code only sees the `Specs`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from bbu_jax.data.chat import LANGUAGES
from bbu_jax.data.pipeline import COLLATORS, DataSpec
from bbu_jax.foundation.sharding import MeshSpec
from bbu_jax.losses import LossSpec, LossWeights, MatchCost
from bbu_jax.losses.matcher import MATCHERS, resolve_matcher
from bbu_jax.models.attention import IMPLEMENTATIONS, resolve_implementation
from bbu_jax.models.detection_head import HeadSpec
from bbu_jax.models.layers import remat_policy
from bbu_jax.training.optimizer import GROUPS, LR_SCALING, MU_DTYPES, OptimSpec
from bbu_jax.training.task import DTYPES, ModelSpec

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A config that must not be run; the message lists every problem found, one per line."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    workdir: str
    seed: int
    log_level: str
    num_train_steps: int  # 0 = from num_epochs
    num_epochs: int
    log_every: int
    max_consecutive_nonfinite: int
    export_hf_at_end: bool
    peak_tflops_per_device: float


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    every: int  # 0 = only at the end
    num_batches: int  # 0 = the whole val set
    generate_samples: int  # val records answered by generation at each evaluation (-1: all, 0: none)
    generate_max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    every: int
    keep: int
    async_save: bool


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    make_tiny_model_if_missing: bool
    make_synthetic_data_if_missing: bool
    synthetic_num_images: int
    synthetic_val_ratio: float
    synthetic_teacher_pool_size: int


@dataclasses.dataclass(frozen=True)
class Specs:
    """Everything a run reads, built once from a validated config."""
    run: RunSpec
    model: ModelSpec
    data: DataSpec
    head: HeadSpec | None  # None: the detection head is off
    loss: LossSpec
    optim: OptimSpec
    mesh: MeshSpec
    eval: EvalSpec
    checkpoint: CheckpointSpec
    demo: DemoSpec

    def samples_per_step(self) -> int:
        """Samples in one optimizer step at most (rows x accumulation x samples per row)."""
        return self.data.batch_rows * self.optim.grad_accum_steps * self.data.samples_per_row()

    def train_steps(self, samples_per_epoch: int) -> int:
        """Optimizer steps of the run: num_train_steps, or num_epochs worth of samples."""
        if self.run.num_train_steps:
            return self.run.num_train_steps
        return max(1, -(-self.run.num_epochs * samples_per_epoch // self.samples_per_step()))


# ----------------------------------------------------------------------------- key checks
def _choice(options):
    options = tuple(options)
    return lambda v: None if v in options else f"must be one of {options}, got {v!r}"


def _at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v!r}"


def _positive(v):
    return None if v > 0 else f"must be > 0, got {v!r}"


def _unit(v):
    return None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v!r}"


def _beta(v):
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v!r}"


def _nonempty(v):
    return None if v else "must not be empty"


def _any(v):
    return None


def _remat(v):
    try:
        remat_policy(v)
    except ValueError as e:
        return str(e)
    return None


def _patch_budget(v):
    return None if v > 0 and v % 4 == 0 else f"must be a positive multiple of 4 (2x2 patch merge), got {v!r}"


_NONNEG = _at_least(0)
Check = tuple[type, Callable[[Any], str | None]]

# group -> key -> (type, check). float keys accept ints (a CLI override like `--config.optim.llm_lr=0`).
SCHEMA: dict[str, dict[str, Check]] = {
    "run": {
        "workdir": (str, _nonempty), "seed": (int, _NONNEG), "log_level": (str, _choice(LOG_LEVELS)),
        "num_train_steps": (int, _NONNEG), "num_epochs": (int, _NONNEG), "log_every": (int, _positive),
        "max_consecutive_nonfinite": (int, _positive), "export_hf_at_end": (bool, _any),
        "peak_tflops_per_device": (float, _positive),
    },
    "model": {
        "hf_dir": (str, _nonempty), "param_dtype": (str, _choice(DTYPES)),
        "compute_dtype": (str, _choice(DTYPES)), "remat_policy": (str, _remat), "scan_layers": (bool, _any),
        "attention_impl": (str, _choice(IMPLEMENTATIONS)),
    },
    "data": {
        "train_jsonl": (str, _nonempty), "val_jsonl": (str, _any), "teacher_pool_jsonl": (str, _any),
        "teacher_ratio": (float, _unit), "max_teachers": (int, _NONNEG),
        "language": (str, _choice(LANGUAGES)), "collator": (str, _choice(COLLATORS)),
        "min_pixels": (int, _positive), "max_pixels": (int, _positive), "skip_bad_samples": (bool, _any),
        "workers": (int, _NONNEG), "check_budgets_on_start": (bool, _any), "batch_rows": (int, _positive),
        "token_budget": (int, _positive), "patch_budget": (int, _patch_budget),
        "segments_per_row": (int, _positive), "pack_buffer": (int, _positive), "max_objects": (int, _positive),
        "caption_tokens": (int, _at_least(2)), "vision_memory_tokens": (int, _positive),
        "text_memory_tokens": (int, _positive),
    },
    "head": {
        "enabled": (bool, _any), "num_queries": (int, _positive), "hidden_dim": (int, _positive),
        "num_layers": (int, _positive), "num_heads": (int, _positive), "mlp_dim": (int, _positive),
        "caption_layers": (int, _positive),
    },
    "loss": {
        "lm_weight": (float, _NONNEG), "lm_chunk": (int, _positive), "detection_weight": (float, _NONNEG),
        "bbox_l1_weight": (float, _NONNEG), "bbox_giou_weight": (float, _NONNEG),
        "objectness_weight": (float, _NONNEG), "caption_weight": (float, _NONNEG),
        "match_class_weight": (float, _NONNEG), "match_bbox_weight": (float, _NONNEG),
        "match_giou_weight": (float, _NONNEG), "focal_alpha": (float, _unit), "focal_gamma": (float, _NONNEG),
        "aux_loss": (bool, _any), "matcher": (str, _choice(MATCHERS)),
    },
    "optim": {
        **{f"{g}_lr": (float, _NONNEG) for g in GROUPS},
        "lr_scaling": (str, _choice(LR_SCALING)), "lr_reference_batch": (int, _positive),
        "warmup_steps": (int, _NONNEG), "min_lr_ratio": (float, _unit), "weight_decay": (float, _NONNEG),
        "adam_b1": (float, _beta), "adam_b2": (float, _beta), "adam_eps": (float, _positive),
        "adam_mu_dtype": (str, _choice(MU_DTYPES)),
        "grad_clip_norm": (float, _NONNEG), "grad_accum_steps": (int, _positive),
        "head_freeze_steps": (int, _NONNEG),
    },
    "mesh": {
        "data": (int, _positive), "fsdp": (int, _positive), "tensor": (int, _positive),
        "distributed": (bool, _any), "coordinator_address": (str, _any), "num_processes": (int, _NONNEG),
        "process_id": (int, _at_least(-1)),
    },
    "eval": {"every": (int, _NONNEG), "num_batches": (int, _NONNEG), "generate_samples": (int, _at_least(-1)),
             "generate_max_new_tokens": (int, _positive)},
    "checkpoint": {"every": (int, _positive), "keep": (int, _positive), "async_save": (bool, _any)},
    "demo": {
        "make_tiny_model_if_missing": (bool, _any), "make_synthetic_data_if_missing": (bool, _any),
        "synthetic_num_images": (int, _NONNEG), "synthetic_val_ratio": (float, _unit),
        "synthetic_teacher_pool_size": (int, _NONNEG),
    },
}
KEYS = tuple(f"{group}.{key}" for group, keys in SCHEMA.items() for key in keys)


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The locked config returned by a config file's get_config() (what `--config FILE` loads)."""
    spec = importlib.util.spec_from_file_location(f"bbu_jax_config_{pathlib.Path(path).stem}", path)
    if spec is None:
        raise FileNotFoundError(f"{path}: not a config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def nearest_key(name: str) -> str | None:
    """The schema key closest to a mistyped one (also across groups: `llm_lr` -> `optim.llm_lr`)."""
    leaf = name.rsplit(".", 1)[-1]
    exact = [k for k in KEYS if k.endswith("." + leaf)]
    if exact:
        return exact[0]
    close = difflib.get_close_matches(name, KEYS, n=1, cutoff=0.6)
    close = close or [k for k in KEYS if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
        leaf, [x.rsplit(".", 1)[-1] for x in KEYS], n=1, cutoff=0.6)]
    return close[0] if close else None


def unknown_key_message(name: str) -> str:
    near = nearest_key(name)
    return f"unknown config key {name!r}" + (f"; did you mean {near!r}?" if near else "")


def _flat(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
    d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    flat = {}
    for group, value in d.items():
        if isinstance(value, Mapping):
            flat.update({f"{group}.{k}": v for k, v in value.items()})
        else:
            flat[group] = value
    return flat


def _type_ok(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _cross_field(c: Mapping[str, Any]) -> list[str]:
    """Rules between keys; only called once every key has the right type and range."""
    problems = []
    if c["run.num_train_steps"] == 0 and c["run.num_epochs"] == 0:
        problems.append("run.num_train_steps and run.num_epochs are both 0: set one of them")
    if 0 < c["run.num_train_steps"] <= c["optim.warmup_steps"]:
        problems.append(f"optim.warmup_steps={c['optim.warmup_steps']} must be < run.num_train_steps="
                        f"{c['run.num_train_steps']}")
    if c["data.collator"] == "standard" and c["data.segments_per_row"] != 1:
        problems.append(f"data.collator='standard' puts one sample per row: data.segments_per_row must be 1, "
                        f"got {c['data.segments_per_row']}")
    if c["data.max_pixels"] < c["data.min_pixels"]:
        problems.append(f"data.max_pixels={c['data.max_pixels']} < data.min_pixels={c['data.min_pixels']}")
    shards = c["mesh.data"] * c["mesh.fsdp"]
    if c["data.batch_rows"] % shards:
        problems.append(f"data.batch_rows={c['data.batch_rows']} must be divisible by mesh.data*mesh.fsdp="
                        f"{shards} (the batch is split over both axes)")
    if c["head.hidden_dim"] % c["head.num_heads"]:
        problems.append(f"head.hidden_dim={c['head.hidden_dim']} must be divisible by "
                        f"head.num_heads={c['head.num_heads']}")
    if c["data.teacher_ratio"] > 0 and c["data.max_teachers"] == 0:
        problems.append(f"data.teacher_ratio={c['data.teacher_ratio']} > 0 needs data.max_teachers >= 1")
    groups = ["vision", "merger", "llm"] + (["detection", "adapter"] if c["head.enabled"] else [])
    if all(c[f"optim.{g}_lr"] == 0 for g in groups):
        problems.append(f"every trained group has lr 0 ({', '.join(f'optim.{g}_lr' for g in groups)}): "
                        f"nothing would train")
    steps = c["run.num_train_steps"]
    if c["head.enabled"] and steps and c["optim.head_freeze_steps"] >= steps:
        problems.append(f"optim.head_freeze_steps={c['optim.head_freeze_steps']} >= run.num_train_steps="
                        f"{steps}: the head would never train")
    if c["demo.make_synthetic_data_if_missing"] and c["demo.synthetic_num_images"] < 2:
        problems.append("demo.make_synthetic_data_if_missing needs demo.synthetic_num_images >= 2")
    if c["mesh.distributed"] and c["mesh.num_processes"] == 1:
        problems.append("mesh.distributed=True with mesh.num_processes=1: use mesh.distributed=False")
    return problems


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ConfigError listing every unknown/missing key, wrong type, bad value and broken rule.

    device_count: the number of devices the mesh must cover (jax.device_count()); None skips the
    check, e.g. for `--validate_only` on a machine other than the training one.
    """
    c = _flat(config)
    problems = [unknown_key_message(k) for k in sorted(set(c) - set(KEYS))]
    problems += [f"missing key {k!r}" for k in KEYS if k not in c]
    for group, keys in SCHEMA.items():
        for key, (expected, check) in keys.items():
            name = f"{group}.{key}"
            if name not in c:
                continue
            value = c[name]
            if not _type_ok(value, expected):
                problems.append(f"{name}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
                continue
            msg = check(value)
            if msg:
                problems.append(f"{name}: {msg}")
    if not problems:
        problems += _cross_field(c)
        mesh = c["mesh.data"] * c["mesh.fsdp"] * c["mesh.tensor"]
        if device_count is not None and mesh != device_count:
            problems.append(f"mesh.data*mesh.fsdp*mesh.tensor = {c['mesh.data']}*{c['mesh.fsdp']}*"
                            f"{c['mesh.tensor']} = {mesh} but there are {device_count} devices")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def build_specs(config: ml_collections.ConfigDict, device_count: int | None = None,
                platform: str | None = None) -> Specs:
    """Validates the config and converts each group into its spec; the only reader of the config.

    platform: the jax backend the run computes on ("cpu", "gpu", "tpu"). The config's "auto"
    choices (model.attention_impl, loss.matcher) are resolved for it here, once, so the model, the
    losses, the benchmarks and the settings recorded with the weights all name the kernel that ran.
    Default ``jax.default_backend()``, which starts jax's backends: a caller that must not start
    them yet (before ``jax.distributed.initialize``) checks the config with `validate` instead.
    """
    validate(config, device_count)
    if platform is None:
        import jax
        platform = jax.default_backend()
    c = config
    loss, optim, head = c.loss, c.optim, c.head
    detection = loss.detection_weight
    weights = LossWeights(
        lm=loss.lm_weight, bbox_l1=detection * loss.bbox_l1_weight, bbox_giou=detection * loss.bbox_giou_weight,
        objectness=detection * loss.objectness_weight, caption=detection * loss.caption_weight,
        match=MatchCost(class_weight=loss.match_class_weight, bbox_weight=loss.match_bbox_weight,
                        giou_weight=loss.match_giou_weight, focal_alpha=loss.focal_alpha,
                        focal_gamma=loss.focal_gamma))
    return Specs(
        run=RunSpec(**c.run.to_dict()),
        model=ModelSpec(**{**c.model.to_dict(),
                           "attention_impl": resolve_implementation(c.model.attention_impl, platform)}),
        data=DataSpec(**c.data.to_dict()),
        head=HeadSpec(width=head.hidden_dim, num_queries=head.num_queries, num_layers=head.num_layers,
                      num_heads=head.num_heads, mlp_dim=head.mlp_dim, caption_layers=head.caption_layers,
                      max_caption_len=c.data.caption_tokens) if head.enabled else None,
        loss=LossSpec(weights=weights, aux_loss=loss.aux_loss, lm_chunk=loss.lm_chunk,
                      matcher=resolve_matcher(loss.matcher, platform)),
        optim=OptimSpec(lrs={g: float(optim[f"{g}_lr"]) for g in GROUPS}, lr_scaling=optim.lr_scaling,
                        lr_reference_batch=optim.lr_reference_batch, warmup_steps=optim.warmup_steps,
                        min_lr_ratio=optim.min_lr_ratio, weight_decay=optim.weight_decay, b1=optim.adam_b1,
                        b2=optim.adam_b2, eps=optim.adam_eps, mu_dtype=optim.adam_mu_dtype, grad_clip_norm=optim.grad_clip_norm,
                        grad_accum_steps=optim.grad_accum_steps,
                        head_freeze_steps=optim.head_freeze_steps if head.enabled else 0),
        mesh=MeshSpec(**c.mesh.to_dict()),
        eval=EvalSpec(**c.eval.to_dict()),
        checkpoint=CheckpointSpec(**c.checkpoint.to_dict()),
        demo=DemoSpec(**c.demo.to_dict()),
    )


# Budget key of the data spec -> what the data report as the longest sample's need.
BUDGET_KEYS = ("token_budget", "patch_budget", "max_objects", "caption_tokens",
               "vision_memory_tokens", "text_memory_tokens")


def validate_budgets(data: DataSpec, longest: Mapping[str, tuple[int, str]]) -> None:
    """Raises ConfigError when a budget cannot hold the longest sample of the data.

    longest: budget key (BUDGET_KEYS) -> (largest need in the data, where it occurs, e.g.
    "data/train.jsonl line 17"). Checked after reading the data, because a sample that does not
    fit would otherwise have to be truncated or dropped.
    """
    problems = []
    for key, (need, where) in longest.items():
        if key not in BUDGET_KEYS:
            raise KeyError(f"{key!r} is not a budget key {BUDGET_KEYS}")
        have = getattr(data, key)
        if need > have:
            problems.append(f"data.{key}={have} is smaller than the longest sample's {need} ({where})")
    if problems:
        raise ConfigError("budgets too small for the data:\n  " + "\n  ".join(problems))


def unknown_overrides(argv: list[str], flag: str = "config") -> list[str]:
    """One message per `--config.group.key=...` override naming no key of the schema, checked
    before absl parses the flags (where a mistyped key would end in a traceback)."""
    problems = []
    for arg in argv:
        if arg.startswith(f"--{flag}."):
            name = arg[len(flag) + 3:].split("=", 1)[0]
            if name not in KEYS:
                problems.append(unknown_key_message(name))
    return problems


def run_config_script(main: Callable[[list[str]], int], *, required: bool = True, flag: str = "config") -> None:
    """A config-file script's entry point: mistyped overrides stop it with one line each (exit 1),
    then absl parses the flags and the process exits with ``main``'s status."""
    import sys

    from absl import app, flags

    if problems := unknown_overrides(sys.argv[1:], flag):
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    if required:
        flags.mark_flag_as_required(flag)
    app.run(lambda argv: sys.exit(main(argv)))
