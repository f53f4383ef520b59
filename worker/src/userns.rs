//! Entering a user namespace for the whole build.
//!
//! `ossb build` runs inside a user namespace in which it is root: layer extraction can then
//! set any file owner, and each RUN sandbox can create its own mount, pid, uts and ipc
//! namespaces. `unshare(CLONE_NEWUSER)` refuses a multi-threaded caller, and the id maps of
//! a namespace must be written from outside it, so this happens first thing in `main`,
//! while the process has one thread: it forks; the child unshares and waits; the parent writes
//! the id maps (with `newuidmap`/`newgidmap` and the ranges of `/etc/subuid` when not root),
//! releases the child, which re-executes the binary inside the namespace, and then waits for
//! it and passes on its exit status and any termination signal.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe, ForkResult, Pid};

/// Set in the environment of the re-executed process; its value is the kind of id mapping.
pub const MARKER: &str = "OSSB_USERNS";

/// How the ids of the namespace map to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdMapping {
    /// The host root: every id maps to itself.
    Identity,
    /// 0 maps to the user and 1..=65536 to its subordinate range: `chown` works in RUN.
    Subordinate,
    /// Only 0 maps (to the user): files of other owners cannot be created.
    Single,
}

impl IdMapping {
    fn as_str(self) -> &'static str {
        match self {
            IdMapping::Identity => "identity",
            IdMapping::Subordinate => "subordinate",
            IdMapping::Single => "single",
        }
    }

    /// How the mapping is described to users.
    pub fn describe(self) -> &'static str {
        match self {
            IdMapping::Identity => "every id this process has (running as root)",
            IdMapping::Subordinate => "65536 subordinate ids",
            IdMapping::Single => "a single id",
        }
    }

    /// The mapping this process runs under, if it was re-executed in a user namespace.
    pub fn current() -> Option<IdMapping> {
        match std::env::var(MARKER).ok()?.as_str() {
            "identity" => Some(IdMapping::Identity),
            "subordinate" => Some(IdMapping::Subordinate),
            "single" => Some(IdMapping::Single),
            _ => None,
        }
    }
}

/// Whether the process runs as root (effective uid 0) in its current user namespace.
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Why the user namespace could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    /// The kernel refused `unshare(CLONE_NEWUSER)`.
    #[error("cannot create a user namespace: {errno}\n  hint: {hint}")]
    Refused {
        /// The kernel's answer.
        errno: nix::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// Writing the id maps failed.
    #[error("cannot map user ids into the build's user namespace: {0}\n  hint: install the uidmap package (newuidmap/newgidmap) and give the user ranges in /etc/subuid and /etc/subgid, e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $USER`")]
    Mapping(String),
    /// A system call of the set-up failed.
    #[error("setting up the user namespace failed: {0}")]
    Sys(String),
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; the pid is our own child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Re-executes the current command inside a new user namespace and returns the exit code to
/// exit with. Must be called while the process has a single thread.
pub fn reexec_in_user_namespace() -> Result<i32, UsernsError> {
    // Everything the child needs is allocated before fork.
    let args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.as_bytes()).map_err(|e| UsernsError::Sys(e.to_string())))
        .collect::<Result<_, _>>()?;
    let exe = CString::new("/proc/self/exe").map_err(|e| UsernsError::Sys(e.to_string()))?;
    let mapping = if nix::unistd::getuid().is_root() {
        IdMapping::Identity
    } else if subordinate_ranges().is_some() && has_tool("newuidmap") && has_tool("newgidmap") {
        IdMapping::Subordinate
    } else {
        IdMapping::Single
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != MARKER)
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(
        CString::new(format!("{MARKER}={}", mapping.as_str()))
            .map_err(|e| UsernsError::Sys(e.to_string()))?,
    );

    let sys = |what: &str| {
        let what = what.to_string();
        move |e: nix::Error| UsernsError::Sys(format!("{what}: {e}"))
    };
    let (to_parent_r, to_parent_w) = pipe().map_err(sys("pipe"))?;
    let (to_child_r, to_child_w) = pipe().map_err(sys("pipe"))?;

    // SAFETY: the process is single-threaded here (the caller's contract), so the child may
    // run arbitrary code after fork.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(to_parent_r);
            drop(to_child_w);
            child(to_parent_w, to_child_r, &exe, &args, &env)
        }
        ForkResult::Parent { child } => {
            drop(to_parent_w);
            drop(to_child_r);
            parent(child, mapping, to_parent_r, to_child_w)
        }
    }
}

fn child(
    to_parent: OwnedFd,
    to_child: OwnedFd,
    exe: &CString,
    args: &[CString],
    env: &[CString],
) -> ! {
    let mut to_parent = std::fs::File::from(to_parent);
    // If the outer process dies (kill -9 of the pid a supervisor knows), the build dies with
    // it instead of running on unseen in its namespace. The check after it closes the race
    // of a parent that died before the call.
    let parent = nix::unistd::getppid();
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if nix::unistd::getppid() != parent {
        // SAFETY: _exit is always safe in a forked child.
        unsafe { libc::_exit(125) };
    }
    match unshare(CloneFlags::CLONE_NEWUSER) {
        Ok(()) => {
            let _ = to_parent.write_all(b"u");
        }
        Err(e) => {
            let _ = to_parent.write_all(b"e");
            let _ = to_parent.write_all(&(e as i32).to_ne_bytes());
            // SAFETY: _exit is always safe; nothing needs unwinding in a forked child.
            unsafe { libc::_exit(125) };
        }
    }
    drop(to_parent);
    let mut go = [0u8; 1];
    let mut to_child = std::fs::File::from(to_child);
    if !matches!(to_child.read(&mut go), Ok(1)) || go[0] != b'g' {
        // SAFETY: as above.
        unsafe { libc::_exit(125) };
    }
    let _ = nix::unistd::execve(exe, args, env);
    // SAFETY: as above.
    unsafe { libc::_exit(127) }
}

fn parent(
    child: Pid,
    mapping: IdMapping,
    from_child: OwnedFd,
    to_child: OwnedFd,
) -> Result<i32, UsernsError> {
    let mut from_child = std::fs::File::from(from_child);
    let mut first = [0u8; 1];
    let refused = match from_child.read(&mut first) {
        Ok(1) if first[0] == b'u' => None,
        Ok(1) if first[0] == b'e' => {
            let mut raw = [0u8; 4];
            let _ = from_child.read_exact(&mut raw);
            Some(nix::Error::from_raw(i32::from_ne_bytes(raw)))
        }
        _ => Some(nix::Error::EIO),
    };
    if let Some(errno) = refused {
        let _ = waitpid(child, None);
        return Err(UsernsError::Refused {
            errno,
            hint: refusal_hint(errno),
        });
    }
    if let Err(e) = write_maps(child, mapping) {
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        return Err(e);
    }
    if mapping == IdMapping::Single {
        eprintln!(
            "warning: only one user id is mapped into the build's user namespace (no /etc/subuid range or no newuidmap): \
             files owned by other users in base images are created as root, and chown/useradd in RUN will fail. \
             To fix: install uidmap and add a range for this user to /etc/subuid and /etc/subgid."
        );
    }
    CHILD.store(child.as_raw(), Ordering::SeqCst);
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler only calls kill(2), which is async-signal-safe.
        unsafe { signal::signal(sig, SigHandler::Handler(forward_signal)) }
            .map_err(|e| UsernsError::Sys(e.to_string()))?;
    }
    let mut to_child = std::fs::File::from(to_child);
    to_child
        .write_all(b"g")
        .map_err(|e| UsernsError::Sys(format!("releasing the child: {e}")))?;
    drop(to_child);
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                return Err(UsernsError::Sys(format!(
                    "waiting for the build process: {e}"
                )))
            }
        }
    }
}

fn refusal_hint(errno: nix::Error) -> &'static str {
    match errno {
        nix::Error::EPERM | nix::Error::EACCES => {
            "unprivileged user namespaces are refused here. In a container, its seccomp profile refuses unshare \
             (the runtime default of containerd and Docker does, without CAP_SYS_ADMIN): run it with the profile \
             deploy/security-profiles/ossb-rootless.json (the runtime default plus what the RUN sandbox needs; in \
             Kubernetes seccompProfile Localhost, with hostUsers: false). On a host, enable them (sysctl \
             kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0). Or, as root in \
             the container, use --isolation chroot"
        }
        nix::Error::ENOSPC => "the limit of user namespaces is reached: raise sysctl user.max_user_namespaces",
        nix::Error::EINVAL => "the process was multi-threaded when it tried to unshare (a bug in ossb: please report it)",
        _ => "check that the kernel supports user namespaces (CONFIG_USER_NS)",
    }
}

fn write_maps(child: Pid, mapping: IdMapping) -> Result<(), UsernsError> {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let proc_file = |name: &str| format!("/proc/{}/{name}", child.as_raw());
    let write = |name: &str, content: &str| {
        std::fs::write(proc_file(name), content)
            .map_err(|e| UsernsError::Mapping(format!("writing {}: {e}", proc_file(name))))
    };
    match mapping {
        IdMapping::Identity => {
            // Only the ids this process's own namespace has: all of them on a host, 65536 in a
            // pod with `hostUsers: false` (where mapping more is refused).
            let needs_caps = |e: UsernsError| {
                match e {
                UsernsError::Mapping(m) => UsernsError::Mapping(format!(
                    "{m}; as root this needs the capabilities SETUID, SETGID and SETFCAP (in Kubernetes: securityContext.capabilities.add)"
                )),
                e => e,
            }
            };
            write("uid_map", &identity_map(&read_own_map("uid_map")?)).map_err(needs_caps)?;
            write("gid_map", &identity_map(&read_own_map("gid_map")?)).map_err(needs_caps)?;
        }
        IdMapping::Subordinate => {
            let ((us, uc), (gs, gc)) = subordinate_ranges()
                .ok_or_else(|| UsernsError::Mapping("no subordinate ids".into()))?;
            let pid = child.as_raw().to_string();
            run_map_tool(
                "newuidmap",
                &[
                    &pid,
                    "0",
                    &uid.to_string(),
                    "1",
                    "1",
                    &us.to_string(),
                    &uc.to_string(),
                ],
            )?;
            run_map_tool(
                "newgidmap",
                &[
                    &pid,
                    "0",
                    &gid.to_string(),
                    "1",
                    "1",
                    &gs.to_string(),
                    &gc.to_string(),
                ],
            )?;
        }
        IdMapping::Single => {
            write("setgroups", "deny")?;
            write("uid_map", &format!("0 {uid} 1\n"))?;
            write("gid_map", &format!("0 {gid} 1\n"))?;
        }
    }
    Ok(())
}

fn read_own_map(name: &str) -> Result<String, UsernsError> {
    let path = format!("/proc/self/{name}");
    std::fs::read_to_string(&path).map_err(|e| UsernsError::Mapping(format!("reading {path}: {e}")))
}

/// The map of a child namespace that keeps every id of `own` (the lines of this process's
/// `/proc/self/uid_map`: inside, outside, count) as it is.
pub(crate) fn identity_map(own: &str) -> String {
    own.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let inside = fields.next()?;
            let count = fields.nth(1)?;
            Some(format!("{inside} {inside} {count}\n"))
        })
        .collect()
}

fn run_map_tool(tool: &str, args: &[&str]) -> Result<(), UsernsError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| UsernsError::Mapping(format!("running {tool}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(UsernsError::Mapping(format!(
            "{tool} {} exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn has_tool(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// The user's `(start, count)` ranges in /etc/subuid and /etc/subgid, if both exist.
fn subordinate_ranges() -> Option<((u64, u64), (u64, u64))> {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    let find = |file: &str| -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let mut parts = line.trim().split(':');
            let who = parts.next()?;
            if who != uid.as_raw().to_string() && Some(who) != name.as_deref() {
                return None;
            }
            let start = parts.next()?.parse().ok()?;
            let count: u64 = parts.next()?.parse().ok()?;
            (count >= 65536).then_some((start, count.min(65536)))
        })
    };
    Some((find("/etc/subuid")?, find("/etc/subgid")?))
}

#[cfg(test)]
mod tests {
    use super::identity_map;

    #[test]
    fn identity_map_keeps_the_ids_of_the_own_namespace() {
        // a host
        assert_eq!(
            identity_map("         0          0 4294967295\n"),
            "0 0 4294967295\n"
        );
        // a pod with hostUsers: false, and a namespace of two extents
        assert_eq!(
            identity_map("         0 1879048192      65536\n"),
            "0 0 65536\n"
        );
        assert_eq!(
            identity_map("0 100000 1000\n1000 1000 1\n"),
            "0 0 1000\n1000 1000 1\n"
        );
    }
}
