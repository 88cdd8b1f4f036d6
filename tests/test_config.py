"""configs/*.py load, are locked, grouped and valid; the validator rejects each kind of bad config
with one line; every key ends up in exactly one spec."""
import dataclasses
import importlib.util
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from bbu_jax.workflows import config as cfg_lib

ROOT = pathlib.Path(__file__).parents[1]
CONFIGS = ROOT / "configs"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name,devices", [("base", 8), ("demo", 1)])
def test_shipped_configs_are_complete_and_valid(name, devices):
    c = load(name)
    assert set(c.keys()) == set(cfg_lib.SCHEMA)
    assert {f"{g}.{k}" for g in c for k in c[g]} == set(cfg_lib.KEYS)
    specs = cfg_lib.build_specs(c, device_count=devices)
    assert specs.head is not None and specs.head.width == c.head.hidden_dim
    with pytest.raises(AttributeError):
        c.not_a_key = 1  # locked
    with pytest.raises(AttributeError):
        c.optim.not_a_key = 1


def test_every_key_reaches_a_spec():
    """Changing any key changes the specs: no key is read by nobody."""
    base = cfg_lib.build_specs(load("demo"))
    for name in cfg_lib.KEYS:
        group, key = name.split(".")
        c = load("demo")
        value = c[group][key]
        if name in ("data.caption_tokens",):
            new = value + 1
        elif isinstance(value, bool):
            new = not value
        elif isinstance(value, (int, float)):
            new = value + 1 if not isinstance(value, float) or value < 0.5 else value / 2
        elif name == "model.attention_impl":
            new = "jax"
        elif name in ("model.param_dtype", "model.compute_dtype"):
            new = "bfloat16"
        elif name == "model.remat_policy":
            new = "full"
        elif name == "run.log_level":
            new = "DEBUG"
        elif name == "data.language":
            new = "zh"
        elif name == "data.collator":
            new, c.data.segments_per_row = "standard", 1
        elif name == "loss.matcher":
            new = "optax"
        elif name == "optim.lr_scaling":
            new = "sqrt"
        else:
            new = value + "x"
        c[group][key] = new
        try:
            specs = cfg_lib.build_specs(c)
        except cfg_lib.ConfigError:
            continue  # a value the rules refuse is still read
        if name == "head.enabled":
            assert specs.head is None
            continue
        assert specs != base, f"{name} changes no spec"


def test_specs_derive_what_the_run_needs():
    c = load("demo")
    c.loss.detection_weight = 0.5
    c.optim.grad_accum_steps = 3
    specs = cfg_lib.build_specs(c)
    assert specs.loss.weights.bbox_l1 == 0.5 * c.loss.bbox_l1_weight and specs.loss.weights.lm == c.loss.lm_weight
    assert specs.samples_per_step() == c.data.batch_rows * 3 * c.data.segments_per_row
    assert specs.optim.lrs["llm"] == c.optim.llm_lr
    assert specs.head.max_caption_len == c.data.caption_tokens
    c.run.num_train_steps, c.run.num_epochs = 0, 2
    specs = cfg_lib.build_specs(c)
    assert specs.train_steps(samples_per_epoch=25) == -(-2 * 25 // specs.samples_per_step())
    assert dataclasses.asdict(specs)["optim"]["lrs"]["llm"] == c.optim.llm_lr


def test_base_learning_rates():
    c = load("base")
    o = c.optim
    assert (o.vision_lr, o.merger_lr, o.llm_lr, o.detection_lr, o.adapter_lr) == (5e-7, 1e-5, 5e-6, 1e-5, 5e-3)
    assert c.data.teacher_ratio == 0.7


def _bad(mutate):
    c = load("demo").to_dict()
    mutate(c)
    return ml_collections.ConfigDict(c)


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["optim"].update(lm_lr=1.0), "unknown config key 'optim.lm_lr'; did you mean 'optim.llm_lr'?"),
    (lambda c: c["optim"].pop("llm_lr"), "missing key 'optim.llm_lr'"),
    (lambda c: c["data"].update(batch_rows="4"), "data.batch_rows: expected int, got str"),
    (lambda c: c["head"].update(enabled=1), "head.enabled: expected bool"),
    (lambda c: c["data"].update(teacher_ratio=1.5), "data.teacher_ratio: must be in [0, 1]"),
    (lambda c: c["optim"].update(llm_lr=-1.0), "optim.llm_lr: must be >= 0"),
    (lambda c: c["data"].update(collator="zip"), "data.collator: must be one of"),
    (lambda c: c["model"].update(attention_impl="flash"), "model.attention_impl: must be one of"),
    (lambda c: c["loss"].update(matcher="greedy"), "loss.matcher: must be one of"),
    (lambda c: c["data"].update(patch_budget=250), "data.patch_budget: must be a positive multiple of 4"),
    (lambda c: c["optim"].update(adam_b2=1.0), "optim.adam_b2: must be in [0, 1)"),
    (lambda c: c["run"].update(num_train_steps=0, num_epochs=0), "both 0"),
    (lambda c: c["data"].update(collator="standard"), "data.segments_per_row must be 1"),
    (lambda c: (c["run"].update(num_train_steps=100), c["optim"].update(warmup_steps=500)),
     "optim.warmup_steps=500 must be < run.num_train_steps"),
    (lambda c: (c["mesh"].update(fsdp=4), c["data"].update(batch_rows=6)), "data.batch_rows=6 must be divisible"),
    (lambda c: c["head"].update(hidden_dim=66), "divisible by head.num_heads"),
    (lambda c: c["optim"].update(vision_lr=0.0, merger_lr=0.0, llm_lr=0.0, detection_lr=0.0, adapter_lr=0.0),
     "nothing would train"),
    (lambda c: c["data"].update(max_pixels=100), "data.max_pixels=100 < data.min_pixels"),
])
def test_validator_rejects(mutate, message):
    with pytest.raises(cfg_lib.ConfigError) as e:
        cfg_lib.validate(_bad(mutate), device_count=1)
    assert message in str(e.value)
    assert all(line.strip() for line in str(e.value).splitlines())  # one problem per line


def test_mesh_must_match_device_count():
    c = load("base")
    with pytest.raises(cfg_lib.ConfigError, match=r"= 8 but there are 4 devices"):
        cfg_lib.validate(c, device_count=4)


def test_budgets_too_small_for_the_data():
    data = cfg_lib.build_specs(load("demo")).data
    cfg_lib.validate_budgets(data, {"token_budget": (data.token_budget, "x.jsonl line 1")})
    need = data.token_budget + 1
    with pytest.raises(cfg_lib.ConfigError, match=rf"data.token_budget={data.token_budget} is smaller than the "
                       rf"longest sample's {need} \(train.jsonl line 7\)"):
        cfg_lib.validate_budgets(data, {"token_budget": (need, "train.jsonl line 7"), "max_objects": (1, "")})


def test_cli_style_override_keeps_types():
    c = load("demo")
    c.optim.llm_lr = 0  # what `--config.optim.llm_lr=0` does: converted to float by the locked ConfigDict
    cfg_lib.validate(c, device_count=1)
    with pytest.raises(TypeError):
        c.data.batch_rows = "many"


@pytest.mark.parametrize("flag,message", [
    ("--config.optim.lm_lr=1", "unknown config key 'optim.lm_lr'; did you mean 'optim.llm_lr'?"),
    ("--config.llm_lr=1", "unknown config key 'llm_lr'; did you mean 'optim.llm_lr'?"),
])
def test_unknown_override_is_one_line_not_a_traceback(flag, message):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(CONFIGS / "demo.py"),
                          flag, "--print_config"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip() == message and "Traceback" not in out.stderr


def test_print_config_shows_the_groups():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(CONFIGS / "demo.py"),
                          "--config.optim.llm_lr=0.5", "--print_config"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for group in cfg_lib.SCHEMA:
        assert f"{group}:" in out.stdout
    assert "llm_lr: 0.5" in out.stdout
