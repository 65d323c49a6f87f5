#!/usr/bin/env bash
# `make gpu-check`: every GPU check in one command, on a GPU machine (one H100/H200 in mind).
#  1. the `gpu`-marked tests (tests/test_gpu.py): NCCL collectives on CPU and CUDA tensors; DALI `mixed`
#     frames vs the CPU loader's PyAV frames; `hiervl train` on NCCL + bf16 + ZeRO-2 + DALI `mixed`, then
#     SIGTERM and an exact resume, then ZeRO-2 -> ZeRO-1 through a universal checkpoint;
#  2. bench/model.py at configs/base.yaml (batch 64 x 12 frames x 224 px, `hit`) beside the plain ViT-B/16
#     reference step, with and without activation checkpointing (peak memory both ways, MFU, clips/s ratio);
#  3. bench/feed.py at configs/base.yaml on base-shaped H.264 shards (.dev/feed-data/kf1): the loader's clips/s
#     with DALI `mixed` alone and with DALI + PyAV decode processes (hybrid), beside the `hit` model's training
#     clips/s in the same run (issue 14: the loader should deliver >= 2x; skipped without PyAV or the data).
# Results: bench/out/gpu-check/*.json and the printed lines, for bench/RESULTS.md.
#
# Works with a venv (.venv) or with a bare python3 that has torch, as on the lent GPU machine: there,
# first bring DeepSpeed and DALI with ../shared/tools/device-wheels.sh (it installs into /tmp/site) and
# the test data with `bash bench/gpu_prepare.sh` run on a CPU machine (it prints the device calls).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ -d /tmp/site ]]; then export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HIERVL_GPU_DATA=${HIERVL_GPU_DATA:-$PWD/.dev/gpu-data}
OUT=bench/out/gpu-check
mkdir -p "$OUT"
start=$(date +%s)

missing=$($PY - <<'PY'
import importlib.util as u
need = ["torch", "deepspeed", "nvidia.dali", "pyarrow", "yaml", "transformers", "pytest", "tqdm"]
print(" ".join(m for m in need if u.find_spec(m.split(".")[0]) is None or (m == "nvidia.dali" and u.find_spec(m) is None)))
PY
)
if [[ -n "$missing" ]]; then
  echo "gpu-check: missing Python modules: $missing"
  echo "  DeepSpeed and DALI: ../shared/tools/device-wheels.sh; the others: bash bench/gpu_prepare.sh (prints the calls)"
  exit 2
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('gpu-check on', torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 2

status=0
timeout 420 $PY -m pytest -m gpu tests/test_gpu.py tests/test_gpu_feed.py -x -q -s -p no:cacheprovider -o addopts="" \
    || status=1
echo "gpu-check: tests took $(( $(date +%s) - start )) s"

for ac in false true; do
  timeout 240 $PY bench/model.py --config configs/base.yaml --device cuda --presets hit --world 1 --steps 5 --warmup 2 \
      $([[ $ac == false ]] && echo --reference) --out "$OUT/model-ac-$ac.json" train.activation_checkpointing=$ac \
      || status=1
done
FEED=${HIERVL_FEED_DATA:-$PWD/.dev/feed-data/kf1}
if [[ -f $FEED/manifest.parquet ]] && $PY -c "import av" 2>/dev/null; then
  workers=$(( $($PY -c "import os; print(len(os.sched_getaffinity(0)))") - 2 )); (( workers > 12 )) && workers=12
  (( workers < 1 )) && workers=1
  timeout 300 $PY bench/feed.py --config configs/base.yaml --device cuda --data "$FEED" --decoders auto pyav \
      --workers 0 "$workers" --min-seconds 10 --out "$OUT/feed.json" "model.text.path=$HIERVL_GPU_DATA/text" \
      || status=1
else
  echo "gpu-check: bench/feed.py skipped (needs PyAV and $FEED: bash bench/gpu_prepare.sh)"
fi
echo "gpu-check: done in $(( $(date +%s) - start )) s, status $status"
exit $status
