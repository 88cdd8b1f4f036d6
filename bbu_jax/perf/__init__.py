"""Measurement tools shared by benchmarks/ and tests: lowering the product's train step, reading
the collectives of its HLO, synthetic product-shaped batches. Not used by training runs.
"""
