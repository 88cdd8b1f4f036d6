#!/usr/bin/env bash
# One call on a lent GPU (the device tool): the Triton flash kernels checked against the "xla"
# kernel on the GPU, then the 3B step's MFU with each fused attention kernel, then (if time is
# left) how many GPUs one loader process feeds on this host's CPUs. Logs go to $OUT
# (./gpu_logs elsewhere); the last lines printed are the headlines.
#   run: bash benchmarks/gpu_session.sh        (about 6-8 minutes; give it timeout_s=570)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
    2>&1 | tee "$OUT/env.log"
JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -x -s tests/test_flash_attention.py -k xla_kernel \
    -p no:cacheprovider 2>&1 | tee "$OUT/flash_check.log"
for attention in pallas cudnn; do
    timeout 200 python3 benchmarks/mfu.py --attention "$attention" --remat full --no-record 2>&1 \
        | tee "$OUT/mfu_$attention.log"
done
timeout 45 python3 benchmarks/loader.py --num_images 60 --batches 4 --workers 1 4 --no-record 2>&1 \
    | tee "$OUT/loader.log"
echo "== headlines"
grep -h "rel err\|passed\|failed" "$OUT/flash_check.log"
grep -h "^mfu:" "$OUT"/mfu_*.log
grep -h "^packed\|^loader:" "$OUT/loader.log"
