//! File operations on a rootfs that can never leave it: path resolution with the rootfs as
//! `/` (symlinks followed inside it, `..` clamped at its top), COPY from the build context,
//! WORKDIR creation and user lookup in the rootfs's own `/etc/passwd` and `/etc/group`.
//!
//! Resolution and use are not atomic, which is sound here because nothing else runs in the
//! rootfs while a step's files are written: RUN processes have exited before COPY begins.

use std::fs;
use std::io;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Errors of file steps.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A filesystem call failed on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The path involved (in the context or the rootfs).
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A COPY source does not exist in the build context.
    #[error("COPY source {0:?} not found in the build context (paths are relative to the context directory; check .dockerignore)")]
    SourceMissing(String),
    /// Several sources were copied to a destination that is not a directory.
    #[error("when copying several sources, the destination {0:?} must be a directory and end with a /")]
    DestNotDir(String),
    /// A symlink loop or a chain longer than the kernel's limit.
    #[error("too many levels of symbolic links resolving {0}")]
    SymlinkLoop(String),
    /// USER names an account the rootfs does not have.
    #[error("unable to find user {0}: no matching entries in the image's /etc/passwd")]
    UnknownUser(String),
    /// USER names a group the rootfs does not have.
    #[error("unable to find group {0}: no matching entries in the image's /etc/group")]
    UnknownGroup(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError::Io { path: path.to_path_buf(), source }
}

/// Resolves `path` (absolute or relative, interpreted from `/` of the rootfs) to a host path
/// inside `root`, following symlinks as the kernel would if `root` were `/`. When
/// `follow_last` is false a symlink in the final component is not followed. Components that do
/// not exist are kept as they are.
pub fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf, FsError> {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = components(Path::new(path));
    pending.reverse();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = root.join(resolved.iter().collect::<PathBuf>()).join(&part);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > 40 {
                    return Err(FsError::SymlinkLoop(path.to_string()));
                }
                let target = fs::read_link(&candidate).map_err(io_err(&candidate))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(part),
        }
    }
    Ok(root.join(resolved.iter().collect::<PathBuf>()))
}

/// The normal and `..` components of `path`, dropping `/` and `.`.
fn components(path: &Path) -> Vec<std::ffi::OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Ownership and mode to give copied files.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ownership {
    /// uid and gid for every copied file; Docker's default is 0:0.
    pub owner: (u32, u32),
    /// When set, the mode of every copied file and directory.
    pub mode: Option<u32>,
}

/// Copies `sources` (paths relative to the context, as written in the Dockerfile) from
/// `context` to `dest` (an absolute path in the rootfs), with Docker's rules: a directory's
/// contents are copied, not the directory; a destination ending in `/`, or several sources,
/// means a directory; missing parents are created.
pub fn copy_into(context: &Path, sources: &[String], rootfs: &Path, dest: &str, own: Ownership) -> Result<(), FsError> {
    let dest_is_dir = dest.ends_with('/') || sources.len() > 1;
    let target = resolve_in_root(rootfs, dest, true)?;
    if sources.len() > 1 && target.exists() && !target.is_dir() {
        return Err(FsError::DestNotDir(dest.to_string()));
    }
    for source in sources {
        let from = resolve_in_root(context, source, true)?;
        let meta = fs::symlink_metadata(&from).map_err(|_| FsError::SourceMissing(source.clone()))?;
        if meta.is_dir() {
            make_dirs(rootfs, &target)?;
            copy_tree(&from, &target, own)?;
        } else {
            let to = if dest_is_dir || target.is_dir() {
                make_dirs(rootfs, &target)?;
                target.join(from.file_name().unwrap_or_default())
            } else {
                if let Some(parent) = target.parent() {
                    make_dirs(rootfs, parent)?;
                }
                target.clone()
            };
            copy_entry(&from, &to, &meta, own)?;
        }
    }
    Ok(())
}

/// Creates `dir` (a host path inside `rootfs`) and its missing parents, root-owned 0755.
fn make_dirs(rootfs: &Path, dir: &Path) -> Result<(), FsError> {
    if dir.is_dir() || dir == rootfs {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_dirs(rootfs, parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(FsError::Io { path: dir.to_path_buf(), source: e }),
    }
}

fn copy_tree(from: &Path, to: &Path, own: Ownership) -> Result<(), FsError> {
    let mut entries: Vec<_> = fs::read_dir(from).map_err(io_err(from))?.collect::<Result<_, _>>().map_err(io_err(from))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&src).map_err(io_err(&src))?;
        if meta.is_dir() {
            if !dst.is_dir() {
                remove_existing(&dst)?;
                fs::create_dir(&dst).map_err(io_err(&dst))?;
            }
            copy_tree(&src, &dst, own)?;
            apply_metadata(&dst, &meta, own)?;
        } else {
            copy_entry(&src, &dst, &meta, own)?;
        }
    }
    let meta = fs::symlink_metadata(from).map_err(io_err(from))?;
    apply_metadata(to, &meta, own)
}

fn remove_existing(path: &Path) -> Result<(), FsError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => fs::remove_file(path).map_err(io_err(path)),
        Err(_) => Ok(()),
    }
}

/// Copies one non-directory entry; symlinks are copied as links, never followed.
fn copy_entry(from: &Path, to: &Path, meta: &fs::Metadata, own: Ownership) -> Result<(), FsError> {
    if to.is_dir() && !fs::symlink_metadata(to).map(|m| m.file_type().is_symlink()).unwrap_or(false) {
        return copy_entry(from, &to.join(from.file_name().unwrap_or_default()), meta, own);
    }
    remove_existing(to)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(from).map_err(io_err(from))?;
        std::os::unix::fs::symlink(&target, to).map_err(io_err(to))?;
        lchown(to, Some(own.owner.0), Some(own.owner.1)).map_err(io_err(to))?;
        return Ok(());
    }
    fs::copy(from, to).map_err(io_err(to))?;
    apply_metadata(to, meta, own)
}

fn apply_metadata(path: &Path, meta: &fs::Metadata, own: Ownership) -> Result<(), FsError> {
    lchown(path, Some(own.owner.0), Some(own.owner.1)).map_err(io_err(path))?;
    let mode = own.mode.unwrap_or(meta.mode() & 0o7777);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    let mtime = filetime_of(meta);
    set_mtime(path, mtime).map_err(io_err(path))
}

fn filetime_of(meta: &fs::Metadata) -> libc::timespec {
    libc::timespec { tv_sec: meta.mtime(), tv_nsec: meta.mtime_nsec() }
}

fn set_mtime(path: &Path, mtime: libc::timespec) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let times = [mtime, mtime];
    // SAFETY: c is a valid NUL-terminated path and times points to two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates the WORKDIR `dir` (absolute, in the rootfs) if missing, owned by `owner`.
pub fn make_workdir(rootfs: &Path, dir: &str, owner: (u32, u32)) -> Result<(), FsError> {
    let target = resolve_in_root(rootfs, dir, true)?;
    if target.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = target.as_path();
    while !cur.exists() && cur != rootfs {
        missing.push(cur.to_path_buf());
        cur = match cur.parent() {
            Some(p) => p,
            None => break,
        };
    }
    for d in missing.iter().rev() {
        fs::create_dir(d).map_err(io_err(d))?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io_err(d))?;
        lchown(d, Some(owner.0), Some(owner.1)).map_err(io_err(d))?;
    }
    Ok(())
}

/// A user resolved in the rootfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory, for $HOME.
    pub home: String,
}

/// Resolves a USER value (`name`, `uid`, `name:group`, `uid:gid`) against the rootfs's
/// `/etc/passwd` and `/etc/group`, as Docker does: a numeric uid needs no passwd entry.
pub fn lookup_user(rootfs: &Path, spec: &str) -> Result<User, FsError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_db(rootfs, "/etc/passwd");
    let groups_db = read_db(rootfs, "/etc/group");
    let entry = passwd.iter().find(|f| f.first().map(String::as_str) == Some(user_part) || (user_part.parse::<u32>().is_ok() && f.get(2).map(String::as_str) == Some(user_part)));
    let (uid, mut gid, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(f), _) => (
            f.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
            f.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
            f.first().cloned(),
            f.get(5).cloned().unwrap_or_else(|| "/".into()),
        ),
        (None, Ok(uid)) => (uid, 0, None, "/".into()),
        (None, Err(_)) => return Err(FsError::UnknownUser(user_part.to_string())),
    };
    if let Some(g) = group_part {
        gid = match groups_db.iter().find(|f| f.first().map(String::as_str) == Some(g)) {
            Some(f) => f.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
            None => g.parse().map_err(|_| FsError::UnknownGroup(g.to_string()))?,
        };
    }
    let mut groups = vec![gid];
    if let (Some(name), None) = (&name, group_part) {
        for f in &groups_db {
            let members = f.get(3).map(String::as_str).unwrap_or("");
            if members.split(',').any(|m| m == name) {
                if let Some(g) = f.get(2).and_then(|s| s.parse().ok()) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    Ok(User { uid, gid, groups, home })
}

fn read_db(rootfs: &Path, path: &str) -> Vec<Vec<String>> {
    let Ok(file) = resolve_in_root(rootfs, path, true) else { return Vec::new() };
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolution_never_leaves_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/tmp", root.join("abs")).unwrap();
        symlink("../../../../..", root.join("etc/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve_in_root(&root, "/abs/x", true).unwrap(), root.join("tmp/x"));
        assert_eq!(resolve_in_root(&root, "etc/up/etc/passwd", true).unwrap(), root.join("etc/passwd"));
        assert_eq!(resolve_in_root(&root, "/../../x", true).unwrap(), root.join("x"));
        assert_eq!(resolve_in_root(&root, "/abs", false).unwrap(), root.join("abs"));
        assert!(matches!(resolve_in_root(&root, "/loop/x", true), Err(FsError::SymlinkLoop(_))));
    }

    #[test]
    fn copies_with_docker_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(ctx.join("src/sub")).unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::write(ctx.join("a.txt"), "a").unwrap();
        fs::write(ctx.join("src/sub/b.txt"), "b").unwrap();
        let own = Ownership { owner: (0, 0), mode: None };
        copy_into(&ctx, &["a.txt".into()], &root, "/app/", own).unwrap();
        copy_into(&ctx, &["a.txt".into()], &root, "/renamed.txt", own).unwrap();
        copy_into(&ctx, &["src".into()], &root, "/dst", own).unwrap();
        assert_eq!(fs::read_to_string(root.join("app/a.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(root.join("renamed.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(root.join("dst/sub/b.txt")).unwrap(), "b");
        assert!(matches!(copy_into(&ctx, &["nope".into()], &root, "/x", own), Err(FsError::SourceMissing(_))));
    }

    #[test]
    fn copy_through_a_symlinked_destination_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&ctx).unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(ctx.join("f"), "x").unwrap();
        symlink(&outside, root.join("evil")).unwrap();
        copy_into(&ctx, &["f".into()], &root, "/evil/", Ownership::default()).unwrap();
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "wrote outside the rootfs");
        assert!(root.join(outside.strip_prefix("/").unwrap()).join("f").exists());
    }

    #[test]
    fn looks_up_users_like_docker() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n").unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\nwheel:x:10:app\n").unwrap();
        assert_eq!(lookup_user(root, "app").unwrap(), User { uid: 1000, gid: 1000, groups: vec![1000, 10], home: "/home/app".into() });
        assert_eq!(lookup_user(root, "4242").unwrap().gid, 0);
        assert_eq!(lookup_user(root, "app:wheel").unwrap().gid, 10);
        assert!(matches!(lookup_user(root, "ghost"), Err(FsError::UnknownUser(_))));
    }
}
