//! Reading an image out of an OCI image layout directory (`index.json`, `blobs/sha256/...`) or
//! out of the blob store itself, for one platform: what `--build-context NAME=oci-layout://`
//! and a bake target's image read from. Every blob is verified against its digest as it is
//! copied into the store.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use ossb_protocol::{Digest, Platform};

use crate::export::REF_NAME;
use crate::oci::{media_type, Descriptor, ImageConfig, Index, Manifest};
use crate::registry::PulledImage;
use crate::store::{BlobStore, StoreError};

/// Manifests, indexes, configs and `index.json` larger than this are refused.
const MAX_JSON: u64 = 4 * 1024 * 1024;

/// Why an image could not be read from a layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// No `index.json`: not an OCI layout.
    #[error("{0} is not an OCI image layout (it has no index.json): write one with `skopeo copy docker://IMAGE oci:DIR:TAG` or `ossb build -o type=oci,tar=false,dest=DIR`")]
    NotALayout(PathBuf),
    /// No manifest has the tag (and the index lists more than one).
    #[error("tag {tag:?} is not in the OCI layout {dir} (its tags: {available}): name one of them, or a digest with @sha256:...")]
    TagMissing {
        /// The layout.
        dir: PathBuf,
        /// The tag asked for.
        tag: String,
        /// The tags it has.
        available: String,
    },
    /// The blob is not in the layout.
    #[error("blob {digest} is not in {dir}: the layout is incomplete")]
    BlobMissing {
        /// The layout (or the store).
        dir: PathBuf,
        /// The blob.
        digest: Digest,
    },
    /// The index has no manifest for the platform.
    #[error("{what} has no image for {wanted} (it has: {available})")]
    PlatformMissing {
        /// The layout and digest.
        what: String,
        /// The platform asked for.
        wanted: Platform,
        /// The platforms it has.
        available: String,
    },
    /// A JSON document is malformed or of the wrong kind.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Reading the layout failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Storing a blob failed (its bytes do not match its digest, or the disk).
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Where an image's blobs are read from.
#[derive(Clone, Copy, Debug)]
pub enum Blobs<'a> {
    /// An OCI layout directory: copied into the store, verified.
    Layout(&'a Path),
    /// The store itself (an image a build of this cache directory made).
    Store,
}

/// The digest `index.json` of the layout `dir` lists for `tag` (its `ref.name` annotation),
/// else its only manifest when it lists one, as buildx resolves an `oci-layout://DIR:TAG`.
pub fn resolve_tag(dir: &Path, tag: &str) -> Result<Digest, LayoutError> {
    let path = dir.join("index.json");
    if !path.is_file() {
        return Err(LayoutError::NotALayout(dir.to_path_buf()));
    }
    let bytes = read_bounded(&path)?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| LayoutError::Invalid {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let name = |d: &Descriptor| {
        d.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned()
    };
    if let Some(d) = index
        .manifests
        .iter()
        .find(|d| name(d).as_deref() == Some(tag))
    {
        return Ok(d.digest);
    }
    match index.manifests.as_slice() {
        [only] => Ok(only.digest),
        all => Err(LayoutError::TagMissing {
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
            available: {
                let tags: Vec<String> = all.iter().filter_map(name).collect();
                match tags.is_empty() {
                    true => "none".into(),
                    false => tags.join(", "),
                }
            },
        }),
    }
}

/// The image `top` (a manifest, or an index to choose `platform` from) with its config and
/// layers, every blob brought into `store` from `blobs` and verified.
pub fn load(
    blobs: Blobs<'_>,
    top: &Digest,
    platform: &Platform,
    store: &BlobStore,
) -> Result<PulledImage, LayoutError> {
    let (bytes, path) = json_blob(blobs, top, store)?;
    let kind: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Invalid {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    let media = kind
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    let is_index =
        media_type::is_index(&media) || (media.is_empty() && kind.get("manifests").is_some());
    let (manifest_digest, bytes, path) = if is_index {
        let index: Index = serde_json::from_value(kind).map_err(|e| LayoutError::Invalid {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let chosen = index
            .find(platform)
            .ok_or_else(|| LayoutError::PlatformMissing {
                what: format!("{}", top),
                wanted: platform.clone(),
                available: index.platforms().join(", "),
            })?;
        let (bytes, path) = json_blob(blobs, &chosen.digest, store)?;
        (chosen.digest, bytes, path)
    } else {
        (*top, bytes, path)
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| LayoutError::Invalid {
        path: path.clone(),
        detail: format!("not an image manifest: {e}"),
    })?;
    let (config_bytes, config_path) = json_blob(blobs, &manifest.config.digest, store)?;
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| LayoutError::Invalid {
            path: config_path,
            detail: format!("not an image config: {e}"),
        })?;
    for layer in &manifest.layers {
        bring(blobs, &layer.digest, store)?;
    }
    Ok(PulledImage {
        manifest_digest,
        manifest,
        config,
    })
}

/// Brings `digest` into the store (verified) and returns where it came from.
fn bring(blobs: Blobs<'_>, digest: &Digest, store: &BlobStore) -> Result<PathBuf, LayoutError> {
    match blobs {
        Blobs::Store if store.contains(digest) => Ok(store.path(digest)),
        Blobs::Store => Err(LayoutError::BlobMissing {
            dir: store
                .path(digest)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            digest: *digest,
        }),
        Blobs::Layout(dir) => {
            let path = dir.join("blobs/sha256").join(digest.hex());
            if store.contains(digest) {
                return Ok(path);
            }
            let mut file = fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => LayoutError::BlobMissing {
                    dir: dir.to_path_buf(),
                    digest: *digest,
                },
                _ => LayoutError::Io {
                    path: path.clone(),
                    source: e,
                },
            })?;
            let mut w = store.writer()?;
            std::io::copy(&mut file, &mut w).map_err(|source| LayoutError::Io {
                path: path.clone(),
                source,
            })?;
            w.commit(Some(digest))?;
            Ok(path)
        }
    }
}

/// A small JSON blob (manifest, index, config), brought into the store and read back.
fn json_blob(
    blobs: Blobs<'_>,
    digest: &Digest,
    store: &BlobStore,
) -> Result<(Vec<u8>, PathBuf), LayoutError> {
    let path = bring(blobs, digest, store)?;
    if store.size(digest).unwrap_or(0) > MAX_JSON {
        return Err(LayoutError::Invalid {
            path,
            detail: format!("{digest} is larger than {MAX_JSON} bytes: not a manifest or config"),
        });
    }
    Ok((store.read(digest)?, path))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, LayoutError> {
    let io = |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    fs::File::open(path)
        .map_err(io)?
        .take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(LayoutError::Invalid {
            path: path.to_path_buf(),
            detail: format!("larger than {MAX_JSON} bytes"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{write_oci_dir, NamedImage};

    /// A one-layer image in `store`: (manifest descriptor, layer digest).
    fn image(store: &BlobStore, platform: &Platform) -> (Descriptor, Digest) {
        let layer = store.put(b"not really a tar").unwrap();
        let config = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            ..Default::default()
        };
        let config_bytes = crate::oci::to_canonical_json(&config);
        let config_digest = store.put(&config_bytes).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_MANIFEST,
            "config": {"mediaType": media_type::OCI_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()},
            "layers": [{"mediaType": media_type::OCI_LAYER_GZIP, "digest": layer.to_string(), "size": 16}],
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let digest = store.put(&bytes).unwrap();
        let desc = Descriptor {
            media_type: media_type::OCI_MANIFEST.into(),
            digest,
            size: bytes.len() as u64,
            platform: None,
            annotations: None,
        };
        (desc, layer)
    }

    #[test]
    fn reads_an_image_by_tag_and_verifies_its_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let from = BlobStore::open(dir.path().join("from")).unwrap();
        let platform: Platform = "linux/amd64".parse().unwrap();
        let (desc, layer) = image(&from, &platform);
        let layout = dir.path().join("layout");
        let named = [NamedImage {
            descriptor: desc.clone(),
            names: vec!["example.com/app:v1".into()],
        }];
        write_oci_dir(&from, &named, &layout).unwrap();
        assert_eq!(resolve_tag(&layout, "v1").unwrap(), desc.digest);
        // One manifest: any tag finds it, as buildx's single-manifest fallback.
        assert_eq!(resolve_tag(&layout, "other").unwrap(), desc.digest);
        let to = BlobStore::open(dir.path().join("to")).unwrap();
        let image = load(Blobs::Layout(&layout), &desc.digest, &platform, &to).unwrap();
        assert_eq!(image.manifest_digest, desc.digest);
        assert!(to.contains(&layer));
        // A blob whose bytes changed is refused.
        let to2 = BlobStore::open(dir.path().join("to2")).unwrap();
        fs::write(layout.join("blobs/sha256").join(layer.hex()), b"changed").unwrap();
        let err = load(Blobs::Layout(&layout), &desc.digest, &platform, &to2).unwrap_err();
        assert!(
            matches!(err, LayoutError::Store(StoreError::DigestMismatch { .. })),
            "{err}"
        );
        assert!(!to2.contains(&layer));
    }

    #[test]
    fn names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            resolve_tag(dir.path(), "v1"),
            Err(LayoutError::NotALayout(_))
        ));
        let from = BlobStore::open(dir.path().join("from")).unwrap();
        let platform: Platform = "linux/amd64".parse().unwrap();
        let (a, _) = image(&from, &platform);
        let (b, _) = image(&from, &"linux/arm64".parse().unwrap());
        let layout = dir.path().join("layout");
        let named = [
            NamedImage {
                descriptor: a,
                names: vec!["x:one".into()],
            },
            NamedImage {
                descriptor: b,
                names: vec!["x:two".into()],
            },
        ];
        write_oci_dir(&from, &named, &layout).unwrap();
        let err = resolve_tag(&layout, "three").unwrap_err().to_string();
        assert!(
            err.contains("\"three\"") && err.contains("one, two"),
            "{err}"
        );
    }
}
