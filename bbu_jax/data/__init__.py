"""Data: raw annotations -> JSONL (convert, readers, desc, synthetic), JSONL -> fixed-shape batches
(schema, vision_process, chat, encode, collate, pipeline). batch.py is the batch contract.

Entry points: pipeline.make_train_iterator / make_eval_batches / build_inference_inputs,
collate.Budgets, convert.convert_dataset, vision_process.preprocess_image. Submodules are not
imported here so that `bbu_jax.data.batch` stays light (no grain / transformers import).
"""
