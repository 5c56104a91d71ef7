#!/usr/bin/env bash
# The GPU benchmarks of issue 14 in one go, sized to finish in under 10 minutes on one H100/H200:
#   bash bench/gpu_all.sh              # results in ./gpu-bench-<date>/ (or $OUT when set)
#   bash bench/gpu_all.sh --record     # ... and append both tables to BENCHMARKS.md
# gpu_encode: ViT-B-32 (untrained) on 20,000 JPEGs, raw pipelines and `mmfeat encode image`, with the ratio.
# gpu_caption: Qwen2-VL-2B's shape (untrained, built from a config) with transformers and vLLM, raw and through
# `mmfeat caption`, with the ratios. vLLM rows need the vllm extra (infra/docker/Dockerfile.gpu-vllm).
# Without CUDA it stops with one line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_all: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi
DEST="${OUT:-gpu-bench-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$DEST"
"$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tee "$DEST/device.txt"
nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1 || true
status=0
timeout 240 "$PY" bench/gpu_encode.py --n 20000 --extractor-n 2048 "$@" 2>&1 | tee "$DEST/gpu_encode.txt" || status=1
timeout 330 "$PY" bench/gpu_caption.py --n 1024 --hf-n 256 --tokens 32 "$@" 2>&1 | tee "$DEST/gpu_caption.txt" || status=1
echo "results in $DEST"
exit $status
