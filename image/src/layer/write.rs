//! Writing a layer blob from a change list, deterministically and in one streaming pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, major, minor, FileStat, Mode, SFlag};
use ossb_protocol::{Digest, Sha256Writer};
use tar::{EntryType, Header};

use super::root::{is_kind, lstat_at, read_xattrs_at, Root, Symlinks};
use super::{Change, ChangeKind, Compression, LayerError, LayerOptions, WrittenLayer};

mod gzip;
#[cfg(test)]
mod tests;

use gzip::GzipWriter;

const BLOCK: usize = 512;
/// The largest value of an 8-byte octal header field (mode, uid, gid, device numbers).
const MAX_OCTAL_8: u64 = 0o7777777;
/// The largest value of a 12-byte octal header field (size).
const MAX_OCTAL_12: u64 = 0o77777777777;
/// gzip level 6: zlib's, Go's and therefore containerd's and BuildKit's default, the usual
/// trade-off; levels 7-9 cost two to three times the CPU for about 1% smaller layers.
const GZIP_LEVEL: u32 = 6;
/// zstd level 3: the library's default level and what BuildKit uses for zstd layers.
const ZSTD_LEVEL: i32 = 3;
/// zstd's multithreaded job size, set explicitly so the frame layout never depends on library
/// defaults derived from other parameters. Part of the output format, as the level is.
/// 4 MiB: with 4 workers zstd peaks at about 40 MiB (its 8 MiB default: about 70 MiB).
const ZSTD_JOB_SIZE: u32 = 4 << 20;
/// zstd's overlap between jobs: an eighth of the window (the default for level 3), explicit too.
const ZSTD_OVERLAP_LOG: u32 = 6;
/// The most compression threads a layer uses (gzip pieces or zstd jobs in parallel). The bytes
/// written never depend on the number of threads.
const MAX_WORKERS: usize = 4;
/// Buffer between the compressor and the caller's writer, so a file or socket sees large writes.
const OUT_BUFFER: usize = 256 * 1024;
/// Buffer for copying file contents into the tar stream.
const COPY_BUFFER: usize = 256 * 1024;

/// Writes the layer for `changes` (read from `rootfs`) to `out` in one streaming pass.
///
/// Added and modified paths are written from their current state in `rootfs` (every parent
/// directory is included too, with its metadata); deleted paths become OCI whiteouts
/// (`dir/.wh.name`). A path listed both as deleted and as added or modified is written (a type
/// change is expressed by the new entry, which replaces the old path when applied); a deletion
/// under a deleted directory, or under a path now written as a non-directory, is redundant and
/// left out. Sockets are left out, as every other layer writer does. The same rootfs and
/// changes always give the same bytes.
///
/// The blob's digest, the tar's diff ID and the blob size are computed on the way; `out` is
/// flushed but not synced.
///
/// Compression runs on up to [`MAX_WORKERS`] threads (the machine's available parallelism),
/// and the bytes are the same whatever their number: gzip is one member made of
/// independently compressed 1 MiB pieces (see the `gzip` module), zstd always uses its
/// multithreaded format with a fixed job size.
pub fn write_layer(
    rootfs: &Path,
    changes: &[Change],
    out: impl Write,
    opts: &LayerOptions,
) -> Result<WrittenLayer, LayerError> {
    write_layer_on(rootfs, changes, out, opts, default_workers())
}

/// The number of compression threads: the available parallelism, at most [`MAX_WORKERS`].
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

/// [`write_layer`] with `workers` compression threads (at least one is used).
pub(super) fn write_layer_on(
    rootfs: &Path,
    changes: &[Change],
    out: impl Write,
    opts: &LayerOptions,
    workers: usize,
) -> Result<WrittenLayer, LayerError> {
    let root = Root::open(rootfs).map_err(|source| LayerError::Rootfs {
        path: rootfs.to_path_buf(),
        source,
    })?;
    let plan = plan(changes)?;
    let sink = Sink::new(
        BufWriter::with_capacity(OUT_BUFFER, out),
        opts.compression,
        workers,
    )
    .map_err(|source| LayerError::Write {
        entry: "start of archive".into(),
        source,
    })?;
    let mut w = TarWriter {
        root: &root,
        out: Sha256Writer::new(sink),
        epoch: opts.source_date_epoch,
        dirs_written: HashSet::new(),
        nondirs_written: HashSet::new(),
        deleted: HashSet::new(),
        first_link: HashMap::new(),
        parent: None,
        buf: vec![0; COPY_BUFFER],
    };
    for (path, deleted) in &plan {
        if *deleted {
            w.write_whiteout(path)?;
        } else {
            w.include_parents(path)?;
            w.write_path(path, false)?;
        }
    }
    let end = |source| LayerError::Write {
        entry: "end of archive".into(),
        source,
    };
    w.out.write_all(&[0; 2 * BLOCK]).map_err(end)?;
    let (diff_id, tar_size, sink) = w.out.finish();
    let (blob, buffered) = sink.finish().map_err(end)?;
    buffered
        .into_inner()
        .map_err(|e| end(e.into_error()))?
        .flush()
        .map_err(end)?;
    let (digest, size) = blob.unwrap_or((diff_id, tar_size));
    Ok(WrittenLayer {
        digest,
        diff_id,
        size,
        media_type: opts.compression.media_type(),
    })
}

/// Validates the changes and orders them by path (parents first); the value is "deleted".
fn plan(changes: &[Change]) -> Result<BTreeMap<PathBuf, bool>, LayerError> {
    let mut plan = BTreeMap::new();
    for change in changes {
        let invalid = |reason: &str| LayerError::InvalidChange {
            path: change.path.clone(),
            reason: reason.into(),
        };
        let mut path = PathBuf::new();
        for c in change.path.components() {
            match c {
                Component::Normal(n) => path.push(n),
                Component::CurDir => {}
                _ => {
                    return Err(invalid(
                        "a changed path must be relative to the rootfs, without '..'",
                    ))
                }
            }
        }
        if path.as_os_str().is_empty() {
            return Err(invalid("the rootfs itself is not a change"));
        }
        let deleted = change.kind == ChangeKind::Deleted;
        // A write wins over a deletion of the same path: the new entry replaces the old one.
        let entry = plan.entry(path).or_insert(deleted);
        *entry = *entry && deleted;
    }
    Ok(plan)
}

struct TarWriter<'r, W: Write> {
    root: &'r Root,
    out: Sha256Writer<Sink<W>>,
    epoch: Option<i64>,
    dirs_written: HashSet<PathBuf>,
    nondirs_written: HashSet<PathBuf>,
    deleted: HashSet<PathBuf>,
    /// The first name written for each multiply-linked inode: later names link to it.
    first_link: HashMap<(u64, u64), Vec<u8>>,
    /// The last parent directory opened, as entries come sorted by directory.
    parent: Option<(PathBuf, OwnedFd)>,
    buf: Vec<u8>,
}

/// The header fields of one entry.
struct Meta {
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: Option<Vec<u8>>,
    dev: (u64, u64),
}

fn shown(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl<W: Write> TarWriter<'_, W> {
    fn write_whiteout(&mut self, path: &Path) -> Result<(), LayerError> {
        let mut ancestors = path.ancestors().skip(1);
        if ancestors.any(|a| self.deleted.contains(a) || self.nondirs_written.contains(a)) {
            return Ok(());
        }
        self.deleted.insert(path.to_path_buf());
        self.include_parents(path)?;
        let name = path.file_name().unwrap_or_default();
        let mut wh = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut base = b".wh.".to_vec();
        base.extend_from_slice(name.as_bytes());
        wh.push(OsStr::from_bytes(&base));
        // No mtime exists for a deleted path: 0 is what clamping any time to the epoch gives.
        let meta = Meta {
            kind: EntryType::Regular,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: None,
            dev: (0, 0),
        };
        self.write_header(wh.as_os_str().as_bytes(), &meta, &[], &shown(&wh))
    }

    /// Writes the parent directories of `path` not written yet, outermost first.
    fn include_parents(&mut self, path: &Path) -> Result<(), LayerError> {
        let mut missing: Vec<PathBuf> = path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty() && !self.dirs_written.contains(*a))
            .map(Path::to_path_buf)
            .collect();
        while let Some(dir) = missing.pop() {
            self.write_path(&dir, true)?;
        }
        Ok(())
    }

    /// Opens the directory `rel` of the rootfs, refusing symlinks on the way.
    fn parent_dir(&mut self, rel: &Path) -> Result<&OwnedFd, LayerError> {
        if self.parent.as_ref().is_none_or(|(p, _)| p != rel) {
            let fd = self
                .root
                .open_dir(rel, Symlinks::Refuse, false, &mut |_, _| {})
                .map_err(|source| LayerError::Io {
                    entry: shown(rel),
                    op: "opening directory of changed path",
                    source,
                })?;
            self.parent = Some((rel.to_path_buf(), fd));
        }
        Ok(&self.parent.as_ref().expect("set above").1)
    }

    fn write_path(&mut self, path: &Path, must_be_dir: bool) -> Result<(), LayerError> {
        let entry = shown(path);
        let io_err = |op: &'static str| {
            let entry = entry.clone();
            move |source: io::Error| LayerError::Io { entry, op, source }
        };
        let name = path.file_name().unwrap_or_default().to_os_string();
        let parent_rel = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let dir = self
            .parent_dir(&parent_rel)?
            .try_clone()
            .map_err(io_err("duplicating descriptor"))?;
        let Some(mut st) = lstat_at(dir.as_fd(), &name).map_err(io_err("reading metadata of"))?
        else {
            return Err(LayerError::InvalidChange {
                path: path.into(),
                reason: "it does not exist in the rootfs".into(),
            });
        };
        if must_be_dir && !is_kind(&st, SFlag::S_IFDIR) {
            return Err(LayerError::InvalidChange {
                path: path.into(),
                reason: "it is the parent of a changed path but not a directory".into(),
            });
        }
        let mut name_bytes = path.as_os_str().as_bytes().to_vec();
        let mut link = None;
        let mut file = None;
        let kind = match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFDIR => {
                name_bytes.push(b'/');
                EntryType::Directory
            }
            SFlag::S_IFLNK => {
                let target = readlinkat(dir.as_fd(), name.as_os_str())
                    .map_err(|e| io_err("reading symlink")(e.into()))?;
                link = Some(target.as_bytes().to_vec());
                EntryType::Symlink
            }
            SFlag::S_IFREG => {
                let fd = openat(
                    dir.as_fd(),
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err("opening file")(e.into()))?;
                // The open file's metadata is what its content will match.
                st = fstat(&fd).map_err(|e| io_err("reading metadata of")(e.into()))?;
                file = Some(File::from(fd));
                EntryType::Regular
            }
            SFlag::S_IFCHR => EntryType::Char,
            SFlag::S_IFBLK => EntryType::Block,
            SFlag::S_IFIFO => EntryType::Fifo,
            _ => {
                tracing::debug!(path = %entry, "socket left out of the layer");
                return Ok(());
            }
        };
        let mut meta = self.meta(&st, kind, link);
        if kind != EntryType::Directory && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.first_link.get(&key) {
                meta.kind = EntryType::Link;
                meta.link = Some(first.clone());
                meta.size = 0;
                file = None;
            } else {
                self.first_link.insert(key, name_bytes.clone());
            }
        }
        let xattrs =
            kept_xattrs(dir.as_fd(), &name).map_err(io_err("reading extended attributes of"))?;
        self.write_header(&name_bytes, &meta, &xattrs, &entry)?;
        if let Some(file) = file {
            self.copy_content(file, meta.size, &entry)?;
        }
        if kind == EntryType::Directory {
            self.dirs_written.insert(path.to_path_buf());
        } else {
            self.nondirs_written.insert(path.to_path_buf());
        }
        Ok(())
    }

    fn meta(&self, st: &FileStat, kind: EntryType, link: Option<Vec<u8>>) -> Meta {
        let mtime = match self.epoch {
            Some(epoch) => st.st_mtime.min(epoch),
            None => st.st_mtime,
        };
        let is_dev = matches!(kind, EntryType::Char | EntryType::Block);
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid.into(),
            gid: st.st_gid.into(),
            mtime: mtime.max(0) as u64,
            size: if kind == EntryType::Regular {
                st.st_size as u64
            } else {
                0
            },
            link,
            dev: if is_dev {
                (major(st.st_rdev), minor(st.st_rdev))
            } else {
                (0, 0)
            },
        }
    }

    /// Writes a header (preceded by a PAX header when a field does not fit or xattrs exist).
    fn write_header(
        &mut self,
        name: &[u8],
        m: &Meta,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        entry: &str,
    ) -> Result<(), LayerError> {
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if name.len() > 100 {
            records.push((b"path".to_vec(), name.to_vec()));
        }
        if let Some(link) = m.link.as_ref().filter(|l| l.len() > 100) {
            records.push((b"linkpath".to_vec(), link.clone()));
        }
        if m.uid > MAX_OCTAL_8 {
            records.push((b"uid".to_vec(), m.uid.to_string().into_bytes()));
        }
        if m.gid > MAX_OCTAL_8 {
            records.push((b"gid".to_vec(), m.gid.to_string().into_bytes()));
        }
        if m.size > MAX_OCTAL_12 {
            records.push((b"size".to_vec(), m.size.to_string().into_bytes()));
        }
        for (key, value) in xattrs {
            let mut k = b"SCHILY.xattr.".to_vec();
            k.extend_from_slice(key);
            records.push((k, value.clone()));
        }
        let to_write = |e: io::Error| LayerError::Write {
            entry: entry.to_string(),
            source: e,
        };
        if !records.is_empty() {
            records.sort();
            let body = pax_body(&records);
            let base = name
                .rsplit(|b| *b == b'/')
                .find(|s| !s.is_empty())
                .unwrap_or(b"");
            let mut pax_name = b"PaxHeaders.0/".to_vec();
            pax_name.extend_from_slice(base);
            let pax = Meta {
                kind: EntryType::XHeader,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: body.len() as u64,
                link: None,
                dev: (0, 0),
            };
            let header = ustar_header(&pax_name, &pax).map_err(|e| invalid_header(entry, e))?;
            self.out.write_all(header.as_bytes()).map_err(to_write)?;
            self.out.write_all(&body).map_err(to_write)?;
            self.out
                .write_all(&[0; BLOCK][..padding(body.len() as u64)])
                .map_err(to_write)?;
        }
        let header = ustar_header(name, m).map_err(|e| invalid_header(entry, e))?;
        self.out.write_all(header.as_bytes()).map_err(to_write)
    }

    /// Copies exactly `size` bytes of `file` into the stream, then the block padding.
    fn copy_content(&mut self, mut file: File, size: u64, entry: &str) -> Result<(), LayerError> {
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = match file.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(LayerError::Io {
                        entry: entry.to_string(),
                        op: "reading file (it shrank while the layer was written)",
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(LayerError::Io {
                        entry: entry.to_string(),
                        op: "reading file",
                        source,
                    })
                }
            };
            self.out
                .write_all(&self.buf[..n])
                .map_err(|source| LayerError::Write {
                    entry: entry.to_string(),
                    source,
                })?;
            left -= n as u64;
        }
        self.out
            .write_all(&[0; BLOCK][..padding(size)])
            .map_err(|source| LayerError::Write {
                entry: entry.to_string(),
                source,
            })
    }
}

fn invalid_header(entry: &str, e: io::Error) -> LayerError {
    LayerError::InvalidChange {
        path: entry.into(),
        reason: format!("cannot be expressed in a tar header: {e}"),
    }
}

/// Bytes of zero padding after `len` bytes of content.
fn padding(len: u64) -> usize {
    ((BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64) as usize
}

/// A ustar header with every field set explicitly: empty user and group names, device numbers 0
/// unless a device, names longer than the field truncated (a PAX record carries them whole).
fn ustar_header(name: &[u8], m: &Meta) -> io::Result<Header> {
    let mut h = Header::new_ustar();
    {
        let old = h.as_old_mut();
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        if let Some(link) = &m.link {
            let n = link.len().min(old.linkname.len());
            old.linkname[..n].copy_from_slice(&link[..n]);
        }
    }
    h.set_entry_type(m.kind);
    h.set_mode(m.mode);
    // Values beyond the octal range are written base-256 by the tar crate, and also as PAX.
    h.set_uid(m.uid);
    h.set_gid(m.gid);
    h.set_mtime(m.mtime);
    h.set_size(m.size);
    h.set_device_major(u32::try_from(m.dev.0).map_err(io::Error::other)?)?;
    h.set_device_minor(u32::try_from(m.dev.1).map_err(io::Error::other)?)?;
    h.set_cksum();
    Ok(h)
}

/// PAX extended header records: `"<len> <key>=<value>\n"`, `len` counting the whole record.
pub(super) fn pax_body(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        body.extend_from_slice(len.to_string().as_bytes());
        body.push(b' ');
        body.extend_from_slice(key);
        body.push(b'=');
        body.extend_from_slice(value);
        body.push(b'\n');
    }
    body
}

/// The extended attributes worth putting in a layer: file capabilities and the user and
/// trusted namespaces. Left out: `security.selinux` and other LSM labels (they describe the
/// build host's policy, not the image), `system.*` (ACLs are not carried by OCI layers), and
/// overlayfs' private `trusted.overlay.*` / `user.overlay.*` (they would leak the build's
/// storage layout). A filesystem without xattr support has none.
fn kept_xattrs(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &OsStr,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let all = match read_xattrs_at(dir, name) {
        Ok(all) => all,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENOENT)) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    Ok(all.into_iter().filter(|(k, _)| keep_xattr(k)).collect())
}

pub(super) fn keep_xattr(key: &[u8]) -> bool {
    if key.starts_with(b"trusted.overlay.") || key.starts_with(b"user.overlay.") {
        return false;
    }
    key == b"security.capability" || key.starts_with(b"user.") || key.starts_with(b"trusted.")
}

/// The compressor between the tar stream and the caller's writer. The blob's digest is
/// computed below the compressor; for a plain tar it is the tar's own digest.
enum Sink<W: Write> {
    Gzip(GzipWriter<Sha256Writer<W>>),
    Zstd(zstd::stream::write::Encoder<'static, Sha256Writer<W>>),
    Plain(W),
}

impl<W: Write> Sink<W> {
    fn new(out: W, compression: Compression, workers: usize) -> io::Result<Self> {
        let workers = workers.max(1);
        Ok(match compression {
            // No file name, mtime 0 and OS "unknown" in the header, pieces cut at fixed input
            // offsets: the bytes depend only on the content (and the pinned flate2 / zlib-rs
            // versions), not on the number of threads.
            Compression::Gzip => Sink::Gzip(GzipWriter::new(Sha256Writer::new(out), workers)),
            // Always the multithreaded format, with at least one worker: zstd's output with 0
            // workers (single-threaded) differs from its output with 1 or more, which is the
            // same for any number of workers given the same job size and overlap.
            Compression::Zstd => {
                use zstd::stream::raw::CParameter;
                let mut enc =
                    zstd::stream::write::Encoder::new(Sha256Writer::new(out), ZSTD_LEVEL)?;
                enc.include_checksum(true)?;
                enc.multithread(u32::try_from(workers).unwrap_or(1))?;
                enc.set_parameter(CParameter::JobSize(ZSTD_JOB_SIZE))?;
                enc.set_parameter(CParameter::OverlapSizeLog(ZSTD_OVERLAP_LOG))?;
                Sink::Zstd(enc)
            }
            Compression::None => Sink::Plain(out),
        })
    }

    /// Ends the compressed stream: the blob's digest and size (None for a plain tar) and `out`.
    fn finish(self) -> io::Result<(Option<(Digest, u64)>, W)> {
        let hashed = match self {
            Sink::Gzip(enc) => enc.finish()?,
            Sink::Zstd(enc) => enc.finish()?,
            Sink::Plain(out) => return Ok((None, out)),
        };
        let (digest, size, out) = hashed.finish();
        Ok((Some((digest, size)), out))
    }
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Gzip(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
            Sink::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Gzip(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
            Sink::Plain(w) => w.flush(),
        }
    }
}
