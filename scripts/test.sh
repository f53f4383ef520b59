#!/usr/bin/env bash
# Runs every test of ossb: starts the test environment (registries, base images; installs what
# is missing), then the unit and end-to-end tests of the whole workspace.
#
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/testenv.sh start
# shellcheck disable=SC1091
. .testenv/env

echo "== cargo test --workspace"
cargo test --workspace --locked "$@"
