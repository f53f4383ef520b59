//! The RUN sandbox: a step's command in its own mount, pid, uts and ipc namespaces, with the
//! rootfs as `/`, a fresh `/proc`, a minimal `/dev`, a read-only `/sys`, and the host's
//! `/etc/hosts` and `/etc/resolv.conf`.
//!
//! The build process (already root in its user namespace, see [`crate::userns`]) starts
//! `ossb __sandbox SPEC` as a child; that fresh process is single-threaded, so it may unshare.
//! It forks the step's pid 1, which sets up the mounts, pivots into the rootfs, drops to the
//! step's user and execs the command. When pid 1 exits the kernel kills every other process
//! of the pid namespace, so nothing a step started outlives it.
//!
//! Every `unsafe` block and syscall of the sandbox is in this file.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Uid};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The subcommand of the ossb binary that runs [`child_main`].
pub const SUBCOMMAND: &str = "__sandbox";

/// Exit code of the sandbox when its own set-up failed (the message is on stderr, prefixed).
const SETUP_FAILED: i32 = 125;
const SETUP_PREFIX: &str = "ossb-sandbox: ";

/// Mount points the sandbox needs in the rootfs; see [`prepare_mount_points`].
pub const MOUNT_POINTS: &[(&str, bool)] = &[
    ("proc", true),
    ("dev", true),
    ("sys", true),
    ("etc/hosts", false),
    ("etc/resolv.conf", false),
];

/// How RUN steps are isolated (`--isolation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Isolation {
    /// Rootless when user namespaces work, else chroot.
    #[default]
    Auto,
    /// A user namespace, with mount, pid, uts and ipc namespaces per step.
    Rootless,
    /// chroot only, for pods that refuse namespaces (needs root in the container).
    Chroot,
}

/// What one RUN executes, passed to the sandbox process as a JSON file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    /// The rootfs, a host path.
    pub rootfs: PathBuf,
    /// The command; `argv[0]` is looked up in the PATH of `env` when it has no `/`.
    pub argv: Vec<String>,
    /// The environment, `K=V`.
    pub env: Vec<String>,
    /// The working directory inside the rootfs (exists).
    pub cwd: String,
    /// uid, gid and supplementary groups.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary gids.
    pub groups: Vec<u32>,
    /// The sandbox's hostname.
    pub hostname: String,
}

/// Why a RUN failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command ran and exited non-zero, or was killed.
    #[error("process \"{command}\" did not complete successfully: {status}{}", last_lines(.output))]
    Failed {
        /// The command as written.
        command: String,
        /// "exit code: N" or "killed by signal N".
        status: String,
        /// The exit code (128+signal when killed).
        code: i32,
        /// The last lines of its output.
        output: Vec<String>,
    },
    /// The sandbox could not be set up.
    #[error("cannot start the RUN sandbox: {0}")]
    Setup(String),
}

fn last_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n  last output lines:");
    for l in lines {
        s.push_str("\n    ");
        s.push_str(l);
    }
    s
}

/// Creates the missing mount points of [`MOUNT_POINTS`] in `rootfs` and returns those it
/// created, so the caller can remove them after the step: they must not end up in a layer.
pub fn prepare_mount_points(rootfs: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    for (rel, is_dir) in MOUNT_POINTS {
        let path = rootfs.join(rel);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        // Parents that are symlinks (an image's /etc -> elsewhere) are left alone: the mount
        // is then skipped by the sandbox, which refuses symlinked targets.
        let Some(parent) = path.parent() else {
            continue;
        };
        if !parent.is_dir()
            || fs::symlink_metadata(parent)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(true)
        {
            continue;
        }
        if *is_dir {
            fs::create_dir(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        } else {
            fs::write(&path, b"")?;
        }
        created.push(path);
    }
    Ok(created)
}

/// Removes the mount points [`prepare_mount_points`] created, if they are still empty.
pub fn remove_mount_points(created: &[PathBuf]) {
    for path in created.iter().rev() {
        let _ = match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir(path),
            Ok(m) if m.len() == 0 => fs::remove_file(path),
            _ => Ok(()),
        };
    }
}

/// Runs `spec` in a sandbox: `exe` is the ossb binary (which implements [`SUBCOMMAND`]).
/// Each output line is passed to `on_line` as it arrives; on failure the error holds the last
/// lines. `display` is the command as the user wrote it, for messages.
pub async fn run(
    exe: &Path,
    spec: &RunSpec,
    display: &str,
    mut on_line: impl FnMut(&str),
) -> Result<(), RunError> {
    let mut spec_file = tempfile::Builder::new()
        .prefix(".ossb-run-")
        .tempfile()
        .map_err(|e| RunError::Setup(format!("writing the step spec: {e}")))?;
    let json = serde_json::to_vec(spec).map_err(|e| RunError::Setup(e.to_string()))?;
    spec_file
        .write_all(&json)
        .map_err(|e| RunError::Setup(format!("writing the step spec: {e}")))?;

    let mut child = tokio::process::Command::new(exe)
        .arg(SUBCOMMAND)
        .arg(spec_file.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RunError::Setup(format!("starting {}: {e}", exe.display())))?;
    let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
    let stderr = child.stderr.take().map(|s| BufReader::new(s).lines());
    let (Some(mut stdout), Some(mut stderr)) = (stdout, stderr) else {
        return Err(RunError::Setup("no output pipes".into()));
    };
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut setup_error = None;
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let line = tokio::select! {
            l = stdout.next_line(), if out_open => match l { Ok(Some(l)) => Some(l), _ => { out_open = false; None } },
            l = stderr.next_line(), if err_open => match l { Ok(Some(l)) => Some(l), _ => { err_open = false; None } },
        };
        let Some(line) = line else { continue };
        if let Some(msg) = line.strip_prefix(SETUP_PREFIX) {
            setup_error = Some(msg.to_string());
            continue;
        }
        on_line(&line);
        if tail.len() == 10 {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| RunError::Setup(format!("waiting for the sandbox: {e}")))?;
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(SETUP_FAILED), _) if setup_error.is_some() => {
            Err(RunError::Setup(setup_error.unwrap_or_default()))
        }
        (Some(code), _) if code > 128 && code < 160 => Err(RunError::Failed {
            command: display.to_string(),
            status: format!("killed by signal {}", code - 128),
            code,
            output: tail.into(),
        }),
        (Some(code), _) => Err(RunError::Failed {
            command: display.to_string(),
            status: format!("exit code: {code}"),
            code,
            output: tail.into(),
        }),
        (None, sig) => Err(RunError::Failed {
            command: display.to_string(),
            status: format!("killed by signal {}", sig.unwrap_or(0)),
            code: 128 + sig.unwrap_or(0),
            output: tail.into(),
        }),
    }
}

/// The entry point of `ossb __sandbox SPEC`: returns the exit code of the step's command.
/// Must run in a fresh, single-threaded process.
pub fn child_main(spec_path: &Path) -> i32 {
    match sandbox(spec_path) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{SETUP_PREFIX}{msg}");
            SETUP_FAILED
        }
    }
}

fn sandbox(spec_path: &Path) -> Result<i32, String> {
    let bytes = fs::read(spec_path).map_err(|e| format!("reading {}: {e}", spec_path.display()))?;
    let spec: RunSpec = serde_json::from_slice(&bytes)
        .map_err(|e| format!("parsing {}: {e}", spec_path.display()))?;
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    unshare(flags).map_err(|e| {
        format!("unshare(mount, pid, uts, ipc namespaces): {e} (is ossb running in its user namespace? run `ossb build` directly, not the internal {SUBCOMMAND} command)")
    })?;
    // A status pipe: pid 1 reports set-up failures through it; a successful exec closes it.
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process is single-threaded (a fresh exec of the binary that has not started
    // any runtime), so the child may allocate and run ordinary code before exec.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(status_r);
            let err = enter_and_exec(&spec);
            let mut w = fs::File::from(status_w);
            let _ = w.write_all(err.as_bytes());
            // SAFETY: _exit is always safe in a forked child.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
        ForkResult::Parent { child } => {
            drop(status_w);
            let mut msg = String::new();
            let _ = fs::File::from(status_r).read_to_string(&mut msg);
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::Error::EINTR) => continue,
                    other => break other,
                }
            };
            if !msg.is_empty() {
                return Err(msg);
            }
            match status {
                Ok(WaitStatus::Exited(_, code)) => Ok(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => Ok(128 + sig as i32),
                other => Err(format!("waiting for the step: {other:?}")),
            }
        }
    }
}

/// In the step's pid 1: mounts, pivot_root, identity, exec. Returns only on failure.
fn enter_and_exec(spec: &RunSpec) -> String {
    match setup_root(spec).and_then(|()| become_user(spec)) {
        Ok(()) => exec(spec),
        Err(e) => e,
    }
}

fn setup_root(spec: &RunSpec) -> Result<(), String> {
    let root = &spec.rootfs;
    let none: Option<&str> = None;
    let sys = |what: String| move |e: nix::Error| format!("{what}: {e}");
    // Mounts made here must not propagate back to the host's namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(sys("making / private".into()))?;
    mount(
        Some(root),
        root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(sys(format!("bind-mounting {}", root.display())))?;

    if let Some(proc_dir) = mount_target(root, "proc", true) {
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        )
        .map_err(sys("mounting /proc".into()))?;
    }
    if let Some(dev) = mount_target(root, "dev", true) {
        setup_dev(&dev)?;
    }
    if let Some(sys_dir) = mount_target(root, "sys", true) {
        // Best effort: a locked-down host may refuse it, and few build steps need /sys.
        if mount(
            Some("/sys"),
            &sys_dir,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .is_ok()
        {
            let _ = mount(
                none,
                &sys_dir,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            );
        }
    }
    for file in ["etc/hosts", "etc/resolv.conf"] {
        let host = Path::new("/").join(file);
        if let Some(target) = mount_target(root, file, false) {
            if host.is_file() && mount(Some(&host), &target, none, MsFlags::MS_BIND, none).is_ok() {
                let _ = mount(
                    none,
                    &target,
                    none,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    none,
                );
            }
        }
    }

    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves the
    // rootfs as the only tree this process can reach.
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root".into()))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    nix::unistd::sethostname(&spec.hostname).map_err(sys("sethostname".into()))?;
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| format!("cannot enter the working directory {}: {e}", spec.cwd))?;
    Ok(())
}

/// The host path of a mount point in the rootfs, or `None` (and the mount is skipped) when it
/// is missing, of the wrong type, or reached through a symlink: following an image's symlink
/// here could mount over a host path.
fn mount_target(root: &Path, rel: &str, dir: bool) -> Option<PathBuf> {
    let mut cur = root.to_path_buf();
    for part in Path::new(rel).components() {
        cur.push(part);
        let m = fs::symlink_metadata(&cur).ok()?;
        if m.file_type().is_symlink() {
            return None;
        }
    }
    let m = fs::symlink_metadata(&cur).ok()?;
    (m.is_dir() == dir).then_some(cur)
}

fn setup_dev(dev: &Path) -> Result<(), String> {
    let none: Option<&str> = None;
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| format!("mounting /dev: {e}"))?;
    // Device nodes cannot be created in a user namespace; bind the host's instead.
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        fs::write(&target, b"").map_err(|e| format!("creating /dev/{name}: {e}"))?;
        mount(
            Some(&Path::new("/dev").join(name)),
            &target,
            none,
            MsFlags::MS_BIND,
            none,
        )
        .map_err(|e| format!("binding /dev/{name}: {e}"))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).map_err(|e| format!("creating /dev/pts: {e}"))?;
    // Best effort: a pty is rarely needed by a build step.
    if mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .is_ok()
    {
        let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
    }
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(|e| format!("creating /dev/shm: {e}"))?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| format!("mounting /dev/shm: {e}"))?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| format!("creating /dev/{name}: {e}"))?;
    }
    Ok(())
}

fn become_user(spec: &RunSpec) -> Result<(), String> {
    let groups: Vec<Gid> = spec.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // setgroups is denied when only one id is mapped; then only the primary group applies.
    if let Err(e) = nix::unistd::setgroups(&groups) {
        if e != nix::Error::EPERM {
            return Err(format!("setgroups: {e}"));
        }
    }
    nix::unistd::setresgid(
        Gid::from_raw(spec.gid),
        Gid::from_raw(spec.gid),
        Gid::from_raw(spec.gid),
    )
    .map_err(|e| {
        format!(
            "setgid {}: {e} (is gid {} mapped into the user namespace?)",
            spec.gid, spec.gid
        )
    })?;
    nix::unistd::setresuid(
        Uid::from_raw(spec.uid),
        Uid::from_raw(spec.uid),
        Uid::from_raw(spec.uid),
    )
    .map_err(|e| {
        format!(
            "setuid {}: {e} (is uid {} mapped into the user namespace?)",
            spec.uid, spec.uid
        )
    })?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(NO_NEW_PRIVS): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn exec(spec: &RunSpec) -> String {
    let Some(program) = spec.argv.first() else {
        return "empty command".into();
    };
    let path = match lookup_program(program, &spec.env) {
        Some(p) => p,
        None => return format!("exec: \"{program}\": executable file not found in $PATH"),
    };
    let to_c = |s: &[u8]| CString::new(s).unwrap_or_default();
    let argv: Vec<CString> = spec.argv.iter().map(|a| to_c(a.as_bytes())).collect();
    let env: Vec<CString> = spec.env.iter().map(|a| to_c(a.as_bytes())).collect();
    match nix::unistd::execve(&to_c(path.as_os_str().as_bytes()), &argv, &env) {
        Ok(never) => match never {},
        Err(e) => format!("exec {}: {e}", path.display()),
    }
}

/// Finds `program` in the PATH of the step's environment, as Docker does.
fn lookup_program(program: &str, env: &[String]) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
