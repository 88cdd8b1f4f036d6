"""Foundation layer: the mesh and logical-axis sharding table, atomic file writes, host memory.

Imports nothing of bbu_jax; every other layer may import it.
"""
