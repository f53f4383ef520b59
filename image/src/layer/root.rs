//! The rootfs as an open directory, and path resolution that never leaves it.
//!
//! Every filesystem operation of the layer code goes through a directory file descriptor
//! obtained here, followed by a single-component `*at` call with `O_NOFOLLOW` /
//! `AT_SYMLINK_NOFOLLOW` semantics on the final name. Parent components are walked one at a time
//! with `openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)`:
//!
//! - [`Symlinks::InRoot`] resolves symlinks met on the way as the kernel's
//!   `openat2(RESOLVE_IN_ROOT)` would: an absolute target restarts at the rootfs, `..` never
//!   climbs above it. This is what applying a layer needs (consumers see the rootfs as `/`).
//! - [`Symlinks::Refuse`] fails on any symlink in a parent component. This is what writing a
//!   layer needs: a change list comes from a walk that never follows symlinks, so a symlink in a
//!   parent means the rootfs changed under us, and following it could read host files.
//!
//! Why userspace resolution and not `openat2`: it works on every kernel and in seccomp sandboxes
//! that refuse `openat2`, and it is sound here because a layer is applied (or written) by one
//! process that is the only writer of the rootfs at that time; every step holds a directory
//! descriptor, so even a concurrent rename cannot move the walk outside the directory it holds,
//! and `..` is resolved by popping our own stack of descriptors, never by opening `..`.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// How many symlinks one resolution may traverse, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: u32 = 40;

/// How deep [`remove_all_at`] descends before giving up (each level holds a descriptor).
const MAX_REMOVE_DEPTH: usize = 1024;

/// How symlinks in parent components are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Symlinks {
    /// Followed, confined to the rootfs (absolute targets restart at the rootfs).
    InRoot,
    /// Refused with an error.
    Refuse,
}

/// Identifies a directory independently of the path used to reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DirId {
    dev: u64,
    ino: u64,
}

impl DirId {
    pub(crate) fn of(fd: BorrowedFd<'_>) -> io::Result<DirId> {
        let st = fstat(fd)?;
        Ok(DirId::from_stat(&st))
    }

    pub(crate) fn from_stat(st: &FileStat) -> DirId {
        DirId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// An open rootfs directory.
pub(crate) struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Opens `path` (following symlinks in `path` itself: that is the caller's choice of rootfs).
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    /// Opens the directory `rel` (relative to the rootfs; `..` components are clamped at the
    /// rootfs) as an `O_PATH` descriptor, never leaving the rootfs.
    ///
    /// With `create`, missing components are created as directories of mode 0755 (owned by the
    /// caller), and `on_create` is told the parent and name of each one.
    pub(crate) fn open_dir(
        &self,
        rel: &Path,
        symlinks: Symlinks,
        create: bool,
        on_create: &mut dyn FnMut(DirId, &OsStr),
    ) -> io::Result<OwnedFd> {
        // Pending components, last to walk first.
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, rel.as_os_str().as_bytes());
        // Descriptors of the directories walked so far below the rootfs; `..` pops one.
        let mut stack: Vec<OwnedFd> = Vec::new();
        let mut links = 0;
        while let Some(name) = pending.pop() {
            if name == ".." {
                stack.pop();
                continue;
            }
            let cur = stack.last().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            match open_subdir(cur, &name) {
                Ok(fd) => stack.push(fd),
                Err(Errno::ENOENT) if create => {
                    let fd = make_dir(cur, &name)?;
                    on_create(DirId::of(cur)?, &name);
                    stack.push(fd);
                }
                Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => {
                    let st = fstatat(cur, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    if !is_kind(&st, SFlag::S_IFLNK) {
                        return Err(io::Error::new(
                            io::ErrorKind::NotADirectory,
                            format!("{:?} is not a directory", name),
                        ));
                    }
                    if symlinks == Symlinks::Refuse {
                        return Err(io::Error::other(format!(
                            "{:?} is a symlink where a directory was expected (the rootfs changed?)",
                            name
                        )));
                    }
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(io::Error::from(Errno::ELOOP));
                    }
                    let target = readlinkat(cur, name.as_os_str())?;
                    let target = target.as_bytes();
                    if target.first() == Some(&b'/') {
                        // Absolute targets are relative to the rootfs, which is `/` to the image.
                        stack.clear();
                    }
                    push_components(&mut pending, target);
                }
                Err(e) => return Err(e.into()),
            }
        }
        match stack.pop() {
            Some(fd) => Ok(fd),
            None => Ok(self.fd.try_clone()?),
        }
    }
}

/// Appends the components of `path` to `pending` so that the first component is popped first.
fn push_components(pending: &mut Vec<OsString>, path: &[u8]) {
    let start = pending.len();
    for c in Path::new(OsStr::from_bytes(path)).components() {
        match c {
            Component::Normal(n) => pending.push(n.to_os_string()),
            Component::ParentDir => pending.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    pending[start..].reverse();
}

fn open_subdir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Creates the directory `name` in `dir` with mode 0755 regardless of the umask, and opens it.
fn make_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    mkdirat(dir, name, Mode::from_bits_truncate(0o755))?;
    let fd = open_dir_rw(dir, name)?;
    fchmod(&fd, Mode::from_bits_truncate(0o755))?;
    Ok(fd)
}

/// Opens the directory `name` of `dir` for reading (listing, fchmod, futimens), not following
/// a symlink at `name`.
pub(crate) fn open_dir_rw(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Whether `st` describes a file of type `kind`.
pub(crate) fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == kind
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`, with a missing file as `None`.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The names in directory `dir` (any descriptor of it, `O_PATH` included), without `.`/`..`.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut d = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

/// Removes `name` from `dir` whatever it is, a directory with everything below it included,
/// never following symlinks. A missing `name` is not an error.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    remove_all_inner(dir, name, 0)
}

fn remove_all_inner(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        // Linux answers EISDIR for a directory; EPERM is what POSIX allows too.
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e.into()),
    }
    match lstat_at(dir, name)? {
        None => return Ok(()),
        Some(st) if !is_kind(&st, SFlag::S_IFDIR) => {
            return Err(io::Error::from(Errno::EPERM));
        }
        Some(_) => {}
    }
    if depth >= MAX_REMOVE_DEPTH {
        return Err(io::Error::other("directory tree too deep to remove"));
    }
    let sub = open_dir_rw(dir, name)?;
    for child in list_dir(sub.as_fd())? {
        remove_all_inner(sub.as_fd(), &child, depth + 1)?;
    }
    drop(sub);
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `/proc/self/fd/<dir>/<name>`: a path that reaches `name` inside the directory held by `dir`
/// without resolving any other component, for the syscalls that only exist in path form
/// (`lsetxattr`, `llistxattr`, `lgetxattr`). The final component is never followed by those.
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.as_bytes());
    CString::new(p)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

fn c_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "xattr name contains a NUL byte",
        )
    })
}

/// Where an extended attribute is read from or written to.
pub(crate) enum XattrTarget<'a> {
    /// An open file or directory.
    Fd(BorrowedFd<'a>),
    /// `name` inside the directory `dir`, not following a symlink at `name`.
    At(BorrowedFd<'a>, &'a OsStr),
}

/// Sets one extended attribute.
pub(crate) fn set_xattr(target: &XattrTarget<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let key = c_name(key)?;
    // SAFETY: `key` and the path are NUL-terminated C strings that outlive the call; `value`
    // is a valid slice whose pointer and length are passed together.
    let rc = unsafe {
        match target {
            XattrTarget::Fd(fd) => libc::fsetxattr(
                fd.as_raw_fd(),
                key.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ),
            XattrTarget::At(dir, name) => {
                let path = proc_path(*dir, name)?;
                libc::lsetxattr(
                    path.as_ptr(),
                    key.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// All extended attributes of `name` in `dir` (not following a symlink at `name`), sorted by
/// name. Attributes that vanish or cannot be read between listing and reading are left out.
pub(crate) fn read_xattrs_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = proc_path(dir, name)?;
    let list = read_sized(|buf, len| {
        // SAFETY: `path` is NUL-terminated; `buf` points to `len` writable bytes (or is null
        // with `len` 0, which asks for the size).
        unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) }
    })?;
    let mut out = Vec::new();
    for key in list.split(|b| *b == 0).filter(|k| !k.is_empty()) {
        let ckey = c_name(key)?;
        let value = read_sized(|buf, len| {
            // SAFETY: as above; `ckey` is NUL-terminated.
            unsafe { libc::lgetxattr(path.as_ptr(), ckey.as_ptr(), buf.cast(), len) }
        });
        match value {
            Ok(v) => out.push((key.to_vec(), v)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENODATA) | Some(libc::EACCES) | Some(libc::EPERM)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// Calls a `*xattr` style function twice: once for the size, once for the bytes, retrying if
/// the value grew in between.
fn read_sized(mut call: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    for _ in 0..8 {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        if buf.is_empty() {
            return Ok(buf);
        }
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
    }
    Err(io::Error::other("extended attributes keep changing size"))
}
