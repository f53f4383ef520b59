#!/usr/bin/env python3
"""The last step of pod.sh: enter a container's root filesystem as a runtime does and exec its
command. pivot_root rather than chroot, so that the container can create user namespaces (the
kernel refuses CLONE_NEWUSER to a chrooted process) as it can in a real pod; the old root is
detached before the command runs, so nothing of the host stays visible. Then the capability
bounding set, no_new_privs, the user, and the container's environment only.

    enter.py ROOTFS --user UID:GID [--caps cap,cap] [--no-new-privs] [--env K=V]... -- CMD ARGS...

ROOTFS must be a mount point of a private mount namespace (pod.sh bind-mounts it on itself).
Without --caps the bounding set is left as it is; with it (even empty) only those remain.

    enter.py --userns -- CMD ARGS...

runs CMD in a new user namespace with ids 0-65535 mapped to themselves, standing in for a pod
with `hostUsers: false` (whose root is root of the pod's own user namespace of 65536 ids, with
capabilities only there); the namespaces CMD makes belong to it.
"""
import ctypes
import os
import platform
import sys

CAPS = [
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
]
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}[platform.machine()]
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
OLD_ROOT = ".pod-oldroot"

libc = ctypes.CDLL(None, use_errno=True)


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        sys.exit(f"enter.py: {what}: {os.strerror(err)}")


CLONE_NEWUSER = 0x10000000


def userns(cmd):
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        os.write(ready_w, b"u")
        if os.read(go_r, 1) != b"g":
            sys.exit("enter.py: the id maps were not written")
        os.setgid(0)
        os.setuid(0)
        os.execvp(cmd[0], cmd)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        os.write(fd, b"0 0 65536\n")
        os.close(fd)
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))


def main(argv):
    if argv[0] == "--userns":
        return userns(argv[2:])
    rootfs, user, caps, nnp, env = argv[0], "0:0", None, False, {}
    i = 1
    while argv[i] != "--":
        opt = argv[i]
        if opt == "--user":
            user, i = argv[i + 1], i + 2
        elif opt == "--caps":
            caps, i = [c for c in argv[i + 1].lower().split(",") if c], i + 2
        elif opt == "--no-new-privs":
            nnp, i = True, i + 1
        elif opt == "--env":
            k, _, v = argv[i + 1].partition("=")
            env[k], i = v, i + 2
        else:
            sys.exit(f"enter.py: unknown option {opt}")
    cmd = argv[i + 1:]
    uid, gid = (int(x) for x in user.split(":"))

    os.chdir(rootfs)
    if not os.path.isdir(OLD_ROOT):
        os.mkdir(OLD_ROOT)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", OLD_ROOT.encode()), "pivot_root")
    os.chdir("/")
    check(libc.umount2(("/" + OLD_ROOT).encode(), MNT_DETACH), "umount old root")

    if caps is not None:
        unknown = set(caps) - set(CAPS)
        if unknown:
            sys.exit(f"enter.py: unknown capabilities {sorted(unknown)}")
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for n in range(last + 1):
            if n >= len(CAPS) or CAPS[n] not in caps:
                check(libc.prctl(PR_CAPBSET_DROP, n, 0, 0, 0), f"drop capability {n}")
    if nnp:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)

    program = cmd[0]
    if "/" not in program:
        for d in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
            if os.access(os.path.join(d, program), os.X_OK):
                program = os.path.join(d, program)
                break
    try:
        os.execve(program, cmd, env)
    except OSError as e:
        sys.exit(f"enter.py: exec {program}: {e}")


main(sys.argv[1:])
