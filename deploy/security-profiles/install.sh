#!/bin/sh
# Installs the security profiles of ossb's rootless pods on a Kubernetes node, as root on the
# node or from the installer DaemonSet of this directory (the node's / mounted at --root):
#
#   - the seccomp profile ossb-rootless.json into the kubelet's seccomp directory, for
#     seccompProfile: {type: Localhost, localhostProfile: ossb-rootless.json};
#   - the AppArmor profile ossb-rootless into /etc/apparmor.d (loaded again at boot) and into the
#     kernel, when AppArmor is enabled, for
#     appArmorProfile: {type: Localhost, localhostProfile: ossb-rootless}.
#
#   install.sh [--root DIR] [--kubelet-dir DIR]      defaults: / and /var/lib/kubelet
#
# The AppArmor profile is compiled by the node's own apparmor_parser (run in --root with
# chroot). Where the parser knows the `userns,` rule (AppArmor 4: Ubuntu 23.10+, whose
# kernel.apparmor_restrict_unprivileged_userns confines user namespaces), it is added.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=/
kubelet=/var/lib/kubelet
while [ $# -gt 0 ]; do
  case $1 in
    --root) root=$2; shift 2 ;;
    --kubelet-dir) kubelet=$2; shift 2 ;;
    *) echo "install.sh: unknown option $1 (--root DIR, --kubelet-dir DIR)" >&2; exit 2 ;;
  esac
done
root=${root%/}

# seccomp: written beside, then renamed, so the kubelet never reads half a profile
dir=$root$kubelet/seccomp
mkdir -p "$dir"
cp "$here/ossb-rootless.json" "$dir/.ossb-rootless.json.new"
chmod 0644 "$dir/.ossb-rootless.json.new"
mv -f "$dir/.ossb-rootless.json.new" "$dir/ossb-rootless.json"
echo "seccomp: installed $kubelet/seccomp/ossb-rootless.json"

# AppArmor: only where the kernel has it enabled (the kubelet refuses AppArmor profiles on nodes
# without it: leave appArmorProfile out of the manifests there)
if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" != Y ]; then
  echo "apparmor: not enabled on this node: nothing to load"
  exit 0
fi
in_root() {
  if [ -z "$root" ]; then "$@"; else chroot "$root" "$@"; fi
}
parser=
for p in /sbin/apparmor_parser /usr/sbin/apparmor_parser; do
  if [ -x "$root$p" ]; then parser=$p; fi
done
if [ -z "$parser" ]; then
  echo "apparmor: enabled, but the node has no apparmor_parser (install the apparmor package)" >&2
  exit 1
fi
mkdir -p "$root/etc/apparmor.d"
new=$root/etc/apparmor.d/.ossb-rootless.new
# The AppArmor 4 variant first: abi 4.0 and the userns rule; the profile as shipped otherwise.
sed -e 's@^abi <abi/3.0>,@abi <abi/4.0>,@' -e '/^  pivot_root,$/a\
userns,' "$here/ossb-rootless.apparmor" >"$new"
if ! in_root "$parser" --skip-kernel-load --skip-cache "/etc/apparmor.d/.ossb-rootless.new" 2>/dev/null; then
  cp "$here/ossb-rootless.apparmor" "$new"
fi
mv -f "$new" "$root/etc/apparmor.d/ossb-rootless"
in_root "$parser" --replace /etc/apparmor.d/ossb-rootless
echo "apparmor: loaded ossb-rootless ($(grep -q '^userns,' "$root/etc/apparmor.d/ossb-rootless" && echo 'with userns' || echo 'AppArmor 3 rules'))"
