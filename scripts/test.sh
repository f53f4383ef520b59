#!/usr/bin/env bash
# Runs every test of ossb: starts the test environment (registries, base images; installs what
# is missing), then the unit and end-to-end tests of the whole workspace, and prints the total.
#
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --debian: the conformance cases that need useradd/groupadd build on a debootstrap Debian (made
# once, ~1 min, cached in .testenv/debian).
scripts/testenv.sh start --debian
# shellcheck disable=SC1091
. .testenv/env

# The tests' podman store (CONTAINERS_STORAGE_CONF, .testenv/podman) starts empty: each run
# pulls its own images into it, under the registries' ever-new names.
# (Guarded: without that variable podman would empty the host's own store.)
if [[ ${CONTAINERS_STORAGE_CONF:-} == "$PWD/.testenv/containers/storage.conf" ]]; then
  podman rm -a -f >/dev/null 2>&1 || true
  podman rmi -a -f >/dev/null 2>&1 || true
fi

# A clean checkout gains nothing from incremental state, and it doubles what the build writes.
if [[ ${CI:-} == true ]]; then export CARGO_INCREMENTAL=0; fi

echo "== cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
# cargo prints one summary per test binary; the last one is often an empty doc-test run, so
# close with the total.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
