#!/usr/bin/env bash
# Run on a CPU machine before a GPU visit (bench/gpu_visit.sh) on a lent GPU machine that has torch but not the rest.
#   bash bench/gpu_prepare.sh
# Brings DALI + DeepSpeed wheels (../shared/tools/device-wheels.sh: .dev/dali1-4, .dev/whl), pytest and
# pyarrow wheels for the GPU machine's Python 3.12 (.dev/whl2), and the test data (.dev/gpu-data:
# H.264 shards, a small text model, a PyAV reference batch; bench/gpu_data.py), the PyAV wheel for the
# loader's decode worker processes (.dev/av) and base.yaml-shaped H.264 shards for bench/feed.py
# (.dev/feed-data/kf1: 430 videos of 10 s, 8 fps, 256 px, a keyframe every 8 frames: 320 train clips, 5 batches of
# base.yaml's 64). Then prints the calls.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if [[ ! -f ../shared/tools/device-wheels.sh ]]; then
  echo "bench/gpu_prepare.sh: ../shared/tools/device-wheels.sh is not here: this script stages wheels for the" \
       "project's own lent GPU machines. On your GPU machine run \`make install\` there, then \`make gpu-check\`." >&2
  exit 2
fi
bash ../shared/tools/device-wheels.sh >/dev/null
mkdir -p .dev/whl2 .dev/pa
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
.venv/bin/pip download -q --no-deps "${plat[@]}" -d .dev/whl2 pytest pluggy iniconfig pygments
.venv/bin/pip download -q --no-deps "${plat[@]}" -d .dev/pa pyarrow==26.0.1  # ~40 MiB: a call of its own
mkdir -p .dev/av
.venv/bin/pip download -q --no-deps "${plat[@]}" -d .dev/av av==18.1.0  # ~35 MiB (abi3): a call of its own
# an older, smaller set (64 videos: 48 train clips, under one batch of 64) is made again
train=$(.venv/bin/python -c "import pyarrow.parquet as pq; print(pq.read_table('.dev/feed-data/kf1/manifest.parquet', \
  columns=['split']).column(0).to_pylist().count('train'))" 2>/dev/null || echo 0)
if (( train < 256 )); then  # at least 4 batches of 64
  rm -rf .dev/feed-data
  .venv/bin/python bench/feed.py --prepare-only --num-videos 430 --keyframe-intervals 1.0 --work .dev/feed-data
fi
rm -rf .dev/feed-data/corpus  # the synthetic sources: only the shards travel
[[ -f .dev/gpu-data/reference.pt ]] || .venv/bin/python bench/gpu_data.py --out .dev/gpu-data
du -sh .dev/* 
cat <<'TXT'

Device calls, back to back (the machine keeps /tmp only while warm):
  1-3. as ../shared/tools/device-wheels.sh prints (carry .dev/dali1, .dev/dali2, .dev/dali3)
  4. carry [".dev/pa"]  command: cp .dev/pa/*.whl /tmp/dw/   (skip if the machine's python3 imports pyarrow)
  4b. carry [".dev/av"]  command: cp .dev/av/*.whl /tmp/dw/   (PyAV: the loader's decode worker processes)
  5. carry [".dev/dali4", ".dev/whl", ".dev/whl2", ".dev/gpu-data", ".dev/feed-data/kf1"]  timeout_s 600  command:
     cp .dev/dali4/part_* /tmp/dw/ && bash bench/gpu_visit.sh
     (installs the wheels and hiervl into /tmp/site, then speed, loader and GPU tests within 585 s; every log
     and JSON comes back in $OUT/visit.tar.gz beside $OUT/visit.log)
  6. at once (within 30 s of 5 returning), if ~3 min of device time are left: carry []  timeout_s 400  command:
     DEADLINE=385 bash bench/gpu_visit.sh compile train      (or `tests` if command 5 ran out of time before them)
TXT
