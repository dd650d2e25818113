#!/usr/bin/env bash
# Real-catalog results of the three transfer strategies (benchmarks/results/modules.md).
# Needs runs/real/manifest.json and runs/real/store.h5 (pooled efficientnet_lite0 at 224 px and
# all-MiniLM-L6-v2) from `embed prepare` / `embed extract`. Runs niced: the machine is shared.
# Usage: benchmarks/modules_real.sh [S3_TEXT_EPOCHS] [IMAGE_S3_STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/real
OUT=$RUN/modules
S3_TEXT_EPOCHS=${1:-2}
IMAGE_S3_STEPS=${2:-10}
embed() { nice -n 10 python -m cli.embed "$@"; }
mkdir -p "$OUT"
for strategy in 1 2; do
  embed finetune $RUN/manifest.json --modality text --strategy $strategy --store $RUN/store.h5 \
    --out $OUT/text-s$strategy --no-progress | tee $OUT/text-s$strategy.log
  embed finetune $RUN/manifest.json --modality image --strategy $strategy --store $RUN/store.h5 \
    --out $OUT/image-s$strategy --no-progress | tee $OUT/image-s$strategy.log
done
# Text S3: MiniLM fine-tuned end to end; limited to S3_TEXT_EPOCHS epochs on 2 CPU cores (resumable: rerun
# with a larger --epochs and the same --out to continue).
embed finetune $RUN/manifest.json --modality text --strategy 3 --out $OUT/text-s3 --epochs "$S3_TEXT_EPOCHS" \
  --no-progress | tee $OUT/text-s3.log
# Image S3 at 224 px: a fixed number of training steps, extrapolated to a full epoch (said so in the output).
embed finetune $RUN/manifest.json --modality image --strategy 3 --out $OUT/image-s3-timing --epochs 1 \
  --max-steps-per-epoch "$IMAGE_S3_STEPS" --no-progress | tee $OUT/image-s3-timing.log
