#!/usr/bin/env bash
# The GPU path on a real GPU in one command: bf16 scoring, 50 sparse steps and an evaluation on the `small` preset
# (built from its config, nothing downloaded), measured peaks beside the plan's. See benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--gradient-checkpointing] [--device cuda:1]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
