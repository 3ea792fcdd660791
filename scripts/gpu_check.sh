#!/usr/bin/env bash
# Issue 29's GPU check: every trainer and infer on one GPU at the OpenKBP sample's sizes, a table and a JSON
# (scripts/gpu_check.py says what each row is). At most 8 minutes on one GPU, start-up included: the python
# stops starting rows after --budget-s (420 s) and the whole run is cut at 470 s.
# Needs only PyTorch (plus numpy, tqdm); rows that need SimpleITK or MONAI report "failed" where those are absent.
#   scripts/gpu_check.sh [--cpu-smoke] [--out gpu_check.json]     PYTHON=... to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
exec timeout 470 "$PYTHON" scripts/gpu_check.py "$@"
