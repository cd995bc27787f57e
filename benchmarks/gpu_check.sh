#!/usr/bin/env bash
# GPU readiness check for diralign (issue 13): one prepared script, under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine: writes benchmarks/gpu_check.json
#   bash benchmarks/gpu_check.sh --dry-run    # on CPU, small sizes: every step except the device parts
#
# It runs `diralign run margins|fig1 --set device=cuda`, the Python API on a CUDA model,
# `torchrun ... --set distributed=true` (NCCL), resume of a GPU run, and times an epoch of
# H-AlexNet, ResNet-18 and DenseNet-121 on 50,000 CIFAR-shaped images, projecting the time to
# risk 1e-8 (benchmarks/gpu_check.py has the details; extra arguments are passed to it).
# The whole check is killed at 8 minutes; steps that would not fit are skipped and say so.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout --signal=INT --kill-after=20 480 python benchmarks/gpu_check.py "$@"
