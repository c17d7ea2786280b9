#!/usr/bin/env bash
# The frozen encoder's speed on a GPU, on the ImageNet EfficientNet-Lite0 Unet at photo size
# (issue #28): a base trained from the packaged ImageNet weights, then the whole
# `ciss add-classes` command with its default freeze point (stage3), with the whole encoder
# frozen (stage4) and with nothing frozen, each a fresh process on a fresh copy of the base
# (benchmarks/add_speed.py), repeats interleaved, medians.
#
# Usage: benchmarks/gpu_pretrained.sh OUT      (OUT: a new folder)
#   environment: SIZE (512), TRAIN images (160), REPEATS (2), BASE_ITERATIONS (200),
#   PYTHON (python)
# Needs: a CUDA GPU, `pip install -e '.[smp,pretrained]'`. Every run's line goes to
# OUT/add_speed.log as it ends, so a run cut off by a time limit keeps what it measured.
set -euo pipefail
out=${1:?usage: gpu_pretrained.sh OUT}
size=${SIZE:-512}
train=${TRAIN:-160}
repeats=${REPEATS:-2}
py=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
if [ -e "$out" ]; then echo "$out exists: give a new folder" >&2; exit 2; fi
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
"$py" -c "import torch; print('device:', torch.cuda.get_device_name())"
mkdir -p "$out"
"$py" -m ciss data synthetic --out "$out/data" --size "$size" --train "$train" --val 32 --seed 0
"$py" -m ciss data split --data "$out/data" --scenario 15-5 --out "$out/split"
"$py" -m ciss train --store "$out/store" --data "$out/split/step-0" \
    --arch smp-unet-timm-tf_efficientnet_lite0 --weights imagenet \
    --iterations "${BASE_ITERATIONS:-200}" --batch-size 8 --quiet
"$py" "$here/add_speed.py" --base "$out/store" --data "$out/split/step-1" --repeats "$repeats" \
    --variant "stage4=--freeze stage4" --variant "none=--freeze none" \
    --out "$out/add_speed.json" 2> >(tee "$out/add_speed.log" >&2)
