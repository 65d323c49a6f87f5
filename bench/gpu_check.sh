#!/usr/bin/env bash
# `make gpu-check`: every GPU check in one command of at most 600 s, results under $OUT. Kept as the old
# entry point; the work is bench/gpu_visit.sh (speed figures, then the loader's, then the gpu-marked tests,
# each time-boxed under one deadline). On a machine without a CUDA GPU: one line, exit 2.
exec bash "$(dirname "$0")/gpu_visit.sh" "$@"
