#!/usr/bin/env bash
# Fuzzes every parser of bytes from outside (fuzz/, cargo-fuzz on the nightly toolchain): the
# Dockerfile parser and planner, the shell-word expander (and deep nesting), .dockerignore,
# the layer applier, registry manifests/indexes/configs and references, the cluster's frames,
# and Docker's config.json. A crash fails the run and leaves its input in
# fuzz/artifacts/TARGET/; turn it into a regression test.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 20 s each, every target)
#
# CI runs 20 s per target; a nightly job runs `scripts/fuzz.sh 3600`. The corpus grows in
# fuzz/corpus/ (OSSB_FUZZ_CORPUS) from one run to the next. The last lines print executions
# per second and in all, per target.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_PER_TARGET=${1:-20}
shift || true
ALL_TARGETS=(parse expand expand_nested dockerignore layer manifest frame docker_config)
TARGETS=("$@")
if [ $# -eq 0 ]; then TARGETS=("${ALL_TARGETS[@]}"); fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (cargo fuzz needs it): rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

root=$PWD
corpus=${OSSB_FUZZ_CORPUS:-$root/fuzz/corpus}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for t in "${ALL_TARGETS[@]}"; do mkdir -p "$corpus/$t"; done

seed() { # seed TARGET NAME < bytes
  cat >"$corpus/$1/seed-$2"
}

# The parser: the real Dockerfiles of the test data.
find dockerfile/testdata -type f \( -name 'Dockerfile*' -o -name '*.Dockerfile' \) -size -16k -print0 |
  xargs -0 -I{} sh -c 'cp "{}" "$1/parse/$(sha1sum "{}" | cut -c1-16)"' _ "$corpus"

# The layer applier: small layers as tar, gzip and zstd, with what layers hold (whiteouts,
# links, long names) and what hostile ones try (.., absolute names, links out).
tree=$logs/tree
mkdir -p "$tree/etc/sub" "$tree/opq"
echo hello >"$tree/etc/file"
ln "$tree/etc/file" "$tree/etc/hardlink"
ln -s /etc/passwd "$tree/etc/abs-link"
ln -s ../../.. "$tree/etc/sub/up"
: >"$tree/etc/.wh.gone"
: >"$tree/opq/.wh..wh..opq"
mkfifo "$tree/etc/fifo"
touch "$tree/etc/sub/$(printf 'n%.0s' $(seq 1 120))"
tar -C "$tree" --owner=1000 --group=1000 --xattrs -cf - . | seed layer plain.tar
tar -C "$tree" --format=posix -cf - . | gzip -n | seed layer pax.tar.gz
tar -C "$tree" --format=gnu -cf - . | zstd -q | seed layer gnu.tar.zst
tar -C "$tree" --transform 's,^\./etc,../escape,' -cf - ./etc | seed layer dotdot.tar
tar -C "$tree" -P --transform 's,^\./etc,/escape,' -cf - ./etc | seed layer absolute.tar

seed manifest oci-manifest.json <<'JSON'
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":9}],"annotations":{"a":"b"}}
JSON
seed manifest docker-list.json <<'JSON'
{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":7,"platform":{"architecture":"arm","os":"linux","variant":"v7"}}]}
JSON
seed manifest config.json <<'JSON'
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","X"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]},"history":[{"created_by":"x","empty_layer":true}]}
JSON
printf 'registry.example:5000/team/app:v1@sha256:%064d' 0 | seed manifest reference
seed docker_config auths.json <<'JSON'
{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"localhost:5000":{"username":"u","password":"p","identitytoken":""}}}
JSON
printf '{"ghcr.io":{"auth":"Og=="}}' | seed docker_config legacy.json
printf '${A:-${B:+x}}' | seed expand nested
printf '\x00\x00\x00\x00\x10\x0d' | seed expand_nested deep

cd fuzz
summary=()
for target in "${TARGETS[@]}"; do
  case $target in
  layer) max_len=65536 ;;
  expand_nested) max_len=1024 ;;
  *) max_len=4096 ;;
  esac
  echo "== cargo fuzz run $target for ${SECONDS_PER_TARGET}s"
  log=$logs/$target.log
  if ! cargo +nightly fuzz run "$target" "$corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len="$max_len" -timeout=60 \
    -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $target failed (a crash leaves its input in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  summary+=("$(printf '%-14s %12s execs %8s execs/s' "$target" "$execs" "$rate")")
done
echo "fuzz: no crash in ${SECONDS_PER_TARGET}s per target"
printf '  %s\n' "${summary[@]}"
