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
    pub fn mount_options(&self, lower: &Path) -> String {
        format!(
            "lowerdir={},upperdir={},workdir={},userxattr,index=off,metacopy=off,redirect_dir=nofollow",
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
    /// The rootfs directory's metadata before the merge (`None` for the top).
    before: Option<fs::Metadata>,
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
                if let Some(before) = &done.before {
                    self.finish_dir(&done.rel, before, done.hidden)?;
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
                    let frame = self.frame(rel, opaque, Some(l))?;
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
        before: Option<fs::Metadata>,
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
    fn finish_dir(&mut self, rel: &Path, before: &fs::Metadata, hidden: bool) -> io::Result<()> {
        let up = self.upper.join(rel);
        let low = self.rootfs.join(rel);
        let u = fs::symlink_metadata(&up).map_err(context(&up))?;
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
        set_times(&low, &u).map_err(context(&low))?;
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
