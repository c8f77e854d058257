#!/usr/bin/env bash
# Here, before a session lent a GPU calls the device tool: what its one `run` needs, in .device/
# (git-ignored; about 20 MB, under the tool's 64 MiB with the working tree). The GPU machine has
# python3 with torch, numpy, tqdm, matplotlib, joblib and pytest, but not kd's Hydra packages, and
# ../shared/data does not travel:
#   .device/wheels/  kd-cli (with conf/ and pretrained/) and hydra-core, omegaconf, antlr4 and the
#                    joblib launcher, at the versions of this checkout's .venv (pure-Python wheels)
#   .device/mnist/   the four MNIST files, gzipped (gunzipped there by scripts/device_checks.sh)
# Then: run(command="bash scripts/device_checks.sh", carry=[".device"], timeout_s=580)
set -euo pipefail
cd "$(dirname "$0")/.."
pip=.venv/bin/pip
root=${KD_DATA_ROOT:-../shared/data}
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .device
mkdir -p .device/wheels .device/mnist
$pip wheel -q --no-deps -w .device/wheels .
$pip download -q --no-deps --only-binary=:all: -d .device/wheels "hydra-core==$(version hydra-core)" \
    "omegaconf==$(version omegaconf)" "hydra-joblib-launcher==$(version hydra-joblib-launcher)"
$pip wheel -q --no-deps -w .device/wheels "antlr4-python3-runtime==$(version antlr4-python3-runtime)"  # an sdist on PyPI
for f in "$root"/MNIST/raw/*-ubyte; do gzip -9 -c "$f" > ".device/mnist/$(basename "$f").gz"; done
ls .device/wheels
du -sh .device
