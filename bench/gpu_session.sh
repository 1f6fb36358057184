#!/usr/bin/env bash
# One device call: install, build with the CUDA handoff, GPU tests, then the GPU bench.
# Usage (on the GPU host, repo root): OUT=/some/dir [BENCH=0] [TESTS=0] [BUILD=0] [TAG=x] bash bench/gpu_session.sh [bench args...]
# BUILD=0 reuses the last build in /tmp/site (a second bench in the same call); TAG names
# the bench's files (gpu_bench_TAG.json, bench_TAG.log) so two benches keep both.
# Files in $OUT (at most 8 come back from the device; keep this list at 6 or fewer):
# build.log, tests_gpu.log, bench.log, gpu_bench.json (every section, the profile
# included; gpu_bench.json.tmp only while it is rewritten), profile_b1.trace.json.gz
# (batch-1 decode under torch.profiler, Chrome trace).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/overlapd-out}; mkdir -p "$OUT"
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
t0=$(date +%s)
if [ "${BUILD:-1}" = 1 ]; then
  OVERLAPD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps --no-compile -q --target /tmp/site . > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
python3 -c "from overlapd.kernels import cuda_handoff as c; print('native _cuda:', c.native())"
[ "${TESTS:-1}" = 1 ] && python3 -m pytest -q -p no:cacheprovider tests/gpu -ra --durations=8 2>&1 \
  | tee "$OUT/tests_gpu.log" | tail -40
[ "${BENCH:-1}" = 1 ] || exit 0  # BENCH=0: build and tests only; TESTS=0: build and bench only
sfx=${TAG:+_$TAG}
python3 bench/gpu.py --out "$OUT/gpu_bench$sfx.json" --profile-trace "$OUT/profile_b1$sfx.trace.json.gz" "$@" 2>&1 \
  | tee "$OUT/bench$sfx.log"
