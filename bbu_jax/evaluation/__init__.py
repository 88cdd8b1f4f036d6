"""Evaluation: detection metrics, batch evaluation and pictures of predictions."""
