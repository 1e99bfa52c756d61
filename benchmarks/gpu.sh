#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one short run (a few minutes on an H100/H200): SwAV step overhead
# for ResNet-50 (bf16, channels_last) at batch 64 and 256, float16 with a GradScaler, torch.compile; batched
# augmentation and training throughput, with JPEGs decoded by PIL in the workers and on the GPU (nvJPEG); the
# loss grid, beside lightly's loss (pip install lightly --no-deps). Prints everything; run it once.
set -uo pipefail  # one failing measurement does not hide the others
cd "$(dirname "$0")"
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
RN50="--device cuda --arch resnet50 --size-crops 224 96 --num-crops 2 6 --amp --channels-last --repeats 20"
$PY step.py $RN50 --batch-sizes 64 256
$PY step.py $RN50 --batch-sizes 64 --amp-dtype float16
$PY augment.py --device cuda --images 512 --image-size 375 500 --batch-size 256 --workers 8 --batches 4 \
    --train --arch resnet50 --amp
$PY augment.py --device cuda --images 512 --image-size 375 500 --batch-size 256 --workers 8 --batches 4 \
    --train --train-only --arch resnet50 --amp --decode-on-device
$PY step.py $RN50 --batch-sizes 64 --compile
$PY loss.py --device cuda --grid --repeats 5
