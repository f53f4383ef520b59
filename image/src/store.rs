//! The content-addressed blob store: `<root>/blobs/sha256/<hex>`, verified on write, atomic.
//!
//! A blob is written to a temporary file in the store's own `tmp/` (same filesystem), hashed
//! as it is written, and renamed into place only when its digest is what was expected. Two
//! writers of the same blob race harmlessly: both produce identical bytes and the rename is
//! atomic, so a reader never sees a partial blob. This holds across processes too: two builds
//! sharing a cache directory each write their own temporary file and the last rename wins
//! with identical bytes.
//!
//! # Accounting and pruning
//! - Size: [`BlobStore::usage`] and [`BlobStore::blobs`] list what is stored (size and last
//!   use).
//! - Last use is the blob file's mtime: a new blob has it fresh, and [`BlobStore::touch`]
//!   renews it whenever a build uses a blob that was already there (the registry client does
//!   for every blob it finds present). Pruning "unused for 48 h" compares against it.
//! - Leases: a running build holds a [`Lease`], a shared `flock` on `<root>/lock`; a prune
//!   takes the same lock exclusively ([`Lease::exclusive`]), so it waits for running builds
//!   and no build starts while it deletes. It is the kernel's lock: a build that dies releases
//!   it, so a crash never wedges the cache. (The coordinator's `CacheLock` uses the same file.)

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ossb_protocol::{Digest, Sha256Writer};
use tempfile::NamedTempFile;

use crate::writeback::WritebackFile;

/// A blob's temporary file: written through a buffer, its writeback started as it grows.
type Spool = BufWriter<WritebackFile<NamedTempFile>>;

/// The temporary file of `spool` once its buffer is flushed; a failed flush names the store's
/// temporary directory.
fn spooled(spool: Spool, tmp: &Path) -> Result<NamedTempFile, StoreError> {
    Ok(spool
        .into_inner()
        .map_err(|e| StoreError::Io {
            path: tmp.to_path_buf(),
            source: e.into_error(),
        })?
        .into_inner())
}

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Bytes arrived whose digest is not the one they were fetched or declared as.
    #[error("blob verification failed: expected {expected}, got {actual} ({size} bytes); the bytes were discarded")]
    DigestMismatch {
        /// What the blob should have been.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
        /// How many bytes arrived.
        size: u64,
    },
    /// A filesystem operation on the store failed.
    #[error("blob store {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The blob is not in the store.
    #[error("blob {0} is not in the local store")]
    Missing(Digest),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A directory of blobs named by digest.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<BlobStore, StoreError> {
        let root = root.into();
        for dir in [root.join("blobs/sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(BlobStore { root })
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The blob's size, if present.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Opens the blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Missing(*digest),
            _ => StoreError::Io { path, source: e },
        })
    }

    /// Hashes the stored blob: the digest its bytes have now (`digest` itself when intact).
    pub fn rehash(&self, digest: &Digest) -> Result<Digest, StoreError> {
        use sha2::Digest as _;
        let path = self.path(digest);
        let mut file = self.open_blob(digest)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf).map_err(io_err(&path))? {
                0 => return Ok(bytes_to_digest(hasher.finalize().into())),
                n => hasher.update(&buf[..n]),
            }
        }
    }

    /// Reads a whole (small) blob, such as a manifest or config.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        let path = self.path(digest);
        self.open_blob(digest)?
            .read_to_end(&mut out)
            .map_err(io_err(&path))?;
        Ok(out)
    }

    /// Stores `bytes` and returns their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        // Here already (a rebuild writes the same configs, manifests and statements): only
        // its last use changes, with no temporary file and no fsync.
        let digest = Digest::of(bytes);
        if self.size(&digest) == Some(bytes.len() as u64) {
            self.touch(&digest);
            return Ok(digest);
        }
        let mut w = self.writer()?;
        let tmp = self.root.join("tmp");
        w.write_all(bytes).map_err(io_err(&tmp))?;
        Ok(w.commit(None)?.0)
    }

    /// Brings `digest` from `other` into this store (verified as it is copied) unless it is
    /// here already; returns its size.
    pub fn copy_from(&self, other: &BlobStore, digest: &Digest) -> Result<u64, StoreError> {
        if let Some(size) = self.size(digest) {
            return Ok(size);
        }
        let mut source = other.open_blob(digest)?;
        let mut w = self.writer()?;
        std::io::copy(&mut source, &mut w).map_err(io_err(&other.path(digest)))?;
        Ok(w.commit(Some(digest))?.1)
    }

    /// A writer for a new blob; nothing is visible in the store until [`BlobWriter::commit`].
    pub fn writer(&self) -> Result<BlobWriter, StoreError> {
        let tmp_dir = self.root.join("tmp");
        let file = NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        Ok(BlobWriter {
            store: self.clone(),
            inner: Sha256Writer::new(BufWriter::new(WritebackFile::new(file))),
        })
    }

    /// A writer for a new blob whose bytes the caller hashes itself as it writes them (the
    /// layer writer does, for the layer's descriptor): hashing them here again would cost as
    /// much as the rest of writing an incompressible layer. [`HashedBlobWriter::commit`]
    /// takes the caller's digest and size; the size is checked against what was written.
    pub fn writer_hashed_by_caller(&self) -> Result<HashedBlobWriter, StoreError> {
        let tmp_dir = self.root.join("tmp");
        let file = NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        Ok(HashedBlobWriter {
            store: self.clone(),
            out: BufWriter::new(WritebackFile::new(file)),
            len: 0,
        })
    }

    /// Marks the blob used now (its mtime), so pruning by age keeps it. Best effort.
    pub fn touch(&self, digest: &Digest) {
        let _ = File::options()
            .write(true)
            .open(self.path(digest))
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }

    /// Every blob in the store, with its size and last use.
    pub fn blobs(&self) -> Result<Vec<BlobInfo>, StoreError> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let Ok(digest) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse()
            else {
                continue;
            };
            let meta = entry.metadata().map_err(io_err(&entry.path()))?;
            out.push(BlobInfo {
                digest,
                size: meta.len(),
                last_used: meta.modified().map_err(io_err(&entry.path()))?,
            });
        }
        out.sort_by_key(|b| b.digest);
        Ok(out)
    }

    /// How many blobs and bytes the store holds.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let blobs = self.blobs()?;
        Ok(Usage {
            blobs: blobs.len() as u64,
            bytes: blobs.iter().map(|b| b.size).sum(),
        })
    }

    /// Removes a blob (for prune, under an exclusive [`Lease`]). Absent blobs are fine.
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let _ = fs::remove_file(self.listing_path(digest));
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// A shared lease for a running build (see the module documentation); waits while a
    /// prune runs.
    pub fn lease(&self) -> Result<Lease, StoreError> {
        Lease::take(&self.root, false)
    }

    /// A blob being downloaded: written and hashed as bytes arrive, resumable (a transfer
    /// that broke off continues where it stopped), and discarded unless it verifies.
    pub fn partial(&self) -> Result<PartialBlob, StoreError> {
        let tmp_dir = self.root.join("tmp");
        let file = NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        Ok(PartialBlob {
            store: self.clone(),
            out: BufWriter::with_capacity(256 * 1024, WritebackFile::new(file)),
            hasher: sha2::Sha256::default(),
            len: 0,
        })
    }

    /// The directory for temporary files on the store's filesystem.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Moves an already written file into the store after checking that it hashes to
    /// `expected`; on a mismatch the file is deleted.
    pub fn adopt(&self, file: NamedTempFile, expected: &Digest) -> Result<u64, StoreError> {
        let path = file.path().to_path_buf();
        let mut reader = io::BufReader::new(File::open(&path).map_err(io_err(&path))?);
        let mut hasher = Sha256Writer::new(io::sink());
        io::copy(&mut reader, &mut hasher).map_err(io_err(&path))?;
        let (actual, size, _) = hasher.finish();
        if actual != *expected {
            return Err(StoreError::DigestMismatch {
                expected: *expected,
                actual,
                size,
            });
        }
        self.persist(file, expected)?;
        Ok(size)
    }

    fn persist(&self, file: NamedTempFile, digest: &Digest) -> Result<(), StoreError> {
        let dest = self.path(digest);
        file.as_file().sync_all().map_err(io_err(&dest))?;
        file.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// A blob being written; hashed as it goes.
pub struct BlobWriter {
    store: BlobStore,
    inner: Sha256Writer<Spool>,
}

impl BlobWriter {
    /// Finishes the blob: verifies it against `expected` when given, then moves it into the
    /// store. Returns its digest and size. On a mismatch the bytes are discarded.
    pub fn commit(self, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        let (actual, size, buffered) = self.inner.finish();
        let file = spooled(buffered, &self.store.tmp_dir())?;
        if let Some(expected) = expected {
            if *expected != actual {
                return Err(StoreError::DigestMismatch {
                    expected: *expected,
                    actual,
                    size,
                });
            }
        }
        self.store.persist(file, &actual)?;
        Ok((actual, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A blob being written by a caller that hashes what it writes (see
/// [`BlobStore::writer_hashed_by_caller`]).
pub struct HashedBlobWriter {
    store: BlobStore,
    out: Spool,
    len: u64,
}

impl HashedBlobWriter {
    /// Moves the blob into the store as `digest`, the caller's hash of every byte it wrote,
    /// after checking that `size` bytes were written. On a mismatch the bytes are discarded.
    pub fn commit(self, digest: &Digest, size: u64) -> Result<(), StoreError> {
        let tmp = self.store.tmp_dir();
        let file = spooled(self.out, &tmp)?;
        if self.len != size {
            return Err(StoreError::Io {
                path: tmp,
                source: io::Error::other(format!(
                    "blob {digest}: {} bytes written, {size} hashed",
                    self.len
                )),
            });
        }
        self.store.persist(file, digest)
    }
}

impl Write for HashedBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One stored blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When a build last used it.
    pub last_used: std::time::SystemTime,
}

/// The store's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Number of blobs.
    pub blobs: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// A lock on the store: shared by running builds, exclusive for a prune. Released on drop
/// (or when the process dies).
pub struct Lease {
    _file: File,
}

impl Lease {
    /// The exclusive lease a prune takes: waits for every running build to finish.
    pub fn exclusive(store: &BlobStore) -> Result<Lease, StoreError> {
        Lease::take(&store.root, true)
    }

    /// The exclusive lease if no build holds the cache now; `None` without waiting otherwise
    /// (the garbage collection a finished build runs).
    pub fn try_exclusive(store: &BlobStore) -> Result<Option<Lease>, StoreError> {
        let (file, path) = lock_file(&store.root)?;
        match flock(&file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(()) => Ok(Some(Lease { _file: file })),
            Err(nix::errno::Errno::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(StoreError::Io {
                path,
                source: e.into(),
            }),
        }
    }

    fn take(root: &Path, exclusive: bool) -> Result<Lease, StoreError> {
        let (file, path) = lock_file(root)?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        flock(&file, arg).map_err(|e| StoreError::Io {
            path,
            source: e.into(),
        })?;
        Ok(Lease { _file: file })
    }
}

/// The store's lock file, opened (and made if missing), and its path.
fn lock_file(root: &Path) -> Result<(File, PathBuf), StoreError> {
    let path = root.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    Ok((file, path))
}

/// `flock(2)` on `file`, taken again when a signal interrupts it.
fn flock(file: &File, arg: nix::fcntl::FlockArg) -> nix::Result<()> {
    loop {
        #[allow(deprecated)]
        match nix::fcntl::flock(std::os::fd::AsRawFd::as_raw_fd(file), arg) {
            Err(nix::errno::Errno::EINTR) => continue,
            done => return done,
        }
    }
}

/// A blob arriving in pieces (see [`BlobStore::partial`]).
pub struct PartialBlob {
    store: BlobStore,
    out: Spool,
    hasher: sha2::Sha256,
    len: u64,
}

impl PartialBlob {
    /// How many bytes have arrived.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        use sha2::Digest as _;
        self.out
            .write_all(bytes)
            .map_err(io_err(&self.store.tmp_dir()))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends a batch of pieces (a network transfer's packets) with one `writev` per batch
    /// rather than a copy of every piece into the write buffer first.
    pub fn write_pieces<B: AsRef<[u8]>>(&mut self, pieces: &[B]) -> Result<(), StoreError> {
        use sha2::Digest as _;
        let tmp = self.store.tmp_dir();
        self.out.flush().map_err(io_err(&tmp))?;
        for piece in pieces {
            self.hasher.update(piece.as_ref());
            self.len += piece.as_ref().len() as u64;
        }
        let mut slices: Vec<io::IoSlice> = pieces
            .iter()
            .map(|p| io::IoSlice::new(p.as_ref()))
            .collect();
        let mut left = &mut slices[..];
        let file = self.out.get_mut();
        while !left.is_empty() {
            match file.write_vectored(left) {
                Ok(0) => return Err(io_err(&tmp)(io::ErrorKind::WriteZero.into())),
                Ok(n) => io::IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&tmp)(e)),
            }
        }
        Ok(())
    }

    /// Pushes the bytes written so far to the file, where [`PartialBlob::reader`] sees them.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.out.flush().map_err(io_err(&self.store.tmp_dir()))
    }

    /// A second handle on the file being written, for reading what was flushed while more
    /// arrives (with `read_at`); it stays valid after the commit.
    pub fn reader(&self) -> Result<File, StoreError> {
        self.out
            .get_ref()
            .get_ref()
            .reopen()
            .map_err(io_err(&self.store.tmp_dir()))
    }

    /// Forgets everything written, to start again from the first byte.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        use io::Seek;
        let tmp = self.store.tmp_dir();
        self.out.flush().map_err(io_err(&tmp))?;
        let spool = self.out.get_mut();
        let f = spool.get_mut().as_file_mut();
        f.set_len(0).map_err(io_err(&tmp))?;
        f.seek(io::SeekFrom::Start(0)).map_err(io_err(&tmp))?;
        spool.rewound();
        self.hasher = sha2::Sha256::default();
        self.len = 0;
        Ok(())
    }

    /// The digest of what has arrived so far.
    pub fn digest(&self) -> Digest {
        use sha2::Digest as _;
        let bytes: [u8; 32] = self.hasher.clone().finalize().into();
        bytes_to_digest(bytes)
    }

    /// Moves the blob into the store if it hashes to `expected`; otherwise discards it and
    /// says so. Returns its size.
    pub fn commit(self, expected: &Digest) -> Result<u64, StoreError> {
        let actual = self.digest();
        if actual != *expected {
            return Err(StoreError::DigestMismatch {
                expected: *expected,
                actual,
                size: self.len,
            });
        }
        let file = spooled(self.out, &self.store.tmp_dir())?;
        self.store.persist(file, expected)?;
        Ok(self.len)
    }
}

fn bytes_to_digest(bytes: [u8; 32]) -> Digest {
    // Digest's only constructors hash or parse; parse its canonical spelling.
    format!("sha256:{}", hex::encode(bytes))
        .parse()
        .unwrap_or_else(|_| Digest::of(b""))
}

/// One entry of a layer blob's tar, from its headers (GNU long names and PAX records applied):
/// what a build needs to know about a base image's files without unpacking it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerEntry {
    /// The name as stored (not cleaned: `./a`, `/a` and `a` are the same path to an applier).
    pub name: Vec<u8>,
    /// The tar type flag (`b'0'` or `0` file, `b'5'` directory, `b'2'` symlink, `b'1'` hard
    /// link, ...).
    pub kind: u8,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Content size.
    pub size: u64,
    /// Symlink target or hard-link target name.
    pub link: Vec<u8>,
    /// The content of the account databases (`etc/passwd`, `etc/group`), which `--chown`
    /// names are looked up in; `None` for every other entry.
    pub content: Option<Vec<u8>>,
}

/// Files whose content a listing keeps (cleaned names).
const LISTED_CONTENT: [&[u8]; 2] = [b"etc/passwd", b"etc/group"];
/// The most content kept for one of them, and the largest GNU long name or PAX header read.
const LISTING_MAX: u64 = 1024 * 1024;
const LISTING_MAGIC: &[u8] = b"ossb-layer-listing-v1\n";

impl BlobStore {
    /// The entries of the layer blob `digest` (gzip, zstd or plain tar), headers only. Made on
    /// first use by reading the blob through (contents are skipped) and kept beside the blob
    /// (`listings/<hex>`), so a later build reads a few hundred kilobytes instead of
    /// decompressing the layer; a listing that does not parse is made again.
    pub fn layer_listing(&self, digest: &Digest) -> Result<Vec<LayerEntry>, StoreError> {
        let path = self.listing_path(digest);
        if let Ok(bytes) = fs::read(&path) {
            if let Some(entries) = decode_listing(&bytes) {
                return Ok(entries);
            }
        }
        let blob = self.open_blob(digest)?;
        let blob_path = self.path(digest);
        let entries = list_tar(crate::layer::decompressed(blob).map_err(io_err(&blob_path))?)
            .map_err(|e| StoreError::Io {
                path: blob_path.clone(),
                source: io::Error::new(e.kind(), format!("reading the layer's entries: {e}")),
            })?;
        // Best effort: without a listing the next build reads the blob again.
        let dir = self.root.join("listings");
        if fs::create_dir_all(&dir).is_ok() {
            if let Ok(mut tmp) = NamedTempFile::new_in(self.root.join("tmp")) {
                if tmp.write_all(&encode_listing(&entries)).is_ok() {
                    let _ = tmp.persist(&path);
                }
            }
        }
        Ok(entries)
    }

    fn listing_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("listings").join(digest.hex())
    }
}

/// Reads the headers of a decompressed tar stream, skipping contents. Extension headers larger
/// than [`LISTING_MAX`] are refused before they are read (as the applier's guard does).
fn list_tar(mut r: impl Read) -> io::Result<Vec<LayerEntry>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut out = Vec::new();
    let mut block = [0u8; 512];
    let (mut long_name, mut long_link): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        if !read_block(&mut r, &mut block)? || block.iter().all(|b| *b == 0) {
            break;
        }
        let kind = block[156];
        let mut size = tar_number(&block[124..136]).ok_or_else(|| bad("invalid size field"))?;
        let extension = matches!(kind, b'L' | b'K' | b'x' | b'g' | b'X');
        if extension {
            if size > LISTING_MAX {
                return Err(bad("an extension header larger than 1 MiB"));
            }
            let data = read_data(&mut r, size)?;
            match kind {
                b'L' => long_name = Some(until_nul(&data).to_vec()),
                b'K' => long_link = Some(until_nul(&data).to_vec()),
                b'x' | b'X' => pax = pax_records(&data),
                _ => {}
            }
            continue;
        }
        let field = |range: std::ops::Range<usize>| tar_number(&block[range]).unwrap_or(0);
        let mode = (field(100..108) & 0o7777) as u32;
        let mut name = match long_name.take() {
            Some(n) => n,
            None if &block[257..263] == b"ustar\0" && block[345] != 0 => {
                let mut n = until_nul(&block[345..500]).to_vec();
                n.push(b'/');
                n.extend_from_slice(until_nul(&block[0..100]));
                n
            }
            None => until_nul(&block[0..100]).to_vec(),
        };
        let mut link = long_link
            .take()
            .unwrap_or_else(|| until_nul(&block[157..257]).to_vec());
        let (mut uid, mut gid, mut mtime) = (field(108..116), field(116..124), field(136..148));
        for (k, v) in std::mem::take(&mut pax) {
            let num = || {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.split('.').next()?.parse::<u64>().ok())
            };
            match k.as_slice() {
                b"path" => name = v,
                b"linkpath" => link = v,
                b"size" => size = num().ok_or_else(|| bad("invalid PAX size"))?,
                b"uid" => uid = num().unwrap_or(uid),
                b"gid" => gid = num().unwrap_or(gid),
                b"mtime" => mtime = num().unwrap_or(mtime),
                _ => {}
            }
        }
        // GNU sparse files: extension blocks follow the header while their flag says so.
        let mut more = kind == b'S' && block[482] != 0;
        while more {
            if !read_block(&mut r, &mut block)? {
                return Err(bad("truncated sparse header"));
            }
            more = block[504] != 0;
        }
        let is_file = matches!(kind, 0 | b'0' | b'7');
        let content = if is_file
            && size <= LISTING_MAX
            && LISTED_CONTENT.contains(&clean(&name).as_slice())
        {
            Some(read_data(&mut r, size)?)
        } else {
            // Hard links, symlinks and directories carry no data whatever their size field.
            if !matches!(kind, b'1' | b'2' | b'5') {
                skip_data(&mut r, size)?;
            }
            None
        };
        out.push(LayerEntry {
            name,
            kind,
            mode,
            uid: uid as u32,
            gid: gid as u32,
            mtime: mtime as i64,
            size,
            link,
            content,
        });
    }
    // Read to the end so a compressed stream's trailer is verified.
    io::copy(&mut r, &mut io::sink())?;
    Ok(out)
}

/// `name` with `/`, `.` and empty components dropped (only to compare with [`LISTED_CONTENT`]).
fn clean(name: &[u8]) -> Vec<u8> {
    name.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect::<Vec<_>>()
        .join(&b'/')
}

fn read_block(r: &mut impl Read, block: &mut [u8; 512]) -> io::Result<bool> {
    let mut n = 0;
    while n < block.len() {
        match r.read(&mut block[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The data of an entry (`size` bytes, at most [`LISTING_MAX`]), and its padding skipped.
fn read_data(r: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(size as usize);
    r.take(size).read_to_end(&mut data)?;
    if (data.len() as u64) < size {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let padding = (512 - size % 512) % 512;
    if io::copy(&mut r.take(padding), &mut io::sink())? < padding {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(data)
}

/// Skips `size` bytes of data and the padding to the next block.
fn skip_data(r: &mut impl Read, size: u64) -> io::Result<()> {
    let padded = size.div_ceil(512) * 512;
    if io::copy(&mut r.take(padded), &mut io::sink())? < padded {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn until_nul(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|c| *c == 0).unwrap_or(b.len())]
}

/// A numeric header field: octal text, or base-256 when the high bit of its first byte is set.
fn tar_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(until_nul(field)).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// PAX records `"<len> <key>=<value>\n"`; malformed ones end the list.
fn pax_records(mut data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(space) = data.iter().position(|b| *b == b' ') {
        let Some(len) = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|l| *l > space + 1 && *l <= data.len())
        else {
            break;
        };
        let record = &data[space + 1..len - 1];
        if let Some(eq) = record.iter().position(|b| *b == b'=') {
            out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        }
        data = &data[len..];
    }
    out
}

fn encode_listing(entries: &[LayerEntry]) -> Vec<u8> {
    let mut out = LISTING_MAGIC.to_vec();
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    for e in entries {
        out.push(e.kind);
        for v in [e.mode, e.uid, e.gid] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&e.mtime.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        bytes(&mut out, &e.name);
        bytes(&mut out, &e.link);
        match &e.content {
            Some(c) => {
                out.push(1);
                bytes(&mut out, c);
            }
            None => out.push(0),
        }
    }
    out
}

/// The entries of an encoded listing; `None` when it is not one (truncated, another version).
fn decode_listing(data: &[u8]) -> Option<Vec<LayerEntry>> {
    let mut d = data.strip_prefix(LISTING_MAGIC)?;
    fn take<'a>(d: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if d.len() < n {
            return None;
        }
        let (head, rest) = d.split_at(n);
        *d = rest;
        Some(head)
    }
    let u32_ = |d: &mut &[u8]| Some(u32::from_le_bytes(take(d, 4)?.try_into().ok()?));
    let u64_ = |d: &mut &[u8]| Some(u64::from_le_bytes(take(d, 8)?.try_into().ok()?));
    let bytes = |d: &mut &[u8]| {
        let n = u32::from_le_bytes(take(d, 4)?.try_into().ok()?) as usize;
        Some(take(d, n)?.to_vec())
    };
    let mut out = Vec::new();
    while !d.is_empty() {
        let kind = take(&mut d, 1)?[0];
        let (mode, uid, gid) = (u32_(&mut d)?, u32_(&mut d)?, u32_(&mut d)?);
        let (mtime, size) = (u64_(&mut d)? as i64, u64_(&mut d)?);
        let (name, link) = (bytes(&mut d)?, bytes(&mut d)?);
        let content = match take(&mut d, 1)?[0] {
            0 => None,
            1 => Some(bytes(&mut d)?),
            _ => return None,
        };
        out.push(LayerEntry {
            name,
            kind,
            mode,
            uid,
            gid,
            mtime,
            size,
            link,
            content,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exclusive_lease_is_tried_without_waiting_for_a_running_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        // flock locks belong to the open file: a second open, as another process's, conflicts.
        let build = store.lease().unwrap();
        assert!(Lease::try_exclusive(&store).unwrap().is_none());
        drop(build);
        let collecting = Lease::try_exclusive(&store).unwrap();
        assert!(collecting.is_some());
        assert!(Lease::try_exclusive(&store).unwrap().is_none());
        drop(collecting);
        let _build = store.lease().unwrap();
    }

    #[test]
    fn a_blob_put_again_is_not_rewritten_but_marked_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = store.put(b"config").unwrap();
        let path = store.path(&digest);
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        assert_eq!(store.put(b"config").unwrap(), digest);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&meta),
            inode,
            "rewritten"
        );
        assert!(
            meta.modified().unwrap() > old,
            "its last use was not updated"
        );
        assert_eq!(store.read(&digest).unwrap(), b"config");
    }

    #[test]
    fn lists_a_layer_and_keeps_the_listing() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o640);
            h.set_uid(7);
            h.set_gid(8);
            h.set_mtime(1234);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            tar.append_data(&mut h, name, data).unwrap();
        };
        add("etc/", tar::EntryType::Directory, b"", None);
        add(
            "./etc/passwd",
            tar::EntryType::Regular,
            b"root:x:0:0::/:/bin/sh\n",
            None,
        );
        add("big", tar::EntryType::Regular, &vec![7u8; 5000], None);
        let long = format!("{}/f", "d".repeat(150));
        add(&long, tar::EntryType::Regular, b"x", None);
        add("lnk", tar::EntryType::Symlink, b"", Some("/etc/passwd"));
        let bytes = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put(&gz.finish().unwrap()).unwrap();
        let entries = store.layer_listing(&d).unwrap();
        let names: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        assert_eq!(names, ["etc/", "etc/passwd", "big", long.as_str(), "lnk"]);
        assert_eq!(
            entries[1].content.as_deref(),
            Some(&b"root:x:0:0::/:/bin/sh\n"[..])
        );
        assert_eq!(
            (entries[2].size, entries[2].content.is_none()),
            (5000, true)
        );
        assert_eq!(
            (
                entries[2].mode,
                entries[2].uid,
                entries[2].gid,
                entries[2].mtime
            ),
            (0o640, 7, 8, 1234)
        );
        assert_eq!(entries[4].link, b"/etc/passwd");
        // The second call reads the kept listing: the same entries.
        assert!(store.listing_path(&d).is_file());
        assert_eq!(store.layer_listing(&d).unwrap(), entries);
        store.remove(&d).unwrap();
        assert!(!store.listing_path(&d).exists());
    }

    #[test]
    fn stores_by_digest_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put(b"hello").unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert!(store.contains(&d));
        assert_eq!(store.read(&d).unwrap(), b"hello");
        assert_eq!(store.size(&d), Some(5));
        // Storing the same bytes again is harmless.
        assert_eq!(store.put(b"hello").unwrap(), d);
    }

    #[test]
    fn wrong_bytes_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let expected = Digest::of(b"right");
        let mut w = store.writer().unwrap();
        w.write_all(b"wrong").unwrap();
        let err = w.commit(Some(&expected)).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&expected));
        assert!(!store.contains(&Digest::of(b"wrong")));
        assert_eq!(
            fs::read_dir(store.tmp_dir()).unwrap().count(),
            0,
            "temporary file left behind"
        );
    }

    #[test]
    fn partial_blobs_resume_reset_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let want = Digest::of(b"hello world");
        let mut p = store.partial().unwrap();
        p.write(b"hello").unwrap();
        p.write(b" world").unwrap();
        assert_eq!(p.digest(), want);
        p.reset().unwrap();
        p.write(b"hello wor1d").unwrap();
        assert!(matches!(
            p.commit(&want),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!store.contains(&want));
        let mut p = store.partial().unwrap();
        p.write(b"xx").unwrap();
        p.reset().unwrap();
        p.write(b"hello world").unwrap();
        assert_eq!(p.commit(&want).unwrap(), 11);
        assert_eq!(store.read(&want).unwrap(), b"hello world");
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn accounting_touch_and_leases() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let a = store.put(b"aaaa").unwrap();
        let b = store.put(b"bb").unwrap();
        assert_eq!(store.usage().unwrap(), Usage { blobs: 2, bytes: 6 });
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        File::options()
            .write(true)
            .open(store.path(&a))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(
            store
                .blobs()
                .unwrap()
                .iter()
                .find(|x| x.digest == a)
                .unwrap()
                .last_used,
            old
        );
        store.touch(&a);
        assert!(store.blobs().unwrap().iter().all(|x| x.last_used > old));
        // Two builds share; a prune waits for both.
        let l1 = store.lease().unwrap();
        let l2 = store.lease().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = store.clone();
        let pruner = std::thread::spawn(move || {
            let _x = Lease::exclusive(&s2).unwrap();
            tx.send(()).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "prune ran during a build");
        drop((l1, l2));
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        pruner.join().unwrap();
        store.remove(&b).unwrap();
        store.remove(&b).unwrap();
        assert_eq!(store.usage().unwrap().blobs, 1);
    }

    #[test]
    fn missing_blob_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = Digest::of(b"absent");
        assert!(store
            .read(&d)
            .unwrap_err()
            .to_string()
            .contains(&d.to_string()));
    }
}
