"""Suite-wide setup: 8 fake CPU devices for sharding tests, and the shared tiny HF checkpoint."""
import os

# Must happen before jax is imported anywhere in the test session.
# The concurrency-optimized CPU scheduler can order collectives differently on different fake
# devices and deadlock a 2x2x2 mesh (seen with the detection head); scripts/train.py sets it too.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint (tied embeddings), written once per session."""
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("hf") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir_untied(tmp_path_factory):
    """Same shapes with a separate lm_head.weight, to cover untied checkpoints."""
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("hf") / "tiny_untied", seed=1,
                                 tie_word_embeddings=False)
