"""What a compiled step holds in device memory, from XLA's memory plan (``compiled.memory_analysis()``).

The plan is per device (one SPMD program). Live at the step's peak, at most: its arguments (state
and batch), its outputs less those written into donated arguments (aliases), its temporaries
(activations, gradients, optimizer scratch) and its code. A plan made for the CPU backend
estimates the GPU one: the same partitioner and buffer sharing, but other fusion choices, and on
CPU bf16 arithmetic is widened to f32 in places, so its temporaries run somewhat larger.
"""
from __future__ import annotations

GIB = 2**30


def memory_summary(compiled) -> dict[str, float]:
    """{"arguments", "outputs", "aliased", "temp", "code", "total"} in GiB per device; "total" is
    arguments + outputs - aliased + temp + code (XLA's peak when it reports one is printed by
    callers beside it)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"] + out["code"]
    return {k: v / GIB for k, v in out.items()}
