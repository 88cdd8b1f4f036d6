"""Inference: generation, response parsing and predict_detection."""
