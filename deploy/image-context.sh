#!/usr/bin/env bash
# Assembles the build context of deploy/Dockerfile: the ossb binary (and ossb-submit from the
# same directory, when there), stripped, every shared
# library that it and newuidmap/newgidmap load (as ldd lists them here, with the dynamic loader),
# a CA bundle, /etc/passwd, /etc/group, /etc/subuid, /etc/subgid for the user ossb (1000), and an
# empty /tmp and home directory.
#
#   deploy/image-context.sh OUT_DIR [OSSB_BINARY]     (default: target/release/ossb)
#
# Needs ldd, strip and newuidmap/newgidmap (Debian: libc-bin, binutils, uidmap) on the machine.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: deploy/image-context.sh OUT_DIR [OSSB_BINARY]}
bin=${2:-$here/../target/release/ossb}
[[ -x $bin ]] || { echo "error: $bin is not an executable (cargo build --release -p ossb-cli)" >&2; exit 1; }
for t in ldd strip newuidmap newgidmap; do
  command -v "$t" >/dev/null || { echo "error: $t not found (install libc-bin, binutils, uidmap)" >&2; exit 1; }
done
rm -rf "$out"
mkdir -p "$out/rootfs" "$out/etc/ssl/certs" "$out/tmp" "$out/home/.cache/ossb" "$out/home/.docker"
cp "$here/Dockerfile" "$out/Dockerfile"
mkdir -p "$out/bin"
strip -o "$out/bin/ossb" "$bin"
if [[ -x $(dirname "$bin")/ossb-submit ]]; then strip -o "$out/bin/ossb-submit" "$(dirname "$bin")/ossb-submit"; fi
cp "$(command -v newuidmap)" "$(command -v newgidmap)" "$out/"
chmod 0755 "$out/newuidmap" "$out/newgidmap"
# Every library ldd resolves (lines `name => /path (addr)` and the loader `/path (addr)`).
ldd "$bin" "$(command -v newuidmap)" "$(command -v newgidmap)" |
  sed -nE 's@^\s*(\S+ => )?(/\S+) \(0x[0-9a-f]+\)$@\2@p' | sort -u |
  while read -r lib; do
    real=$(readlink -f "$lib")
    mkdir -p "$out/rootfs$(dirname "$lib")"
    cp "$real" "$out/rootfs$lib"
  done
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/ca-certificates.crt"
fi
cat >"$out/etc/passwd" <<'P'
root:x:0:0:root:/root:/sbin/nologin
ossb:x:1000:1000:ossb:/home/ossb:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
P
cat >"$out/etc/group" <<'G'
root:x:0:
ossb:x:1000:
nogroup:x:65534:
G
echo "ossb:100000:65536" >"$out/etc/subuid"
echo "ossb:100000:65536" >"$out/etc/subgid"
printf 'hosts: files dns\npasswd: files\ngroup: files\n' >"$out/etc/nsswitch.conf"
chmod -R u=rwX,go=rX "$out/etc"
echo "$out"
