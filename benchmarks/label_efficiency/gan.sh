#!/usr/bin/env bash
# The label-efficiency experiment's generator (issue 28 item 7): StyleGAN2-ADA, preset openkbp64, on the OpenKBP
# train split's 64^2 body crops. Resumable: rerun the same command and it continues from OUT's training state.
# Usage: benchmarks/label_efficiency/gan.sh OPENKBP_DIR OUT_DIR   (publishes OUT_DIR/stylegan2.pt)
# The shipped generator (sample-data/openkbp/models/stylegan2.pt) is this run stopped at 354 kimg; the preset's
# budget is 3,000 kimg. Which snapshot the experiment uses is a dev-split choice (protocol.json: gan_snapshot).
set -euo pipefail
openkbp=${1:?OpenKBP folder}
out=${2:?run folder}
here=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$here/lib${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m labelfactory.cli train-stylegan2 \
    --openkbp "$openkbp" --split train --preset openkbp64 --out "$out" --model "$out/stylegan2.pt" --no-progress
