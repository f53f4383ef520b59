//! Metadata snapshots of a rootfs, and the diff between two of them: how a build step's
//! filesystem change becomes the change list of its layer.
//!
//! A [`Snapshot`] records, for every path under the rootfs, its type, permission bits, owner,
//! size, mtime, ctime, inode, device, link count, device number and symlink target. Contents are
//! never read or hashed: any change made through the normal file API updates the ctime (which
//! cannot be set from user space), and a replaced file has a new inode, so comparing metadata
//! finds every change. The walk uses directory descriptors (`openat` + `fstatat` with
//! `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`): symlinks are recorded, never followed, and excluded
//! subtrees (mount points such as `proc`, `sys`, `dev`) are never entered.
//!
//! Directories are compared without their ctime: adding and removing entries shows in the
//! entries themselves and in the mtime, and the sandbox's own mount points are created and
//! removed with the directory's times restored, which leaves only the ctime changed. (A
//! directory whose only change is an xattr is therefore not seen.)
//!
//! Timestamp granularity: a file changed in the same clock tick as the snapshot that recorded
//! it could keep the same ctime. [`Snapshot::take`] therefore waits, when the newest ctime it saw
//! is that recent, until the clock has moved past it, so that any later change gets a strictly
//! later ctime. This costs at most a few tens of milliseconds, only right after a change, and
//! keeps diffs exact and deterministic.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};
use ossb_image::layer::{Change, ChangeKind};

/// How far the clock must have moved past the newest ctime seen when a snapshot ends, on
/// filesystems with nanosecond timestamps: more than one scheduler tick (10 ms at HZ=100), the
/// granularity of the coarse clock the kernel stamps ctimes with.
const FINE_MARGIN: Duration = Duration::from_millis(20);
/// The same on filesystems that only keep whole seconds.
const COARSE_MARGIN: Duration = Duration::from_secs(1);

/// The type of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

/// A point in time as the filesystem records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: i64,
}

/// What a snapshot records about one path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryMeta {
    /// The file type.
    pub kind: FileKind,
    /// Permission bits, set-id and sticky bits included (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Last content modification.
    pub mtime: Timestamp,
    /// Last content or metadata change (cannot be set by user space).
    pub ctime: Timestamp,
    /// Inode number.
    pub ino: u64,
    /// Device holding the inode.
    pub dev: u64,
    /// Number of hard links.
    pub nlink: u64,
    /// Device number, for device nodes.
    pub rdev: u64,
    /// Target of a symlink.
    pub symlink_target: Option<OsString>,
}

/// The metadata of every path under a rootfs at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Sorted by path, component-wise (a directory directly before its contents).
    entries: Vec<(PathBuf, EntryMeta)>,
}

impl Snapshot {
    /// Walks `rootfs` without following symlinks. `exclude` lists paths relative to the rootfs
    /// (a leading `/` is accepted) that are left out with everything below them, e.g. the mount
    /// points `proc`, `sys` and `dev` during RUN. The rootfs directory itself is not recorded.
    ///
    /// Files that vanish during the walk are left out; any other error (a directory that cannot
    /// be read, too many open descriptors for a very deep tree) fails the snapshot, naming the
    /// path.
    pub fn take(rootfs: &Path, exclude: &[PathBuf]) -> io::Result<Snapshot> {
        let exclude: HashSet<PathBuf> = exclude.iter().map(|p| normalize(p)).collect();
        let root = nix::fcntl::open(
            rootfs,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| context(rootfs, Path::new(""), e.into()))?;
        let mut walk = Walk {
            rootfs,
            exclude: &exclude,
            entries: Vec::new(),
        };
        walk.run(root)?;
        let snapshot = Snapshot {
            entries: walk.entries,
        };
        snapshot.wait_for_clock();
        Ok(snapshot)
    }

    /// The changes from `self` to `after`, sorted by path (component-wise).
    ///
    /// - A path only in `after` is [`ChangeKind::Added`], and so is everything below an added
    ///   directory.
    /// - A path only in `self` is [`ChangeKind::Deleted`]; below a deleted directory nothing
    ///   else is listed (its whiteout covers the subtree).
    /// - A path in both whose metadata differs is [`ChangeKind::Modified`]. A type change is a
    ///   single `Modified`: the layer entry of the new type replaces the old path when applied
    ///   (a directory that became something else takes its whole old subtree with it, so the old
    ///   contents are not listed; a file that became a directory has its contents `Added`).
    pub fn diff(&self, after: &Snapshot) -> Vec<Change> {
        let (before, after) = (&self.entries, &after.entries);
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        // A directory of `before` that is gone (deleted, or replaced by a non-directory): its
        // old contents are covered by that change.
        let mut gone: Option<&Path> = None;
        loop {
            let order = match (before.get(i), after.get(j)) {
                (Some(b), Some(a)) => b.0.cmp(&a.0),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => break,
            };
            match order {
                std::cmp::Ordering::Less => {
                    let (path, meta) = &before[i];
                    i += 1;
                    if gone.is_some_and(|g| path.starts_with(g)) {
                        continue;
                    }
                    out.push(Change {
                        path: path.clone(),
                        kind: ChangeKind::Deleted,
                    });
                    if meta.kind == FileKind::Directory {
                        gone = Some(path);
                    }
                }
                std::cmp::Ordering::Greater => {
                    out.push(Change {
                        path: after[j].0.clone(),
                        kind: ChangeKind::Added,
                    });
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (path, old) = &before[i];
                    let new = &after[j].1;
                    i += 1;
                    j += 1;
                    if !same(old, new) {
                        out.push(Change {
                            path: path.clone(),
                            kind: ChangeKind::Modified,
                        });
                        if old.kind == FileKind::Directory && new.kind != FileKind::Directory {
                            gone = Some(path);
                        }
                    }
                }
            }
        }
        out
    }

    /// The metadata recorded for `path` (relative to the rootfs).
    pub fn get(&self, path: &Path) -> Option<&EntryMeta> {
        let path = normalize(path);
        self.entries
            .binary_search_by(|(p, _)| p.as_path().cmp(&path))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// Every recorded path with its metadata, sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &EntryMeta)> {
        self.entries.iter().map(|(p, m)| (p.as_path(), m))
    }

    /// How many paths were recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the rootfs was empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Waits until the clock is safely past the newest ctime recorded (see the module docs).
    fn wait_for_clock(&self) {
        let Some(newest) = self.entries.iter().map(|(_, m)| m.ctime).max() else {
            return;
        };
        let fine = self
            .entries
            .iter()
            .any(|(_, m)| m.ctime.nanos != 0 || m.mtime.nanos != 0);
        let margin = if fine { FINE_MARGIN } else { COARSE_MARGIN };
        let deadline = to_duration(newest).saturating_add(margin);
        // Bounded: a ctime in the future (clock stepped back) must not stall the build.
        for _ in 0..2 {
            let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) else {
                return;
            };
            match deadline.checked_sub(now) {
                Some(wait) if !wait.is_zero() => std::thread::sleep(wait.min(margin)),
                _ => return,
            }
        }
    }
}

/// Whether a path is unchanged between two snapshots (see the module docs on directories).
fn same(old: &EntryMeta, new: &EntryMeta) -> bool {
    if old.kind == FileKind::Directory && new.kind == FileKind::Directory {
        EntryMeta {
            ctime: new.ctime,
            ..old.clone()
        } == *new
    } else {
        old == new
    }
}

fn to_duration(t: Timestamp) -> Duration {
    if t.secs < 0 {
        return Duration::ZERO;
    }
    Duration::new(t.secs as u64, t.nanos.clamp(0, 999_999_999) as u32)
}

/// A relative path with only normal components (`/a/./b/` is `a/b`).
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter_map(|c| {
            if let Component::Normal(n) = c {
                Some(n)
            } else {
                None
            }
        })
        .collect()
}

fn context(rootfs: &Path, rel: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("snapshot of {}: {:?}: {e}", rootfs.display(), rel),
    )
}

/// One directory being walked: its descriptor, path and sorted names, and the next to visit.
struct Frame {
    fd: OwnedFd,
    path: PathBuf,
    names: Vec<OsString>,
    next: usize,
}

struct Walk<'a> {
    rootfs: &'a Path,
    exclude: &'a HashSet<PathBuf>,
    entries: Vec<(PathBuf, EntryMeta)>,
}

impl Walk<'_> {
    /// Depth-first, names sorted bytewise in each directory: the order of `Path`'s `Ord`.
    /// Iterative, so that a deep tree cannot overflow the stack.
    fn run(&mut self, root: OwnedFd) -> io::Result<()> {
        let names = self.list(root.as_fd(), Path::new(""))?;
        let mut stack = vec![Frame {
            fd: root,
            path: PathBuf::new(),
            names,
            next: 0,
        }];
        while let Some(frame) = stack.last_mut() {
            let Some(name) = frame.names.get(frame.next).cloned() else {
                stack.pop();
                continue;
            };
            frame.next += 1;
            let path = frame.path.join(&name);
            if self.exclude.contains(&path) {
                continue;
            }
            let dir = frame.fd.as_fd();
            let Some(meta) = self.meta(dir, &name, &path)? else {
                continue;
            };
            let is_dir = meta.kind == FileKind::Directory;
            self.entries.push((path.clone(), meta));
            if !is_dir {
                continue;
            }
            let sub = match openat(
                dir,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(context(self.rootfs, &path, e.into())),
            };
            let names = self.list(sub.as_fd(), &path)?;
            stack.push(Frame {
                fd: sub,
                path,
                names,
                next: 0,
            });
        }
        Ok(())
    }

    fn list(&self, dir: BorrowedFd<'_>, path: &Path) -> io::Result<Vec<OsString>> {
        let err = |e: Errno| context(self.rootfs, path, e.into());
        let mut d = nix::dir::Dir::openat(
            dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        let mut names = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    fn meta(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
    ) -> io::Result<Option<EntryMeta>> {
        let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(context(self.rootfs, path, e.into())),
        };
        let kind = kind_of(&st);
        let symlink_target = if kind == FileKind::Symlink {
            match readlinkat(dir, name) {
                Ok(t) => Some(t),
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => return Err(context(self.rootfs, path, e.into())),
            }
        } else {
            None
        };
        Ok(Some(EntryMeta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: Timestamp {
                secs: st.st_mtime,
                nanos: st.st_mtime_nsec,
            },
            ctime: Timestamp {
                secs: st.st_ctime,
                nanos: st.st_ctime_nsec,
            },
            ino: st.st_ino,
            dev: st.st_dev,
            nlink: st.st_nlink as u64,
            rdev: if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                st.st_rdev
            } else {
                0
            },
            symlink_target,
        }))
    }
}

fn kind_of(st: &FileStat) -> FileKind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => FileKind::Directory,
        SFlag::S_IFLNK => FileKind::Symlink,
        SFlag::S_IFCHR => FileKind::CharDevice,
        SFlag::S_IFBLK => FileKind::BlockDevice,
        SFlag::S_IFIFO => FileKind::Fifo,
        SFlag::S_IFSOCK => FileKind::Socket,
        _ => FileKind::Regular,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Cursor;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use ossb_image::layer::{apply_layer, write_layer, ApplyOptions, Compression, LayerOptions};

    use super::*;

    /// (path, type, mode, uid, size, mtime, symlink target) of one path.
    type View = (PathBuf, FileKind, u32, u32, u64, i64, Option<OsString>);

    fn snap(root: &Path) -> Snapshot {
        Snapshot::take(root, &[]).unwrap()
    }

    fn listed(changes: &[Change]) -> Vec<(String, ChangeKind)> {
        changes
            .iter()
            .map(|c| (c.path.to_string_lossy().into_owned(), c.kind))
            .collect()
    }

    fn expect(list: &[(&str, ChangeKind)]) -> Vec<(String, ChangeKind)> {
        list.iter().map(|(p, k)| (p.to_string(), *k)).collect()
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// A small tree with fixed mtimes, the same every time it is built.
    fn populate(r: &Path) {
        for d in ["bin", "etc", "var/cache/apt", "a", "usr/lib", "proc/1"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        for (f, c) in [
            ("bin/sh", "shell"),
            ("etc/passwd", "root:x:0:0"),
            ("var/cache/apt/pkg", "cache"),
            ("var/cache/apt/pkg2", "cache"),
            ("a/file", "a"),
            ("old", "old"),
            ("proc/1/status", "running"),
            ("usr/lib/libc.so", "libc"),
        ] {
            fs::write(r.join(f), c).unwrap();
        }
        symlink("usr/lib", r.join("lib")).unwrap();
        // Files first, directories deepest first: setting a child's mtime leaves its parent's alone.
        for p in [
            "bin/sh",
            "etc/passwd",
            "var/cache/apt/pkg",
            "var/cache/apt/pkg2",
            "a/file",
            "old",
            "proc/1/status",
            "usr/lib/libc.so",
            "lib",
            "bin",
            "etc",
            "var/cache/apt",
            "a",
            "usr/lib",
            "proc/1",
            "var/cache",
            "var",
            "usr",
            "proc",
        ] {
            set_mtime(&r.join(p), 1_000_000);
        }
    }

    fn set_mtime(p: &Path, secs: i64) {
        let t = nix::sys::time::TimeSpec::new(secs, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            p,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    #[test]
    fn finds_additions_modifications_and_deletions_in_path_order() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        populate(r);
        let before = snap(r);
        fs::write(r.join("new"), "new").unwrap();
        fs::create_dir_all(r.join("nd/x")).unwrap();
        fs::write(r.join("nd/x/f"), "f").unwrap();
        fs::write(r.join("etc/passwd"), "root:y:0:0").unwrap(); // same size, same second
        fs::set_permissions(r.join("bin/sh"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::remove_file(r.join("old")).unwrap();
        fs::remove_dir_all(r.join("var/cache")).unwrap();
        fs::rename(r.join("a/file"), r.join("a/renamed")).unwrap();
        fs::remove_file(r.join("lib")).unwrap();
        symlink("usr/lib64", r.join("lib")).unwrap();
        let diff = before.diff(&snap(r));
        use ChangeKind::*;
        assert_eq!(
            listed(&diff),
            expect(&[
                ("a", Modified),
                ("a/file", Deleted),
                ("a/renamed", Added),
                ("bin/sh", Modified),
                ("etc/passwd", Modified),
                ("lib", Modified),
                ("nd", Added),
                ("nd/x", Added),
                ("nd/x/f", Added),
                ("new", Added),
                ("old", Deleted),
                ("var", Modified),
                ("var/cache", Deleted),
            ])
        );
    }

    #[test]
    fn an_unchanged_tree_has_no_changes_even_when_read() {
        let t = tempfile::tempdir().unwrap();
        populate(t.path());
        let before = snap(t.path());
        fs::read(t.path().join("etc/passwd")).unwrap();
        fs::read_dir(t.path().join("etc")).unwrap().for_each(drop);
        assert!(before.diff(&snap(t.path())).is_empty());
        assert_eq!(before.get(Path::new("/etc/passwd")).unwrap().size, 10);
        assert_eq!(
            before
                .get(Path::new("lib"))
                .unwrap()
                .symlink_target
                .as_deref(),
            Some(OsStr::new("usr/lib"))
        );
    }

    #[test]
    fn type_changes_are_one_modification() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        populate(r);
        let before = snap(r);
        fs::remove_file(r.join("old")).unwrap();
        fs::create_dir(r.join("old")).unwrap();
        fs::write(r.join("old/inside"), "").unwrap();
        fs::remove_dir_all(r.join("var/cache")).unwrap();
        fs::write(r.join("var/cache"), "now a file").unwrap();
        fs::remove_file(r.join("lib")).unwrap();
        fs::write(r.join("lib"), "").unwrap();
        let diff = before.diff(&snap(r));
        use ChangeKind::*;
        assert_eq!(
            listed(&diff),
            expect(&[
                ("lib", Modified),
                ("old", Modified),
                ("old/inside", Added),
                ("var", Modified),
                ("var/cache", Modified)
            ])
        );
    }

    #[test]
    fn ownership_and_hardlinks_are_changes() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        populate(r);
        let before = snap(r);
        fs::hard_link(r.join("bin/sh"), r.join("bin/ash")).unwrap();
        if is_root() {
            std::os::unix::fs::lchown(r.join("etc/passwd"), Some(1000), Some(1000)).unwrap();
        }
        let diff = before.diff(&snap(r));
        use ChangeKind::*;
        let mut want = vec![("bin", Modified), ("bin/ash", Added), ("bin/sh", Modified)];
        if is_root() {
            want.push(("etc/passwd", Modified));
        }
        assert_eq!(listed(&diff), expect(&want));
    }

    #[test]
    fn excluded_subtrees_and_symlink_targets_are_not_walked() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = t.path();
        populate(r);
        symlink(outside.path(), r.join("out")).unwrap();
        let exclude = [PathBuf::from("/proc"), PathBuf::from("./var/cache/")];
        let before = Snapshot::take(r, &exclude).unwrap();
        assert!(
            before.get(Path::new("proc")).is_none()
                && before.get(Path::new("var/cache/apt")).is_none()
        );
        fs::write(r.join("proc/1/status"), "stopped!").unwrap();
        fs::write(r.join("var/cache/apt/new"), "").unwrap();
        fs::write(outside.path().join("f"), "").unwrap();
        let after = Snapshot::take(r, &exclude).unwrap();
        assert!(after
            .iter()
            .all(|(p, _)| p == Path::new("out") || !p.starts_with("out")));
        assert_eq!(listed(&before.diff(&after)), expect(&[]));
    }

    #[test]
    fn changes_right_after_a_snapshot_are_seen() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        for i in 0..20u8 {
            fs::write(&f, [i]).unwrap();
            let before = snap(t.path());
            fs::write(&f, [i + 100]).unwrap();
            assert_eq!(
                listed(&before.diff(&snap(t.path()))),
                expect(&[("f", ChangeKind::Modified)]),
                "round {i}"
            );
        }
    }

    #[test]
    fn snapshot_of_ten_thousand_files_lists_them_all_and_diffs_one_change() {
        // How fast this is, is measured in benches/benches/snapshot.rs. On tmpfs when there is
        // one: creating 10k files on a busy disk is the slow part.
        let shm = Path::new("/dev/shm");
        let t = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        for d in 0..100 {
            let dir = t.path().join(format!("usr/share/d{d}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..100 {
                fs::write(dir.join(format!("f{f}")), "").unwrap();
            }
        }
        let before = snap(t.path());
        assert_eq!(before.len(), 10_102);
        fs::write(t.path().join("usr/share/d42/f7"), "changed").unwrap();
        assert_eq!(
            listed(&before.diff(&snap(t.path()))),
            expect(&[("usr/share/d42/f7", ChangeKind::Modified)])
        );
    }

    #[test]
    fn a_mount_point_created_and_removed_leaves_its_directory_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir(r.join("etc")).unwrap();
        let before = snap(r);
        let created = crate::sandbox::prepare_mount_points(r).unwrap();
        assert!(r.join("etc/hosts").exists());
        crate::sandbox::remove_mount_points(&created);
        assert!(!r.join("etc/hosts").exists());
        assert_eq!(listed(&before.diff(&snap(r))), expect(&[]));
        // A real change of the directory still shows.
        fs::write(r.join("etc/new"), "x").unwrap();
        assert_eq!(
            listed(&before.diff(&snap(r))),
            expect(&[
                ("etc", ChangeKind::Modified),
                ("etc/new", ChangeKind::Added)
            ])
        );
    }

    #[test]
    fn diff_written_as_a_layer_reproduces_the_change() {
        let t = tempfile::tempdir().unwrap();
        let (src, copy) = (t.path().join("src"), t.path().join("copy"));
        for r in [&src, &copy] {
            fs::create_dir(r).unwrap();
            populate(r);
        }
        let before = snap(&src);
        fs::write(src.join("etc/passwd"), "root:x:0:0\nuser:x:1000:1000").unwrap();
        fs::remove_dir_all(src.join("var/cache")).unwrap();
        fs::create_dir_all(src.join("var/lib/dpkg")).unwrap();
        fs::write(src.join("var/lib/dpkg/status"), "ok").unwrap();
        fs::hard_link(src.join("bin/sh"), src.join("bin/ash")).unwrap();
        fs::remove_file(src.join("old")).unwrap();
        fs::create_dir(src.join("old")).unwrap();
        fs::remove_file(src.join("a/file")).unwrap();
        fs::set_permissions(
            src.join("usr/lib/libc.so"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let changes = before.diff(&snap(&src));
        let mut blob = Vec::new();
        let opts = LayerOptions {
            compression: Compression::Zstd,
            source_date_epoch: None,
            level: None,
        };
        write_layer(&src, &changes, &mut blob, &opts).unwrap();
        apply_layer(Cursor::new(blob), &copy, &ApplyOptions::default()).unwrap();
        let (a, b) = (snap(&src), snap(&copy));
        let view = |s: &Snapshot| -> Vec<View> {
            s.iter()
                .filter(|(p, _)| !p.starts_with("proc"))
                .map(|(p, m)| {
                    (
                        p.to_path_buf(),
                        m.kind,
                        m.mode,
                        m.uid,
                        m.size,
                        m.mtime.secs,
                        m.symlink_target.clone(),
                    )
                })
                .collect()
        };
        assert_eq!(view(&a), view(&b));
        let (sh, ash) = (
            b.get(Path::new("bin/sh")).unwrap(),
            b.get(Path::new("bin/ash")).unwrap(),
        );
        assert_eq!(sh.ino, ash.ino);
        assert_eq!(
            fs::read(copy.join("etc/passwd")).unwrap(),
            fs::read(src.join("etc/passwd")).unwrap()
        );
        assert_eq!(fs::metadata(copy.join("bin/sh")).unwrap().nlink(), 2);
    }
}
