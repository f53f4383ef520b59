#!/usr/bin/env bash
# Runs every benchmark of ossb (cargo bench -p ossb-benches: all [[bench]] targets), with the
# test environment up (registries, busybox, and the Debian base for the apt workload), the
# release binary built first, and writes the table of the whole-build benchmarks against
# buildah and BuildKit (benches/benches/build_*.rs) into BENCHMARKS.md. Each build_* bench
# starts its own dockerd for BuildKit (benches/src/buildkit.rs, installing docker.io if missing).
#
#   scripts/bench.sh                 all benches
#   scripts/bench.sh build_apt ...   only these bench targets
#
# OSSB_BENCH_RUNS (default 3) runs per scenario; OSSB_BENCH_BIG_MIB (default 1024) scales the
# big COPY; OSSB_BENCH_BUILDKIT=0 leaves BuildKit out. Needs root, like scripts/testenv.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/testenv.sh start --debian
# shellcheck disable=SC1091
. .testenv/env

cargo build --release --locked -p ossb-cli
export OSSB_BIN=${OSSB_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/ossb}

results=$(mktemp)
log=$(mktemp)
trap 'rm -f "$results" "$log"' EXIT
export OSSB_BENCH_RESULTS=$results

benches=()
for b in "$@"; do benches+=(--bench "$b"); done
start=$(date +%s)
status=0
# --no-fail-fast: one failing bench must not lose the others' results
cargo bench --locked --no-fail-fast -p ossb-benches "${benches[@]}" 2>&1 | tee "$log" || status=$?
took=$(($(date +%s) - start))

if [[ ! -s $results ]]; then
  echo "no whole-build results (no build_* bench ran): BENCHMARKS.md left as it is"
  exit 0
fi
cmd="scripts/bench.sh${*:+ $*}"
{
  sed '/^<!-- results -->$/q' BENCHMARKS.md
  echo
  echo "Produced by \`$cmd\` on $(date -u +%Y-%m-%d) ($(nproc) cores, $(uname -r), $(buildah --version | cut -d' ' -f1-3), $(/usr/bin/docker --version 2>/dev/null | cut -d, -f1 || echo 'no docker') with its built-in BuildKit, ossb $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!BENCHMARKS.md' || echo '+uncommitted')), ${OSSB_BENCH_RUNS:-3} runs per scenario, medians; all benches took ${took}s."
  echo
  echo "| workload | scenario | ossb (s) | buildah (s) | ossb / buildah | BuildKit (s) | ossb / BuildKit | target | ossb peak RSS (MiB) |"
  echo "|---|---|---:|---:|---:|---:|---:|---|---:|"
  cat "$results"
} >BENCHMARKS.md.new
mv BENCHMARKS.md.new BENCHMARKS.md
echo "wrote BENCHMARKS.md"
exit "$status"
