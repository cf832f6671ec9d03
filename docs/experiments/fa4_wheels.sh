#!/usr/bin/env bash
# Wheels of flash-attn-4 and its CuTe DSL for the device tool's H200 (Python 3.12, CUDA 13),
# in three folders of the checkout that each fit one call: see fa4_hopper.py beside this file.
# cute_fwd.py (route 2's own kernel) needs only the CuTe DSL of these: its third call is
# `bash .fa4c/install.sh docs/experiments/cute_fwd.py --time`.
# Run from the checkout's root; needs pip and xz here. About four minutes (xz -9).
set -euo pipefail
tmp=$(mktemp -d)
platforms=(--python-version 3.12 --implementation cp --only-binary=:all:
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
for pkg in flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi torch-c-dlpack-ext \
  quack-kernels; do
  python3 -m pip download -q --no-deps "${platforms[@]}" -d "$tmp" "$pkg"
done
mkdir -p "$tmp/cu13" .fa4a .fa4b .fa4c
(cd "$tmp/cu13" && unzip -q "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl && tar cf - . | xz -9 -T0 > "$tmp/cu13.tar.xz")
rm "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl
split -n 3 -d "$tmp/cu13.tar.xz" "$tmp/part."
mv "$tmp/part.00" .fa4a/ && mv "$tmp/part.01" .fa4b/ && mv "$tmp/part.02" "$tmp"/*.whl .fa4c/
cat > .fa4c/install.sh <<'INSTALL'
set -euo pipefail
mkdir -p /tmp/fa4 /tmp/site && cp .fa4c/part.02 /tmp/fa4/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .fa4c/*.whl
cat /tmp/fa4/part.00 /tmp/fa4/part.01 /tmp/fa4/part.02 | xz -d | tar x -C /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:.
# sourced (`. .fa4c/install.sh`), it stops here, with PYTHONPATH set in the caller's shell
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0
# the script to run and its arguments (default: fa4_hopper.py), e.g. bash .fa4c/install.sh docs/experiments/cute_fwd.py --time
timeout 420 python3 "${@:-docs/experiments/fa4_hopper.py}"
INSTALL
rm -rf "$tmp"
du -sh .fa4a .fa4b .fa4c
