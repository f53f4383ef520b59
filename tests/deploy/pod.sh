#!/usr/bin/env bash
# Runs one container of a rendered pod spec the way a container runtime would, closely enough
# for the deploy tests: in the image's root filesystem (an unpacked `ossb build --output
# type=local` of deploy/Dockerfile), in new mount and pid namespaces (and a network namespace
# when given), with the pod's volumes bind-mounted at their mountPaths, a fresh /proc, the
# given /etc/hosts (what the headless Services resolve to), the container's environment only,
# its user, a capability bounding set and no_new_privs, and a read-only root when asked.
#
#   pod.sh --rootfs DIR [--netns NS] [--hosts FILE] [--user UID:GID] [--caps cap,cap]
#          [--ro-root] [--no-new-privs] [--mount SRC:DST[:ro]]... [--env K=V]... -- CMD ARGS...
#
# The bounding set always keeps SYS_CHROOT, SETUID and SETGID for the entry into the rootfs
# (chroot --userspec), which a runtime does before it drops capabilities. DIR is modified:
# mount points are created in it.
set -euo pipefail
all=("$@")
rootfs= netns= hosts= user=0:0 caps= ro_root=0 nnp=0 inner=0 mounts=() envs=()
while (($#)); do
  case $1 in
    --inner) inner=1; shift ;;
    --rootfs) rootfs=$2; shift 2 ;;
    --netns) netns=$2; shift 2 ;;
    --hosts) hosts=$2; shift 2 ;;
    --user) user=$2; shift 2 ;;
    --caps) caps=$2; shift 2 ;;
    --ro-root) ro_root=1; shift ;;
    --no-new-privs) nnp=1; shift ;;
    --mount) mounts+=("$2"); shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -d $rootfs && $# -gt 0 ]] || { echo "pod.sh: --rootfs DIR and a command are required" >&2; exit 2; }

if ((inner == 0)); then
  wrap=()
  [[ -z $netns ]] || wrap=(ip netns exec "$netns")
  exec "${wrap[@]}" unshare --mount --pid --fork --propagation private -- bash "$0" --inner "${all[@]}"
fi

R=$(cd "$rootfs" && pwd)
mount --bind "$R" "$R"
for m in "${mounts[@]}"; do
  IFS=: read -r src dst mode <<<"$m"
  if [[ -d $src ]]; then mkdir -p "$R$dst"; else mkdir -p "$(dirname "$R$dst")"; touch "$R$dst"; fi
  mount --bind "$src" "$R$dst"
  [[ $mode != ro ]] || mount -o remount,bind,ro "$R$dst"
done
mkdir -p "$R/proc" "$R/dev" "$R/etc"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
if [[ -n $hosts ]]; then
  [[ -e $R/etc/hosts ]] || touch "$R/etc/hosts"
  mount --bind "$hosts" "$R/etc/hosts"
fi
((ro_root == 0)) || mount -o remount,bind,ro "$R"
priv=()
if [[ -n $caps ]]; then
  bound=-all,+sys_chroot,+setuid,+setgid
  IFS=, read -ra list <<<"$caps"
  for c in "${list[@]}"; do [[ -z $c ]] || bound+=",+${c,,}"; done
  priv+=(--bounding-set "$bound")
fi
((nnp == 0)) || priv+=(--no-new-privs)
prefix=()
((${#priv[@]} == 0)) || prefix=(/usr/bin/setpriv "${priv[@]}" --)
exec /usr/bin/env -i "${envs[@]}" "${prefix[@]}" /usr/sbin/chroot --userspec="$user" "$R" "$@"
