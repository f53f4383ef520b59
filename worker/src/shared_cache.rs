//! A `RUN --mount=type=cache` directory as one blob, so that a build cluster can hand it from
//! the worker that last wrote it to the next (see `ossb-cluster`'s worker): [`export`] writes
//! the directory as a layer (a sorted zstd tar, the same writer as image layers) unless it is
//! unchanged since it was last exported or imported; [`import`] replaces the directory with a
//! blob's content, under the cache's exclusive lock, through a sibling directory renamed into
//! place (a step never sees half an import; extraction never leaves the directory).
//!
//! Beside each cache directory `NAME`, `NAME.shared` records the blob it last matched and a
//! fingerprint of its metadata then (paths, types, sizes, times, inodes: any write changes
//! it), so an unchanged directory is neither written nor sent again.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ossb_image::layer::{
    apply_layer, write_layer, ApplyOptions, Compression, LayerOptions, WrittenLayer,
};
use ossb_protocol::Digest;
use serde::{Deserialize, Serialize};

use crate::mounts::{file_name_for, lock};
use crate::snapshot::Snapshot;

/// What a cache directory last matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Shared {
    /// The blob.
    digest: Digest,
    /// The directory's metadata fingerprint then.
    fingerprint: String,
}

/// The main directory of cache mount `id` under `cache_dir` (as `RUN --mount` uses it).
pub fn dir_of(cache_dir: &Path, id: &str) -> PathBuf {
    cache_dir.join("run-mounts/cache").join(file_name_for(id))
}

fn marker_of(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_os_string();
    name.push(".shared");
    PathBuf::from(name)
}

fn read_marker(dir: &Path) -> Option<Shared> {
    serde_json::from_slice(&fs::read(marker_of(dir)).ok()?).ok()
}

fn write_marker(dir: &Path, shared: &Shared) -> io::Result<()> {
    let bytes = serde_json::to_vec(shared).map_err(io::Error::other)?;
    let tmp = marker_of(dir).with_extension("shared.tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(tmp, marker_of(dir))
}

fn fingerprint(dir: &Path) -> io::Result<String> {
    Ok(fingerprint_of(&Snapshot::take(dir, &[])?))
}

fn fingerprint_of(snapshot: &Snapshot) -> String {
    let mut h = blake3::Hasher::new();
    for (path, m) in snapshot.iter() {
        h.update(path.as_os_str().as_encoded_bytes());
        h.update(&[0]);
        h.update(format!("{:?}", (m.kind, m.mode, m.uid, m.gid, m.size)).as_bytes());
        h.update(format!("{:?}", (m.mtime, m.ctime, m.ino, m.symlink_target.as_ref())).as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The blob the cache directory of `id` last matched, if it still does (unchanged since).
pub fn current(cache_dir: &Path, id: &str) -> Option<Digest> {
    let dir = dir_of(cache_dir, id);
    let shared = read_marker(&dir)?;
    (fingerprint(&dir).ok()? == shared.fingerprint).then_some(shared.digest)
}

/// Writes the cache directory of `id` to `out` as a zstd layer, unless it does not exist or
/// is unchanged since it last matched a blob (`None` then). Holds the cache's shared lock, so
/// a `sharing=locked` step does not write meanwhile. Call [`exported`] once the blob is
/// stored.
pub fn export(cache_dir: &Path, id: &str, out: impl Write) -> io::Result<Option<Export>> {
    let dir = dir_of(cache_dir, id);
    if !dir.is_dir() {
        return Ok(None);
    }
    let _lock = lock(&dir, libc::LOCK_SH)?;
    // One walk: the fingerprint and the layer's entries come from the same snapshot.
    let snapshot = Snapshot::take(&dir, &[])?;
    let before = fingerprint_of(&snapshot);
    if read_marker(&dir).is_some_and(|s| s.fingerprint == before) {
        return Ok(None);
    }
    let changes = Snapshot::default().diff(&snapshot);
    let opts = LayerOptions {
        compression: Compression::Zstd,
        source_date_epoch: None,
        level: None,
    };
    let layer = write_layer(&dir, &changes, out, &opts).map_err(io::Error::other)?;
    Ok(Some(Export {
        layer,
        fingerprint: before,
    }))
}

/// A cache directory written as a blob.
#[derive(Debug)]
pub struct Export {
    /// The blob.
    pub layer: WrittenLayer,
    fingerprint: String,
}

/// Records that the cache directory of `id` matches the blob [`export`] wrote.
pub fn exported(cache_dir: &Path, id: &str, export: &Export) -> io::Result<()> {
    write_marker(
        &dir_of(cache_dir, id),
        &Shared {
            digest: export.layer.digest,
            fingerprint: export.fingerprint.clone(),
        },
    )
}

/// Replaces the cache directory of `id` with the content of layer `blob` (whose digest is
/// `digest`), under the cache's exclusive lock (it waits for the steps using it).
pub fn import(cache_dir: &Path, id: &str, digest: &Digest, blob: impl Read) -> io::Result<()> {
    let dir = dir_of(cache_dir, id);
    let parent = dir.parent().expect("a cache directory has a parent");
    fs::create_dir_all(parent)?;
    let _lock = lock(&dir, libc::LOCK_EX)?;
    let name = file_name_for(id);
    let fresh = parent.join(format!(".import-{name}-{}", std::process::id()));
    let old = parent.join(format!(".old-{name}-{}", std::process::id()));
    for leftover in [&fresh, &old] {
        let _ = fs::remove_dir_all(leftover);
    }
    fs::create_dir(&fresh)?;
    match apply_layer(blob, &fresh, &ApplyOptions::default()) {
        Ok(report) => {
            for line in report.warnings() {
                tracing::warn!("cache mount {}: {line}", dir.display());
            }
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&fresh);
            return Err(io::Error::other(e));
        }
    }
    if dir.exists() {
        fs::rename(&dir, &old)?;
    }
    fs::rename(&fresh, &dir)?;
    let _ = fs::remove_dir_all(&old);
    write_marker(
        &dir,
        &Shared {
            digest: *digest,
            fingerprint: fingerprint(&dir)?,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache directory goes out as a blob and comes back elsewhere the same; an unchanged
    /// directory is not exported again; a changed one is.
    #[test]
    fn a_cache_directory_travels_as_a_blob() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let dir = dir_of(a.path(), "/root/.cargo");
        fs::create_dir_all(dir.join("registry")).unwrap();
        fs::write(dir.join("registry/crate.tar"), b"bytes of a crate").unwrap();
        assert!(export(b.path(), "/root/.cargo", Vec::new())
            .unwrap()
            .is_none());

        let mut blob = Vec::new();
        let first = export(a.path(), "/root/.cargo", &mut blob)
            .unwrap()
            .unwrap();
        exported(a.path(), "/root/.cargo", &first).unwrap();
        assert_eq!(current(a.path(), "/root/.cargo"), Some(first.layer.digest));
        assert!(export(a.path(), "/root/.cargo", Vec::new())
            .unwrap()
            .is_none());

        // Elsewhere, over what was there.
        let other = dir_of(b.path(), "/root/.cargo");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("stale"), b"x").unwrap();
        import(
            b.path(),
            "/root/.cargo",
            &first.layer.digest,
            blob.as_slice(),
        )
        .unwrap();
        assert_eq!(
            fs::read(other.join("registry/crate.tar")).unwrap(),
            b"bytes of a crate"
        );
        assert!(!other.join("stale").exists());
        assert_eq!(current(b.path(), "/root/.cargo"), Some(first.layer.digest));

        fs::write(dir.join("registry/more"), b"more").unwrap();
        assert_eq!(current(a.path(), "/root/.cargo"), None);
        let second = export(a.path(), "/root/.cargo", Vec::new())
            .unwrap()
            .unwrap();
        assert_ne!(second.layer.digest, first.layer.digest);
    }

    /// A blob that tries to write outside the cache directory leaves it as it was.
    #[test]
    fn a_bad_blob_leaves_the_directory_alone() {
        let a = tempfile::tempdir().unwrap();
        let dir = dir_of(a.path(), "c");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("kept"), b"k").unwrap();
        let err = import(a.path(), "c", &Digest::of(b"x"), &b"not a tar at all"[..]);
        assert!(err.is_err());
        assert_eq!(fs::read(dir.join("kept")).unwrap(), b"k");
        assert!(fs::read_dir(dir.parent().unwrap()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".import")));
    }
}
