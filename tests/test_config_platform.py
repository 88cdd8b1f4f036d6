"""The config's "auto" choices (attention kernel, matcher) are resolved once, by build_specs, for the
platform the run computes on; what a checkpoint records does not decide how another machine loads it."""
import dataclasses
import pathlib

import pytest

from bbu_jax.inference.settings import Settings
from bbu_jax.workflows.config import build_specs, load_config

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("platform, kernel, matcher", [("gpu", "pallas", "optax"), ("cpu", "xla", "scipy")])
def test_base_config_resolves_auto_for_the_platform(platform, kernel, matcher):
    c = load_config(CONFIGS / "base.py")
    assert (c.model.attention_impl, c.loss.matcher) == ("auto", "auto")
    specs = build_specs(c, platform=platform)
    assert (specs.model.attention_impl, specs.loss.matcher) == (kernel, matcher)


def test_named_choices_are_kept_and_the_default_platform_is_jaxs():
    c = load_config(CONFIGS / "base.py")
    c.model.attention_impl, c.loss.matcher = "cudnn", "scipy"
    specs = build_specs(c, platform="gpu")
    assert (specs.model.attention_impl, specs.loss.matcher) == ("cudnn", "scipy")
    here = build_specs(load_config(CONFIGS / "base.py"))  # these tests run on the CPU
    assert (here.model.attention_impl, here.loss.matcher) == ("xla", "scipy")


def test_a_gpu_runs_record_does_not_choose_the_cpu_matcher():
    gpu = build_specs(load_config(CONFIGS / "base.py"), platform="gpu")
    settings = Settings(base_model="/m", model_config={}, language="en", min_pixels=1, max_pixels=2,
                        system_prompt="", instruction="", num_teachers=0, teacher_pool="", caption_vocab=None,
                        head=None, specs=dataclasses.asdict(gpu), training_data=None, versions={})
    assert settings.specs["model"]["attention_impl"] == "pallas"  # the record names the kernel that ran
    loss = settings.loss_spec()
    assert loss.matcher == "scipy" and loss.weights == gpu.loss.weights
