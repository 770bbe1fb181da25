#!/usr/bin/env bash
# The GPU benchmark in one command, for a GPU machine that can reach no package index.
#
# Where pip works, once: fetch the wheels such a machine lacks into .whl/ (git-ignored):
#     bash benchmarks/gpu_run.sh fetch
# On the GPU machine, with .whl/ copied beside the checkout:
#     bash benchmarks/gpu_run.sh run [bench_train.py flags]
# "run" installs the wheels beside the machine's own packages (torch, transformers and accelerate
# are used as found; peft comes along because diffusers 0.42 cannot import its LoRA loaders with
# peft 0.17 under transformers 5, nor load LoRA weights with 0.18), prints the card, runs
# bench_optimizer.py, then bench_train.py with a --deadline (DEADLINE, default 480 s) so that it ends inside a 10-minute
# job with its results written, and leaves results.json, bench.log, optimizer.json and the workers' logs in $OUT
# (benchmarks/gpu-run/ when OUT is unset).
# PYTHON names the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

WHEELS=(diffusers==0.42.1 bitsandbytes==0.50.2 importlib_metadata==10.2.0 peft==0.21.2)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any)

case "${1:-}" in
fetch)
    mkdir -p .git/info
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    platform_flags=()
    for platform in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$platform"); done
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_flags[@]}" -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
run)
    shift
    out="${OUT:-benchmarks/gpu-run}"
    mkdir -p "$out"
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "error: no wheels in .whl/: run 'bash benchmarks/gpu_run.sh fetch' where pip works, and bring .whl/ along" >&2
        exit 1
    fi
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"; } \
        | tee "$out/card.txt"
    # The optimizer step alone first (seconds): bitsandbytes' 8-bit AdamW against the suite's.
    timeout 150 "$PYTHON" benchmarks/bench_optimizer.py --output "$out/optimizer.json" 2>&1 | tee "$out/optimizer.log" || true
    status=0
    "$PYTHON" benchmarks/bench_train.py --deadline "${DEADLINE:-480}" --timeout 300 --workdir /tmp/bench-train \
        --output "$out/results.json" "$@" 2>&1 | tee "$out/bench.log" || status=$?
    tar -czf "$out/logs.tar.gz" -C /tmp/bench-train logs 2>/dev/null || true
    exit "$status"
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh fetch | run [bench_train.py flags]" >&2
    exit 2
    ;;
esac
