"""The README.md of an export: what the model is, how it was trained, and how to use it."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bbu_jax.inference.settings import SETTINGS_FILE, Settings

# Metrics a card quotes when the run logged them, in this order.
CARD_METRICS = ("val/head/type_mAP50", "val/head/type_mAP", "val/head/box_AP50", "val/head/box_AP",
                "val/generate/f1", "val/generate/precision", "val/generate/recall", "val/generate/complete_json",
                "val/lm_loss", "train/lm_loss")


def model_card(settings: Settings, metrics: Mapping[str, Any]) -> str:
    data = settings.specs["data"]
    head = settings.head
    quoted = [(k, metrics[k]) for k in CARD_METRICS if isinstance(metrics.get(k), (int, float))]
    lines = [
        "# Qwen2.5-VL fine-tuned for BBU equipment inspection (bbu_jax)",
        "",
        f"Base model: `{settings.base_model}`. Weights at optimizer step {settings.step}. "
        f"Trained with bbu_jax {settings.versions.get('bbu_jax', '?')} "
        f"(jax {settings.versions.get('jax', '?')}, transformers {settings.versions.get('transformers', '?')}).",
        "",
        "## How it was trained",
        "",
        f"- answers in `{settings.language}` to the instruction: {json.dumps(settings.instruction, ensure_ascii=False)}",
        f"- system prompt: {json.dumps(settings.system_prompt, ensure_ascii=False)}",
        f"- images resized to {settings.min_pixels}..{settings.max_pixels} pixels (this folder's "
        f"`preprocessor_config.json` says the same, so transformers' processor resizes as training did)",
        f"- demonstrations: {settings.num_teachers} per prompt at inference (training: ratio "
        f"{data['teacher_ratio']}, at most {data['max_teachers']}, pool `{settings.teacher_pool or 'none'}`)",
        f"- training data: `{data['train_jsonl']}`"
        + (f", converted with {json.dumps(settings.training_data, ensure_ascii=False)}" if settings.training_data
           else ""),
        f"- collator `{data['collator']}`, {data['batch_rows']} rows of {data['token_budget']} tokens and "
        f"{data['patch_budget']} patches",
        f"- detection head: {'none' if head is None else json.dumps(head)}",
        f"- every setting of the run: `{SETTINGS_FILE}`",
        "",
    ]
    if quoted:
        lines += ["## Metrics (validation, at the last evaluation)", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4f} |" for k, v in quoted]
        lines.append("")
    lines += [
        "## Use it",
        "",
        "With bbu_jax (every setting above is applied for you; boxes in pixels of the image as given):",
        "",
        "```python",
        "from bbu_jax.inference import Predictor",
        "p = Predictor.from_pretrained(\"THIS_FOLDER\")",
        "p.detect([\"photo.jpg\"])     # the detection head: [[{\"bbox_2d\", \"desc\", \"score\"}, ...]]",
        "p.generate([\"photo.jpg\"])   # the model's answer: [{\"objects\", \"text\", \"parse_status\"}]",
        "```",
        "",
        "With transformers (the language model only; the detection head needs bbu_jax). Pass the processor's",
        "`mm_token_type_ids` to the model: without them transformers silently uses 1D positions instead of",
        "Qwen2.5-VL's M-RoPE, and the answers degrade. Answer boxes are pixels of the resized image the",
        "processor made, not of the original photo.",
        "",
        "```python",
        "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration",
        "model = Qwen2_5_VLForConditionalGeneration.from_pretrained(\"THIS_FOLDER\", local_files_only=True)",
        "processor = AutoProcessor.from_pretrained(\"THIS_FOLDER\", local_files_only=True)",
        "messages = [{\"role\": \"system\", \"content\": " + json.dumps(settings.system_prompt, ensure_ascii=False)
        + "},",
        "            {\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": "
        + json.dumps(settings.instruction, ensure_ascii=False) + "}]}]",
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "inputs = processor(text=[text], images=[image], return_tensors=\"pt\")  # includes mm_token_type_ids",
        "out = model.generate(**inputs, max_new_tokens=1024)",
        "```",
        "",
    ]
    return "\n".join(lines)
