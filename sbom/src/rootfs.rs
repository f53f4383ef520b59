//! Reading a root filesystem without ever leaving it.
//!
//! Every open goes through directory descriptors with `O_NOFOLLOW`, one component at a time,
//! so a symlink planted in an image (`var/lib/dpkg/status -> /etc/shadow`) can neither make us
//! read the host nor loop. Symlinks met on a fixed path (`etc/os-release` is one in Debian) are
//! resolved as the image would see them: absolute targets from the root, `..` stopping at the
//! root. The walk follows no symlink at all, so every real file is seen once and a directory
//! loop cannot exist. Not `openat2(RESOLVE_IN_ROOT)`: it is missing in older kernels and some
//! seccomp profiles, and the component walk costs little for the few fixed paths we read.

use std::ffi::{CStr, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};

use crate::package::Findings;

/// Symlinks followed on one path before giving up, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;
/// Directory depth the walk descends to; deeper trees are reported, not walked.
const MAX_DEPTH: usize = 256;

/// An open root filesystem directory.
pub(crate) struct Root {
    fd: OwnedFd,
}

/// A regular file met on the walk.
pub(crate) struct FileEntry<'a> {
    /// Path relative to the root, `/`-separated (lossy where a name is not UTF-8).
    pub rel: &'a str,
    /// The permission bits.
    pub mode: u32,
    /// The size `stat` gives.
    pub size: u64,
    dir: BorrowedFd<'a>,
    c_name: &'a CStr,
}

impl FileEntry<'_> {
    /// Opens this file (not a symlink put in its place since the walk saw it).
    pub fn open(&self) -> io::Result<File> {
        open_regular(self.dir, self.c_name)
    }
}

/// Why a file's contents were not read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("larger than the {limit} bytes read from such a file")]
    TooLarge { limit: u64 },
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
}

impl Root {
    /// Opens `path` as the root of a scan.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    /// Opens the regular file at `rel`, resolving symlinks inside the root. `Ok(None)` when
    /// nothing is there, or something other than a regular file.
    pub fn open_file(&self, rel: &str) -> io::Result<Option<File>> {
        enum Step {
            Root,
            Parent,
            Name(OsString),
        }
        fn push_path(pending: &mut Vec<Step>, path: &Path) {
            // `pending` is a stack: components go on in reverse so the first is taken first.
            for c in path.components().rev() {
                match c {
                    Component::RootDir => pending.push(Step::Root),
                    Component::ParentDir => pending.push(Step::Parent),
                    Component::Normal(n) => pending.push(Step::Name(n.to_os_string())),
                    Component::CurDir | Component::Prefix(_) => {}
                }
            }
        }
        let mut pending = Vec::new();
        push_path(&mut pending, Path::new(rel.trim_start_matches('/')));
        let mut chain: Vec<OwnedFd> = Vec::new();
        let mut links = 0;
        while let Some(step) = pending.pop() {
            let name = match step {
                Step::Root => {
                    chain.clear();
                    continue;
                }
                Step::Parent => {
                    chain.pop();
                    continue;
                }
                Step::Name(name) => name,
            };
            let dir = chain.last().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            let st = match fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFLNK {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Errno::ELOOP.into());
                }
                let target = readlinkat(dir, name.as_os_str())?;
                push_path(&mut pending, Path::new(&target));
            } else if pending.is_empty() {
                if kind != SFlag::S_IFREG {
                    return Ok(None);
                }
                let c_name = std::ffi::CString::new(name.as_bytes())
                    .map_err(|_| io::Error::from(Errno::EINVAL))?;
                return open_regular(dir, &c_name).map(Some);
            } else if kind == SFlag::S_IFDIR {
                let fd = openat(
                    dir,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                chain.push(fd);
            } else {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Reads the regular file at `rel` (see [`Root::open_file`]) if it holds at most `limit`
    /// bytes.
    pub fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, ReadError> {
        match self.open_file(rel)? {
            Some(file) => read_capped(file, limit).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `visit` for every regular file under the root, in name order, following no
    /// symlink. Directories that cannot be read become warnings.
    pub fn walk(&self, findings: &mut Findings, visit: &mut dyn FnMut(&FileEntry, &mut Findings)) {
        match dup_dir(self.fd.as_fd()) {
            Ok(fd) => walk_dir(fd, "", 0, findings, visit),
            Err(e) => findings.warn("", format!("cannot list the root: {e}")),
        }
    }
}

/// Reads `file` whole when it holds at most `limit` bytes: the size is checked first (a sparse
/// 1 GiB file costs nothing) and the read is bounded too (a file may grow while read).
pub(crate) fn read_capped(file: File, limit: u64) -> Result<Vec<u8>, ReadError> {
    let size = file.metadata()?.len();
    if size > limit {
        return Err(ReadError::TooLarge { limit });
    }
    let mut buf = Vec::with_capacity(size as usize);
    file.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    Ok(buf)
}

/// Opens `name` in `dir` for reading if it is a regular file right now: `O_NOFOLLOW` refuses a
/// symlink swapped in, `O_NONBLOCK` keeps a FIFO from blocking the scan before `fstat` says what
/// it is.
fn open_regular(dir: BorrowedFd, name: &CStr) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

fn dup_dir(dir: BorrowedFd) -> io::Result<OwnedFd> {
    Ok(openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

fn walk_dir(
    fd: OwnedFd,
    rel: &str,
    depth: usize,
    findings: &mut Findings,
    visit: &mut dyn FnMut(&FileEntry, &mut Findings),
) {
    let mut dir = match Dir::from_fd(fd) {
        Ok(dir) => dir,
        Err(e) => return findings.warn(rel, format!("cannot list directory: {e}")),
    };
    let mut names: Vec<std::ffi::CString> = Vec::new();
    for entry in dir.iter() {
        match entry {
            Ok(entry) => {
                let name = entry.file_name();
                if name.to_bytes() != b"." && name.to_bytes() != b".." {
                    names.push(name.to_owned());
                }
            }
            Err(e) => {
                findings.warn(rel, format!("cannot list directory: {e}"));
                break;
            }
        }
    }
    // readdir order depends on the filesystem; name order keeps warnings and found_at stable.
    names.sort();
    for c_name in &names {
        let name = OsStr::from_bytes(c_name.to_bytes());
        let child = if rel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        let st = match fstatat(dir.as_fd(), c_name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) => {
                findings.warn(&child, format!("cannot stat: {e}"));
                continue;
            }
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            if depth + 1 >= MAX_DEPTH {
                findings.warn(
                    &child,
                    format!("deeper than {MAX_DEPTH} directories, not scanned"),
                );
                continue;
            }
            match openat(
                dir.as_fd(),
                c_name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(sub) => walk_dir(sub, &child, depth + 1, findings, visit),
                Err(e) => findings.warn(&child, format!("cannot open directory: {e}")),
            }
        } else if kind == SFlag::S_IFREG {
            let entry = FileEntry {
                rel: &child,
                mode: st.st_mode & 0o7777,
                size: st.st_size as u64,
                dir: dir.as_fd(),
                c_name,
            };
            visit(&entry, findings);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let outside = tempfile::tempdir().expect("tempdir");
        fs::write(outside.path().join("secret"), "host secret").expect("write");
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        fs::create_dir_all(r.join("usr/lib")).expect("mkdir");
        fs::create_dir_all(r.join("etc")).expect("mkdir");
        fs::write(r.join("usr/lib/os-release"), "ID=debian\n").expect("write");
        symlink("../usr/lib/os-release", r.join("etc/os-release")).expect("symlink");
        symlink("/usr/lib/os-release", r.join("etc/abs")).expect("symlink");
        let secret = outside.path().join("secret");
        symlink(&secret, r.join("etc/escape-abs")).expect("symlink");
        symlink(
            "../../../../../../../../../..".to_string() + secret.to_str().expect("utf-8"),
            r.join("etc/escape-rel"),
        )
        .expect("symlink");
        symlink("loop-b", r.join("etc/loop-a")).expect("symlink");
        symlink("loop-a", r.join("etc/loop-b")).expect("symlink");

        let root = Root::open(r).expect("open root");
        let read = |p: &str| root.read_file(p, 1024).map_err(|e| e.to_string());
        assert_eq!(read("etc/os-release"), Ok(Some(b"ID=debian\n".to_vec())));
        assert_eq!(read("etc/abs"), Ok(Some(b"ID=debian\n".to_vec())));
        assert_eq!(read("etc/escape-abs"), Ok(None));
        assert_eq!(read("etc/escape-rel"), Ok(None));
        assert!(
            read("etc/loop-a").is_err(),
            "a symlink loop is an error, not a hang"
        );
        assert_eq!(read("etc"), Ok(None), "a directory is not a file");
    }

    #[test]
    fn walk_skips_symlinks_and_reports_files_in_order() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        fs::create_dir_all(r.join("a/b")).expect("mkdir");
        fs::write(r.join("a/b/f"), "x").expect("write");
        fs::write(r.join("a/e"), "y").expect("write");
        symlink("..", r.join("a/b/up")).expect("symlink");
        symlink("/", r.join("a/host")).expect("symlink");
        let root = Root::open(r).expect("open root");
        let mut seen = Vec::new();
        let mut findings = Findings::default();
        root.walk(&mut findings, &mut |e, _| seen.push(e.rel.to_string()));
        assert_eq!(seen, vec!["a/b/f", "a/e"]);
        assert!(findings.warnings.is_empty());
    }
}
