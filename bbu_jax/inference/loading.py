"""A trained model from wherever it lies: an HF export, a run folder, or one checkpoint step.

- export folder (config.json + safetensors; a bbu_jax export also has the detection head files and
  `settings.SETTINGS_FILE`): the weights through `from_hf`.
- checkpoint step `RUN/checkpoints/STEP`: only the params of the saved train state are read (no
  optimizer state), onto a model built from the step's own settings record; tokenizer and processor
  files come from the base model folder the settings name.
- run folder `RUN` (has checkpoints/): its newest readable step (its hf_export/ when it has no
  checkpoints left).

Nothing here writes: a step that cannot be read is reported and the previous one tried.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.models.attention import resolve_implementation
from bbu_jax.models.detection_head import DetectionHead
from bbu_jax.models.detection_head_files import CONFIG as HEAD_CONFIG
from bbu_jax.models.detection_head_files import check_detection_head, load_detection_head
from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, from_hf
from bbu_jax.models.qwen2_5_vl.params import abstract_model
from bbu_jax.inference.settings import SETTINGS_FILE, Settings
from bbu_jax.training import checkpointing

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trained:
    model: Qwen25VL
    head: DetectionHead | None
    caption_vocab: np.ndarray | None
    settings: Settings | None  # None: an HF folder not written by bbu_jax
    files: Path  # the folder holding the tokenizer and processor files
    source: Path  # the export folder or checkpoint step that was read


def default_dtype() -> str:
    """bfloat16 where the accelerator computes it natively, float32 on the CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def find_step(path: str | Path) -> Path | None:
    """The checkpoint step ``path`` names (a step folder, or a run folder's newest step); None
    when ``path`` is neither."""
    path = Path(path)
    if checkpointing.is_step_dir(path):
        return path
    steps = checkpointing.step_dirs(path / "checkpoints")
    return steps[0] if steps else None


def load_trained(path: str | Path, *, dtype: str | None = None, attention_impl: str | None = None) -> Trained:
    """The model (+ head, caption vocabulary, settings) at ``path`` (see the module doc), with
    params and compute in ``dtype`` (default `default_dtype`) and ``attention_impl`` (default "auto":
    the flash kernel on GPU, "xla" elsewhere). The settings record the kernel training ran, which
    loading never follows: a run trained on a GPU loads on the CPU with the CPU's kernel."""
    path = Path(path)
    dtype = dtype or default_dtype()
    attention_impl = resolve_implementation(attention_impl or "auto", jax.default_backend())
    if (path / "config.json").is_file():
        return _load_export(path, dtype, attention_impl)
    if checkpointing.is_step_dir(path):
        return _load_step(path, dtype, attention_impl)
    steps = checkpointing.step_dirs(path / "checkpoints")
    if not steps and (path / "hf_export" / "config.json").is_file():  # a run whose checkpoints are gone
        return _load_export(path / "hf_export", dtype, attention_impl)
    if not steps:
        raise FileNotFoundError(f"{path}: neither an HF export (config.json), a checkpoint step "
                                f"(state/, meta/) nor a run folder with checkpoints/")
    for step in steps:
        try:
            return _load_step(step, dtype, attention_impl)
        except (OSError, ValueError, KeyError) as e:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", step, e)
    raise ValueError(f"{path}: no readable checkpoint in {path / 'checkpoints'}")


def _load_export(folder: Path, dtype: str, attention_impl: str) -> Trained:
    settings = Settings.read(folder) if (folder / SETTINGS_FILE).is_file() else None
    scan = True if settings is None else settings.specs["model"]["scan_layers"]
    model = from_hf(folder, jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype), attention_impl=attention_impl,
                    scan_layers=scan)
    head = vocab = None
    if (folder / HEAD_CONFIG).is_file():
        check_detection_head(folder)  # a head beside another model than its own is refused
        head, vocab = load_detection_head(folder, dtype=jnp.dtype(dtype), attention_impl=attention_impl)
    return Trained(model, head, vocab, settings, folder, folder)


def _load_step(step_dir: Path, dtype: str, attention_impl: str) -> Trained:
    settings = Settings.from_dict(checkpointing.read_meta(step_dir), f"{step_dir}/meta")
    files = Path(settings.base_model)
    if not (files / "config.json").is_file():
        raise FileNotFoundError(f"{step_dir}: its base model folder {files} (tokenizer and processor files) "
                                f"is gone")
    cfg = Qwen25VLConfig.from_hf_dict(settings.model_config, source=f"{step_dir}/meta")
    model_spec = settings.specs["model"]
    modules = {"model": abstract_model(cfg, jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype),
                                       attention_impl=attention_impl, scan_layers=model_spec["scan_layers"])}
    if settings.head is not None:
        llm_hidden = settings.head["llm_hidden"]
        modules["head"] = nnx.eval_shape(lambda: DetectionHead(
            settings.head_spec(), llm_hidden=llm_hidden, attention_impl=attention_impl, dtype=jnp.dtype(dtype),
            param_dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    split = {name: nnx.split(m, nnx.Param, ...) for name, m in modules.items()}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            {name: nnx.to_pure_dict(p) for name, (_, p, _) in split.items()})
    restored = checkpointing.restore_params(step_dir, abstract)
    loaded = {}
    for name, (graphdef, params, rest) in split.items():
        nnx.replace_by_pure_dict(params, restored[name])
        loaded[name] = nnx.merge(graphdef, params, rest)
    return Trained(loaded["model"], loaded.get("head"), settings.caption_vocab_array(), settings, files, step_dir)

