"""Data: raw annotations -> JSONL (convert, readers, desc, synthetic), JSONL -> fixed-shape batches
(schema, chat, encode, collate, pipeline) with the model's own image processing
(models.qwen2_5_vl.processing). batch.py is the batch contract.

Entry points: pipeline.make_train_iterator (a DataSpec) / make_eval_batches / build_inference_inputs,
collate.Budgets, convert.convert_dataset. Submodules are not imported here so that
`bbu_jax.data.batch` stays light (no grain / transformers import).
"""
