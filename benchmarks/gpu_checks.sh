#!/usr/bin/env bash
# The accelerator checks of the time-to-accuracy work, in one run (about 5 minutes on one H100/H200):
# the demo recipe's train and predict steps on NumPy-rendered batches (float32, bfloat16), then the
# R50-FPN train step and inference against torchvision in float32, and the train step in bfloat16
# against torchvision under autocast. Needs JAX on the accelerator and a CUDA build of torch; not
# TensorFlow, tensorflow-datasets or pycocotools. From the repository root:
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]       # figures as JSON/markdown under OUT_DIR
#
# The full demo (`python -m experiments.coco_retinanet`) needs the data stack (`pip install -e '.[train]'`).
set -euo pipefail
out=${1:-benchmarks/results/accelerator}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
python benchmarks/bench_demo_step.py --out "$out/demo_step_float32.json"
python benchmarks/bench_demo_step.py --override model.compute_dtype=bfloat16 --out "$out/demo_step_bfloat16.json"
python benchmarks/suite.py --cases train_step,inference --skip_memory --out "$out/r50_float32"
python benchmarks/suite.py --cases train_step --skip_memory --override model.compute_dtype=bfloat16 \
    --torch_autocast bfloat16 --out "$out/r50_bfloat16"
