"""The jaxtyping annotations are checked at run time in the tests (pyproject's
`--jaxtyping-packages=bbu_jax,beartype.beartype(...)`): a wrong shape or dtype fails at the call
with jaxtyping's message, not deep inside the function or never."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from bbu_jax.losses.box_ops import elementwise_box_iou
from bbu_jax.models.qwen2_5_vl.processing import normalize_rows


def test_a_wrong_last_dimension_fails_at_the_call():
    normalize_rows(np.zeros((2, 588), np.uint8))
    with pytest.raises(TypeCheckError, match="normalize_rows"):
        normalize_rows(np.zeros((2, 3 * 14 * 14 + 1), np.uint8))


def test_a_wrong_dtype_fails_at_the_call():
    with pytest.raises(TypeCheckError, match="normalize_rows"):
        normalize_rows(np.zeros((2, 588), np.float32))


def test_shape_names_must_agree_across_arguments_under_jit():
    """Checks run while tracing, so jitted code is covered too; size-1 dims broadcast (`*#b`)."""
    boxes = jnp.zeros((3, 4))
    jax.jit(elementwise_box_iou)(boxes, boxes)
    jax.jit(elementwise_box_iou)(boxes[:, None], boxes[None])
    with pytest.raises(TypeCheckError, match="elementwise_box_iou"):
        jax.jit(elementwise_box_iou)(boxes, jnp.zeros((2, 4)))
