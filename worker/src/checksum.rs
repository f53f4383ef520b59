//! Content checksums of what a COPY reads, for cache keys: path, type, mode, uid, gid, size,
//! content and link target of every file the copy would take — never mtimes, so a fresh
//! checkout on another machine gives the same checksum.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::fs::{expand_source, join_rel, CopyFilter, FsError};

/// The blake3 checksum of the files `sources` name under `root` (wildcards and `filter` as
/// COPY applies them). A missing source is an error, as it is for the copy itself.
pub fn sources_checksum(
    root: &Path,
    sources: &[String],
    filter: CopyFilter<'_>,
) -> Result<[u8; 32], FsError> {
    let mut hasher = blake3::Hasher::new();
    for source in sources {
        hasher.update(b"source\0");
        hasher.update(source.as_bytes());
        for (rel, path) in expand_source(root, source, filter)? {
            hash_tree(&mut hasher, &path, &rel, filter)?;
        }
    }
    Ok(*hasher.finalize().as_bytes())
}

fn hash_tree(
    hasher: &mut blake3::Hasher,
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
    hasher: &mut blake3::Hasher,
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
    hasher: &mut blake3::Hasher,
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
        let mut file = fs::File::open(path).map_err(io_err)?;
        io::copy(&mut file, hasher).map_err(io_err)?;
    }
    Ok(())
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
}
