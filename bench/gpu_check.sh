#!/usr/bin/env bash
# The whole GPU check in one command: bash bench/gpu_check.sh OUT_DIR [--budget-s S] (see README "GPU check").
out="$(realpath -m "${1:?usage: bench/gpu_check.sh OUT_DIR [--budget-s S] [--only STEPS] [--gpus N] [--dry-run]}")" && cd "$(dirname "$0")/.." && exec python3 -m bench.gpu_check --out "$out" "${@:2}"
