"""HF <-> bbu_jax weight conversion (`python -m convert_weights.hf_to_flax` / `flax_to_hf`)."""
