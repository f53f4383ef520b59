//! Applying a layer onto a rootfs without ever touching anything outside it.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, futimens, makedev, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};
use tar::{Entry, EntryType};

use super::root::{
    is_kind, list_dir, lstat_at, open_dir_rw, remove_all_at, set_xattr, DirId, Root, Symlinks,
    XattrTarget,
};
use super::{ApplyOptions, ApplyReport, LayerError};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const READ_BUFFER: usize = 256 * 1024;

/// Applies a layer (gzip, zstd or plain tar, detected by magic bytes) onto `rootfs`.
///
/// Entries replace what is at their path (a directory over a directory merges); `.wh.NAME`
/// removes NAME (recursively) as left by earlier layers; `.wh..wh..opq` removes everything in
/// its directory that this layer did not put there, whether the marker comes before or after
/// the layer's own entries in that directory (containerd's semantics). Following the OCI spec,
/// a whiteout never removes what this same layer created. Missing parent directories are created
/// with mode 0755 (as Docker; containerd uses 0700). Directory modes and mtimes are set after
/// the whole layer is applied, deepest first, so that adding their contents does not change
/// them and read-only directories can still be filled; meanwhile a directory being filled has
/// at least `rwx` for its owner.
///
/// See the module documentation for how entries that try to reach outside `rootfs` are
/// refused or neutralized. On error the rootfs holds the entries applied so far and should be
/// discarded.
pub fn apply_layer(
    reader: impl Read,
    rootfs: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport, LayerError> {
    let root = Root::open(rootfs).map_err(|source| LayerError::Rootfs {
        path: rootfs.to_path_buf(),
        source,
    })?;
    let stream = decompressed(reader).map_err(|source| LayerError::Read {
        after: None,
        source,
    })?;
    // The guard refuses extension headers the tar reader would read whole into memory.
    let mut archive = tar::Archive::new(super::guard::HeaderGuard::new(stream));
    let mut applier = Applier::new(&root, opts);
    let mut last: Option<String> = None;
    let read_err = |after: &Option<String>, source| LayerError::Read {
        after: after.clone(),
        source,
    };
    {
        let entries = archive.entries().map_err(|e| read_err(&last, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| read_err(&last, e))?;
            last = Some(applier.apply(entry, &last)?);
        }
    }
    // Read to the end so a compressed stream's trailer (gzip CRC and length, zstd checksum) is
    // verified, and trailing garbage in the decompressed stream is noticed.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| read_err(&last, e))?;
    applier.finish_dirs()?;
    Ok(applier.report)
}

/// The decompressed layer, detected by its first bytes: gzip `1f 8b`, zstd `28 b5 2f fd`, else
/// a plain tar.
pub(crate) fn decompressed<'a>(mut reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match reader.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = magic[..n].to_vec();
    let stream = io::Cursor::new(head).chain(reader);
    Ok(if magic[..n].starts_with(&[0x1f, 0x8b]) {
        // Multi-member: some layer formats (eStargz) are concatenated gzip members.
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            READ_BUFFER,
            stream,
        )))
    } else if magic[..n] == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::new(stream)?)
    } else {
        Box::new(BufReader::with_capacity(READ_BUFFER, stream))
    })
}

/// The name of an entry relative to the rootfs: a leading `/` stripped, `.` and empty components
/// dropped, `..` applied lexically. `Err` when `..` climbs above the rootfs or a NUL is present.
pub(super) fn clean_name(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.contains(&0) {
        return Err("has a NUL byte in its name");
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err("climbs out of the rootfs with '..'");
                }
            }
            _ => parts.push(c),
        }
    }
    Ok(PathBuf::from(OsStr::from_bytes(&parts.join(&b'/'))))
}

/// A directory whose final mode and mtime are set once the layer is applied.
struct DirFixup {
    path: PathBuf,
    id: DirId,
    mode: u32,
    mtime: i64,
}

/// Metadata of an entry, from its header and PAX records.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Applier<'r> {
    root: &'r Root,
    opts: &'r ApplyOptions,
    report: ApplyReport,
    /// Names this layer created, as (directory, name): kept by opaque markers and whiteouts.
    unpacked: HashSet<(DirId, OsString)>,
    /// Entries skipped for want of permission, so hardlinks to them are skipped too.
    skipped_paths: HashSet<PathBuf>,
    dirs: Vec<DirFixup>,
    /// Set once ownership could not be applied, so that it is reported once.
    chown_failed: bool,
    /// (xattr name, errno) pairs already reported.
    xattr_failures: HashMap<(Vec<u8>, i32), ()>,
    /// The last parent directory resolved. Dropped whenever anything is removed, since a
    /// removal can take a directory (or a symlink) that this resolution went through.
    parent: Option<(PathBuf, OwnedFd, DirId)>,
    buf: Vec<u8>,
    /// File bytes written since the free space was last checked.
    unchecked: u64,
}

/// File bytes written between two checks of the free space.
const SPACE_CHECK_EVERY: u64 = 8 << 20;

/// The space left free on the rootfs's filesystem: 5% of it, at most 1 GiB.
fn reserve(total: u64) -> u64 {
    (total / 20).min(1 << 30)
}

/// Refuses to go on when the filesystem `file` is on has less than [`reserve`] free.
fn check_space(file: &File, shown: &str) -> Result<(), LayerError> {
    let Ok(stat) = nix::sys::statvfs::fstatvfs(file) else {
        return Ok(()); // not knowing is no reason to refuse
    };
    let unit = stat.fragment_size();
    let free = stat.blocks_available() * unit;
    let keep = reserve(stat.blocks() * unit);
    if free < keep {
        return Err(LayerError::NoSpace {
            entry: shown.to_string(),
            free_mib: free >> 20,
            reserve_mib: keep >> 20,
        });
    }
    Ok(())
}

impl<'r> Applier<'r> {
    fn new(root: &'r Root, opts: &'r ApplyOptions) -> Self {
        Applier {
            root,
            opts,
            report: ApplyReport::default(),
            unpacked: HashSet::new(),
            skipped_paths: HashSet::new(),
            dirs: Vec::new(),
            chown_failed: false,
            xattr_failures: HashMap::new(),
            parent: None,
            unchecked: 0,
            buf: vec![0; READ_BUFFER],
        }
    }

    /// Records a skipped entry for the caller ([`ApplyReport::skipped`]), which reports it (a
    /// warning logged here too would be shown twice).
    fn warn(&mut self, line: String) {
        tracing::debug!("{line}");
        if let Some(hook) = &self.opts.on_warning {
            hook(&line);
        }
        self.report.skipped.push(line);
    }

    /// Applies one entry; returns its name for error context.
    fn apply<R: Read>(
        &mut self,
        mut entry: Entry<'_, R>,
        last: &Option<String>,
    ) -> Result<String, LayerError> {
        self.report.entries += 1;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(shown);
        }
        let rel = clean_name(&raw).map_err(|reason| LayerError::Escape {
            entry: shown.clone(),
            reason: reason.into(),
        })?;
        let Some(base) = rel.file_name().map(OsStr::to_os_string) else {
            // The rootfs itself ("/", "./"): its metadata is the consumer's, as containerd.
            return Ok(shown);
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if self.opts.whiteouts && base.as_bytes().starts_with(WHITEOUT_PREFIX) {
            self.whiteout(&parent_rel, &base, &shown)?;
            return Ok(shown);
        }
        if rel.as_os_str().as_bytes().starts_with(WHITEOUT_META_PREFIX) {
            // Inside AUFS' own directories (`.wh..wh.plnk/...`), as containerd skips them.
            self.warn(format!("entry {shown:?} skipped: AUFS metadata"));
            return Ok(shown);
        }
        let meta = entry_meta(&mut entry).map_err(|reason| LayerError::InvalidEntry {
            entry: shown.clone(),
            reason,
        })?;
        if let Some(only) = &self.opts.only {
            let file = matches!(
                kind,
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse | EntryType::Link
            );
            // Device nodes and fifos are nobody's metadata to read.
            let special = matches!(kind, EntryType::Char | EntryType::Block | EntryType::Fifo);
            if special || (file && !only(&rel, meta.mode, entry.size())) {
                // Not wanted; a lower layer's copy that was wanted goes, as the layer replaces
                // it, and hardlinks to it are skipped too.
                let (parent, _) = self.parent_dir(&parent_rel, &shown)?;
                self.clear(parent.as_fd(), &base, false, &shown)?;
                self.skipped_paths.insert(rel);
                return Ok(shown);
            }
        }
        let (parent, parent_id) = self.parent_dir(&parent_rel, &shown)?;
        let parent = parent.as_fd();
        let created = match kind {
            EntryType::Directory => self.make_dir(parent, &base, &rel, &meta, &shown)?,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.make_file(parent, &base, &mut entry, &meta, &shown, last)?
            }
            EntryType::Symlink => self.make_symlink(parent, &base, &entry, &meta, &shown)?,
            EntryType::Link => {
                self.make_hardlink(parent, parent_id, &base, &rel, &entry, &shown)?
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.make_node(parent, &base, &rel, &entry, &meta, &shown)?
            }
            other => {
                self.warn(format!(
                    "entry {shown:?} skipped: unsupported tar entry type {:?}",
                    other.as_byte() as char
                ));
                false
            }
        };
        if created {
            self.unpacked.insert((parent_id, base));
        }
        Ok(shown)
    }

    /// The parent directory of an entry, created if missing, resolved inside the rootfs.
    fn parent_dir(&mut self, rel: &Path, shown: &str) -> Result<(OwnedFd, DirId), LayerError> {
        if let Some((path, fd, id)) = &self.parent {
            if path == rel {
                let fd = fd
                    .try_clone()
                    .map_err(|source| io_error(shown, "duplicating descriptor for", source))?;
                return Ok((fd, *id));
            }
        }
        let unpacked = &mut self.unpacked;
        let fd = self
            .root
            .open_dir(rel, Symlinks::InRoot, true, &mut |dir, name| {
                unpacked.insert((dir, name.to_os_string()));
            })
            .map_err(|source| io_error(shown, "resolving the parent directory of", source))?;
        let id = DirId::of(fd.as_fd())
            .map_err(|source| io_error(shown, "reading the parent directory of", source))?;
        let cached = fd
            .try_clone()
            .map_err(|source| io_error(shown, "duplicating descriptor for", source))?;
        self.parent = Some((rel.to_path_buf(), cached, id));
        Ok((fd, id))
    }

    /// Removes whatever is at `name` (unless `keep_dir` and it is a directory). Returns whether a
    /// directory was kept.
    fn clear(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        keep_dir: bool,
        shown: &str,
    ) -> Result<bool, LayerError> {
        let existing =
            lstat_at(dir, name).map_err(|source| io_error(shown, "reading what is at", source))?;
        match existing {
            None => Ok(false),
            Some(st) if keep_dir && is_kind(&st, SFlag::S_IFDIR) => Ok(true),
            Some(_) => {
                self.parent = None;
                remove_all_at(dir, name)
                    .map_err(|source| io_error(shown, "removing what was at", source))?;
                Ok(false)
            }
        }
    }

    fn make_dir(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<bool, LayerError> {
        if !self.clear(dir, name, true, shown)? {
            mkdirat(dir, name, Mode::from_bits_truncate(0o700))
                .map_err(|e| io_error(shown, "creating directory", e.into()))?;
        }
        let fd = open_dir_rw(dir, name)
            .map_err(|source| io_error(shown, "opening directory", source))?;
        self.chown(shown, || {
            fchown(
                &fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
        })?;
        // Final mode at the end (see `apply_layer`); until then the owner may fill it.
        fchmod(&fd, Mode::from_bits_truncate(meta.mode | 0o700))
            .map_err(|e| io_error(shown, "setting mode of", e.into()))?;
        self.set_xattrs(&XattrTarget::Fd(fd.as_fd()), meta, shown);
        let id = DirId::of(fd.as_fd())
            .map_err(|source| io_error(shown, "reading metadata of", source))?;
        self.dirs.push(DirFixup {
            path: rel.to_path_buf(),
            id,
            mode: meta.mode,
            mtime: meta.mtime,
        });
        Ok(true)
    }

    fn make_file<R: Read>(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        entry: &mut Entry<'_, R>,
        meta: &EntryMeta,
        shown: &str,
        last: &Option<String>,
    ) -> Result<bool, LayerError> {
        self.clear(dir, name, false, shown)?;
        // O_EXCL | O_NOFOLLOW: always a new inode, never through a symlink or an existing link.
        let fd = openat(
            dir,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| io_error(shown, "creating file", e.into()))?;
        let mut file = File::from(fd);
        let expected = entry.size();
        let mut copied = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(LayerError::Read {
                        after: last.clone(),
                        source,
                    })
                }
            };
            let chunk = &self.buf[..n];
            if chunk.iter().all(|b| *b == 0) {
                // A hole: the size is set below; zeros need no disk.
                file.seek(io::SeekFrom::Current(n as i64))
                    .map_err(|source| io_error(shown, "writing file", source))?;
            } else {
                file.write_all(chunk)
                    .map_err(|source| io_error(shown, "writing file", source))?;
                self.unchecked += n as u64;
                if self.unchecked >= SPACE_CHECK_EVERY {
                    self.unchecked = 0;
                    check_space(&file, shown)?;
                }
            }
            copied += n as u64;
        }
        file.set_len(copied)
            .map_err(|source| io_error(shown, "writing file", source))?;
        if copied < expected && entry.header().entry_type() != EntryType::GNUSparse {
            return Err(LayerError::Read {
                after: last.clone(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("entry {shown:?} ends after {copied} of its {expected} bytes"),
                ),
            });
        }
        self.chown(shown, || {
            fchown(
                &file,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
        })?;
        fchmod(&file, Mode::from_bits_truncate(meta.mode))
            .map_err(|e| io_error(shown, "setting mode of", e.into()))?;
        self.set_xattrs(&XattrTarget::Fd(file.as_fd()), meta, shown);
        let t = timespec(meta.mtime);
        futimens(&file, &t, &t).map_err(|e| io_error(shown, "setting mtime of", e.into()))?;
        Ok(true)
    }

    fn make_symlink<R: Read>(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        entry: &Entry<'_, R>,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<bool, LayerError> {
        let target = link_target(entry, shown)?;
        self.clear(dir, name, false, shown)?;
        // The target is stored verbatim: it is only data until someone resolves it, and this
        // module resolves it inside the rootfs.
        symlinkat(target.as_c_str(), dir, name)
            .map_err(|e| io_error(shown, "creating symlink", e.into()))?;
        self.chown(shown, || {
            fchownat(
                dir,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        self.set_xattrs(&XattrTarget::At(dir, name), meta, shown);
        let t = timespec(meta.mtime);
        utimensat(
            dir,
            name,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_error(shown, "setting mtime of", e.into()))?;
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn make_hardlink<R: Read>(
        &mut self,
        dir: BorrowedFd<'_>,
        dir_id: DirId,
        name: &OsStr,
        rel: &Path,
        entry: &Entry<'_, R>,
        shown: &str,
    ) -> Result<bool, LayerError> {
        let raw = entry
            .link_name_bytes()
            .ok_or_else(|| invalid(shown, "is a hardlink without a target"))?;
        let target = clean_name(&raw).map_err(|reason| LayerError::Escape {
            entry: shown.into(),
            reason: format!("links to a target that {reason}"),
        })?;
        let Some(target_name) = target.file_name() else {
            return Err(LayerError::Escape {
                entry: shown.into(),
                reason: "is a hardlink to the rootfs itself".into(),
            });
        };
        if self.skipped_paths.contains(&target) {
            self.skipped_paths.insert(rel.to_path_buf());
            self.warn(format!(
                "entry {shown:?} skipped: its hardlink target {:?} was skipped",
                target
            ));
            return Ok(false);
        }
        let target_parent = target.parent().unwrap_or(Path::new(""));
        let tdir = self
            .root
            .open_dir(target_parent, Symlinks::InRoot, false, &mut |_, _| {})
            .map_err(|source| io_error(shown, "resolving the hardlink target of", source))?;
        let tdir_id = DirId::of(tdir.as_fd())
            .map_err(|source| io_error(shown, "resolving the hardlink target of", source))?;
        if tdir_id == dir_id && target_name == name {
            return Err(invalid(shown, "is a hardlink to itself"));
        }
        self.clear(dir, name, false, shown)?;
        // No AT_SYMLINK_FOLLOW: a hardlink to a symlink links the symlink, not what it names.
        linkat(tdir.as_fd(), target_name, dir, name, AtFlags::empty())
            .map_err(|e| io_error(shown, "creating hardlink", e.into()))?;
        Ok(true)
    }

    fn make_node<R: Read>(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        entry: &Entry<'_, R>,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<bool, LayerError> {
        let header = entry.header();
        let (kind, dev) = match header.entry_type() {
            EntryType::Fifo => (SFlag::S_IFIFO, 0),
            t => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let kind = if t == EntryType::Char {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                (kind, makedev(major.into(), minor.into()))
            }
        };
        self.clear(dir, name, false, shown)?;
        match mknodat(dir, name, kind, Mode::from_bits_truncate(0o600), dev) {
            Ok(()) => {}
            Err(e @ (Errno::EPERM | Errno::EACCES)) => {
                self.skipped_paths.insert(rel.to_path_buf());
                tracing::debug!("device node {shown:?} skipped: {e}");
                self.report.devices_skipped.push(shown.to_string());
                return Ok(false);
            }
            Err(e) => return Err(io_error(shown, "creating device node", e.into())),
        }
        self.chown(shown, || {
            fchownat(
                dir,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        // Following is harmless here: `name` was just created by mknodat, so it is no symlink.
        fchmodat(
            dir,
            name,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| io_error(shown, "setting mode of", e.into()))?;
        self.set_xattrs(&XattrTarget::At(dir, name), meta, shown);
        let t = timespec(meta.mtime);
        utimensat(
            dir,
            name,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_error(shown, "setting mtime of", e.into()))?;
        Ok(true)
    }

    fn whiteout(&mut self, parent_rel: &Path, base: &OsStr, shown: &str) -> Result<(), LayerError> {
        let base = base.as_bytes();
        if base == WHITEOUT_OPAQUE {
            return self.opaque(parent_rel, shown);
        }
        if base.starts_with(WHITEOUT_META_PREFIX) {
            self.warn(format!("entry {shown:?} skipped: AUFS metadata"));
            return Ok(());
        }
        let target = &base[WHITEOUT_PREFIX.len()..];
        if matches!(target, b"" | b"." | b"..") {
            return Err(LayerError::Escape {
                entry: shown.into(),
                reason: "is a whiteout that names no file in its directory".into(),
            });
        }
        let Some(dir) = self.existing_dir(parent_rel, shown)? else {
            return Ok(()); // nothing there to hide
        };
        let id = DirId::of(dir.as_fd())
            .map_err(|source| io_error(shown, "reading the directory of", source))?;
        let target = OsStr::from_bytes(target);
        if self.unpacked.contains(&(id, target.to_os_string())) {
            return Ok(()); // a whiteout hides lower layers only
        }
        self.parent = None;
        remove_all_at(dir.as_fd(), target)
            .map_err(|source| io_error(shown, "removing what the whiteout names", source))
    }

    /// The directory `rel`, or None if it does not exist (or a component is not a directory).
    fn existing_dir(&mut self, rel: &Path, shown: &str) -> Result<Option<OwnedFd>, LayerError> {
        match self
            .root
            .open_dir(rel, Symlinks::InRoot, false, &mut |_, _| {})
        {
            Ok(fd) => Ok(Some(fd)),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOENT))
                    || e.kind() == io::ErrorKind::NotADirectory =>
            {
                Ok(None)
            }
            Err(source) => Err(io_error(shown, "resolving the directory of", source)),
        }
    }

    fn opaque(&mut self, parent_rel: &Path, shown: &str) -> Result<(), LayerError> {
        let Some(dir) = self.existing_dir(parent_rel, shown)? else {
            return Ok(());
        };
        self.parent = None;
        self.empty_opaque(dir.as_fd(), 0)
            .map_err(|source| io_error(shown, "emptying the opaque directory of", source))
    }

    /// Removes from `dir` everything this layer did not create, recursing into the directories
    /// it did create or merge (their lower contents are hidden too).
    fn empty_opaque(&self, dir: BorrowedFd<'_>, depth: usize) -> io::Result<()> {
        if depth > 1024 {
            return Err(io::Error::other("directory tree too deep"));
        }
        let id = DirId::of(dir)?;
        for name in list_dir(dir)? {
            if !self.unpacked.contains(&(id, name.clone())) {
                remove_all_at(dir, &name)?;
                continue;
            }
            if lstat_at(dir, &name)?.is_some_and(|st| is_kind(&st, SFlag::S_IFDIR)) {
                let sub = openat(
                    dir,
                    name.as_os_str(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                self.empty_opaque(sub.as_fd(), depth + 1)?;
            }
        }
        Ok(())
    }

    /// Runs a chown. A refusal for want of privilege (EPERM) or of an id mapping (EINVAL) is
    /// reported the first time only and is not an error; chown is still tried for later entries,
    /// whose ids may be mapped.
    fn chown(
        &mut self,
        shown: &str,
        f: impl FnOnce() -> nix::Result<()>,
    ) -> Result<(), LayerError> {
        if !self.opts.chown {
            return Ok(());
        }
        match f() {
            Ok(()) => Ok(()),
            Err(Errno::EPERM | Errno::EINVAL) if self.chown_failed => Ok(()),
            Err(e @ (Errno::EPERM | Errno::EINVAL)) => {
                self.chown_failed = true;
                self.warn(format!(
                    "ownership not applied from entry {shown:?} on: {e} (no privilege to chown or no id mapping); \
                     those files keep the applier's user and group"
                ));
                Ok(())
            }
            Err(e) => Err(io_error(shown, "changing owner of", e.into())),
        }
    }

    fn set_xattrs(&mut self, target: &XattrTarget<'_>, meta: &EntryMeta, shown: &str) {
        if !self.opts.xattrs {
            return;
        }
        for (key, value) in &meta.xattrs {
            let shown_key = String::from_utf8_lossy(key);
            if key.starts_with(b"trusted.overlay.") || key.starts_with(b"user.overlay.") {
                self.warn(format!("xattr {shown_key} on {shown:?} skipped: overlayfs-private attributes are never applied"));
                continue;
            }
            if let Err(e) = set_xattr(target, key, value) {
                let errno = e.raw_os_error().unwrap_or(0);
                if self
                    .xattr_failures
                    .insert((key.clone(), errno), ())
                    .is_none()
                {
                    self.warn(format!(
                        "xattr {shown_key} not applied ({e}), first on {shown:?}"
                    ));
                }
            }
        }
    }

    /// Sets the final mode and mtime of the layer's directories, deepest (latest) first; a
    /// directory replaced later in the layer is left alone, and a directory listed twice gets
    /// its last entry's metadata.
    fn finish_dirs(&mut self) -> Result<(), LayerError> {
        let dirs = std::mem::take(&mut self.dirs);
        let mut done = HashSet::new();
        for d in dirs.iter().rev() {
            if !done.insert(d.id) {
                continue;
            }
            let shown = d.path.to_string_lossy();
            let Some(fd) = self.existing_dir(&d.path, &shown)? else {
                continue;
            };
            let fd = open_dir_rw(fd.as_fd(), OsStr::new("."))
                .map_err(|source| io_error(&shown, "opening directory", source))?;
            if DirId::of(fd.as_fd()).ok() != Some(d.id) {
                continue;
            }
            fchmod(&fd, Mode::from_bits_truncate(d.mode))
                .map_err(|e| io_error(&shown, "setting mode of", e.into()))?;
            let t = timespec(d.mtime);
            futimens(&fd, &t, &t).map_err(|e| io_error(&shown, "setting mtime of", e.into()))?;
        }
        Ok(())
    }
}

fn io_error(entry: &str, op: &'static str, source: io::Error) -> LayerError {
    LayerError::Io {
        entry: entry.to_string(),
        op,
        source,
    }
}

fn invalid(entry: &str, reason: &str) -> LayerError {
    LayerError::InvalidEntry {
        entry: entry.to_string(),
        reason: reason.to_string(),
    }
}

fn timespec(secs: i64) -> TimeSpec {
    TimeSpec::new(secs, 0)
}

fn link_target<R: Read>(entry: &Entry<'_, R>, shown: &str) -> Result<CString, LayerError> {
    let raw = entry
        .link_name_bytes()
        .ok_or_else(|| invalid(shown, "is a symlink without a target"))?;
    if raw.is_empty() {
        return Err(invalid(shown, "is a symlink with an empty target"));
    }
    CString::new(raw.into_owned()).map_err(|_| invalid(shown, "has a NUL byte in its link target"))
}

/// Mode, owner, mtime and xattrs of an entry. The tar crate already applied PAX `uid`, `gid`,
/// `size`, `path` and `linkpath`; PAX `mtime` (possibly fractional or negative) is read here.
fn entry_meta<R: Read>(entry: &mut Entry<'_, R>) -> Result<EntryMeta, String> {
    let header = entry.header();
    let mode = header.mode().map_err(|e| format!("bad mode field: {e}"))? & 0o7777;
    let uid = header.uid().map_err(|e| format!("bad uid field: {e}"))?;
    let gid = header.gid().map_err(|e| format!("bad gid field: {e}"))?;
    let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} is out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} is out of range"))?;
    let mut mtime = header
        .mtime()
        .map(|m| i64::try_from(m).unwrap_or(i64::MAX))
        .map_err(|e| format!("bad mtime field: {e}"))?;
    let mut xattrs = Vec::new();
    if let Some(pax) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for record in pax {
            let record = record.map_err(|e| format!("bad PAX record: {e}"))?;
            let key = record.key_bytes();
            if key == b"mtime" {
                mtime = parse_pax_time(record.value_bytes()).ok_or("bad PAX mtime")?;
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((name.to_vec(), record.value_bytes().to_vec()));
            }
        }
    }
    Ok(EntryMeta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// The whole seconds of a PAX time such as `1700000000.123456789` or `-1.5` (rounded down).
fn parse_pax_time(value: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(value).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let has_fraction = frac.bytes().any(|b| b != b'0');
    Some(if int.starts_with('-') && has_fraction {
        secs.saturating_sub(1)
    } else {
        secs
    })
}
