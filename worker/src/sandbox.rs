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
//! Where the container refuses a fresh procfs or `sethostname` (a Pod Security "baseline" pod,
//! see [`crate::rootless`]), the rootless sandbox adapts under `--isolation auto`: the step
//! gets the container's `/proc` read-only, in the build's pid namespace, and a user namespace
//! of its own (its first process is then the sandbox's child, not a pid 1), or keeps the
//! container's hostname.
//!
//! With [`Isolation::Chroot`] there is no user namespace: the build runs as the container's
//! root. The sandbox then still takes mount, pid, uts and ipc namespaces when the container
//! allows it (CAP_SYS_ADMIN), and otherwise degrades to a plain `chroot` (see
//! [`Isolation::Chroot`] for what that loses). In every mode the sandbox process is a child
//! subreaper and kills whatever the step left running when it ends.
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

use crate::overlay::OverlayDirs;
use crate::rootless::Refusals;
use crate::step_output::{LogLimit, OutputLine, OutputStream};

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
    /// No user namespace: for pods that refuse them (as buildah's `--isolation chroot`). Needs
    /// root in the container. With CAP_SYS_ADMIN the step still gets its own mount, pid, uts
    /// and ipc namespaces and the same mounts as rootless. Without it (an ordinary container),
    /// the step is only `chroot`ed: it has no `/proc`, `/dev` holds device nodes made with
    /// mknod (CAP_MKNOD), it shares the pod's pid, uts, ipc and network namespaces (it can see
    /// and signal the pod's processes and change its hostname), `RUN --mount` and
    /// `--network=none` are refused, and it runs as real root of the container, so only the
    /// container's own isolation protects the node.
    Chroot,
}

impl Isolation {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Auto => "auto",
            Isolation::Rootless => "rootless",
            Isolation::Chroot => "chroot",
        }
    }
}

/// `RUN --network` as the sandbox applies it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// The build's own network (the host's, or the pod's).
    #[default]
    Host,
    /// A new network namespace with only the loopback interface, up.
    None,
}

/// A mount the sandbox makes in the rootfs before the step starts (`RUN --mount`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMount {
    /// Where, relative to the rootfs, already resolved inside it (no symlink components).
    /// Missing components are created as directories (the last one as a file for
    /// [`MountSource::Secret`] and file binds); the caller removes them after the step.
    pub target: PathBuf,
    /// What is mounted there.
    pub source: MountSource,
}

/// What a [`SandboxMount`] mounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSource {
    /// A host file or directory, bound.
    Bind {
        /// The host path.
        path: PathBuf,
        /// Mounted read-only.
        read_only: bool,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Its size limit in bytes.
        size: Option<u64>,
    },
    /// A secret, written to a file of the given owner and mode on the sandbox's own `/dev`
    /// tmpfs (never a disk, gone with the sandbox's mount namespace) and bound read-only on the
    /// target. The spec carrying it reaches the sandbox through a memfd, never a file.
    Secret {
        /// The value.
        content: crate::mounts::SecretBytes,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
        /// Permission bits.
        mode: u32,
    },
}

/// A file the sandbox writes into its `/dev` tmpfs before exec (a RUN heredoc script).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevFile {
    /// The path below `/dev`, e.g. `pipes/EOF`.
    pub name: String,
    /// The content.
    pub content: String,
    /// Permission bits.
    pub mode: u32,
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
    /// Rootless or chroot. [`Isolation::Auto`] means rootless, adapted to what the container
    /// allows; [`Isolation::Rootless`] (the user forced it) is the full sandbox or an error
    /// (see [`crate::rootless`]).
    #[serde(default)]
    pub isolation: Isolation,
    /// The network.
    #[serde(default)]
    pub network: Network,
    /// `RUN --mount`s, in order.
    #[serde(default)]
    pub mounts: Vec<SandboxMount>,
    /// Files to create under `/dev`.
    #[serde(default)]
    pub dev_files: Vec<DevFile>,
    /// The step's `/etc/hosts` when it is not the host's (`--add-host`).
    #[serde(default)]
    pub hosts: Option<PathBuf>,
    /// When set, the step runs on an overlay of `rootfs` (the lower directory, left unchanged)
    /// and writes into its upper directory; see [`crate::overlay`]. Needs the mount namespace:
    /// the sandbox fails rather than fall back to a plain chroot.
    #[serde(default)]
    pub overlay: Option<OverlayDirs>,
}

/// What an `ossb __sandbox` is asked to do: run a step, or probe overlayfs or what the
/// container allows a rootless sandbox.
#[derive(Deserialize, Serialize)]
enum Request {
    /// See [`probe_overlay`].
    OverlayProbe {
        /// The overlay to try.
        overlay: OverlayDirs,
        /// Its lower directory.
        lower: PathBuf,
    },
    /// See [`probe_rootless`].
    RootlessProbe,
    /// A step, with what its rootless sandbox must do without.
    Run {
        /// The step.
        spec: Box<RunSpec>,
        /// What the container refused to a rootless sandbox (empty in chroot isolation).
        refusals: Refusals,
    },
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
/// The times of the directories that hold them are kept, so neither their creation nor their
/// removal is a change of the step.
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
        let times = crate::mounts::times_of(parent);
        if *is_dir {
            fs::create_dir(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        } else {
            fs::write(&path, b"")?;
        }
        if let Some(t) = times {
            let _ = crate::mounts::set_times(parent, t);
        }
        created.push(path);
    }
    Ok(created)
}

/// Removes the mount points [`prepare_mount_points`] created, if they are still empty.
pub fn remove_mount_points(created: &[PathBuf]) {
    for path in created.iter().rev() {
        crate::mounts::remove_mount_point(path);
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
    let refusals = match spec.isolation {
        Isolation::Chroot => Refusals::default(),
        Isolation::Rootless | Isolation::Auto => {
            let forced = spec.isolation == Isolation::Rootless;
            let exe = exe.to_path_buf();
            tokio::task::spawn_blocking(move || {
                crate::rootless::refusals(&exe, forced, probe_rootless)
            })
            .await
            .map_err(|e| RunError::Setup(format!("probing the rootless sandbox: {e}")))?
            .map_err(RunError::Setup)?
        }
    };
    let request = request_memfd(&Request::Run {
        spec: Box::new(spec.clone()),
        refusals,
    })
    .map_err(|e| RunError::Setup(format!("writing the step spec: {e}")))?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg(SUBCOMMAND)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: see `give_request`.
    unsafe { command.pre_exec(give_request(&request)) };
    let mut child = command
        .spawn()
        .map_err(|e| RunError::Setup(format!("starting {}: {e}", exe.display())))?;
    drop(request);
    let limit = LogLimit::from_env();
    let stdout = child.stdout.take().map(|s| OutputStream::new(s, limit));
    let stderr = child.stderr.take().map(|s| OutputStream::new(s, limit));
    let (Some(mut stdout), Some(mut stderr)) = (stdout, stderr) else {
        return Err(RunError::Setup("no output pipes".into()));
    };
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut setup_error = None;
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let read = tokio::select! {
            r = stdout.next(), if out_open => { out_open = r.is_some(); r }
            r = stderr.next(), if err_open => { err_open = r.is_some(); r }
        };
        let line = match read {
            None => continue,
            Some(OutputLine::Line(line)) => {
                if let Some(msg) = line.strip_prefix(SETUP_PREFIX) {
                    setup_error = Some(msg.to_string());
                    continue;
                }
                on_line(&line);
                line
            }
            // Past the log limit: not shown, but kept as the last words of a failure.
            Some(OutputLine::Hidden(line)) => line,
        };
        if tail.len() == 10 {
            tail.pop_front();
        }
        tail.push_back(crate::step_output::clip_for_error(line));
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

/// Asks the kernel to SIGKILL this process when its parent dies (kept across exec), and exits
/// at once when the parent is already gone.
fn die_with_parent() {
    let parent = nix::unistd::getppid();
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if nix::unistd::getppid() != parent {
        // SAFETY: _exit is always safe.
        unsafe { libc::_exit(SETUP_FAILED) };
    }
}

/// Removes the step specs that ossb before the memfd (`.ossb-run-*` in the temporary directory)
/// left behind when a build was killed: they may hold secret values. Only this user's files, a
/// minute old or more, are touched. Returns how many were removed.
pub fn remove_stale_step_files() -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return 0;
    };
    let me = nix::unistd::geteuid().as_raw();
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().as_bytes().starts_with(b".ossb-run-") {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() >= 60);
        if meta.is_file() && meta.uid() == me && old && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The descriptor on which `ossb __sandbox` finds its request.
const REQUEST_FD: i32 = 3;

/// The request as a memfd: a step's spec carries secret values, and a memfd is on no
/// filesystem, so nothing is left behind when a build is killed (a spec file in /tmp was).
fn request_memfd(request: &Request) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::io::{Seek, SeekFrom};
    let fd =
        nix::sys::memfd::memfd_create(c"ossb-step-request", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(std::io::Error::from)?;
    let mut file = fs::File::from(fd);
    serde_json::to_writer(&mut file, request)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file.into())
}

/// What the child runs between fork and exec to find `request` on [`REQUEST_FD`].
///
/// SAFETY (for the caller of `pre_exec`): the closure runs in the forked child, where only
/// async-signal-safe calls are allowed; it makes only `dup2` and `fcntl`, which are. The
/// memfd itself is close-on-exec, so only the copy on [`REQUEST_FD`] reaches the sandbox.
fn give_request(
    request: &std::os::fd::OwnedFd,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    use std::os::fd::AsRawFd;
    let raw = request.as_raw_fd();
    move || {
        // SAFETY: plain descriptor calls on descriptors this process holds.
        let r = unsafe {
            if raw == REQUEST_FD {
                // dup2 onto itself would keep close-on-exec.
                libc::fcntl(raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, REQUEST_FD)
            }
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Reads the request the parent put on [`REQUEST_FD`], and closes it: the step must not
/// inherit it.
fn read_request() -> Result<Request, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: `give_request` placed the request on this descriptor before exec, and nothing
    // else in this fresh process owns it; the File closes it when dropped.
    let mut file = unsafe { fs::File::from_raw_fd(REQUEST_FD) };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("reading the step request on descriptor {REQUEST_FD}: {e} (ossb __sandbox is started by ossb itself)"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("parsing the step request: {e}"))
}

/// The entry point of `ossb __sandbox`: returns the exit code of the step's command.
/// Must run in a fresh, single-threaded process.
pub fn child_main() -> i32 {
    match sandbox() {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("{SETUP_PREFIX}{msg}");
            SETUP_FAILED
        }
    }
}

fn sandbox() -> Result<i32, String> {
    let (spec, refusals) = match read_request()? {
        Request::Run { spec, refusals } => (spec, refusals),
        Request::OverlayProbe { overlay, lower } => {
            return probe_child(&lower, &overlay).map(|()| 0)
        }
        Request::RootlessProbe => return rootless_probe_child().map(|()| 0),
    };
    // A build killed outright (SIGKILL cannot be handled) takes its step with it: this
    // process dies with its parent, and the step's first process dies with this one.
    die_with_parent();
    // Orphaned descendants of the step are re-parented to this process, so that
    // kill_leftovers finds them even without a pid namespace.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        ));
    }
    let layout = enter_namespaces(&spec, &refusals)?;
    let mut plain = PlainChroot::default();
    if layout == Layout::PlainChroot {
        plain = prepare_plain_chroot(&spec)?;
    }
    // A status pipe: pid 1 reports set-up failures through it; a successful exec closes it.
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // With the container's /proc, the step's first process makes a user namespace of its own,
    // which this process maps: "made" goes up this pipe, "mapped" down the other.
    let userns_sync = match layout {
        Layout::PodProc { .. } => Some((pipe_pair()?, pipe_pair()?)),
        _ => None,
    };
    // SAFETY: this process is single-threaded (a fresh exec of the binary that has not started
    // any runtime), so the child may allocate and run ordinary code before exec.
    let result = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(status_r);
            die_with_parent();
            let err = match userns_sync {
                Some(((_, made), (mapped, _))) => {
                    step_userns(&spec, made, mapped).err().unwrap_or_default()
                }
                None => String::new(),
            };
            let err = if err.is_empty() {
                enter_and_exec(&spec, layout)
            } else {
                err
            };
            let mut w = fs::File::from(status_w);
            let _ = w.write_all(err.as_bytes());
            // SAFETY: _exit is always safe in a forked child.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
        ForkResult::Parent { child } => {
            drop(status_w);
            let mapped = match userns_sync {
                Some(((made, _), (_, mapped))) => map_step_userns(child, made, mapped),
                None => Ok(()),
            };
            if mapped.is_err() {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            let mut msg = String::new();
            let _ = fs::File::from(status_r).read_to_string(&mut msg);
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::Error::EINTR) => continue,
                    other => break other,
                }
            };
            kill_leftovers();
            if let Err(e) = mapped {
                Err(e)
            } else if !msg.is_empty() {
                Err(msg)
            } else {
                match status {
                    Ok(WaitStatus::Exited(_, code)) => Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => Ok(128 + sig as i32),
                    other => Err(format!("waiting for the step: {other:?}")),
                }
            }
        }
    };
    undo_plain_chroot(&plain);
    result
}

/// How a step is confined; see [`enter_namespaces`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Mount, pid, uts and ipc namespaces of its own, unshared by the sandbox (the step is the
    /// pid namespace's pid 1), and a fresh /proc. `hostname`: it is set.
    Full { hostname: bool },
    /// The container refuses a fresh procfs: the step's first process makes a user namespace
    /// of its own (mapped by the sandbox to every id of the build's), then its mount, uts and
    /// ipc namespaces; it gets the container's /proc read-only and stays in the build's pid
    /// namespace, where pids agree with that /proc. Its own user namespace keeps it from
    /// ossb's processes and other steps through that /proc: reading their memory, files or
    /// environment needs capabilities in their user namespace.
    PodProc { hostname: bool },
    /// chroot isolation where the container allows no namespaces (no CAP_SYS_ADMIN).
    PlainChroot,
}

/// Unshares the step's namespaces, or leaves them to the step's process ([`Layout::PodProc`],
/// as `refusals` asks). Returns [`Layout::PlainChroot`] when, in chroot mode, the container
/// does not allow them.
fn enter_namespaces(spec: &RunSpec, refusals: &Refusals) -> Result<Layout, String> {
    let hostname = refusals.hostname.is_none();
    if refusals.fresh_proc.is_some() {
        return Ok(Layout::PodProc { hostname });
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if spec.network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    match unshare(flags) {
        Ok(()) => Ok(Layout::Full { hostname }),
        Err(nix::Error::EPERM) if spec.isolation == Isolation::Chroot => {
            if spec.overlay.is_some() {
                return Err("the step was to run on overlayfs, which needs a mount namespace this container does not allow (no CAP_SYS_ADMIN); a bug: the overlayfs probe should have refused".into());
            }
            if spec.network == Network::None {
                return Err("RUN --network=none needs a network namespace, which this container does not allow (no CAP_SYS_ADMIN) in chroot isolation: drop --network=none, or give the container CAP_SYS_ADMIN, or use --isolation rootless where user namespaces work".into());
            }
            if !spec.mounts.is_empty() {
                return Err("RUN --mount needs a mount namespace, which this container does not allow (no CAP_SYS_ADMIN) in chroot isolation: give the container CAP_SYS_ADMIN, or use --isolation rootless where user namespaces work".into());
            }
            Ok(Layout::PlainChroot)
        }
        Err(e) => Err(format!(
            "unshare(mount, pid, uts, ipc namespaces): {e} (is ossb running in its user namespace? run `ossb build` directly, not the internal {SUBCOMMAND} command)"
        )),
    }
}

/// A close-on-exec pipe as (read end, write end).
fn pipe_pair() -> Result<(fs::File, fs::File), String> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    Ok((fs::File::from(r), fs::File::from(w)))
}

/// In the step's first process ([`Layout::PodProc`]): a user namespace of its own, mapped by
/// the sandbox (`made` tells it, `mapped` answers), then the mount, uts and ipc (and network)
/// namespaces, owned by it. Its creator has every capability in it, so no id change is needed.
fn step_userns(spec: &RunSpec, mut made: fs::File, mut mapped: fs::File) -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("unshare(user namespace) for the step: {e}"))?;
    made.write_all(b"u")
        .map_err(|e| format!("telling the sandbox the step's user namespace is made: {e}"))?;
    drop(made);
    let mut go = [0u8; 1];
    if !matches!(mapped.read(&mut go), Ok(1)) || go[0] != b'g' {
        return Err("the sandbox did not map the step's user namespace".into());
    }
    die_with_parent();
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if spec.network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("unshare(mount, uts, ipc namespaces) for the step: {e}"))
}

/// In the sandbox: once the step's process says its user namespace is made, maps every id of
/// the build's user namespace to itself in it (as [`crate::userns`] maps the build's), and lets
/// it go on. A step that failed before (its message is on the status pipe) is not an error here.
fn map_step_userns(
    child: nix::unistd::Pid,
    mut made: fs::File,
    mut mapped: fs::File,
) -> Result<(), String> {
    let mut byte = [0u8; 1];
    if !matches!(made.read(&mut byte), Ok(1)) {
        return Ok(());
    }
    for name in ["uid_map", "gid_map"] {
        let own = fs::read_to_string(format!("/proc/self/{name}"))
            .map_err(|e| format!("reading /proc/self/{name}: {e}"))?;
        let path = format!("/proc/{}/{name}", child.as_raw());
        fs::write(&path, crate::userns::identity_map(&own))
            .map_err(|e| format!("mapping the step's user namespace: writing {path}: {e}"))?;
    }
    mapped
        .write_all(b"g")
        .map_err(|e| format!("releasing the step: {e}"))
}

/// Kills every process the step left behind: the sandbox is their subreaper, so each of them
/// is (or becomes, when its parent dies) a child of this process. In a pid namespace they are
/// already dead when pid 1 has exited; this matters for the plain chroot.
fn kill_leftovers() {
    let me = std::process::id().to_string();
    for _ in 0..100 {
        let mut found = false;
        if let Ok(dir) = fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                // The fields after the command name, which is in parentheses and may hold
                // spaces: state, ppid, ...
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1));
                if ppid == Some(me.as_str()) {
                    found = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // Reap what was killed (and anything re-parented meanwhile).
        loop {
            match waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::Error::EINTR) => continue,
                Err(_) => break,
            }
        }
        if !found {
            match waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Err(nix::Error::ECHILD) => return,
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }
}

/// In the step's first process (pid 1, or the chroot'ed child): mounts, pivot_root, identity,
/// exec. Returns only on failure.
fn enter_and_exec(spec: &RunSpec, layout: Layout) -> String {
    let root = match layout {
        Layout::Full { hostname } => setup_root(spec, Proc::Fresh, hostname),
        Layout::PodProc { hostname } => setup_root(spec, Proc::Container, hostname),
        Layout::PlainChroot => enter_plain_chroot(spec),
    };
    match root.and_then(|()| become_user(spec)) {
        Ok(()) => {
            // Changing the uid cleared the parent-death signal: set it again.
            die_with_parent();
            exec(spec)
        }
        Err(e) => e,
    }
}

/// The step's `/proc`.
#[derive(Clone, Copy)]
enum Proc {
    /// A procfs of its pid namespace.
    Fresh,
    /// The container's, with what the runtime masks in it, read-only ([`Layout::PodProc`]).
    Container,
}

fn setup_root(spec: &RunSpec, proc: Proc, hostname: bool) -> Result<(), String> {
    let none: Option<&str> = None;
    let sys = |what: String| move |e: nix::Error| format!("{what}: {e}");
    // Mounts made here must not propagate back to the host's namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(sys("making / private".into()))?;
    // On overlayfs the step's `/` is the merged directory; every mount below goes on top of it,
    // never into the upper directory, so none of them reaches the step's changes.
    let root = match &spec.overlay {
        Some(dirs) => {
            mount_overlay(&spec.rootfs, dirs)?;
            &dirs.merged
        }
        None => &spec.rootfs,
    };
    mount(
        Some(root),
        root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(sys(format!("bind-mounting {}", root.display())))?;
    if spec.network == Network::None {
        loopback_up()?;
    }

    if let Some(proc_dir) = mount_target(root, "proc", true) {
        match proc {
            Proc::Fresh => mount(
                Some("proc"),
                &proc_dir,
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                none,
            )
            .map_err(sys("mounting /proc".into()))?,
            Proc::Container => {
                // Recursive: the runtime's masks are mounts locked to /proc in a user
                // namespace, and a bind that would leave them behind is refused.
                mount(
                    Some("/proc"),
                    &proc_dir,
                    none,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    none,
                )
                .map_err(sys("binding the container's /proc".into()))?;
                remount_read_only(&proc_dir)
                    .map_err(sys("making the container's /proc read-only".into()))?;
            }
        }
    }
    let dev = mount_target(root, "dev", true);
    if let Some(dev) = &dev {
        setup_dev(dev)?;
        write_dev_files(dev, &spec.dev_files)?;
    } else if !spec.dev_files.is_empty() {
        return Err("the rootfs has no /dev directory to hold the RUN heredoc script".into());
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
            let _ = remount_read_only(&sys_dir);
        }
    }
    for file in ["etc/hosts", "etc/resolv.conf"] {
        let host = host_file(spec, file);
        if let Some(target) = mount_target(root, file, false) {
            if host.is_file() && mount(Some(&host), &target, none, MsFlags::MS_BIND, none).is_ok() {
                let _ = remount_read_only(&target);
            }
        }
    }
    for (i, m) in spec.mounts.iter().enumerate() {
        run_mount(root, dev.as_deref(), i, m)?;
    }

    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves the
    // rootfs as the only tree this process can reach.
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root".into()))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    if hostname {
        nix::unistd::sethostname(&spec.hostname).map_err(sys("sethostname".into()))?;
    }
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| format!("cannot enter the working directory {}: {e}", spec.cwd))?;
    Ok(())
}

/// Mounts the overlay of `dirs` with `lower` as its lower directory on `dirs.merged`. Called in
/// a mount namespace of the sandbox.
fn mount_overlay(lower: &Path, dirs: &OverlayDirs) -> Result<(), String> {
    let options = dirs.mount_options(lower);
    mount(
        Some("overlay"),
        &dirs.merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| {
        format!(
            "mounting overlayfs on {} ({options}): {e}",
            dirs.merged.display()
        )
    })
}

/// Runs `exe __sandbox` (a fresh, single-threaded process, as namespaces need) to mount the
/// overlay of `dirs` on `lower`, delete `g` and replace the directory `d` through it, and
/// unmount it. The caller checks what the upper directory recorded.
pub(crate) fn probe_overlay(exe: &Path, lower: &Path, dirs: &OverlayDirs) -> Result<(), String> {
    let request = Request::OverlayProbe {
        overlay: dirs.clone(),
        lower: lower.to_path_buf(),
    };
    let request = request_memfd(&request).map_err(|e| format!("writing the probe request: {e}"))?;
    let mut command = std::process::Command::new(exe);
    command.arg(SUBCOMMAND).stdin(Stdio::null());
    // SAFETY: see `give_request`.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, give_request(&request)) };
    let out = command
        .output()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(stderr.trim().trim_start_matches(SETUP_PREFIX).to_string())
}

/// The probe's child side: see [`probe_overlay`].
fn probe_child(lower: &Path, dirs: &OverlayDirs) -> Result<(), String> {
    let none: Option<&str> = None;
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(mount namespace): {e}"))?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("making / private: {e}"))?;
    mount_overlay(lower, dirs)?;
    let merged = &dirs.merged;
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what} through overlayfs: {e}")
    };
    fs::remove_file(merged.join("g")).map_err(io("deleting a file"))?;
    fs::remove_dir_all(merged.join("d")).map_err(io("deleting a directory"))?;
    fs::create_dir(merged.join("d")).map_err(io("creating a directory"))?;
    umount2(merged, MntFlags::empty()).map_err(|e| format!("unmounting the probe: {e}"))?;
    Ok(())
}

/// Runs `exe __sandbox` (a fresh, single-threaded process) to find what the container refuses
/// to a rootless step: in the namespaces a step gets, a fresh procfs and its hostname. An error
/// when even the namespaces or their mounts are refused: no rootless sandbox runs here.
pub(crate) fn probe_rootless(exe: &Path) -> Result<Refusals, String> {
    let request = request_memfd(&Request::RootlessProbe)
        .map_err(|e| format!("writing the probe request: {e}"))?;
    let mut command = std::process::Command::new(exe);
    command.arg(SUBCOMMAND).stdin(Stdio::null());
    // SAFETY: see `give_request`.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, give_request(&request)) };
    let out = command
        .output()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(stderr.trim().trim_start_matches(SETUP_PREFIX).to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "the rootless probe's answer {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The rootless probe's child side (see [`probe_rootless`]): the namespaces the sandbox
/// unshares for a step, then, in their pid 1, a fresh procfs (over `/proc`, in this private
/// mount namespace, gone with it) and the hostname. Prints the [`Refusals`] as JSON.
fn rootless_probe_child() -> Result<(), String> {
    let none: Option<&str> = None;
    die_with_parent();
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC,
    )
    .map_err(|e| format!("unshare(mount, pid, uts, ipc namespaces): {e}"))?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("mount(/, private): {e}{}", mount_refused_hint(e)))?;
    let (mut answer_r, answer_w) = pipe_pair()?;
    // SAFETY: this process is single-threaded (a fresh exec of the binary), so the child may
    // run ordinary code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(answer_r);
            let refusals = Refusals {
                fresh_proc: mount(
                    Some("proc"),
                    "/proc",
                    Some("proc"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    none,
                )
                .err()
                .map(|e| format!("mount(proc): {e}")),
                hostname: nix::unistd::sethostname("ossb")
                    .err()
                    .map(|e| format!("sethostname: {e}")),
            };
            let _ = serde_json::to_writer(answer_w, &refusals);
            // SAFETY: _exit is always safe in a forked child.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(answer_w);
            let mut answer = String::new();
            let _ = answer_r.read_to_string(&mut answer);
            while let Err(nix::Error::EINTR) = waitpid(child, None) {}
            let refusals: Refusals = serde_json::from_str(&answer)
                .map_err(|e| format!("the probe's pid 1 answered {answer:?}: {e}"))?;
            let text = serde_json::to_string(&refusals).map_err(|e| e.to_string())?;
            std::io::stdout()
                .write_all(text.as_bytes())
                .map_err(|e| format!("writing the probe's answer: {e}"))
        }
    }
}

/// Why a mount in the sandbox's own namespaces, where it has every capability, is refused:
/// EACCES there comes from a security module (the runtime's default AppArmor profile denies
/// every mount).
fn mount_refused_hint(e: nix::Error) -> String {
    if e != nix::Error::EACCES {
        return String::new();
    }
    let label = [
        "/proc/self/attr/apparmor/current",
        "/proc/self/attr/current",
    ]
    .iter()
    .find_map(|f| fs::read_to_string(f).ok())
    .map(|l| l.trim_end_matches(['\0', '\n']).to_string())
    .filter(|l| !l.is_empty());
    let by = label.map_or_else(
        || "a security module".to_string(),
        |l| format!("the security label {l}"),
    );
    format!(
        " (the container's {by} denies mount, as the runtime's default AppArmor profile does: \
         load the AppArmor profile of deploy/security-profiles and run ossb under it, \
         appArmorProfile Localhost ossb-rootless in Kubernetes; or use --isolation chroot as root)"
    )
}

/// Makes one `RUN --mount` under `root`; `dev` is the sandbox's `/dev` tmpfs (where secrets
/// are staged).
fn run_mount(
    root: &Path,
    dev: Option<&Path>,
    index: usize,
    m: &SandboxMount,
) -> Result<(), String> {
    let none: Option<&str> = None;
    let is_file = match &m.source {
        MountSource::Bind { path, .. } => !path.is_dir(),
        MountSource::Tmpfs { .. } => false,
        MountSource::Secret { .. } => true,
    };
    let target = make_mount_point(root, &m.target, !is_file)?;
    let shown = Path::new("/").join(&m.target);
    match &m.source {
        MountSource::Bind { path, read_only } => {
            mount(
                Some(path),
                &target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )
            .map_err(|e| format!("binding {} on {}: {e}", path.display(), shown.display()))?;
            if *read_only {
                remount_read_only(&target)
                    .map_err(|e| format!("making {} read-only: {e}", shown.display()))?;
            }
        }
        MountSource::Tmpfs { size } => {
            let opts = size.map(|s| format!("size={s}"));
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                opts.as_deref(),
            )
            .map_err(|e| format!("mounting a tmpfs on {}: {e}", shown.display()))?;
        }
        MountSource::Secret {
            content,
            uid,
            gid,
            mode,
        } => {
            let Some(dev) = dev else {
                return Err("the rootfs has no /dev directory to stage the secret in".into());
            };
            // Staged on the /dev tmpfs, bound on the target, then unlinked: the bind mount
            // keeps the file alive, and no other path in the sandbox names it.
            let staged = dev.join(format!(".ossb-secret-{index}"));
            fs::write(&staged, &content.0).map_err(|e| format!("staging a secret: {e}"))?;
            fs::set_permissions(&staged, fs::Permissions::from_mode(*mode))
                .map_err(|e| format!("staging a secret: {e}"))?;
            nix::unistd::chown(
                &staged,
                Some(Uid::from_raw(*uid)),
                Some(Gid::from_raw(*gid)),
            )
            .map_err(|e| format!("secret owner {uid}:{gid}: {e}"))?;
            mount(Some(&staged), &target, none, MsFlags::MS_BIND, none)
                .map_err(|e| format!("mounting the secret on {}: {e}", shown.display()))?;
            let _ = remount_read_only(&target);
            fs::remove_file(&staged).map_err(|e| format!("staging a secret: {e}"))?;
        }
    }
    Ok(())
}

/// Creates the missing components of `rel` under `root` (directories; the last one a file
/// when `dir` is false) without following symlinks, and returns the host path.
fn make_mount_point(root: &Path, rel: &Path, dir: bool) -> Result<PathBuf, String> {
    let mut cur = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let std::path::Component::Normal(name) = part else {
            return Err(format!(
                "mount target {} is not a plain path",
                rel.display()
            ));
        };
        cur.push(name);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "mount target /{} goes through a symbolic link",
                    rel.display()
                ))
            }
            Ok(m) if last && m.is_dir() != dir => {
                return Err(format!(
                    "mount target /{} is a {} but the mount is a {}",
                    rel.display(),
                    if m.is_dir() { "directory" } else { "file" },
                    if dir { "directory" } else { "file" }
                ))
            }
            Ok(_) => {}
            Err(_) if last && !dir => {
                fs::write(&cur, b"").map_err(|e| format!("creating /{}: {e}", rel.display()))?
            }
            Err(_) => {
                fs::create_dir(&cur).map_err(|e| format!("creating /{}: {e}", rel.display()))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("creating /{}: {e}", rel.display()))?;
            }
        }
    }
    Ok(cur)
}

/// Remounts a bind mount read-only. In a user namespace the flags the mount inherited from a
/// more privileged namespace (nosuid, nodev, noexec) are locked and must be repeated.
fn remount_read_only(target: &Path) -> Result<(), nix::Error> {
    let none: Option<&str> = None;
    let base = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if mount(none, target, none, base, none).is_ok() {
        return Ok(());
    }
    let st = nix::sys::statvfs::statvfs(target)?;
    let f = st.flags();
    use nix::sys::statvfs::FsFlags;
    let mut flags = base;
    for (have, add) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(have) {
            flags |= add;
        }
    }
    mount(none, target, none, flags, none)
}

/// Sets the loopback interface of a new network namespace up (`--network=none`).
fn loopback_up() -> Result<(), String> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data (names and a union of integers); all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass, which lives across
    // the calls; the flags member of its union is the one these requests use.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(format!(
                "reading the loopback flags: {}",
                std::io::Error::last_os_error()
            ));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(format!(
                "setting the loopback interface up: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Writes the heredoc scripts into the sandbox's `/dev` (a tmpfs: they never reach a layer).
fn write_dev_files(dev: &Path, files: &[DevFile]) -> Result<Vec<PathBuf>, String> {
    let mut created = Vec::new();
    for f in files {
        let rel = Path::new(&f.name);
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!("invalid heredoc file name /dev/{}", f.name));
        }
        let path = dev.join(rel);
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                fs::create_dir_all(parent)
                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
                created.push(parent.to_path_buf());
            }
        }
        fs::write(&path, &f.content).map_err(|e| format!("writing /dev/{}: {e}", f.name))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(f.mode))
            .map_err(|e| format!("writing /dev/{}: {e}", f.name))?;
        created.push(path);
    }
    Ok(created)
}

/// The device nodes of a plain chroot's `/dev`.
const PLAIN_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Before a plain chroot (no mount namespace): device nodes and heredoc files in the rootfs's
/// `/dev` (excluded from snapshots), and the host's hosts/resolv.conf in the empty files made
/// for them. Returns what it created, for [`undo_plain_chroot`].
fn prepare_plain_chroot(spec: &RunSpec) -> Result<PlainChroot, String> {
    let mut created = Vec::new();
    let mut filled = Vec::new();
    if let Some(dev) = mount_target(&spec.rootfs, "dev", true) {
        for (name, major, minor) in PLAIN_DEVICES {
            let path = dev.join(name);
            if fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            // Best effort: without CAP_MKNOD the step has no device nodes.
            if nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(*major, *minor),
            )
            .is_ok()
            {
                let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o666));
                created.push(path);
            }
        }
        created.extend(write_dev_files(&dev, &spec.dev_files)?);
    } else if !spec.dev_files.is_empty() {
        return Err("the rootfs has no /dev directory to hold the RUN heredoc script".into());
    }
    for file in ["etc/hosts", "etc/resolv.conf"] {
        if let Some(target) = mount_target(&spec.rootfs, file, false) {
            let empty = fs::metadata(&target).map(|m| m.len() == 0).unwrap_or(false);
            if empty {
                if let Ok(content) = fs::read(host_file(spec, file)) {
                    if fs::write(&target, content).is_ok() {
                        filled.push(target);
                    }
                }
            }
        }
    }
    Ok(PlainChroot { created, filled })
}

/// The file whose content the step sees at `file` (`etc/hosts` or `etc/resolv.conf`).
fn host_file(spec: &RunSpec, file: &str) -> PathBuf {
    match &spec.hosts {
        Some(hosts) if file == "etc/hosts" => hosts.clone(),
        _ => Path::new("/").join(file),
    }
}

/// What [`prepare_plain_chroot`] changed in the rootfs.
#[derive(Default)]
struct PlainChroot {
    /// Device nodes, heredoc files and their directories.
    created: Vec<PathBuf>,
    /// Empty files it filled with the host's content.
    filled: Vec<PathBuf>,
}

/// Removes what [`prepare_plain_chroot`] created and empties the files it filled, so that the
/// mount points are found empty again (and removed) by [`remove_mount_points`].
fn undo_plain_chroot(changed: &PlainChroot) {
    for path in changed.created.iter().rev() {
        let _ = fs::remove_file(path).or_else(|_| fs::remove_dir(path));
    }
    for path in &changed.filled {
        let _ = fs::write(path, b"");
    }
}

/// In the child of a plain chroot: chroot, chdir.
fn enter_plain_chroot(spec: &RunSpec) -> Result<(), String> {
    nix::unistd::chroot(&spec.rootfs).map_err(|e| {
        format!(
            "chroot {}: {e} (chroot isolation needs root with CAP_SYS_CHROOT in the container)",
            spec.rootfs.display()
        )
    })?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
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
    default_signals();
    match nix::unistd::execve(&to_c(path.as_os_str().as_bytes()), &argv, &env) {
        Ok(never) => match never {},
        Err(e) => format!("exec {}: {e}", path.display()),
    }
}

/// Gives the step every signal at its default disposition and none blocked, as a container
/// starts under Docker. Rust's runtime ignores SIGPIPE in this process and an ignored signal
/// stays ignored across exec: `yes | head` in a step then never ended.
fn default_signals() {
    // The kernel's struct sigaction, all zero: SIG_DFL, no flags, an empty mask (whatever the
    // field order of the architecture). The raw call because libc refuses the signals it keeps
    // for itself (32 and 33), which something in ossb's process ignores too.
    let dfl = [0u64; 4];
    for sig in 1..=64 {
        // SAFETY: rt_sigaction reads 8 bytes of mask after the handler fields, all inside
        // `dfl`, and writes nothing (no old action); it fails harmlessly for SIGKILL and
        // SIGSTOP.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
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
