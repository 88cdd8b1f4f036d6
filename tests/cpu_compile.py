"""XLA flags for test subprocesses whose runs are about bookkeeping and numerics, not speed: the
cheapest CPU code generation (same HLO, same results)."""
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
