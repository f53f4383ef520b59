#!/usr/bin/env bash
# The example build: starts the local registry, builds examples/hello with ossb, pushes it, and
# runs the pushed image with podman. Needs nothing but this repository and Debian's packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/testenv.sh start
# shellcheck disable=SC1091
. .testenv/env

echo "== building ossb"
cargo build --locked --bin ossb
OSSB=target/debug/ossb

IMAGE=$OSSB_TEST_REGISTRY/examples/hello:latest
echo "== ossb build examples/hello -> $IMAGE"
"$OSSB" build --progress plain \
  --build-arg "BASE=$OSSB_TEST_REGISTRY/$OSSB_TEST_BUSYBOX" \
  --insecure-registry "$OSSB_TEST_REGISTRY" \
  -t "$IMAGE" --push \
  examples/hello

echo "== podman run $IMAGE"
podman run --rm --runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
  --network host --tls-verify=false "$IMAGE"
