"""Composition layer: the training run, HF import/export, demo assets.

Builds on every library layer below; nothing in bbu_jax below this layer imports it.
"""
