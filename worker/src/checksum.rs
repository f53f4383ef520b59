//! Content checksums of what a COPY reads, for cache keys: path, type, mode, uid, gid, size,
//! content and link target of every file the copy would take — never mtimes, so a fresh
//! checkout on another machine gives the same checksum.
//!
//! A file's content enters the checksum as its blake3 hash, which a [`ChecksumCache`] keeps
//! between builds (as BuildKit's and git's index do), keyed by what changes when a file is
//! written: path, device, inode, size, mtime and ctime in nanoseconds, mode, uid, gid. A
//! touched but identical file is read again and gives the same hash, so the checksum still
//! depends on content only. The racy-git rule applies: an entry is trusted only when the file's
//! mtime is older, by more than the coarsest timestamp granularity, than the moment the file
//! was read (so also than the moment the cache was written), since a write in the same
//! timestamp tick would leave the key unchanged. (Setting an old mtime back changes the ctime.)

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::fs::{expand_source, join_rel, CopyFilter, FsError};

/// The blake3 checksum of the files `sources` name under `root` (wildcards and `filter` as
/// COPY applies them). A missing source is an error, as it is for the copy itself.
pub fn sources_checksum(
    root: &Path,
    sources: &[String],
    filter: CopyFilter<'_>,
) -> Result<[u8; 32], FsError> {
    sources_checksum_cached(root, sources, filter, &ChecksumCache::in_memory())
}

/// [`sources_checksum`] with the content hashes of unchanged files taken from `cache`.
pub fn sources_checksum_cached(
    root: &Path,
    sources: &[String],
    filter: CopyFilter<'_>,
    cache: &ChecksumCache,
) -> Result<[u8; 32], FsError> {
    let mut hasher = Hasher {
        hasher: blake3::Hasher::new(),
        cache,
        entries: None,
    };
    sum_sources(&mut hasher, root, sources, filter)?;
    Ok(*hasher.hasher.finalize().as_bytes())
}

/// What one file (or directory, link, special file) contributed to a checksum: its path
/// relative to the root and a digest of the bytes it fed in (path, metadata, content hash).
pub type EntryDigest = (String, [u8; 8]);

/// [`sources_checksum_cached`] with what each entry contributed, in the order the checksum
/// read them: two lists of the same sources tell which path changed (a cache miss's reason).
/// Eight bytes per entry: only compared with an earlier list of the same step.
pub fn sources_entries_cached(
    root: &Path,
    sources: &[String],
    filter: CopyFilter<'_>,
    cache: &ChecksumCache,
) -> Result<([u8; 32], Vec<EntryDigest>), FsError> {
    let mut hasher = Hasher {
        hasher: blake3::Hasher::new(),
        cache,
        entries: Some((blake3::Hasher::new(), Vec::new())),
    };
    sum_sources(&mut hasher, root, sources, filter)?;
    let entries = hasher.entries.take().map(|(_, e)| e).unwrap_or_default();
    Ok((*hasher.hasher.finalize().as_bytes(), entries))
}

fn sum_sources(
    hasher: &mut Hasher<'_>,
    root: &Path,
    sources: &[String],
    filter: CopyFilter<'_>,
) -> Result<(), FsError> {
    for source in sources {
        // Not part of any entry's digest: the sources are the instruction's.
        hasher.hasher.update(b"source\0");
        hasher.hasher.update(source.as_bytes());
        for (rel, path) in expand_source(root, source, filter)? {
            hash_tree(hasher, &path, &rel, filter)?;
        }
    }
    Ok(())
}

/// The checksum being computed and where content hashes come from.
struct Hasher<'c> {
    hasher: blake3::Hasher,
    cache: &'c ChecksumCache,
    /// When asked for: the current entry's own hasher and the entries so far.
    entries: Option<(blake3::Hasher, Vec<EntryDigest>)>,
}

impl Hasher<'_> {
    fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        if let Some((entry, _)) = &mut self.entries {
            entry.update(bytes);
        }
    }

    /// Ends the entry at `rel`: its digest joins the list (when one is kept).
    fn end_entry(&mut self, rel: &str) {
        if let Some((entry, list)) = &mut self.entries {
            let mut digest = [0u8; 8];
            digest.copy_from_slice(&entry.finalize().as_bytes()[..8]);
            list.push((rel.to_string(), digest));
            entry.reset();
        }
    }
}

fn hash_tree(
    hasher: &mut Hasher<'_>,
    path: &Path,
    rel: &str,
    filter: CopyFilter<'_>,
) -> Result<(), FsError> {
    let io_err = |source: io::Error| FsError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The top of a source is followed when it is a symlink, as COPY does.
    let meta = fs::metadata(path)
        .or_else(|_| fs::symlink_metadata(path))
        .map_err(io_err)?;
    hash_entry(hasher, path, rel, &meta)?;
    if meta.is_dir() {
        walk(hasher, path, rel, filter)?;
    }
    Ok(())
}

fn walk(
    hasher: &mut Hasher<'_>,
    dir: &Path,
    rel: &str,
    filter: CopyFilter<'_>,
) -> Result<(), FsError> {
    let io_err = |source: io::Error| FsError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err)?
        .collect::<Result<_, _>>()
        .map_err(io_err)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let child_rel = join_rel(rel, &entry.file_name().to_string_lossy());
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|source| FsError::Io {
            path: path.clone(),
            source,
        })?;
        if filter.excluded(&child_rel) && !(meta.is_dir() && filter.must_descend(&child_rel)) {
            continue;
        }
        hash_entry(hasher, &path, &child_rel, &meta)?;
        if meta.is_dir() {
            walk(hasher, &path, &child_rel, filter)?;
        }
    }
    Ok(())
}

fn hash_entry(
    hasher: &mut Hasher<'_>,
    path: &Path,
    rel: &str,
    meta: &fs::Metadata,
) -> Result<(), FsError> {
    let io_err = |source: io::Error| FsError::Io {
        path: path.to_path_buf(),
        source,
    };
    hasher.update(b"\0entry\0");
    hasher.update(rel.as_bytes());
    hasher.update(&meta.mode().to_le_bytes());
    hasher.update(&meta.uid().to_le_bytes());
    hasher.update(&meta.gid().to_le_bytes());
    if meta.file_type().is_symlink() {
        hasher.update(
            fs::read_link(path)
                .map_err(io_err)?
                .as_os_str()
                .as_encoded_bytes(),
        );
    } else if meta.is_file() {
        hasher.update(&meta.len().to_le_bytes());
        let content = hasher.cache.content_hash(path, meta).map_err(io_err)?;
        hasher.update(&content);
    } else {
        // A fifo, socket or device is never opened: its type (in the mode) and its device
        // number are what a copy makes of it.
        hasher.update(&meta.rdev().to_le_bytes());
    }
    hasher.end_entry(rel);
    Ok(())
}

/// Timestamps within this much of the moment a file was read are not trusted (the racy-git
/// rule): the coarsest granularity in use (FAT's 2 s; NFS and others 1 s; ext4, xfs and btrfs
/// stamp with a clock that lags by a few milliseconds).
const RACY_NS: i64 = 2_000_000_000;
/// Entries not used for this long are dropped when the cache is saved.
const KEEP_UNUSED_SECS: u64 = 14 * 24 * 3600;
/// The most entries kept (about 100 bytes each plus the path).
const MAX_ENTRIES: usize = 2_000_000;
const MAGIC: &[u8] = b"ossb-checksums-v1\n";

/// What identifies one state of a file: if all of it is unchanged, so is the content.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl FileKey {
    fn of(path: &Path, meta: &fs::Metadata) -> FileKey {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        FileKey {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    hash: [u8; 32],
    /// When the file was read (ns since the epoch): the entry is trusted only for timestamps
    /// older than this by [`RACY_NS`].
    read_ns: i64,
    /// When a build last used it (s since the epoch).
    used: u64,
}

/// The content hashes of files read by earlier builds (see the module documentation), kept in
/// one file of the cache directory. Shared by the steps of a build; [`ChecksumCache::save`]
/// writes it back (the last of two concurrent builds wins, losing only entries).
#[derive(Debug)]
pub struct ChecksumCache {
    file: Option<PathBuf>,
    entries: Mutex<HashMap<FileKey, Entry>>,
    /// Files read (not taken from the cache) so far, for tests and logs.
    reads: std::sync::atomic::AtomicU64,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

impl ChecksumCache {
    /// A cache that keeps nothing beyond this process.
    pub fn in_memory() -> ChecksumCache {
        ChecksumCache {
            file: None,
            entries: Mutex::new(HashMap::new()),
            reads: Default::default(),
        }
    }

    /// The cache kept in `file`; a missing or unreadable file gives an empty cache.
    pub fn open(file: &Path) -> ChecksumCache {
        let entries = fs::read(file)
            .ok()
            .and_then(|bytes| decode(&bytes))
            .unwrap_or_default();
        ChecksumCache {
            file: Some(file.to_path_buf()),
            entries: Mutex::new(entries),
            reads: Default::default(),
        }
    }

    /// How many files were read rather than taken from the cache.
    pub fn files_read(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The blake3 hash of the content of the regular file `path` (whose metadata is `meta`).
    fn content_hash(&self, path: &Path, meta: &fs::Metadata) -> io::Result<[u8; 32]> {
        let key = FileKey::of(path, meta);
        let now = now_ns();
        let used = (now / 1_000_000_000) as u64;
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = entries.get_mut(&key) {
                if key.mtime_ns < e.read_ns.saturating_sub(RACY_NS) {
                    e.used = used;
                    return Ok(e.hash);
                }
            }
        }
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut file = fs::File::open(path)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let hash = *hasher.finalize().as_bytes();
        // Keyed by the metadata from before the read: a write during it changes the file's
        // times, so the entry would not match the file afterwards.
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(
            key,
            Entry {
                hash,
                read_ns: now,
                used,
            },
        );
        Ok(hash)
    }

    /// Writes the cache back to its file (atomically), dropping entries unused for two weeks.
    pub fn save(&self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = (now_ns() / 1_000_000_000) as u64;
        let oldest = oldest.saturating_sub(KEEP_UNUSED_SECS);
        let mut kept: Vec<(&FileKey, &Entry)> =
            entries.iter().filter(|(_, e)| e.used >= oldest).collect();
        if kept.len() > MAX_ENTRIES {
            kept.sort_by_key(|(_, e)| std::cmp::Reverse(e.used));
            kept.truncate(MAX_ENTRIES);
        }
        let bytes = encode(&kept);
        drop(entries);
        let dir = file.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&bytes)?;
        tmp.persist(file).map_err(|e| e.error)?;
        Ok(())
    }
}

fn encode(entries: &[(&FileKey, &Entry)]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for (k, e) in entries {
        let path = k.path.as_os_str().as_bytes();
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path);
        for v in [k.dev, k.ino, k.size] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [k.mtime_ns, k.ctime_ns, e.read_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [k.mode, k.uid, k.gid] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&e.used.to_le_bytes());
        out.extend_from_slice(&e.hash);
    }
    out
}

/// The entries of a saved cache; `None` when the file is not one (truncated, other version).
fn decode(data: &[u8]) -> Option<HashMap<FileKey, Entry>> {
    let mut d = data.strip_prefix(MAGIC)?;
    fn take<'a>(d: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if d.len() < n {
            return None;
        }
        let (head, rest) = d.split_at(n);
        *d = rest;
        Some(head)
    }
    fn u64_(d: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(d, 8)?.try_into().ok()?))
    }
    fn u32_(d: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(d, 4)?.try_into().ok()?))
    }
    let mut out = HashMap::new();
    while !d.is_empty() {
        let len = u32_(&mut d)? as usize;
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(take(&mut d, len)?));
        let (dev, ino, size) = (u64_(&mut d)?, u64_(&mut d)?, u64_(&mut d)?);
        let (mtime_ns, ctime_ns, read_ns) = (
            u64_(&mut d)? as i64,
            u64_(&mut d)? as i64,
            u64_(&mut d)? as i64,
        );
        let (mode, uid, gid) = (u32_(&mut d)?, u32_(&mut d)?, u32_(&mut d)?);
        let used = u64_(&mut d)?;
        let hash: [u8; 32] = take(&mut d, 32)?.try_into().ok()?;
        out.insert(
            FileKey {
                path,
                dev,
                ino,
                size,
                mtime_ns,
                ctime_ns,
                mode,
                uid,
                gid,
            },
            Entry {
                hash,
                read_ns,
                used,
            },
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_and_mode_count_mtime_does_not() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("src")).unwrap();
        fs::write(dir.path().join("src/a"), "one").unwrap();
        let sum = || sources_checksum(dir.path(), &["src".into()], CopyFilter::none()).unwrap();
        let first = sum();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        fs::File::options()
            .write(true)
            .open(dir.path().join("src/a"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(sum(), first, "mtime must not matter");
        fs::write(dir.path().join("src/a"), "two").unwrap();
        let second = sum();
        assert_ne!(second, first, "content matters");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path().join("src/a"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(sum(), second, "mode matters");
        assert!(sources_checksum(dir.path(), &["missing".into()], CopyFilter::none()).is_err());
    }

    /// The entry list gives the same checksum as the plain one and tells which path changed.
    #[test]
    fn entries_name_the_changed_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("src")).unwrap();
        fs::write(dir.path().join("src/a"), "one").unwrap();
        fs::write(dir.path().join("src/b"), "two").unwrap();
        let cache = ChecksumCache::in_memory();
        let list = || {
            sources_entries_cached(dir.path(), &["src".into()], CopyFilter::none(), &cache).unwrap()
        };
        let (sum, before) = list();
        assert_eq!(
            sum,
            sources_checksum(dir.path(), &["src".into()], CopyFilter::none()).unwrap()
        );
        let paths: Vec<&str> = before.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["src", "src/a", "src/b"]);
        fs::write(dir.path().join("src/b"), "three").unwrap();
        let (_, after) = list();
        let changed: Vec<&str> = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.0.as_str())
            .collect();
        assert_eq!(changed, ["src/b"]);
    }

    fn set_mtime(path: &Path, secs_ago: u64) {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn the_cache_skips_unchanged_files_and_notices_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        for f in ["a", "b"] {
            fs::write(src.join(f), f.repeat(1000)).unwrap();
        }
        let file = dir.path().join("cache/checksums");
        let sum = |cache: &ChecksumCache| {
            sources_checksum_cached(dir.path(), &["src".into()], CopyFilter::none(), cache).unwrap()
        };
        let plain = sources_checksum(dir.path(), &["src".into()], CopyFilter::none()).unwrap();
        // Files written just now are racy: read each time, and not trusted once saved.
        let cache = ChecksumCache::open(&file);
        assert_eq!(sum(&cache), plain, "the cache never changes the checksum");
        cache.save().unwrap();
        let cache = ChecksumCache::open(&file);
        assert_eq!(sum(&cache), plain);
        assert_eq!(cache.files_read(), 2, "racy entries are read again");
        // Older files are taken from the saved cache.
        for f in ["a", "b"] {
            set_mtime(&src.join(f), 3600);
        }
        let cache = ChecksumCache::open(&file);
        assert_eq!(sum(&cache), plain);
        cache.save().unwrap();
        let cache = ChecksumCache::open(&file);
        assert_eq!(sum(&cache), plain);
        assert_eq!(cache.files_read(), 0, "unchanged files are not read");
        // Same size, same mtime, other content: the ctime differs, so it is read.
        let old = fs::metadata(src.join("a")).unwrap().modified().unwrap();
        fs::write(src.join("a"), "z".repeat(1000)).unwrap();
        fs::File::options()
            .write(true)
            .open(src.join("a"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let changed = sum(&cache);
        assert_ne!(changed, plain);
        assert_eq!(cache.files_read(), 1);
        assert_eq!(
            changed,
            sources_checksum(dir.path(), &["src".into()], CopyFilter::none()).unwrap()
        );
        // A corrupt cache file is an empty cache.
        fs::write(&file, b"ossb-checksums-v1\n\x01").unwrap();
        let cache = ChecksumCache::open(&file);
        assert_eq!(sum(&cache), changed);
        assert_eq!(cache.files_read(), 2);
    }

    #[test]
    fn an_entry_is_trusted_only_for_timestamps_older_than_its_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, "one").unwrap();
        let cache = ChecksumCache::in_memory();
        let meta = fs::metadata(&path).unwrap();
        let first = cache.content_hash(&path, &meta).unwrap();
        // Rewritten in the same timestamp tick: same key, so only the racy rule saves us.
        fs::write(&path, "two").unwrap();
        let second = cache.content_hash(&path, &meta).unwrap();
        assert_ne!(
            first, second,
            "an entry read within the racy window is not trusted"
        );
        assert_eq!(cache.files_read(), 2);
    }
}
