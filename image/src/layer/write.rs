//! Writing a layer blob from a change list, deterministically and in one streaming pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, major, minor, FileStat, Mode, SFlag};
use ossb_protocol::{Digest, Sha256Writer};
use tar::{EntryType, Header};

use super::root::{is_kind, lstat_at, read_xattrs_at, Root, Symlinks};
use super::{
    codec_level, decompressed, Change, ChangeKind, Compression, LayerError, LayerOptions,
    WrittenLayer,
};

mod chunks;
mod pieces;
#[cfg(test)]
mod tests;

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use chunks::{Chunk, ChunkWriter, BLOB_CHUNKS, CHUNKS};
use pieces::{Format, PieceWriter};

const BLOCK: usize = 512;
/// The largest value of an 8-byte octal header field (mode, uid, gid, device numbers).
const MAX_OCTAL_8: u64 = 0o7777777;
/// The largest value of a 12-byte octal header field (size).
const MAX_OCTAL_12: u64 = 0o77777777777;
/// gzip level 6: zlib's, Go's and therefore containerd's and BuildKit's default, the usual
/// trade-off; levels 7-9 cost two to three times the CPU for about 1% smaller layers.
pub(super) const GZIP_LEVEL: u32 = 6;
/// zstd level 3: the library's default level and what BuildKit uses for zstd layers.
pub(super) const ZSTD_LEVEL: i32 = 3;
/// The most compression threads a layer uses (pieces compressed in parallel). The bytes
/// written never depend on the number of threads.
const MAX_WORKERS: usize = 4;

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
/// independently compressed 1 MiB pieces (incompressible ones stored), zstd is a sequence of
/// independent 4 MiB frames (see the `pieces` module).
pub fn write_layer(
    rootfs: &Path,
    changes: &[Change],
    out: impl Write,
    opts: &LayerOptions,
) -> Result<WrittenLayer, LayerError> {
    write_layer_on(
        rootfs,
        changes,
        &ContentSources::new(),
        out,
        opts,
        default_workers(),
    )
}

/// Regular files of a rootfs whose bytes are in another file: the rootfs-relative path (as in
/// a [`Change`]) to that file's host path.
///
/// A COPY whose rootfs nobody reads afterwards (a skeleton, `--link`'s directory) makes each
/// copied file a placeholder of the right size, owner, mode, mtime and xattrs, and the layer
/// takes the bytes from the source: a large COPY is then read once instead of copied into
/// the rootfs and read back (see `ossb_worker::fs::copy_into_referencing`).
pub type ContentSources = HashMap<PathBuf, PathBuf>;

/// [`write_layer`], with the content of the files `sources` names read from their sources.
///
/// Everything but a file's bytes comes from the rootfs, so the layer is byte for byte the one
/// the rootfs would give with the sources' bytes copied into it. A source is opened without
/// following a symlink, must be a regular file and must have the placeholder's size (else
/// [`LayerError::Io`]: it changed since it was copied).
pub fn write_layer_from(
    rootfs: &Path,
    changes: &[Change],
    sources: &ContentSources,
    out: impl Write,
    opts: &LayerOptions,
) -> Result<WrittenLayer, LayerError> {
    write_layer_on(rootfs, changes, sources, out, opts, default_workers())
}

/// The number of compression threads: the available parallelism, at most [`MAX_WORKERS`].
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

/// [`write_layer`] with `workers` compression threads (at least one is used).
///
/// The work is split into stages on their own threads, joined by [`chunks`]: one walks the
/// plan and reads the rootfs into tar chunks, one computes the diff ID over them, one feeds
/// them to the compressor (whose workers are further threads), and the caller's thread hashes
/// the blob and writes it to `out` (which need not be `Send`). Each stage has a few chunks
/// queued ahead of it, so one that waits for a CPU for a moment does not stall the others.
pub(super) fn write_layer_on(
    rootfs: &Path,
    changes: &[Change],
    sources: &ContentSources,
    out: impl Write,
    opts: &LayerOptions,
    workers: usize,
) -> Result<WrittenLayer, LayerError> {
    let root = Root::open(rootfs).map_err(|source| LayerError::Rootfs {
        path: rootfs.to_path_buf(),
        source,
    })?;
    let plan = plan(changes)?;
    let compression = opts.compression;
    let level = codec_level(compression, opts.level);
    let epoch = opts.source_date_epoch;
    // reader -> hasher -> compressor (or the caller, for a plain tar) -> back to the reader;
    // compressor -> caller -> back to the compressor.
    let (tar_tx, tar_rx) = sync_channel::<Chunk>(CHUNKS + 1);
    let (hashed_tx, hashed_rx) = sync_channel::<Chunk>(CHUNKS + 1);
    let (tar_free_tx, tar_free_rx) = sync_channel::<Chunk>(CHUNKS + 1);
    let (blob_tx, blob_rx) = sync_channel::<Chunk>(BLOB_CHUNKS + 1);
    let (blob_free_tx, blob_free_rx) = sync_channel::<Chunk>(BLOB_CHUNKS + 1);
    let spawn = |name: &str| std::thread::Builder::new().name(format!("ossb-layer-{name}"));
    let (written, compressed, read, hashed) = std::thread::scope(|s| {
        let (root, plan) = (&root, &plan);
        let reader = spawn("read").spawn_scoped(s, move || {
            write_tar(
                root,
                plan,
                sources,
                epoch,
                ChunkWriter::new(tar_tx, tar_free_rx, CHUNKS),
            )
        });
        let hasher = spawn("hash").spawn_scoped(s, move || {
            let mut h = Sha256Writer::new(io::sink());
            let mut complete = false;
            for chunk in tar_rx {
                h.write_all(chunk.bytes()).expect("io::Sink never fails");
                complete = chunk.end;
                if hashed_tx.send(chunk).is_err() {
                    break;
                }
            }
            let (digest, size, _) = h.finish();
            complete.then_some((digest, size))
        });
        // The caller's end of the blob: the compressor's output, or the tar itself.
        let (blob_rx, blob_free_tx, compressor) = if compression == Compression::None {
            drop((blob_tx, blob_rx, blob_free_tx, blob_free_rx));
            (hashed_rx, tar_free_tx, None)
        } else {
            let compressor = spawn("compress").spawn_scoped(s, move || {
                let out = ChunkWriter::new(blob_tx, blob_free_rx, BLOB_CHUNKS);
                compress(hashed_rx, tar_free_tx, out, compression, level, workers)
            });
            (blob_rx, blob_free_tx, Some(compressor))
        };
        let written = write_blob(&blob_rx, &blob_free_tx, out, compression);
        // Whatever happened, the channel ends held here go before the threads are joined, so
        // a stage blocked on them wakes up and stops.
        drop((blob_rx, blob_free_tx));
        let spawn_failed = |e: io::Error| LayerError::Write {
            entry: "start of archive".into(),
            source: io::Error::new(e.kind(), format!("starting a layer thread: {e}")),
        };
        let panicked = |what: &str| LayerError::Write {
            entry: "end of archive".into(),
            source: io::Error::other(format!("the layer {what} thread panicked")),
        };
        let compressed = compressor.map(|c| {
            c.map_err(spawn_failed)
                .and_then(|t| t.join().map_err(|_| panicked("compressor"))?)
        });
        let read = reader
            .map_err(spawn_failed)
            .and_then(|t| t.join().map_err(|_| panicked("reader"))?);
        let hashed = hasher
            .map_err(spawn_failed)
            .and_then(|t| t.join().map_err(|_| panicked("digest")));
        (written, compressed, read, hashed)
    });
    // The stage that failed first says why; the others only saw the pipeline stop. The
    // reader's own errors (a file that vanished) come first.
    let (blob, diff) = match (read, compressed.transpose(), written, hashed) {
        (Ok(()), Ok(_), Ok(blob), Ok(Some(diff))) => (blob, diff),
        (read, compressed, written, hashed) => {
            let errors: Vec<LayerError> = [read.err(), compressed.err(), written.err()]
                .into_iter()
                .flatten()
                .chain(hashed.err())
                .collect();
            let cause = errors
                .iter()
                .position(|e| !is_stopped_error(e))
                .unwrap_or(0);
            return Err(errors
                .into_iter()
                .nth(cause)
                .unwrap_or_else(|| LayerError::Write {
                    entry: "end of archive".into(),
                    source: chunks::stopped(),
                }));
        }
    };
    let (diff_id, tar_size) = diff;
    let (digest, size) = blob.unwrap_or((diff_id, tar_size));
    Ok(WrittenLayer {
        digest,
        diff_id,
        size,
        media_type: compression.media_type(),
    })
}

fn is_stopped_error(e: &LayerError) -> bool {
    matches!(e, LayerError::Write { source, .. } if chunks::is_stopped(source))
}

/// The caller's stage: writes the blob's chunks to `out` until the end of the stream, and
/// returns the blob's digest and size when it is compressed (a plain tar's are the diff ID's).
fn write_blob(
    rx: &Receiver<Chunk>,
    free: &SyncSender<Chunk>,
    out: impl Write,
    compression: Compression,
) -> Result<Option<(Digest, u64)>, LayerError> {
    let end = |source| LayerError::Write {
        entry: "end of archive".into(),
        source,
    };
    if compression == Compression::None {
        let mut out = out;
        drain(rx, free, |b| out.write_all(b))?;
        out.flush().map_err(end)?;
        return Ok(None);
    }
    let mut out = Sha256Writer::new(out);
    drain(rx, free, |b| out.write_all(b))?;
    let (digest, size, mut out) = out.finish();
    out.flush().map_err(end)?;
    Ok(Some((digest, size)))
}

/// Passes every chunk of `rx` to `write` and back to `free`, up to the end of the stream.
fn drain(
    rx: &Receiver<Chunk>,
    free: &SyncSender<Chunk>,
    mut write: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<(), LayerError> {
    for chunk in rx {
        if let Err(source) = write(chunk.bytes()) {
            return Err(LayerError::Write {
                entry: chunk.entry.clone(),
                source,
            });
        }
        let end = chunk.end;
        // The producer may be done already.
        let _ = free.send(chunk);
        if end {
            return Ok(());
        }
    }
    Err(LayerError::Write {
        entry: "end of archive".into(),
        source: chunks::stopped(),
    })
}

/// The compressing stage: the tar chunks of `rx` into the compressor, its output into `out`.
fn compress(
    rx: Receiver<Chunk>,
    free: SyncSender<Chunk>,
    out: ChunkWriter,
    compression: Compression,
    level: i32,
    workers: usize,
) -> Result<(), LayerError> {
    let mut enc =
        compressor(out, compression, level, workers).map_err(|source| LayerError::Write {
            entry: "start of archive".into(),
            source,
        })?;
    drain(&rx, &free, |b| enc.write_all(b))?;
    let end = |source| LayerError::Write {
        entry: "end of archive".into(),
        source,
    };
    enc.finish().map_err(end)?.finish().map_err(end)
}

/// The reading stage: the tar stream of `plan` into `out`, end-of-archive blocks included.
fn write_tar(
    root: &Root,
    plan: &BTreeMap<PathBuf, bool>,
    sources: &ContentSources,
    epoch: Option<i64>,
    out: ChunkWriter,
) -> Result<(), LayerError> {
    let mut w = TarWriter {
        root,
        sources,
        out,
        epoch,
        dirs_written: HashSet::new(),
        nondirs_written: HashSet::new(),
        deleted: HashSet::new(),
        first_link: HashMap::new(),
        parent: None,
    };
    for (path, deleted) in plan {
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
    w.out.set_entry("end of archive");
    w.out.write_all(&[0; 2 * BLOCK]).map_err(end)?;
    w.out.finish().map_err(end)
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

struct TarWriter<'r> {
    root: &'r Root,
    sources: &'r ContentSources,
    out: ChunkWriter,
    epoch: Option<i64>,
    dirs_written: HashSet<PathBuf>,
    nondirs_written: HashSet<PathBuf>,
    deleted: HashSet<PathBuf>,
    /// The first name written for each multiply-linked inode: later names link to it.
    first_link: HashMap<(u64, u64), Vec<u8>>,
    /// The last parent directory opened, as entries come sorted by directory.
    parent: Option<(PathBuf, OwnedFd)>,
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

impl TarWriter<'_> {
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

    /// The directory `rel` of the rootfs (opened refusing symlinks on the way), taken out of
    /// the cache: give it back with `self.parent = Some(..)` (moving it saves a dup and a
    /// close per entry).
    fn take_parent_dir(&mut self, rel: &Path) -> Result<(PathBuf, OwnedFd), LayerError> {
        if let Some((p, fd)) = self.parent.take() {
            if p == rel {
                return Ok((p, fd));
            }
        }
        let fd = self
            .root
            .open_dir(rel, Symlinks::Refuse, false, &mut |_, _| {})
            .map_err(|source| LayerError::Io {
                entry: shown(rel),
                op: "opening directory of changed path",
                source,
            })?;
        Ok((rel.to_path_buf(), fd))
    }

    fn write_path(&mut self, path: &Path, must_be_dir: bool) -> Result<(), LayerError> {
        let parent_rel = path.parent().unwrap_or(Path::new(""));
        let (rel, dir) = self.take_parent_dir(parent_rel)?;
        let result = self.write_path_in(path, must_be_dir, &dir);
        self.parent = Some((rel, dir));
        result
    }

    fn write_path_in(
        &mut self,
        path: &Path,
        must_be_dir: bool,
        dir: &OwnedFd,
    ) -> Result<(), LayerError> {
        let entry = shown(path);
        let io_err = |op: &'static str| {
            let entry = entry.clone();
            move |source: io::Error| LayerError::Io { entry, op, source }
        };
        let name = path.file_name().unwrap_or_default().to_os_string();
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
        // An open file's attributes are read through its descriptor: cheaper than the
        // /proc/self/fd path the others need.
        let xattrs = match &file {
            Some(f) => fd_xattrs(f.as_fd()),
            None => kept_xattrs(dir.as_fd(), &name),
        }
        .map_err(io_err("reading extended attributes of"))?;
        let file = match (file, self.sources.get(path)) {
            (Some(_), Some(source)) => Some(open_source(source, meta.size, &entry)?),
            (file, _) => file,
        };
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
        self.out.set_entry(entry);
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
            let read = self
                .out
                .read_from(&mut file, left)
                .map_err(|source| LayerError::Write {
                    entry: entry.to_string(),
                    source,
                })?;
            let n = match read {
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

/// The file holding the bytes of the placeholder `entry` (see [`ContentSources`]): a regular
/// file, not followed if a symlink, of the placeholder's `size`.
fn open_source(source: &Path, size: u64, entry: &str) -> Result<File, LayerError> {
    let io_err = |op: &'static str| {
        move |source: io::Error| LayerError::Io {
            entry: entry.to_string(),
            op,
            source,
        }
    };
    let fd = nix::fcntl::open(
        source,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("opening the copied file's source")(e.into()))?;
    let st =
        fstat(&fd).map_err(|e| io_err("reading metadata of the copied file's source")(e.into()))?;
    if !is_kind(&st, SFlag::S_IFREG) || st.st_size as u64 != size {
        return Err(io_err("reading the copied file's source")(
            io::Error::other(format!(
                "{} changed while the step ran (now {} bytes, copied {size})",
                source.display(),
                st.st_size
            )),
        ));
    }
    Ok(File::from(fd))
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

/// [`kept_xattrs`] of an open file, through its descriptor.
fn fd_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    let list = match sized(|buf, len| {
        // SAFETY: `buf` points to `len` writable bytes (or is null with `len` 0, which asks
        // for the size); `fd` is open for the duration of the call.
        unsafe { libc::flistxattr(fd, buf.cast(), len) }
    }) {
        Ok(list) => list,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for key in list.split(|b| *b == 0).filter(|k| !k.is_empty()) {
        if !keep_xattr(key) {
            continue;
        }
        let Ok(ckey) = std::ffi::CString::new(key) else {
            continue;
        };
        let value = sized(|buf, len| {
            // SAFETY: as above; `ckey` is NUL-terminated.
            unsafe { libc::fgetxattr(fd, ckey.as_ptr(), buf.cast(), len) }
        });
        match value {
            Ok(v) => out.push((key.to_vec(), v)),
            // Gone since it was listed, or not readable by us: as `read_xattrs_at`.
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

/// Calls an `f*xattr` function for the size, then for the bytes, retrying if they grew.
fn sized(mut call: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    for _ in 0..8 {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
    Err(io::Error::other("extended attributes kept changing size"))
}

pub(super) fn keep_xattr(key: &[u8]) -> bool {
    if key.starts_with(b"trusted.overlay.") || key.starts_with(b"user.overlay.") {
        return false;
    }
    key == b"security.capability" || key.starts_with(b"user.") || key.starts_with(b"trusted.")
}

/// The compressor of the tar stream; its workers are threads of its own.
///
/// No file name, mtime 0 and OS "unknown" in the gzip header, pieces cut at fixed input
/// offsets (see [`pieces`]): the bytes depend only on the content (and the pinned flate2 /
/// zlib-rs / zstd versions), not on the number of threads.
fn compressor<W: Write>(
    out: W,
    compression: Compression,
    level: i32,
    workers: usize,
) -> io::Result<PieceWriter<W>> {
    let format = match compression {
        Compression::Gzip => Format::Gzip,
        Compression::Zstd => Format::Zstd,
        Compression::None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a plain tar has no compressor",
            ))
        }
    };
    Ok(PieceWriter::with_level(out, format, level, workers))
}

/// A reader that hashes what it reads, and keeps its source's error apart.
struct Sha256Reader<R>(R, Sha256Writer<io::Sink>, Option<io::Error>);

impl<R: io::Read> io::Read for Sha256Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Ok(n) => {
                self.1.write_all(&buf[..n])?;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.2 = Some(e);
                Err(copy)
            }
        }
    }
}

/// Recompresses the layer blob `blob` (gzip, zstd or a plain tar, told by its first bytes) as
/// `opts.compression` at `opts.level` into `out`: what `force-compression=true` does to a
/// layer compressed otherwise (a base image's). The tar is kept byte for byte (no mtime is
/// touched: `opts.source_date_epoch` is not used), so the diff ID, which is returned, is the
/// layer's as before; the caller checks it against the config's.
pub fn recompress(
    blob: impl io::Read,
    out: impl Write,
    opts: &LayerOptions,
) -> Result<WrittenLayer, LayerError> {
    let read = |after: &str| {
        let after = Some(after.to_string());
        move |source| LayerError::Read { after, source }
    };
    let write = |source| LayerError::Write {
        entry: "recompressed layer".into(),
        source,
    };
    let tar = decompressed(blob).map_err(read("(start)"))?;
    let mut tar = Sha256Reader(tar, Sha256Writer::new(io::sink()), None);
    let mut blob = Sha256Writer::new(out);
    let copied = match opts.compression {
        Compression::None => io::copy(&mut tar, &mut blob).map(drop),
        c => {
            let level = codec_level(c, opts.level);
            compressor(&mut blob, c, level, default_workers()).and_then(|mut enc| {
                io::copy(&mut tar, &mut enc)?;
                enc.finish().map(drop)
            })
        }
    };
    // A read error is the source's (a corrupt blob), a write error the destination's.
    copied.map_err(|e| match tar.2.take() {
        Some(source) => read("(a recompressed layer's tar)")(source),
        None => write(e),
    })?;
    let diff = tar.1;
    let (diff_id, _, _) = diff.finish();
    let (digest, size, mut out) = blob.finish();
    out.flush().map_err(write)?;
    Ok(WrittenLayer {
        digest,
        diff_id,
        size,
        media_type: opts.compression.media_type(),
    })
}
