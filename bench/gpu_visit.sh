#!/usr/bin/env bash
# A GPU visit's long command: after the wheel/data copies that bench/gpu_prepare.sh prints, in ONE command
# of at most 600 s on the lent GPU machine (python3 with torch 2.11 + transformers 5.17, no network, no make):
#   install  DALI parts joined; DeepSpeed, DALI, PyAV, pytest wheels and hiervl itself (pip --target from
#            this tree, no network, no build isolation; a symlink package if pip cannot) into /tmp/site,
#            once per warm machine;
#   probe    GPU, versions, modules, CPUs, /dev/shm;
#   model    bench/model.py at configs/base.yaml: `hit` beside the plain ViT-B/16 reference with activation
#            checkpointing off (base.yaml's default now) (clips/s, MFU, peak memory);
#   feed     bench/feed.py: the loader's clips/s with DALI mixed alone + the hybrid (12 PyAV processes), then
#            the pool alone, on base-shaped H.264 shards;
#   tests    the gpu-marked tests (base.yaml's recipe at a small shape), all of them (no -x), junit XML;
#   ac-on    `hit` with activation checkpointing on (a lever: the first stage the deadline cuts);
#   optional: compile (hit with train.compile=true), train (`hiervl train` at base.yaml: samples/s and
#            data-wait share), flat (the flat preset at the same shape).
# Speed first (an idle GPU), then the loader, then the tests. Every log and JSON is written under $WORK and,
# after every stage, packed into $OUT/visit.tar.gz beside $OUT/visit.log ($OUT is what comes back from the GPU
# machine, at most 8 files; a killed command still returns what is there). DEADLINE (default 585 s from the start)
# caps every stage: a stage gets at most the time left, and is skipped with a line when under 30 s are left.
#   cp .dev/dali4/part_* /tmp/dw/ && bash bench/gpu_visit.sh          # the long command
#   DEADLINE=385 bash bench/gpu_visit.sh compile train                 # a follow-up (timeout_s 400), warm machine
# On a machine without a CUDA GPU it prints one line and exits 2 (`make gpu-check` runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[[ -x .venv/bin/python && -z ${HIERVL_VISIT_SYSTEM_PYTHON:-} ]] && PY=.venv/bin/python

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-visit: no CUDA GPU visible to $PY (torch missing or CPU-only): run it on a GPU machine after the copies bench/gpu_prepare.sh prints"
  exit 2
fi

OUT=${OUT:-$PWD/bench/out/gpu-visit}
WORK=${WORK:-/tmp/gpu-visit}
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
DEADLINE=${DEADLINE:-585}
STAGES=${*:-probe model feed tests ac-on}
GPU_DATA=$PWD/.dev/gpu-data
TEXT="model.text.path=$GPU_DATA/text"  # the loader's tokenizer (MiniLM's, saved with a 2-layer BERT)
FEED=$PWD/.dev/feed-data/kf1
SITE=${SITE:-/tmp/site}

say() { echo "[gpu-visit +$(( $(date +%s) - T0 ))s] $*"; }

run() {  # run NAME SECONDS CMD...: one stage, time-boxed (timeout signals the stage's whole process group)
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) - 5 ))
  if (( left < 30 )); then say "skip $name: ${left}s left before the deadline"; return 0; fi
  (( left < limit )) && limit=$left
  say "start $name (limit ${limit}s)"
  timeout -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  say "end $name rc=$rc$( (( rc == 124 || rc == 137 )) && echo ' (time box hit)')"
  grep -v -i -E "warn|^[[:space:]]*$" "$WORK/$name.log" | tail -n 12
  pack
}

pack() {  # everything so far into $OUT/visit.tar.gz (replaced whole: a kill mid-write leaves the previous one)
  tar czf "$OUT/.visit.tar.gz" -C "$WORK" . 2>/dev/null && mv -f "$OUT/.visit.tar.gz" "$OUT/visit.tar.gz"
}

shim() {  # hiervl as a package of symlinks into this tree: pipeline/ is hiervl, launch/ dataprep/ configs/ inside
  local pkg=$SITE/hiervl f
  rm -rf "$pkg" && mkdir -p "$pkg"
  for f in pipeline/*; do ln -s "$PWD/$f" "$pkg/$(basename "$f")"; done
  for f in launch dataprep configs; do ln -s "$PWD/$f" "$pkg/$f"; done
}

install() {  # once per warm machine
  [[ -f $SITE/.hiervl-installed ]] && return 0
  mkdir -p "$SITE"
  if compgen -G "/tmp/dw/part_0*" > /dev/null; then
    cat /tmp/dw/part_0* > /tmp/dw/nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl && rm -f /tmp/dw/part_0*
  fi
  local wheels=() d w seen=" "
  for d in /tmp/dw .dev/whl .dev/whl2; do  # one copy of each wheel (pip refuses two files of one version)
    for w in "$d"/*.whl; do
      [[ -f $w && $seen != *" $(basename "$w") "* ]] || continue
      wheels+=("$w"); seen+="$(basename "$w") "
    done
  done
  (( ${#wheels[@]} )) && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "${wheels[@]}"
  say "wheels rc=$? (${#wheels[@]} wheels)"
  # hiervl itself: no network (--no-index), the machine's own setuptools (--no-build-isolation)
  if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
      > "$WORK/install-hiervl.log" 2>&1; then
    say "pip could not build hiervl (see install-hiervl.log): symlink package instead"
    shim
  fi
  touch "$SITE/.hiervl-installed"
}

probe() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'PY'
import importlib.util as u, os, shutil, sys
import torch, transformers
import hiervl
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(), "hiervl", hiervl.__file__)
mods = ["deepspeed", "nvidia.dali", "av", "pyarrow", "pandas", "psutil", "einops", "msgpack", "timm", "pytest",
        "tensorboard"]
print("modules:", {m: u.find_spec(m) is not None for m in mods})
print("cpus", len(os.sched_getaffinity(0)), "| /dev/shm free GiB", round(shutil.disk_usage("/dev/shm").free / 2**30, 1),
      "| TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST"), "| make", shutil.which("make"))
PY
}

model() {  # NAME LIMIT EXTRA...: bench/model.py at base.yaml (text: MiniLM-shaped from its config, bench/model.py)
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" "$PY" bench/model.py --config configs/base.yaml --device cuda --world 1 --steps 5 --warmup 2 \
      --out "$WORK/$name.json" "$@"
}

stage() {
  case $1 in
  probe) probe > "$WORK/probe.log" 2>&1; cat "$WORK/probe.log"; pack ;;
  model)  # the headline: hit beside the plain ViT-B/16 reference, activation checkpointing off (base.yaml's default)
    model model-ac-off 170 --presets hit --reference train.activation_checkpointing=false
    ;;
  ac-on)  # what activation checkpointing costs (a lever, not the default): last in the long command
    model model-ac-on 90 --presets hit --warmup 2 train.activation_checkpointing=true  # an option after --presets
    ;;
  compile)  # torch.compile of the towers (compiled during the 2 warmup steps, which are not timed)
    model model-compile 240 --presets hit --warmup 3 train.activation_checkpointing=false train.compile=true
    ;;
  flat)
    model model-flat 120 --presets flat --warmup 2 train.activation_checkpointing=false
    ;;
  feed)  # DALI mixed alone, DALI + 12 PyAV processes (hybrid), then the 12 processes alone
    local ring=()
    (( $("$PY" -c "import shutil; print(int(shutil.disk_usage('/dev/shm').free / 2**30))") < 2 )) \
        && ring=(data.prefetch=1)  # the ring holds (prefetch + 1) x 64 clips of 3.6 MB in /dev/shm
    run feed 100 "$PY" bench/feed.py --config configs/base.yaml --device cuda --data "$FEED" --decoders auto \
        --workers 0 12 --min-seconds 8 --no-model --out "$WORK/feed.json" "$TEXT" ${ring[@]+"${ring[@]}"}
    run feed-pool 50 "$PY" bench/feed.py --config configs/base.yaml --device cuda --data "$FEED" --decoders pyav \
        --workers 12 --min-seconds 8 --no-model --out "$WORK/feed-pool.json" "$TEXT" ${ring[@]+"${ring[@]}"}
    ;;
  tests)  # every GPU test even if one fails (no -x): one command must say everything
    run tests 330 "$PY" -m pytest -m gpu tests/test_gpu.py tests/test_gpu_feed.py -q -s -rA -p no:cacheprovider \
        -o addopts="" --junitxml="$WORK/pytest.xml"
    local f d
    for f in /tmp/pytest-of-*/pytest-*/test_*/*/{status.json,metrics.jsonl,deepspeed_config.json}; do
      [[ -f $f ]] || continue
      d=$WORK/test-runs/$(basename "$(dirname "$f")")
      mkdir -p "$d" && cp "$f" "$d/"
    done
    pack
    ;;
  train)  # hiervl train at base.yaml (hybrid loader, ZeRO-2, bf16) on the feed shards: samples/s, data-wait share
    run train 240 "$PY" -m hiervl.launch.cli train --config configs/base.yaml "data.path=$FEED" "$TEXT" \
        train.ranks=1 train.steps=40 train.log_every=10 checkpoint.every_steps=0 eval.every_steps=0 \
        data.remainder=pad train.out_dir=/tmp/hiervl-train-base
    cp /tmp/hiervl-train-base/{metrics.jsonl,status.json,deepspeed_config.json} "$WORK/" 2>/dev/null
    pack
    ;;
  *) say "unknown stage $1 (stages: probe model feed tests ac-on compile flat train)" ;;
  esac
}

main() {
  export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export HIERVL_GPU_DATA=$GPU_DATA
  install
  local s
  for s in $STAGES; do stage "$s"; done
  pack
  say "done; in $OUT/visit.tar.gz: $(ls "$WORK" | tr '\n' ' ')"
}

main 2>&1 | tee -a "$OUT/visit.log"
