#!/usr/bin/env bash
# The Python packages bbu_jax needs that the lent GPU machines' image lacks (it holds jax, flax, optax,
# orbax, transformers, torch and most of their needs, and reaches no network): cp312 manylinux wheels
# in .whl/ (git-ignored), at the versions of requirements/lock-py312.txt. The device tool carries the
# folder (carry [".whl"]); benchmarks/device_session.py installs from it what python lacks or has at
# another version.
#   make wheels
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock-py312.txt
# grain and its needs missing there (array-record, portpicker); beartype: the tests' runtime checks;
# flax, optax and orbax: the image has them, at versions of its own (device_session.py installs these
# where the image's differ, so the run uses the lock's)
PACKAGES="grain array-record portpicker ml-collections tensorboardX faster-coco-eval beartype flax optax orbax-checkpoint"
PLATFORMS="manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64"
rm -rf .whl
mkdir -p .whl
for name in $PACKAGES; do
    # the lock spells names as pip freeze does (array_record, ml_collections): match - and _ alike
    spec=$(grep -i "^${name//-/[-_]}==" "$LOCK") || { echo "$name is not in $LOCK" >&2; exit 1; }
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $(printf -- '--platform %s ' $PLATFORMS) -d .whl "$spec"
done
ls -1 .whl
du -sh .whl
