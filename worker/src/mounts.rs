//! `RUN --mount`, on the build's side of the sandbox: where each mount's content comes from
//! (the build context, a finished stage, the persistent cache directory, a `--secret` file, a
//! fresh tmpfs), the locks of `sharing=locked|private` cache mounts, writable copies for
//! `rw` binds, and the cleanup that keeps mount targets out of the step's layer.
//!
//! [`prepare`] turns the planner's mounts into [`SandboxMount`]s for the sandbox and a
//! [`Prepared`] that holds the locks and temporary copies until it is dropped. Mount points the
//! sandbox has to create in the rootfs are listed beforehand; [`Prepared::cleanup`] removes them
//! after the step (when they are still empty) and restores the modification time of the
//! directory that held them, as BuildKit does, so they do not appear in the layer.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ossb_dockerfile::{Mount, MountType, Sharing, Source};

use crate::fs::resolve_in_root;
use crate::sandbox::{MountSource, SandboxMount};

/// Why a `RUN --mount` cannot be provided.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `type=secret,required` (or `env=`) names a secret the build was not given.
    #[error("secret {0:?} is required but was not given: pass it with --secret id={0},src=PATH")]
    MissingSecret(String),
    /// `from=` names an image that was not provided (a bug of the caller).
    #[error("RUN --mount from={0}: the image was not pulled")]
    ImageSource(String),
    /// A required `type=ssh` mount names an agent that was not given.
    #[error("RUN --mount=type=ssh,id={0} is required but no SSH agent was given for it: pass {hint}", hint = ssh_hint(.0))]
    MissingSsh(String),
    /// The agent of a `type=ssh` mount cannot be forwarded.
    #[error("RUN --mount=type=ssh,id={id}: cannot forward the SSH agent {agent}: {source} (is the agent running? check the --ssh socket)")]
    SshForward {
        /// The mount's id.
        id: String,
        /// The agent's socket (`--ssh`).
        agent: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `from=` names a stage that has not been built.
    #[error("RUN --mount from=: stage {0} has not been built")]
    StageMissing(usize),
    /// The source of a bind mount does not exist.
    #[error("RUN --mount source {source_path:?} not found in {from}")]
    SourceMissing {
        /// `source=` as written.
        source_path: String,
        /// "the build context" or "stage N".
        from: String,
    },
    /// A filesystem call failed.
    #[error("RUN --mount target {target}: {path}: {source}")]
    Io {
        /// The mount's target.
        target: String,
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Where a secret's value comes from. Neither form leaves a copy anywhere: a file is read when
/// a step mounts it, and a value lives in this process's memory and then in the step spec the
/// sandbox reads from a memfd. `Debug` never shows a value.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A file of the user's (`--secret id=,src=PATH`).
    File(PathBuf),
    /// A value (`--secret id=,env=VAR`, or a secret that reached a cluster worker).
    Value(SecretBytes),
}

impl Secret {
    /// The secret's bytes.
    pub fn read(&self) -> io::Result<Vec<u8>> {
        match self {
            Secret::File(path) => fs::read(path),
            Secret::Value(v) => Ok(v.0.clone()),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::File(path) => write!(f, "File({})", path.display()),
            Secret::Value(v) => v.fmt(f),
        }
    }
}

/// A secret's bytes, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret, {} bytes>", self.0.len())
    }
}

/// Where the content of mounts comes from.
#[derive(Clone, Debug)]
pub struct MountSources {
    /// The build context (`type=bind` without `from`).
    pub context: PathBuf,
    /// Rootfs of the finished stages, by plan position (`from=STAGE`).
    pub stages: HashMap<usize, PathBuf>,
    /// Unpacked images and named contexts, by name as written (`from=IMAGE`).
    pub images: HashMap<String, PathBuf>,
    /// The cache directory; cache mounts live in `CACHE_DIR/run-mounts/`.
    pub cache_dir: PathBuf,
    /// Secrets by id (`--secret`).
    pub secrets: BTreeMap<String, Secret>,
    /// SSH agent sockets by id (`--ssh`).
    pub ssh: BTreeMap<String, PathBuf>,
}

/// The `--ssh` flag that gives the agent of `id`.
fn ssh_hint(id: &str) -> String {
    if id == "default" {
        "--ssh default (the agent of $SSH_AUTH_SOCK)".into()
    } else {
        format!("--ssh {id}=SOCKET")
    }
}

/// The mounts of one step, ready for the sandbox, and what must live as long as the step.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The mounts, in the Dockerfile's order.
    pub mounts: Vec<SandboxMount>,
    /// `NAME=VALUE` for secrets with `env=`.
    pub env: Vec<String>,
    /// Secret values, to be masked in output.
    pub secret_values: Vec<String>,
    /// The target of the first `type=ssh` mount: `SSH_AUTH_SOCK` of a step that has none.
    pub ssh_auth_sock: Option<String>,
    /// Forwarded SSH agents, served until the step ends.
    forwards: Vec<crate::ssh::AgentForward>,
    /// Held until the step ends (cache `sharing=locked|private`, and shared locks).
    locks: Vec<fs::File>,
    /// Copies for `rw` binds, deleted when dropped.
    copies: Vec<tempfile::TempDir>,
    /// Every path of the mount points [`prepare`] created, parents first.
    created: Vec<PathBuf>,
}

impl Prepared {
    /// After the step: removes the mount points the sandbox created (when still empty) and
    /// restores the times of their parent directory, then releases locks and copies.
    pub fn cleanup(mut self) {
        for path in self.created.iter().rev() {
            remove_mount_point(path);
        }
        self.created.clear();
    }
}

/// Resolves the planner's `mounts` for a step on `rootfs`; may block (on cache locks), so call
/// it from a blocking context.
pub fn prepare(
    rootfs: &Path,
    mounts: &[Mount],
    sources: &MountSources,
) -> Result<Prepared, MountError> {
    let mut p = Prepared::default();
    for m in mounts {
        let source = match m.kind {
            MountType::Ssh => ssh(m, sources, &mut p)?,
            MountType::Tmpfs => Some(MountSource::Tmpfs { size: m.size }),
            MountType::Secret => secret(m, sources, &mut p)?,
            MountType::Bind => Some(bind(m, sources, &mut p)?),
            MountType::Cache => Some(cache(m, sources, &mut p)?),
        };
        let Some(source) = source else { continue };
        let target = resolve_in_root(rootfs, &m.target, true).map_err(|e| MountError::Io {
            target: m.target.clone(),
            path: rootfs.join(m.target.trim_start_matches('/')),
            source: io::Error::other(e.to_string()),
        })?;
        let dir = match &source {
            MountSource::Bind { path, .. } => path.is_dir(),
            MountSource::Tmpfs { .. } => true,
            MountSource::Secret { .. } => false,
        };
        create_mount_point(rootfs, &target, dir, &mut p).map_err(|e| MountError::Io {
            target: m.target.clone(),
            path: target.clone(),
            source: e,
        })?;
        let rel = target.strip_prefix(rootfs).unwrap_or(&target).to_path_buf();
        p.mounts.push(SandboxMount {
            target: rel,
            source,
        });
    }
    Ok(p)
}

/// Creates the missing components of `target` (directories; the last one a file when `dir` is
/// false) and records the first one for [`Prepared::cleanup`]. The times of the directory
/// that holds it are put back, so that the creation is not a change of the step.
fn create_mount_point(rootfs: &Path, target: &Path, dir: bool, p: &mut Prepared) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = target;
    while cur != rootfs && fs::symlink_metadata(cur).is_err() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(parent) => cur = parent,
            None => break,
        }
    }
    let Some(first) = missing.last().cloned() else {
        return Ok(());
    };
    let parent = first.parent().unwrap_or(rootfs).to_path_buf();
    let times = times_of(&parent);
    for path in missing.iter().rev() {
        p.created.push(path.clone());
        if path == target && !dir {
            fs::write(path, b"")?;
        } else {
            fs::create_dir(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        }
    }
    if let Some(t) = times {
        let _ = set_times(&parent, t);
    }
    Ok(())
}

/// The access and modification times of `path`.
pub(crate) fn times_of(path: &Path) -> Option<(libc::timespec, libc::timespec)> {
    let meta = fs::symlink_metadata(path).ok()?;
    let ts = |s: i64, ns: i64| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: ns as _,
    };
    Some((
        ts(meta.atime(), meta.atime_nsec()),
        ts(meta.mtime(), meta.mtime_nsec()),
    ))
}

/// Removes `path` if it is an empty directory or an empty file (what the step put there
/// stays), keeping the times of the directory that holds it (so a removed mount point is not a
/// change of the step).
pub(crate) fn remove_mount_point(path: &Path) {
    let parent = path.parent().map(Path::to_path_buf);
    let times = parent.as_deref().and_then(times_of);
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir(path);
        }
        Ok(m) if m.is_file() && m.len() == 0 => {
            let _ = fs::remove_file(path);
        }
        _ => return,
    }
    if let (Some(parent), Some(t)) = (parent, times) {
        let _ = set_times(&parent, t);
    }
}

fn secret(
    m: &Mount,
    sources: &MountSources,
    p: &mut Prepared,
) -> Result<Option<MountSource>, MountError> {
    let id = m.id.clone().unwrap_or_default();
    let Some(secret) = sources.secrets.get(&id) else {
        if m.required {
            return Err(MountError::MissingSecret(id));
        }
        // As BuildKit: an optional secret that was not given is simply absent.
        return Ok(None);
    };
    let content = secret.read().map_err(|source| MountError::Io {
        target: m.target.clone(),
        path: match secret {
            Secret::File(path) => path.clone(),
            Secret::Value(_) => PathBuf::from(format!("secret {id}")),
        },
        source,
    })?;
    let text = String::from_utf8_lossy(&content).into_owned();
    if !text.trim().is_empty() {
        p.secret_values.push(text.trim().to_string());
    }
    if let Some(name) = &m.env {
        p.env.push(format!("{name}={text}"));
        if m.target.is_empty() {
            return Ok(None);
        }
    }
    Ok(Some(MountSource::Secret {
        content: SecretBytes(content),
        uid: m.uid.unwrap_or(0),
        gid: m.gid.unwrap_or(0),
        mode: m.mode.unwrap_or(0o400),
    }))
}

/// An SSH agent forwarded for the step, or `None` for an optional mount without one.
fn ssh(
    m: &Mount,
    sources: &MountSources,
    p: &mut Prepared,
) -> Result<Option<MountSource>, MountError> {
    let id = m.id.clone().unwrap_or_else(|| "default".into());
    let Some(agent) = sources.ssh.get(&id) else {
        if m.required {
            return Err(MountError::MissingSsh(id));
        }
        // As BuildKit: an optional agent that was not given is simply absent.
        return Ok(None);
    };
    let forward = crate::ssh::AgentForward::start(
        agent,
        m.uid.unwrap_or(0),
        m.gid.unwrap_or(0),
        m.mode.unwrap_or(0o600),
    )
    .map_err(|source| MountError::SshForward {
        id,
        agent: agent.clone(),
        source,
    })?;
    let path = forward.socket().to_path_buf();
    p.forwards.push(forward);
    p.ssh_auth_sock.get_or_insert_with(|| m.target.clone());
    Ok(Some(MountSource::Bind {
        path,
        read_only: false,
    }))
}

/// The host directory a mount reads from: the context or a stage's rootfs.
fn source_root<'a>(m: &Mount, sources: &'a MountSources) -> Result<(&'a Path, String), MountError> {
    match &m.from {
        None => Ok((&sources.context, "the build context".into())),
        Some(Source::Stage(i)) => sources
            .stages
            .get(i)
            .map(|p| (p.as_path(), format!("stage {i}")))
            .ok_or(MountError::StageMissing(*i)),
        // Named contexts are in `images` by their name.
        Some(Source::Image(image) | Source::Context(image)) => sources
            .images
            .get(image)
            .map(|p| (p.as_path(), image.clone()))
            .ok_or_else(|| MountError::ImageSource(image.clone())),
    }
}

fn bind(m: &Mount, sources: &MountSources, p: &mut Prepared) -> Result<MountSource, MountError> {
    let (root, from) = source_root(m, sources)?;
    let rel = m.source.clone().unwrap_or_else(|| "/".into());
    let path = resolve_in_root(root, &rel, true).map_err(|e| MountError::Io {
        target: m.target.clone(),
        path: root.join(rel.trim_start_matches('/')),
        source: io::Error::other(e.to_string()),
    })?;
    if fs::symlink_metadata(&path).is_err() {
        return Err(MountError::SourceMissing {
            source_path: rel,
            from,
        });
    }
    if m.read_only {
        return Ok(MountSource::Bind {
            path,
            read_only: true,
        });
    }
    // rw: the step may write, but its writes must reach neither the source nor the image.
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        let target = m.target.clone();
        move |source| MountError::Io {
            target,
            path,
            source,
        }
    };
    let tmp_root = sources.cache_dir.join("run-mounts/tmp");
    fs::create_dir_all(&tmp_root).map_err(io_err(&tmp_root))?;
    let tmp = tempfile::Builder::new()
        .prefix("bind-")
        .tempdir_in(&tmp_root)
        .map_err(io_err(&tmp_root))?;
    let copy = tmp.path().join("c");
    copy_tree(&path, &copy).map_err(io_err(&path))?;
    p.copies.push(tmp);
    Ok(MountSource::Bind {
        path: copy,
        read_only: false,
    })
}

fn cache(m: &Mount, sources: &MountSources, p: &mut Prepared) -> Result<MountSource, MountError> {
    let id = m.id.clone().unwrap_or_else(|| m.target.clone());
    let base = sources.cache_dir.join("run-mounts/cache");
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        let target = m.target.clone();
        move |source| MountError::Io {
            target,
            path,
            source,
        }
    };
    fs::create_dir_all(&base).map_err(io_err(&base))?;
    let name = file_name_for(&id);
    let (dir, lock) = match m.sharing {
        Sharing::Shared => {
            let dir = base.join(&name);
            (
                dir.clone(),
                lock(&dir, libc::LOCK_SH).map_err(io_err(&dir))?,
            )
        }
        Sharing::Locked => {
            let dir = base.join(&name);
            (
                dir.clone(),
                lock(&dir, libc::LOCK_EX).map_err(io_err(&dir))?,
            )
        }
        Sharing::Private => {
            // The first instance nobody else holds; a new one when all are in use.
            let mut n = 0;
            loop {
                let dir = if n == 0 {
                    base.join(&name)
                } else {
                    base.join(format!("{name}.{n}"))
                };
                match lock(&dir, libc::LOCK_EX | libc::LOCK_NB) {
                    Ok(l) => break (dir, l),
                    Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => n += 1,
                    Err(e) => return Err(io_err(&dir)(e)),
                }
            }
        }
    };
    p.locks.push(lock);
    if fs::symlink_metadata(&dir).is_err() {
        // Created beside and renamed, so an interrupted build never leaves a half-seeded cache.
        let fresh = base.join(format!(".new-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&fresh);
        if m.from.is_some() {
            let (root, from) = source_root(m, sources)?;
            let rel = m.source.clone().unwrap_or_else(|| "/".into());
            let src = resolve_in_root(root, &rel, true).map_err(|e| MountError::Io {
                target: m.target.clone(),
                path: root.join(rel.trim_start_matches('/')),
                source: io::Error::other(e.to_string()),
            })?;
            if !src.is_dir() {
                return Err(MountError::SourceMissing {
                    source_path: rel,
                    from,
                });
            }
            copy_tree(&src, &fresh).map_err(io_err(&src))?;
        } else {
            fs::create_dir(&fresh).map_err(io_err(&fresh))?;
        }
        fs::set_permissions(&fresh, fs::Permissions::from_mode(m.mode.unwrap_or(0o755)))
            .map_err(io_err(&fresh))?;
        lchown(&fresh, Some(m.uid.unwrap_or(0)), Some(m.gid.unwrap_or(0)))
            .map_err(io_err(&fresh))?;
        fs::rename(&fresh, &dir).map_err(io_err(&dir))?;
    }
    Ok(MountSource::Bind {
        path: dir,
        read_only: m.read_only,
    })
}

/// A file name for a cache id: readable characters kept, others escaped, so that different
/// ids never share a directory.
pub(crate) fn file_name_for(id: &str) -> String {
    let mut s = String::from("id-");
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02x}"));
        }
    }
    s
}

/// Takes `flock(op)` on `DIR.lock`; the lock lasts as long as the returned file.
pub(crate) fn lock(dir: &Path, op: libc::c_int) -> io::Result<fs::File> {
    let mut name = dir.as_os_str().to_os_string();
    name.push(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PathBuf::from(name))?;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copies a file or a directory tree, keeping modes, owners (best effort), symlinks and times.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if ft.is_dir() {
        fs::create_dir(to)?;
        let mut names: Vec<_> = fs::read_dir(from)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            copy_tree(&from.join(&name), &to.join(&name))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        fs::copy(from, to)?;
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else {
        // Devices, fifos and sockets are not copied into a bind mount's copy.
        return Ok(());
    }
    let _ = lchown(to, Some(meta.uid()), Some(meta.gid()));
    Ok(())
}

pub(crate) fn set_times(
    path: &Path,
    (atime, mtime): (libc::timespec, libc::timespec),
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let times = [atime, mtime];
    // SAFETY: c is a valid NUL-terminated path and times points to two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: MountType, target: &str) -> Mount {
        Mount {
            kind,
            target: target.into(),
            source: None,
            from: None,
            read_only: !matches!(kind, MountType::Cache | MountType::Tmpfs),
            id: None,
            sharing: Sharing::Shared,
            mode: None,
            uid: None,
            gid: None,
            required: false,
            size: None,
            env: None,
        }
    }

    fn sources(dir: &Path) -> MountSources {
        MountSources {
            context: dir.join("ctx"),
            stages: HashMap::new(),
            images: HashMap::new(),
            cache_dir: dir.join("cache"),
            secrets: BTreeMap::new(),
            ssh: BTreeMap::new(),
        }
    }

    #[test]
    fn cache_ids_map_to_distinct_names() {
        assert_eq!(file_name_for("/root/.cache"), "id-%2froot%2f%2ecache");
        assert_ne!(file_name_for("a/b"), file_name_for("a%2fb"));
    }

    #[test]
    fn mount_points_are_removed_and_parent_times_restored() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("run")).unwrap();
        let before = fs::metadata(rootfs.join("run")).unwrap().mtime_nsec();
        let mut m = mount(MountType::Tmpfs, "/run/a/b");
        m.id = None;
        let p = prepare(&rootfs, &[m], &sources(dir.path())).unwrap();
        assert_eq!(p.mounts[0].target, Path::new("run/a/b"));
        assert!(rootfs.join("run/a/b").is_dir());
        p.cleanup();
        assert!(!rootfs.join("run/a").exists());
        assert_eq!(
            fs::metadata(rootfs.join("run")).unwrap().mtime_nsec(),
            before
        );
    }

    #[test]
    fn private_cache_mounts_get_their_own_instance_while_one_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        let mut m = mount(MountType::Cache, "/c");
        m.id = Some("x".into());
        m.sharing = Sharing::Private;
        m.uid = Some(0);
        m.mode = Some(0o700);
        let s = sources(dir.path());
        let first = prepare(&rootfs, &[m.clone()], &s).unwrap();
        let second = prepare(&rootfs, &[m.clone()], &s).unwrap();
        let path = |p: &Prepared| match &p.mounts[0].source {
            MountSource::Bind { path, .. } => path.clone(),
            other => panic!("{other:?}"),
        };
        assert_ne!(path(&first), path(&second));
        assert_eq!(fs::metadata(path(&first)).unwrap().mode() & 0o7777, 0o700);
        let p1 = path(&first);
        drop(first);
        let third = prepare(&rootfs, &[m], &s).unwrap();
        assert_eq!(path(&third), p1);
    }

    #[test]
    fn secrets_missing_fail_only_when_required() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        let mut m = mount(MountType::Secret, "/run/secrets/tok");
        m.id = Some("tok".into());
        let p = prepare(&rootfs, &[m.clone()], &sources(dir.path())).unwrap();
        assert!(p.mounts.is_empty());
        m.required = true;
        let e = prepare(&rootfs, &[m.clone()], &sources(dir.path())).unwrap_err();
        assert!(e.to_string().contains("--secret id=tok"), "{e}");
        let file = dir.path().join("tok.txt");
        fs::write(&file, "s3cr3t\n").unwrap();
        let mut s = sources(dir.path());
        s.secrets.insert("tok".into(), Secret::File(file));
        m.env = Some("TOKEN".into());
        let p = prepare(&rootfs, &[m], &s).unwrap();
        assert_eq!(p.env, vec!["TOKEN=s3cr3t\n".to_string()]);
        assert_eq!(p.secret_values, vec!["s3cr3t".to_string()]);
        assert!(matches!(
            p.mounts[0].source,
            MountSource::Secret { mode: 0o400, .. }
        ));
    }
}
