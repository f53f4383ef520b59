#!/usr/bin/env bash
# A bounded fuzzing run of the Dockerfile parser, the shell-word expander and the .dockerignore
# matcher (dockerfile/fuzz, cargo-fuzz on the nightly toolchain). CI runs it for 60 s in all;
# a crash fails the run and leaves the input in dockerfile/fuzz/artifacts/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 20)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_PER_TARGET=${1:-20}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (cargo fuzz needs it): rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
# Seed the parser with the real Dockerfiles of the test data.
mkdir -p "$corpus/parse" "$corpus/expand" "$corpus/dockerignore"
find dockerfile/testdata -type f \( -name 'Dockerfile*' -o -name '*.Dockerfile' \) -size -16k -print0 |
  xargs -0 -I{} sh -c 'cp "{}" "$1/parse/$(sha1sum "{}" | cut -c1-16)"' _ "$corpus"

cd dockerfile/fuzz
for target in parse expand dockerignore; do
  echo "== cargo fuzz run $target for ${SECONDS_PER_TARGET}s"
  log=$corpus/$target.log
  if ! cargo +nightly fuzz run "$target" "$corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $target failed (a crash leaves its input in dockerfile/fuzz/artifacts/$target)" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units' "$log" || true
done
echo "fuzz: no crash in $((SECONDS_PER_TARGET * 3))s of fuzzing"
