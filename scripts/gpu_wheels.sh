#!/usr/bin/env bash
# Fetch into .whl/ the wheels that scripts/gpu_bench.sh installs on the GPU machine (Python 3.12, x86-64), whose
# image lacks them. Run here, once, before the device call; .whl/ is git-ignored.
set -euo pipefail
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 soundfile==0.14.0 cffi==2.0.0 pycparser==3.0 \
  indexed_gzip==1.10.3
# antlr4-python3-runtime (needed by omegaconf) has no wheel on PyPI: build the pure-Python one.
python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
