#!/usr/bin/env bash
# The emulator's PTX probe (tools/cuda_emu/probes/ptx_probe.cu) built by nvcc and run on the
# GPU: the modes that follow the rules (mma.sync with ldmatrix and cp.async in bfloat16 and
# float16, a barrier-ordered shared-memory exchange, a cluster of 4 CTAs reading each other's
# shared memory around the cluster barrier, whole and split) must give no wrong value, as
# they do in the emulator (tests/test_cuda_emu.py test_ptx_standins).
#   bash tools/gpu/ptx_probes.sh OUTDIR
set -eu
OUT=${1:?usage: tools/gpu/ptx_probes.sh OUTDIR}
cd "$(dirname "$0")/../.."
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
command -v "$NVCC" >/dev/null || NVCC=nvcc
"$NVCC" -std=c++17 -arch=sm_90 -Icsrc/cuda -Icsrc -x cu tools/cuda_emu/probes/ptx_probe.cu \
  -o "$OUT/ptx_probe"
"$OUT/ptx_probe"
