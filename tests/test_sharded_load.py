"""from_hf onto a 2x2x2 (data, fsdp, tensor) mesh of 8 fake CPU devices equals the unsharded model."""
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from bbu_jax.models.qwen2_5_vl import from_hf, hf_forward
from bbu_jax.testing import hf_reference
from bbu_jax.foundation import sharding


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return sharding.make_mesh(2, 2, 2, jax.devices()[:8])


def test_params_land_on_their_shardings(tiny_hf_dir, mesh):
    model = from_hf(tiny_hf_dir, mesh=mesh)
    expected = dict(nnx.to_flat_state(sharding.param_shardings(model, mesh)))
    sharded = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        want = expected[path].get_value()
        assert var.get_value().sharding.is_equivalent_to(want, var.get_value().ndim), path
        sharded += any(s is not None for s in want.spec)
    q = model.language_model.layers.self_attn.q_proj.weight
    assert q.get_metadata()["out_sharding"] == ("layers", "heads", "embed")
    assert q.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert sharded > 10


def test_sharded_logits_equal_unsharded(tiny_hf_dir, mesh):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (112, 168, 3), dtype=np.uint8))
    texts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>screw<|im_end|>\n",
             "<|im_start|>user\na longer text only row<|im_end|>\n"]
    inputs = hf_reference.processor_inputs(tiny_hf_dir, texts, [[img], []])
    ref = hf_forward(from_hf(tiny_hf_dir), **inputs)
    out = hf_forward(from_hf(tiny_hf_dir, mesh=mesh), **inputs)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"sharded vs unsharded logits max rel err {err:.2e}")
    assert err <= 1e-5


def test_logical_rules_drop_non_dividing_axes(mesh):
    spec = sharding.logical_to_spec(("vocab", "embed"), (7, 8), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.logical_to_spec(("batch", None), (4, 3), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("nonsense",), (4,), mesh)
