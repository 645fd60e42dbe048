#!/usr/bin/env bash
# Fold and verify the bundled models and a few exporter-corpus models on CUDA, in one command:
#
#   bash bench/gpu_check.sh OUTDIR        (PYTHON=/path/to/python picks the interpreter)
#
# Writes OUTDIR/<model>.verify.json, <model>.ledger.json and summary.json. Exit codes:
# 0 every model passed on CUDA; 1 a verification failed; 2 a model could not be checked or
# its report does not show CUDA, or bad usage; 77 no usable CUDA here (one line says why).
# What it checks and how: bench/gpu_check.py.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
