"""Measurement tools shared by benchmarks/ and tests: the product's train step built and lowered
for measuring (``lowering``), the collectives (``collectives``), matrix-product FLOPs (``hlo_flops``)
and memory plan (``memory``) of a compiled step, synthetic product-shaped batches and data
(``synthetic``) and a bare LM train step for the kernel-lowering test (``lm_step``). The model-FLOPs
count behind every MFU is ``bbu_jax.training.flops``.
"""
