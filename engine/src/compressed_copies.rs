//! The compressed copies of layers stored as plain tars or compressed otherwise.
//!
//! A build whose outputs read no blobs stores its layers uncompressed
//! (`BuildRequest::defer_compression`), as BuildKit leaves a layer without a compressed blob
//! until an export asks for one; `force-compression=true` recompresses a base image's layers.
//! The first export that needs a layer so compresses it, and the copy is recorded here by the
//! source blob's digest and the compression asked, so later exports take it as it is.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ossb_image::oci::Descriptor;
use ossb_protocol::Digest;

/// The records of one cache directory, under `<cache>/cache/compressed`.
pub(crate) struct CompressedCopies {
    dir: PathBuf,
}

impl CompressedCopies {
    pub(crate) fn open(cache_dir: &Path) -> CompressedCopies {
        CompressedCopies {
            dir: cache_dir.join("cache/compressed"),
        }
    }

    /// `settings` names the compression (its media type and level).
    fn path(&self, source: &Digest, settings: &str) -> PathBuf {
        let settings = Digest::of(settings.as_bytes()).hex();
        self.dir
            .join(format!("{}-{}.json", source.hex(), &settings[..16]))
    }

    /// The copy of `source` compressed with `settings`, if one was recorded. Reading it marks
    /// it used (its mtime), for pruning.
    pub(crate) fn get(&self, source: &Digest, settings: &str) -> Option<Descriptor> {
        let path = self.path(source, settings);
        let copy = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
        crate::cache::mark_used(&path);
        Some(copy)
    }

    /// Records `copy` as `source` compressed with `settings`.
    pub(crate) fn put(&self, source: &Digest, settings: &str, copy: &Descriptor) -> io::Result<()> {
        crate::cache::write_atomic(&self.path(source, settings), &serde_json::to_vec(copy)?)
    }

    /// The digests of the copies last used when `fresh` says (`prune` keeps their blobs).
    pub(crate) fn digests(&self, fresh: impl Fn(SystemTime) -> bool) -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        for (_, copy, used) in self.records()? {
            if let Some(copy) = copy.filter(|_| fresh(used)) {
                out.push(copy.digest);
            }
        }
        Ok(out)
    }

    /// Removes the records `gone` says to (given the copy and when it was last used), and
    /// unreadable ones (interrupted writes); how many.
    pub(crate) fn prune(
        &self,
        gone: impl Fn(&Descriptor, SystemTime) -> bool,
    ) -> io::Result<usize> {
        let mut removed = 0;
        for (path, copy, used) in self.records()? {
            if copy.is_none_or(|c| gone(&c, used)) {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    /// Every record: its path, its copy (`None` if unreadable) and when it was last used.
    fn records(&self) -> io::Result<Vec<(PathBuf, Option<Descriptor>, SystemTime)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let copy = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Descriptor>(&b).ok());
            out.push((path, copy, used));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(n: u8) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: Digest::of(&[n]),
            size: u64::from(n),
            platform: None,
            annotations: None,
        }
    }

    #[test]
    fn a_copy_is_found_by_its_source_and_settings_only() {
        let dir = tempfile::tempdir().unwrap();
        let copies = CompressedCopies::open(dir.path());
        let source = Digest::of(b"tar");
        assert!(copies.get(&source, "gzip;level=6").is_none());
        copies.put(&source, "gzip;level=6", &desc(1)).unwrap();
        assert_eq!(
            copies.get(&source, "gzip;level=6").unwrap().digest,
            desc(1).digest
        );
        assert!(copies.get(&source, "gzip;level=9").is_none());
        assert!(copies.get(&Digest::of(b"other"), "gzip;level=6").is_none());
    }

    #[test]
    fn prune_removes_what_it_is_told_and_unreadable_records() {
        let dir = tempfile::tempdir().unwrap();
        let copies = CompressedCopies::open(dir.path());
        copies.put(&Digest::of(b"a"), "s", &desc(1)).unwrap();
        copies.put(&Digest::of(b"b"), "s", &desc(2)).unwrap();
        fs::write(dir.path().join("cache/compressed/broken.json"), b"{").unwrap();
        let removed = copies.prune(|c, _| c.size == 1).unwrap();
        assert_eq!(removed, 2);
        assert!(copies.get(&Digest::of(b"a"), "s").is_none());
        assert!(copies.get(&Digest::of(b"b"), "s").is_some());
    }
}
