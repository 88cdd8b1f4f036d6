"""configs/*.py load, are locked and valid; the validator rejects each kind of bad config."""
import importlib.util
import pathlib

import pytest

from bbu_jax.training import config as cfg_lib

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name,devices", [("base", 8), ("demo", 1)])
def test_shipped_configs_are_complete_and_valid(name, devices):
    c = load(name)
    assert set(c.keys()) == set(cfg_lib.SCHEMA)
    cfg_lib.validate(c, device_count=devices)
    with pytest.raises(AttributeError):
        c.not_a_key = 1  # locked


def test_base_learning_rates():
    c = load("base")
    assert (c.vision_lr, c.merger_lr, c.llm_lr, c.detection_lr, c.adapter_lr) == (5e-7, 1e-5, 5e-6, 1e-5, 5e-3)
    assert c.teacher_ratio == 0.7


def _bad(mutate):
    c = load("demo").to_dict()
    mutate(c)
    import ml_collections
    return ml_collections.ConfigDict(c)


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(surprise=1), "unknown key 'surprise'"),
    (lambda c: c.pop("llm_lr"), "missing key 'llm_lr'"),
    (lambda c: c.update(batch_rows="4"), "batch_rows: expected int, got str"),
    (lambda c: c.update(detection_enabled=1), "detection_enabled: expected bool"),
    (lambda c: c.update(teacher_ratio=1.5), "teacher_ratio: must be in [0, 1]"),
    (lambda c: c.update(llm_lr=-1.0), "llm_lr: must be >= 0"),
    (lambda c: c.update(collator="zip"), "collator: must be one of"),
    (lambda c: c.update(patch_budget=250), "patch_budget: must be a positive multiple of 4"),
    (lambda c: c.update(adam_b2=1.0), "adam_b2: must be in [0, 1)"),
    (lambda c: c.update(num_train_steps=0, num_epochs=0), "both 0"),
    (lambda c: c.update(collator="standard"), "segments_per_row must be 1"),
    (lambda c: c.update(num_train_steps=100, warmup_steps=500), "warmup_steps=500 must be < num_train_steps"),
    (lambda c: c.update(mesh_fsdp=4, batch_rows=6), "batch_rows=6 must be divisible"),
    (lambda c: c.update(detection_hidden_dim=66), "divisible by detection_num_heads"),
    (lambda c: c.update(vision_lr=0.0, merger_lr=0.0, llm_lr=0.0, detection_lr=0.0, adapter_lr=0.0),
     "nothing would train"),
    (lambda c: c.update(max_pixels=100), "max_pixels=100 < min_pixels"),
])
def test_validator_rejects(mutate, message):
    with pytest.raises(cfg_lib.ConfigError) as e:
        cfg_lib.validate(_bad(mutate), device_count=1)
    assert message in str(e.value)


def test_mesh_must_match_device_count():
    c = load("base")
    with pytest.raises(cfg_lib.ConfigError, match=r"= 8 but there are 4 devices"):
        cfg_lib.validate(c, device_count=4)


def test_budgets_too_small_for_the_data():
    c = load("demo")
    cfg_lib.validate_budgets(c, {"token_budget": (c.token_budget, "x.jsonl line 1")})
    need = c.token_budget + 1
    with pytest.raises(cfg_lib.ConfigError, match=rf"token_budget={c.token_budget} is smaller than the "
                       rf"longest sample's {need} \(train.jsonl line 7\)"):
        cfg_lib.validate_budgets(c, {"token_budget": (need, "train.jsonl line 7"), "max_objects": (1, "")})


def test_cli_style_override_keeps_types():
    c = load("demo")
    c.llm_lr = 0  # what `--config.llm_lr=0` does: converted to float by the locked ConfigDict
    cfg_lib.validate(c, device_count=1)
    with pytest.raises(TypeError):
        c.batch_rows = "many"
