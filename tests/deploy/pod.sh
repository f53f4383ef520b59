#!/usr/bin/env bash
# Runs one container of a rendered pod spec the way a container runtime would, closely enough
# for the deploy tests: in the image's root filesystem (an unpacked `ossb build --output
# type=local` of deploy/Dockerfile), in new mount and pid namespaces (and a network namespace
# when given), with the pod's volumes bind-mounted at their mountPaths, a fresh /proc, the
# given /etc/hosts (what the headless Services resolve to), its own hostname (the pod's name),
# the container's environment only, its user, a capability bounding set and no_new_privs, and a
# read-only root when asked. The rootfs is entered with pivot_root (tests/deploy/enter.py), as a
# runtime does, so the container can make user namespaces as it can in a pod; --userns gives
# the pod a user namespace of its own (`hostUsers: false`).
#
#   pod.sh --rootfs DIR [--netns NS] [--userns] [--hosts FILE] [--hostname NAME] [--user UID:GID]
#          [--caps cap,cap] [--ro-root] [--no-new-privs] [--mount SRC:DST[:ro]]...
#          [--env K=V]... -- CMD ARGS...
#
# With --caps (even empty) only those capabilities stay in the bounding set. DIR is modified:
# mount points are created in it.
set -euo pipefail
all=("$@")
rootfs= netns= hosts= hostname= userns=0 user=0:0 caps= caps_given= ro_root=0 nnp=0 inner=0 mounts=() envs=()
while (($#)); do
  case $1 in
    --inner) inner=1; shift ;;
    --rootfs) rootfs=$2; shift 2 ;;
    --netns) netns=$2; shift 2 ;;
    --hosts) hosts=$2; shift 2 ;;
    --user) user=$2; shift 2 ;;
    --caps) caps=$2; caps_given=1; shift 2 ;;
    --hostname) hostname=$2; shift 2 ;;
    --userns) userns=1; shift ;;
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
  ((userns == 0)) || wrap+=(python3 "$(dirname "$0")/enter.py" --userns --)
  exec "${wrap[@]}" unshare --mount --pid --uts --fork --propagation private -- bash "$0" --inner "${all[@]}"
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
mkdir -p "$R/.pod-oldroot" # where enter.py puts the host's root before detaching it
((ro_root == 0)) || mount -o remount,bind,ro "$R"
enter=(--user "$user")
[[ -z $caps_given ]] || enter+=(--caps "$caps")
((nnp == 0)) || enter+=(--no-new-privs)
for e in "${envs[@]}"; do enter+=(--env "$e"); done
[[ -z $hostname ]] || hostname "$hostname"
exec python3 "$(dirname "$0")/enter.py" "$R" "${enter[@]}" -- "$@"
