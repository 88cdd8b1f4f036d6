"""KV-cache generation against transformers' generate on the tiny checkpoint (f32), sampling, stops,
and the host-level teacher-guided API.

The untied tiny checkpoint is used: with tied random embeddings greedy decoding just repeats the
last prompt token, which would not exercise positions or the cache. Shapes are shared (2 rows, one
length and patch bucket, 12 new tokens) so the whole module compiles the generator once.
"""
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from bbu_jax.data.schema import Example, Obj
from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.pipeline import build_inference_inputs
from bbu_jax.inference.generate import cut_at_stop, generate_from_inputs, generate_tokens, pad_prompts
from bbu_jax.models.qwen2_5_vl import from_hf, processing
from bbu_jax.testing import hf_reference

torch = pytest.importorskip("torch")

NEW_TOKENS, ROWS, LENGTH, PATCHES = 12, 2, 256, 256


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMG_A, IMG_B = image(112, 140, 0), image(56, 84, 1)


def user(text: str, n_images: int) -> str:
    pads = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{pads}{text}"
            "<|im_end|>\n<|im_start|>assistant\n")


CASES = {
    "one_image": ([user("Detect every BBU screw.", 1)], [[IMG_A]]),
    "two_images": ([user("螺丝连接点 compare", 2)], [[IMG_A, IMG_B]]),
    "batch_left_pad": ([user("label port", 1), user("a much longer text-only question about the fiber cable", 0)],
                       [[IMG_B], []]),
}


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_dir_untied):
    return tiny_hf_dir_untied


@pytest.fixture(scope="module")
def model(hf_dir):
    return from_hf(hf_dir)


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def eos(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def prompt_batch(model, inputs: dict) -> dict:
    cfg = model.config
    b = processing.prepare_hf_batch(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                              inputs.get("image_grid_thw"), image_token_id=cfg.image_token_id,
                              vision_start_token_id=cfg.vision_start_token_id)
    return pad_prompts([b], rows=ROWS, length=LENGTH, num_patches=PATCHES)  # single prompts + an empty row


@pytest.fixture(scope="module")
def torch_model(hf_dir):
    return hf_reference.torch_reference_model(hf_dir)


def hf_generate(ref, inputs: dict, eos: int) -> np.ndarray:
    """transformers' greedy tokens (inputs carry mm_token_type_ids, which it needs for M-RoPE)."""
    with torch.no_grad():
        out = ref.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, hf_dir, model, torch_model, eos):
    texts, images = CASES[case]
    inputs = hf_reference.processor_inputs(hf_dir, texts, images, padding_side="left")
    ref = hf_generate(torch_model, inputs, eos)
    out = generate_tokens(model, prompt_batch(model, inputs), max_new_tokens=NEW_TOKENS, stop_ids=[eos], pad_id=eos)
    assert out.shape == (ROWS, NEW_TOKENS)
    for row_out, row_ref in zip(out, ref):
        print(f"{case}: jax {row_out.tolist()}\n{case}: hf  {row_ref.tolist()}")
        assert cut_at_stop(row_out, [eos]) == cut_at_stop(row_ref, [eos])
    assert (out[len(texts):] == eos).all()  # the empty filler row starts finished
    assert len(set(out[0].tolist())) > 2  # the run exercises the cache, not a repeated token


@pytest.fixture(scope="module")
def one_image_prompt(hf_dir, model):
    texts, images = CASES["one_image"]
    return prompt_batch(model, hf_reference.processor_inputs(hf_dir, texts, images, padding_side="left"))


def test_stop_token_ends_row_with_padding(model, one_image_prompt, eos):
    free = generate_tokens(model, one_image_prompt, max_new_tokens=NEW_TOKENS, stop_ids=[eos], pad_id=eos)[0]
    stop = int(free[3])
    first = free.tolist().index(stop)
    out = generate_tokens(model, one_image_prompt, max_new_tokens=NEW_TOKENS, stop_ids=[stop], pad_id=-1)[0]
    assert out[:first + 1].tolist() == free[:first + 1].tolist()
    assert (out[first + 1:] == -1).all()


def test_sampling_is_seeded_and_top_p_narrows(model, one_image_prompt, eos):
    def run(seed, top_p=0.9):
        return generate_tokens(model, one_image_prompt, max_new_tokens=NEW_TOKENS, stop_ids=[eos], pad_id=eos,
                               temperature=1.0, top_p=top_p, seed=seed)[0]

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (NEW_TOKENS,)
    np.testing.assert_array_equal(a, b)
    assert a.tolist() != c.tolist()
    greedy = generate_tokens(model, one_image_prompt, max_new_tokens=NEW_TOKENS, stop_ids=[eos], pad_id=eos)[0]
    np.testing.assert_array_equal(run(5, top_p=1e-6), greedy)  # only the top token survives


def test_host_generate_teacher_guided_batch_invariant(tmp_path, hf_dir, model):
    paths = []
    for i, (h, w) in enumerate([(112, 140), (56, 84), (84, 56)]):
        paths.append(str(tmp_path / f"im{i}.png"))
        image(h, w, 10 + i).save(paths[-1])
    teacher = Example((paths[2],), (Obj((4, 8, 40, 50), "screw/BBU mounting screw/tight"),))
    encoder = SampleEncoder(str(hf_dir), language="en", min_pixels=3136, max_pixels=20000)
    kw = dict(max_new_tokens=NEW_TOKENS, batch_size=2, length_bucket=LENGTH, patch_bucket=PATCHES)
    inputs = [build_inference_inputs(encoder, [p], (teacher,))[0] for p in paths[:2]]
    together = generate_from_inputs(model, encoder.tokenizer, inputs, **kw)
    alone = [generate_from_inputs(model, encoder.tokenizer, [x], **kw)[0] for x in inputs]
    assert len(together) == 2 and all(isinstance(t, str) for t in together)
    assert together == alone
    assert together[0] != together[1]


def test_pad_prompts_rejects_overflow(model, one_image_prompt):
    with pytest.raises(ValueError, match="exceeds the budget"):
        pad_prompts([one_image_prompt], rows=1, length=8, num_patches=PATCHES)
    with pytest.raises(ValueError, match="do not fit"):
        pad_prompts([one_image_prompt, one_image_prompt], rows=3, length=LENGTH, num_patches=PATCHES)
