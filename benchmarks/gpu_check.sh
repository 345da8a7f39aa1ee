#!/usr/bin/env bash
# The issue-13 GPU check: one table of tokens/s, MFU, data wait and peak memory of a ~125M and a ~1.1B
# Llama-family model continued by the trainer (in-process and over the HTTP stream), and a resume-after-kill
# check, and issue 26's rows (--document-masking at 125M, --activation-checkpointing at 1.1B). Under 8 minutes
# on one H100/H200 before issue 26's two runs (about 10 with them, estimated: not yet run on a GPU); installs
# nothing. It uses the repository's .venv when there is one (whose torch must be a CUDA build on a GPU
# machine), else the python on PATH.
#   benchmarks/gpu_check.sh [--dry-run] [--peak-tflops N]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# As a module: run as a script, benchmarks/tokenize.py would shadow the standard library's tokenize.
exec "$PYTHON" -m benchmarks.gpu_check "$@"
