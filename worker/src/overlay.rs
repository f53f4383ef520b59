//! RUN steps on kernel overlayfs: the step writes into a fresh upper directory above the stage's
//! rootfs, and its change list is read from that upper directory alone, so a step costs time in
//! proportion to what it changed, not to the size of the rootfs.
//!
//! [`supported`] probes once per filesystem (in a throwaway `ossb __sandbox` child: the build
//! process never unshares) whether an overlay can be mounted there with `userxattr` (kernel
//! 5.11 or later, in the build's user namespace or as root with CAP_SYS_ADMIN) and whether it
//! records whiteouts and opaque directories. [`Upper::create`] makes the upper and work
//! directories beside the rootfs (same filesystem, so that merging is renaming); the sandbox
//! mounts `lowerdir=ROOTFS,upperdir=UPPER,workdir=WORK` on [`OverlayDirs::merged`] and pivots
//! into it (see [`crate::sandbox`]). After the step, [`Upper::merge`] walks the upper directory,
//! lists the changes exactly as [`crate::snapshot::Snapshot::diff`] would have listed them for
//! the same change, and moves the upper's content into the rootfs, which then holds the new
//! state for later steps and for the layer writer.
//!
//! How the upper directory maps to changes:
//! - a character device 0/0 is a whiteout: the path is [`ChangeKind::Deleted`];
//! - a directory with the opaque xattr (`user.overlay.opaque=y`) hides everything below it in
//!   the rootfs: the rootfs entries the upper directory does not hold are `Deleted` one by one
//!   (as the metadata diff lists them, rather than an OCI `.wh..wh..opq`, so that both ways give
//!   the same layer bytes), and everything below it is new;
//! - any other entry is `Added` (nothing in the rootfs) or `Modified`; a non-directory copied up
//!   without any change (a file opened for writing and left alone) is not a change;
//! - a directory that exists in both is `Modified` when its mode, owner, mtime or xattrs differ
//!   (a directory copied up only because something below it changed is not itself a change).
//!
//! Known differences from the metadata fallback, as in Docker's and BuildKit's overlay
//! snapshotters: modifying a file that has other hard links in the rootfs copies it up, which
//! breaks the link (the other names keep the old content and are not in the layer); renaming a
//! directory that comes from the rootfs fails with EXDEV (`redirect_dir` stays off), so `mv`
//! copies it instead.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use ossb_image::layer::{Change, ChangeKind};
use serde::{Deserialize, Serialize};

/// Where the sandbox mounts the overlay of one RUN step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayDirs {
    /// The upper directory: everything the step writes.
    pub upper: PathBuf,
    /// overlayfs's work directory (same filesystem as `upper`).
    pub work: PathBuf,
    /// The empty directory the overlay is mounted on, which the step sees as `/`.
    pub merged: PathBuf,
}

impl OverlayDirs {
    /// The mount options for a lower directory (already checked to hold no comma or colon).
    /// `userxattr` keeps overlay's own xattrs in the `user.` namespace, which a user namespace
    /// may write; it also rules out `redirect_dir` and `metacopy`, which are asked off anyway so
    /// that every copied-up file holds its whole content and a directory rename is a copy.
    /// `volatile` (5.10) skips overlay's sync of the whole upper filesystem at unmount (tens of
    /// milliseconds per step on a busy disk): the upper directory is scratch, merged right
    /// after the step, and a crash discards the build anyway.
    pub fn mount_options(&self, lower: &Path) -> String {
        format!(
            "lowerdir={},upperdir={},workdir={},userxattr,index=off,metacopy=off,redirect_dir=nofollow,volatile",
            lower.display(),
            self.upper.display(),
            self.work.display()
        )
    }
}

/// The environment variable that forces the metadata fallback for every step when set to
/// `metadata` (for comparisons and benchmarks).
pub const FORCE_FALLBACK_ENV: &str = "OSSB_SNAPSHOT";

/// Whether `OSSB_SNAPSHOT=metadata` asks for metadata snapshots instead of overlayfs and
/// recorded writes.
pub fn fallback_forced() -> bool {
    std::env::var_os(FORCE_FALLBACK_ENV).is_some_and(|v| v == "metadata")
}

/// The probe results of this process, by the device of the directory probed.
static PROBED: Mutex<Option<HashMap<u64, bool>>> = Mutex::new(None);

/// Whether RUN steps on the filesystem of `dir` can use overlayfs: probed once per filesystem
/// per process by running `exe __sandbox` (the ossb binary) on a tiny overlay in a temporary
/// directory under `dir`. Blocks for the few milliseconds of the probe. `false` when
/// [`fallback_forced`]; the reason of a failed probe is logged at debug level.
pub fn supported(exe: &Path, dir: &Path) -> bool {
    if fallback_forced() {
        return false;
    }
    let Ok(dev) = fs::metadata(dir).map(|m| m.dev()) else {
        return false;
    };
    let mut probed = PROBED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = probed.as_ref().and_then(|p| p.get(&dev)) {
        return *known;
    }
    let result = probe(exe, dir);
    if let Err(e) = &result {
        tracing::debug!(dir = %dir.display(), "overlayfs not usable, steps use metadata snapshots: {e}");
    }
    probed
        .get_or_insert_with(HashMap::new)
        .insert(dev, result.is_ok());
    result.is_ok()
}

/// Mounts a tiny overlay in a sandbox child, deletes a file and replaces a directory through
/// it, and checks that the upper directory shows a whiteout and an opaque directory.
fn probe(exe: &Path, dir: &Path) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix(".ossb-overlay-probe-")
        .tempdir_in(dir)
        .map_err(|e| format!("creating a probe directory in {}: {e}", dir.display()))?;
    let lower = tmp.path().join("lower");
    let dirs = OverlayDirs {
        upper: tmp.path().join("upper"),
        work: tmp.path().join("work"),
        merged: tmp.path().join("merged"),
    };
    for d in [&lower.join("d"), &dirs.upper, &dirs.work, &dirs.merged] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    for f in [lower.join("d/f"), lower.join("g")] {
        fs::write(&f, b"x").map_err(|e| format!("{}: {e}", f.display()))?;
    }
    crate::sandbox::probe_overlay(exe, &lower, &dirs)?;
    let g = fs::symlink_metadata(dirs.upper.join("g"))
        .map_err(|e| format!("no whiteout in the upper directory: {e}"))?;
    if !is_whiteout(&g) {
        return Err("a deleted file did not become a 0/0 character device".into());
    }
    if !is_opaque(&dirs.upper.join("d")).map_err(|e| format!("reading the opaque xattr: {e}"))? {
        return Err("a replaced directory did not get the opaque xattr".into());
    }
    Ok(())
}

/// The upper and work directories of one RUN step, beside the rootfs; removed when dropped.
#[derive(Debug)]
pub struct Upper {
    tmp: tempfile::TempDir,
    dirs: OverlayDirs,
}

impl Upper {
    /// Creates them next to `rootfs` (on its filesystem). The upper directory gets the mode and
    /// owner of the rootfs's top directory, which is what the step sees as `/`.
    pub fn create(rootfs: &Path) -> io::Result<Upper> {
        let parent = rootfs.parent().unwrap_or(Path::new("/"));
        let lower = rootfs.as_os_str().as_bytes();
        if lower.contains(&b',') || lower.contains(&b':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: a path with ',' or ':' cannot be an overlayfs lower directory",
                    rootfs.display()
                ),
            ));
        }
        let tmp = tempfile::Builder::new()
            .prefix(".ossb-overlay-")
            .tempdir_in(parent)?;
        let dirs = OverlayDirs {
            upper: tmp.path().join("upper"),
            work: tmp.path().join("work"),
            merged: tmp.path().join("merged"),
        };
        for d in [&dirs.upper, &dirs.work, &dirs.merged] {
            fs::create_dir(d)?;
        }
        let top = fs::metadata(rootfs)?;
        lchown(&dirs.upper, Some(top.uid()), Some(top.gid()))?;
        fs::set_permissions(&dirs.upper, fs::Permissions::from_mode(top.mode() & 0o7777))?;
        Ok(Upper { tmp, dirs })
    }

    /// The directories, for the sandbox's [`crate::sandbox::RunSpec`].
    pub fn dirs(&self) -> &OverlayDirs {
        &self.dirs
    }

    /// After the step (the overlay is unmounted: the sandbox has exited): the changes, sorted
    /// by path, and the rootfs updated to the state the step saw.
    ///
    /// `exclude` lists paths (relative to the rootfs) whose subtrees are merged but never listed,
    /// as [`crate::snapshot::Snapshot::take`] leaves them out (the sandbox's mount points).
    /// `created_before` lists directories the engine created in the rootfs for this step before
    /// the overlay was mounted (the working directory): they are listed as added when they
    /// still exist, and a whiteout of one of them is no deletion (it did not exist before).
    pub fn merge(
        self,
        rootfs: &Path,
        exclude: &[PathBuf],
        created_before: &[PathBuf],
    ) -> io::Result<Vec<Change>> {
        let mut m = Merge {
            rootfs,
            upper: &self.dirs.upper,
            exclude: exclude.iter().map(|p| normalize(p)).collect(),
            created_before: created_before.iter().map(|p| normalize(p)).collect(),
            changes: Vec::new(),
        };
        m.run()?;
        let mut created: Vec<PathBuf> = m.created_before.iter().cloned().collect();
        created.retain(|path| fs::symlink_metadata(rootfs.join(path)).is_ok());
        for path in created {
            m.list(&path, ChangeKind::Added);
        }
        let mut changes = m.changes;
        changes.sort_by(|a, b| a.path.cmp(&b.path).then(a.kind.cmp(&b.kind)));
        changes.dedup_by(|a, b| a.path == b.path);
        drop(self.tmp);
        Ok(changes)
    }
}

/// A relative path with only normal components.
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// One directory present in the upper directory and, as a directory, in the rootfs, being
/// merged: its names in the upper directory and, for the post-order work, what it was.
struct Frame {
    rel: PathBuf,
    names: Vec<OsString>,
    next: usize,
    /// Its rootfs contents are hidden (it or an ancestor is opaque).
    hidden: bool,
    /// The metadata of the upper and the rootfs directory before the merge, which moves
    /// entries out of one into the other and so changes both (`None` for the top).
    before: Option<(fs::Metadata, fs::Metadata)>,
}

struct Merge<'a> {
    rootfs: &'a Path,
    upper: &'a Path,
    exclude: HashSet<PathBuf>,
    created_before: HashSet<PathBuf>,
    changes: Vec<Change>,
}

impl Merge<'_> {
    /// Adds a change unless it lies in an excluded subtree.
    fn list(&mut self, path: &Path, kind: ChangeKind) {
        if path.ancestors().any(|a| self.exclude.contains(a)) {
            return;
        }
        self.changes.push(Change {
            path: path.to_path_buf(),
            kind,
        });
    }

    /// Depth-first over the directories both trees hold (iterative: a deep tree cannot overflow
    /// the stack); a directory's own metadata is merged after its contents, whose renames
    /// change its times.
    fn run(&mut self) -> io::Result<()> {
        let mut stack = vec![self.frame(PathBuf::new(), false, None)?];
        while let Some(frame) = stack.last_mut() {
            let Some(name) = frame.names.get(frame.next).cloned() else {
                let done = stack.pop().expect("a frame is on the stack");
                if let Some((upper, lower)) = &done.before {
                    self.finish_dir(&done.rel, upper, lower, done.hidden)?;
                }
                continue;
            };
            frame.next += 1;
            let (rel, hidden) = (frame.rel.join(&name), frame.hidden);
            let up = self.upper.join(&rel);
            let low = self.rootfs.join(&rel);
            let ust = fs::symlink_metadata(&up).map_err(context(&up))?;
            let lst = fs::symlink_metadata(&low).ok();
            if is_whiteout(&ust) {
                if lst.is_some() {
                    remove_all(&low)?;
                    if !self.created_before.contains(&rel) {
                        self.list(&rel, ChangeKind::Deleted);
                    }
                }
                continue;
            }
            match (ust.is_dir(), lst) {
                (true, Some(l)) if l.is_dir() => {
                    let opaque = hidden || is_opaque(&up).map_err(context(&up))?;
                    let frame = self.frame(rel, opaque, Some((ust, l)))?;
                    stack.push(frame);
                }
                (true, lower) => {
                    // New, or a directory where the rootfs has something else: move it whole.
                    let kind = if lower.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    };
                    self.list(&rel, kind);
                    strip_overlay_xattrs(&up)?;
                    self.list_new_tree(&rel)?;
                    if lower.is_some() {
                        remove_all(&low)?;
                    }
                    fs::rename(&up, &low).map_err(context(&low))?;
                }
                (false, lower) => {
                    if let Some(l) = &lower {
                        if !hidden && same_non_dir(&ust, &up, l, &low)? {
                            continue;
                        }
                        if l.is_dir() {
                            remove_all(&low)?;
                        }
                    }
                    strip_overlay_xattrs(&up)?;
                    fs::rename(&up, &low).map_err(context(&low))?;
                    let kind = if lower.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    };
                    self.list(&rel, kind);
                }
            }
        }
        Ok(())
    }

    /// Opens a directory of both trees. When its rootfs contents are hidden, those the upper
    /// directory does not hold are deleted now (listed, and removed from the rootfs).
    fn frame(
        &mut self,
        rel: PathBuf,
        hidden: bool,
        before: Option<(fs::Metadata, fs::Metadata)>,
    ) -> io::Result<Frame> {
        let names = sorted_names(&self.upper.join(&rel))?;
        if hidden {
            let keep: HashSet<&OsString> = names.iter().collect();
            for name in sorted_names(&self.rootfs.join(&rel))? {
                if !keep.contains(&name) {
                    let path = rel.join(&name);
                    remove_all(&self.rootfs.join(&path))?;
                    if !self.created_before.contains(&path) {
                        self.list(&path, ChangeKind::Deleted);
                    }
                }
            }
        }
        Ok(Frame {
            rel,
            names,
            next: 0,
            hidden,
            before,
        })
    }

    /// Lists everything below the new directory `rel` of the upper directory as added, and
    /// makes it ready to move: overlay's xattrs removed, stray whiteouts dropped.
    fn list_new_tree(&mut self, rel: &Path) -> io::Result<()> {
        let mut dirs = vec![rel.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for name in sorted_names(&self.upper.join(&dir))? {
                let path = dir.join(&name);
                let up = self.upper.join(&path);
                let st = fs::symlink_metadata(&up).map_err(context(&up))?;
                if is_whiteout(&st) {
                    fs::remove_file(&up).map_err(context(&up))?;
                    continue;
                }
                strip_overlay_xattrs(&up)?;
                self.list(&path, ChangeKind::Added);
                if st.is_dir() {
                    dirs.push(path);
                }
            }
        }
        Ok(())
    }

    /// Gives the rootfs directory `rel` the upper one's owner, mode, xattrs and times, and lists
    /// it when they changed (always when it was opaque: the step made it anew).
    fn finish_dir(
        &mut self,
        rel: &Path,
        u: &fs::Metadata,
        before: &fs::Metadata,
        hidden: bool,
    ) -> io::Result<()> {
        let up = self.upper.join(rel);
        let low = self.rootfs.join(rel);
        let up_xattrs = kept_xattrs(&up)?;
        let low_xattrs = kept_xattrs(&low)?;
        let changed = hidden
            || u.mode() != before.mode()
            || u.uid() != before.uid()
            || u.gid() != before.gid()
            || (u.mtime(), u.mtime_nsec()) != (before.mtime(), before.mtime_nsec())
            || up_xattrs != low_xattrs;
        if u.uid() != before.uid() || u.gid() != before.gid() {
            lchown(&low, Some(u.uid()), Some(u.gid())).map_err(context(&low))?;
        }
        // Always: a chown above clears set-id bits.
        fs::set_permissions(&low, fs::Permissions::from_mode(u.mode() & 0o7777))
            .map_err(context(&low))?;
        if up_xattrs != low_xattrs {
            for (name, _) in &low_xattrs {
                remove_xattr(&low, name).map_err(context(&low))?;
            }
            for (name, value) in &up_xattrs {
                set_xattr(&low, name, value).map_err(context(&low))?;
            }
        }
        set_times(&low, u).map_err(context(&low))?;
        if changed {
            self.list(rel, ChangeKind::Modified);
        }
        Ok(())
    }
}

/// Whether a non-directory of the upper directory is an unchanged copy of the rootfs's: same
/// type, owner, mode, size, mtime, device number, link target, xattrs and content, and not
/// linked to other names in the upper directory.
fn same_non_dir(u: &fs::Metadata, up: &Path, l: &fs::Metadata, low: &Path) -> io::Result<bool> {
    if u.file_type() != l.file_type()
        || u.nlink() != 1
        || u.mode() != l.mode()
        || u.uid() != l.uid()
        || u.gid() != l.gid()
        || u.size() != l.size()
        || (u.mtime(), u.mtime_nsec()) != (l.mtime(), l.mtime_nsec())
        || u.rdev() != l.rdev()
    {
        return Ok(false);
    }
    if u.file_type().is_symlink() && fs::read_link(up)? != fs::read_link(low)? {
        return Ok(false);
    }
    if kept_xattrs(up)? != kept_xattrs(low)? {
        return Ok(false);
    }
    if u.is_file() {
        return same_content(up, low);
    }
    Ok(true)
}

fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// An overlayfs whiteout: a character device with device number 0/0.
pub(crate) fn is_whiteout(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Whether a directory of the upper directory is opaque (its lower contents are hidden).
pub(crate) fn is_opaque(path: &Path) -> io::Result<bool> {
    for name in [&b"user.overlay.opaque"[..], b"trusted.overlay.opaque"] {
        if get_xattr(path, name)?.is_some_and(|v| v.first() == Some(&b'y')) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.overlay.") || name.starts_with(b"trusted.overlay.")
}

/// The xattrs of `path` (not followed) except overlay's own, sorted.
fn kept_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in list_xattrs(path).map_err(context(path))? {
        if is_overlay_xattr(&name) {
            continue;
        }
        if let Some(value) = get_xattr(path, &name).map_err(context(path))? {
            out.push((name, value));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes overlay's xattrs (`origin`, `impure`, `opaque`, ...) from an upper entry before it
/// moves into the rootfs: they mean nothing there, and the rootfs is the next step's lower
/// directory.
fn strip_overlay_xattrs(path: &Path) -> io::Result<()> {
    for name in list_xattrs(path).map_err(context(path))? {
        if is_overlay_xattr(&name) {
            remove_xattr(path, &name).map_err(context(path))?;
        }
    }
    Ok(())
}

fn sorted_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names = fs::read_dir(dir)
        .map_err(context(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(context(dir))?;
    names.sort_unstable();
    Ok(names)
}

fn remove_all(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(context(path))
}

fn context(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn set_times(path: &Path, from: &fs::Metadata) -> io::Result<()> {
    let atime = nix::sys::time::TimeSpec::new(from.atime(), from.atime_nsec());
    let mtime = nix::sys::time::TimeSpec::new(from.mtime(), from.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &atime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

// Extended attributes by path, never following a final symlink (the l*xattr calls). The paths
// are the build's own (rootfs and upper directory, walked from the top through directories
// checked not to be symlinks), and nothing else writes there during a merge.

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn c_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Calls `f(buf, len)` (a size query when len is 0) until the buffer is large enough.
fn read_sized(mut f: impl FnMut(*mut libc::c_char, usize) -> isize) -> io::Result<Option<Vec<u8>>> {
    loop {
        let size = f(std::ptr::null_mut(), 0);
        if size < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENODATA) => Ok(None),
                Some(libc::ENOTSUP) => Ok(Some(Vec::new())),
                _ => Err(e),
            };
        }
        let mut buf = vec![0u8; size as usize];
        let got = f(buf.as_mut_ptr().cast(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // It grew between the two calls: ask again.
            Some(libc::ERANGE) => continue,
            Some(libc::ENODATA) => return Ok(None),
            _ => return Err(e),
        }
    }
}

fn list_xattrs(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = c_path(path)?;
    // SAFETY: p is a NUL-terminated path; buf is null with len 0 (a size query) or points to
    // `len` writable bytes owned by read_sized.
    let list = read_sized(|buf, len| unsafe { libc::llistxattr(p.as_ptr(), buf, len) })?;
    Ok(list
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

fn get_xattr(path: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let (p, n) = (c_path(path)?, c_name(name)?);
    // SAFETY: p and n are NUL-terminated; buf is null with len 0 (a size query) or points to
    // `len` writable bytes owned by read_sized.
    read_sized(|buf, len| unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.cast(), len) })
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let (p, n) = (c_path(path)?, c_name(name)?);
    // SAFETY: p and n are NUL-terminated; value points to value.len() readable bytes.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn remove_xattr(path: &Path, name: &[u8]) -> io::Result<()> {
    let (p, n) = (c_path(path)?, c_name(name)?);
    // SAFETY: p and n are NUL-terminated strings that live across the call.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENODATA) {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::process::Command;

    use ossb_image::layer::{write_layer, Compression, LayerOptions};

    use super::*;
    use crate::snapshot::Snapshot;

    /// Every entry of the test trees gets this mtime; changes made by a step are later and
    /// are clamped to [`EPOCH`], so that two runs at different times give the same bytes.
    const OLD: i64 = 1_000_000;
    const EPOCH: i64 = 2_000_000;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// A rootfs with something for every kind of change.
    fn populate(r: &Path) {
        for d in ["dir/b", "repl", "opq/sub", "deep/er", "etc", "proc", "keep"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        for (f, c) in [
            ("mod", "old"),
            ("chmod", "c"),
            ("chown", "o"),
            ("del", "d"),
            ("dir/a", "a"),
            ("dir/b/c", "c"),
            ("repl/x", "x"),
            ("link_src", "l"),
            ("ren", "r"),
            ("opq/old1", "1"),
            ("opq/sub/old2", "2"),
            ("deep/er/file", "f"),
            ("etc/passwd", "root:x:0:0"),
            ("keep/same", "s"),
            ("keep/touched", "t"),
        ] {
            fs::write(r.join(f), c).unwrap();
        }
        symlink("mod", r.join("oldlink")).unwrap();
        let mut all = Vec::new();
        let mut dirs = vec![r.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    dirs.push(p.clone());
                }
                all.push(p);
            }
        }
        // Deepest first: setting a child's time leaves its directory's alone.
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in all {
            let t = nix::sys::time::TimeSpec::new(OLD, 0);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
    }

    /// The step: create, modify, chmod, chown, delete a file and a directory, replace a
    /// directory by a file and a file by a directory, hardlink, symlink, rename, recreate a
    /// directory, write deep inside the tree, open a file for writing without changing it.
    fn script() -> String {
        let chown = if is_root() {
            "chown 1000:1000 chown"
        } else {
            "true"
        };
        format!(
            "set -e
            echo new > new; mkdir -p nd/x; echo f > nd/x/f
            echo more >> mod
            chmod 700 chmod
            {chown}
            rm del
            rm -rf dir
            rm -rf repl; echo now-a-file > repl
            rm link_src.x 2>/dev/null || true; ln link_src hl
            ln -s target sym; rm oldlink; ln -s chmod oldlink
            mv ren renamed
            rm -rf opq; mkdir -p opq/sub; echo n > opq/sub/new
            echo changed > deep/er/file
            : >> keep/touched
            rm chown.x 2>/dev/null || true
            rm -f del2; mkdir -p ren2; rmdir ren2"
        )
    }

    /// `sh -c script` in `dir`, in a new mount namespace (and a user namespace when not
    /// root), after `mount` if given. None when namespaces cannot be made here.
    fn run_in_namespace(dir: &Path, mount: Option<&str>, script: &str) -> Option<()> {
        let mut full = String::new();
        if let Some(m) = mount {
            full.push_str(m);
            full.push_str(" && ");
        }
        full.push_str(&format!("cd '{}' && {{ {script}\n}}", dir.display()));
        let mut cmd = Command::new("unshare");
        if !is_root() {
            cmd.args(["--user", "--map-root-user"]);
        }
        let out = cmd.args(["--mount", "sh", "-c", &full]).output().ok()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("unshare") || err.contains("mount") {
                return None;
            }
            panic!("the step failed: {err}");
        }
        Some(())
    }

    fn layer(rootfs: &Path, changes: &[Change]) -> Vec<u8> {
        let mut blob = Vec::new();
        let opts = LayerOptions {
            compression: Compression::None,
            source_date_epoch: Some(EPOCH),
            level: None,
        };
        write_layer(rootfs, changes, &mut blob, &opts).unwrap();
        blob
    }

    /// "type name mode uid:gid size" of each entry of a plain tar (short names only).
    fn names(tar: &[u8]) -> Vec<String> {
        let field = |h: &[u8], r: std::ops::Range<usize>| {
            let raw = &h[r];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).trim().to_string()
        };
        let octal = |s: String| u64::from_str_radix(&s, 8).unwrap_or(0);
        let mut out = Vec::new();
        let mut at = 0;
        while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|b| *b != 0) {
            let h = &tar[at..at + 512];
            let size = octal(field(h, 124..136));
            let kind = match h[156] {
                b'0' | 0 => "Regular",
                b'1' => "Link",
                b'2' => "Symlink",
                b'5' => "Directory",
                b'x' => "Pax",
                _ => "Other",
            };
            out.push(format!(
                "{kind} {}{} {:o} {}:{} {size} {} {}",
                field(h, 345..500),
                field(h, 0..100),
                octal(field(h, 100..108)),
                octal(field(h, 108..116)),
                octal(field(h, 116..124)),
                octal(field(h, 136..148)),
                field(h, 157..257),
            ));
            at += 512 + size.div_ceil(512) as usize * 512;
        }
        out
    }

    fn skip(what: &str) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} must work under CI"
        );
        eprintln!("skipped: {what} is not available here");
    }

    #[test]
    fn overlay_and_metadata_snapshots_give_the_same_layer_bytes() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a/rootfs"), t.path().join("b/rootfs"));
        for r in [&a, &b] {
            fs::create_dir_all(r).unwrap();
            populate(r);
        }
        let exclude = [PathBuf::from("proc")];

        // The fallback: snapshots around the step run in place.
        let before = Snapshot::take(&a, &exclude).unwrap();
        if run_in_namespace(&a, None, &script()).is_none() {
            return skip("a mount namespace");
        }
        let fallback = before.diff(&Snapshot::take(&a, &exclude).unwrap());

        // Overlay: the step runs on the merged directory, the changes come from the upper one.
        let upper = Upper::create(&b).unwrap();
        let d = upper.dirs();
        let mount = format!(
            "mount -t overlay overlay -o '{}' '{}'",
            d.mount_options(&b),
            d.merged.display()
        );
        if run_in_namespace(&d.merged, Some(&mount), &script()).is_none() {
            return skip("overlayfs in a mount namespace");
        }
        let from_upper = upper.merge(&b, &exclude, &[]).unwrap();

        let (la, lb) = (layer(&a, &fallback), layer(&b, &from_upper));
        assert_eq!(names(&la), names(&lb), "{fallback:#?}\n{from_upper:#?}");
        assert!(la == lb, "same entries, different bytes");
        let listed = names(&lb).join("\n");
        for expected in [
            "opq/.wh.old1",
            "opq/sub/.wh.old2",
            ".wh.dir",
            ".wh.del",
            ".wh.ren",
            "Regular repl ",
            "Link link_src",
            "Symlink sym",
            "Regular deep/er/file",
        ] {
            assert!(listed.contains(expected), "{expected} missing:\n{listed}");
        }
        assert!(
            !listed.contains("keep/touched"),
            "a file opened for writing and left unchanged is no change:\n{listed}"
        );
        // The rootfs holds the new state, without overlay's xattrs.
        assert_eq!(fs::read_to_string(b.join("repl")).unwrap(), "now-a-file\n");
        assert!(!b.join("dir").exists() && !b.join("opq/old1").exists());
        assert!(
            fs::metadata(b.join("hl")).unwrap().ino()
                == fs::metadata(b.join("link_src")).unwrap().ino()
        );
        for p in ["opq", "deep", "nd"] {
            assert!(
                list_xattrs(&b.join(p))
                    .unwrap()
                    .iter()
                    .all(|n| !is_overlay_xattr(n)),
                "{p} kept an overlay xattr"
            );
        }
        // What is left beside the rootfs is only its own directory.
        let beside: Vec<_> = fs::read_dir(b.parent().unwrap()).unwrap().collect();
        assert_eq!(beside.len(), 1);
    }

    #[test]
    fn a_workdir_made_before_the_step_is_listed_unless_the_step_removed_it() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("rootfs");
        fs::create_dir_all(&r).unwrap();
        populate(&r);
        for (script, listed) in [("true", true), ("rm -rf /work/app", false)] {
            let created = crate::fs::make_workdir(&r, "/work/app", (0, 0)).unwrap();
            let created: Vec<PathBuf> = created.into_iter().map(|c| c.path).collect();
            assert_eq!(created, [PathBuf::from("work"), PathBuf::from("work/app")]);
            let upper = Upper::create(&r).unwrap();
            let d = upper.dirs();
            let mount = format!(
                "mount -t overlay overlay -o '{}' '{}'",
                d.mount_options(&r),
                d.merged.display()
            );
            let script = script.replace("/work", &format!("{}/work", d.merged.display()));
            if run_in_namespace(&d.merged, Some(&mount), &script).is_none() {
                return skip("overlayfs in a mount namespace");
            }
            let changes = upper.merge(&r, &[], &created).unwrap();
            let paths: Vec<_> = changes.iter().map(|c| (c.path.clone(), c.kind)).collect();
            if listed {
                assert_eq!(
                    paths,
                    [
                        (PathBuf::from("work"), ChangeKind::Added),
                        (PathBuf::from("work/app"), ChangeKind::Added)
                    ]
                );
            } else {
                // The step removed what did not exist before it: no whiteout, only `work`.
                assert!(
                    paths.iter().all(|(_, k)| *k != ChangeKind::Deleted),
                    "{paths:?}"
                );
            }
            let _ = fs::remove_dir_all(r.join("work"));
        }
    }
}
