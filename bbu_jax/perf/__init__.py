"""Measurement tools shared by benchmarks/, tests and the training log: the model-FLOPs count
(``flops``; the training loop's MFU uses it too), the collectives of a lowered step's HLO
(``collectives``), synthetic product-shaped batches (``synthetic``) and a bare LM train step
(``lm_step``).
"""
