//! Exporters that write a built image somewhere other than a registry: an OCI image layout,
//! as a directory or as a tar archive (what `podman load` and `skopeo copy oci-archive:` read),
//! a Docker archive (`docker load` / `podman load`, [`write_docker_archive`]), and the image's
//! filesystem in a local directory ([`write_local`]) or a tar archive ([`write_tar`]).
//!
//! Nothing half-written is left at the destination: the result is assembled under a temporary
//! name beside it and renamed into place at the end.

use std::fs;
use std::io::{self, BufWriter, Write};

use crate::writeback::WritebackFile;
use std::path::{Path, PathBuf};

use crate::oci::{media_type, to_canonical_json, Descriptor, Index, Manifest};
use crate::store::BlobStore;

mod docker;
mod local;
mod tarball;

pub use docker::write_docker_archive;
pub use local::write_local;
pub use tarball::write_tar;

/// Annotation naming an image in an OCI layout (the tag part).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation with the full image name, as containerd and buildx write it.
pub const IMAGE_NAME: &str = "io.containerd.image.name";

/// Errors of the exporters.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Writing the destination failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// What was being written.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The destination holds something that is not ours to replace.
    #[error("{} exists and is not {}; refusing to overwrite it (remove it or choose another dest)", .path.display(), .replaceable.what())]
    Occupied {
        /// The destination.
        path: PathBuf,
        /// What an export may replace there.
        replaceable: Replaceable,
    },
    /// The blob store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A layer could not be read or applied.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer blob.
        digest: String,
        /// What went wrong.
        source: crate::layer::LayerError,
    },
    /// The image has no manifest for the platform asked for.
    #[error("the image has no manifest for platform {wanted}; it offers: {}", .available.join(", "))]
    PlatformMissing {
        /// What was asked for.
        wanted: String,
        /// What the index lists.
        available: Vec<String>,
    },
    /// A manifest in the store is not valid.
    #[error("manifest {digest} in the local store is invalid: {detail}")]
    InvalidManifest {
        /// Its digest.
        digest: String,
        /// What is wrong.
        detail: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One image (a manifest or an index, already in the store) and the names it is tagged with.
#[derive(Clone, Debug)]
pub struct NamedImage {
    /// The top-level manifest or index.
    pub descriptor: Descriptor,
    /// Full references, e.g. `registry:5000/app:1.0`.
    pub names: Vec<String>,
}

/// Every blob reachable from `top` (manifests, indexes, configs, layers), in a stable order.
pub fn reachable_blobs(
    store: &BlobStore,
    top: &Descriptor,
) -> Result<Vec<Descriptor>, ExportError> {
    let mut out = vec![top.clone()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        i += 1;
        let invalid = |e: serde_json::Error| ExportError::InvalidManifest {
            digest: d.digest.to_string(),
            detail: e.to_string(),
        };
        if media_type::is_index(&d.media_type) {
            let index: Index = serde_json::from_slice(&store.read(&d.digest)?).map_err(invalid)?;
            out.extend(index.manifests);
        } else if media_type::is_manifest(&d.media_type) {
            let m: Manifest = serde_json::from_slice(&store.read(&d.digest)?).map_err(invalid)?;
            out.push(m.config);
            out.extend(m.layers);
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|d| seen.insert(d.digest));
    Ok(out)
}

/// The manifest of `top` for `platform`: `top` itself when it is a manifest, else the
/// index entry for the platform.
pub(crate) fn manifest_for(
    store: &BlobStore,
    top: &Descriptor,
    platform: &ossb_protocol::Platform,
) -> Result<(Descriptor, Manifest), ExportError> {
    let read_json = |d: &Descriptor| -> Result<serde_json::Value, ExportError> {
        serde_json::from_slice(&store.read(&d.digest)?).map_err(|e| ExportError::InvalidManifest {
            digest: d.digest.to_string(),
            detail: e.to_string(),
        })
    };
    let parse = |d: &Descriptor, v: serde_json::Value| -> Result<Manifest, ExportError> {
        serde_json::from_value(v).map_err(|e| ExportError::InvalidManifest {
            digest: d.digest.to_string(),
            detail: e.to_string(),
        })
    };
    let value = read_json(top)?;
    if !media_type::is_index(&top.media_type) {
        return Ok((top.clone(), parse(top, value)?));
    }
    let index: Index = serde_json::from_value(value).map_err(|e| ExportError::InvalidManifest {
        digest: top.digest.to_string(),
        detail: e.to_string(),
    })?;
    let entry = index
        .find(platform)
        .ok_or_else(|| ExportError::PlatformMissing {
            wanted: platform.to_string(),
            available: index.platforms(),
        })?
        .clone();
    let value = read_json(&entry)?;
    let manifest = parse(&entry, value)?;
    Ok((entry, manifest))
}

/// The tag part of a reference, as the OCI layout's ref.name annotation wants it.
pub(crate) fn tag_of(name: &str) -> &str {
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.rsplit_once(':') {
        Some((_, tag)) => tag,
        None => "latest",
    }
}

fn layout_index(images: &[NamedImage]) -> Index {
    let mut manifests = Vec::new();
    for image in images {
        if image.names.is_empty() {
            manifests.push(image.descriptor.clone());
        }
        for name in &image.names {
            let mut d = image.descriptor.clone();
            // The descriptor's own annotations (`--annotation manifest-descriptor:`) stay.
            let mut annotations = d.annotations.take().unwrap_or_default();
            annotations.insert(IMAGE_NAME.to_string(), name.clone());
            annotations.insert(REF_NAME.to_string(), tag_of(name).to_string());
            d.annotations = Some(annotations);
            manifests.push(d);
        }
    }
    Index {
        schema_version: 2,
        media_type: Some(media_type::OCI_INDEX.into()),
        manifests,
        annotations: None,
    }
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes an OCI image layout directory at `dest`.
pub fn write_oci_dir(
    store: &BlobStore,
    images: &[NamedImage],
    dest: &Path,
) -> Result<(), ExportError> {
    let parent = parent_of(dest);
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".ossb-oci-")
        .tempdir_in(&parent)
        .map_err(io_err(&parent))?;
    let blobs_dir = staging.path().join("blobs/sha256");
    fs::create_dir_all(&blobs_dir).map_err(io_err(&blobs_dir))?;
    for image in images {
        for d in reachable_blobs(store, &image.descriptor)? {
            let to = blobs_dir.join(d.digest.hex());
            if to.exists() {
                continue;
            }
            // A hard link costs nothing when the store is on the same filesystem.
            if fs::hard_link(store.path(&d.digest), &to).is_err() {
                fs::copy(store.path(&d.digest), &to).map_err(io_err(&to))?;
            }
        }
    }
    let layout = staging.path().join("oci-layout");
    fs::write(&layout, OCI_LAYOUT).map_err(io_err(&layout))?;
    let index = staging.path().join("index.json");
    fs::write(&index, to_canonical_json(&layout_index(images))).map_err(io_err(&index))?;
    clear_destination(dest)?;
    let staged = staging.keep();
    fs::rename(&staged, dest).map_err(io_err(dest))?;
    Ok(())
}

/// Writes an OCI image layout as a tar archive at `dest`.
pub fn write_oci_tar(
    store: &BlobStore,
    images: &[NamedImage],
    dest: &Path,
) -> Result<(), ExportError> {
    let parent = parent_of(dest);
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".ossb-oci-")
        .tempfile_in(&parent)
        .map_err(io_err(&parent))?;
    {
        let mut tar = tar::Builder::new(BufWriter::new(WritebackFile::new(tmp.as_file())));
        let mut add = |name: &str, size: u64, data: &mut dyn io::Read| -> io::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(size);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, data)
        };
        let index = to_canonical_json(&layout_index(images));
        add("oci-layout", OCI_LAYOUT.len() as u64, &mut &OCI_LAYOUT[..]).map_err(io_err(dest))?;
        add("index.json", index.len() as u64, &mut &index[..]).map_err(io_err(dest))?;
        let mut written = std::collections::HashSet::new();
        for image in images {
            for d in reachable_blobs(store, &image.descriptor)? {
                if written.insert(d.digest) {
                    let mut f = store.open_blob(&d.digest)?;
                    let size = f.metadata().map_err(io_err(dest))?.len();
                    add(&format!("blobs/sha256/{}", d.digest.hex()), size, &mut f)
                        .map_err(io_err(dest))?;
                }
            }
        }
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(io_err(dest))?;
    }
    tmp.as_file().sync_all().map_err(io_err(dest))?;
    tmp.persist(dest).map_err(|e| ExportError::Io {
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

pub(crate) fn parent_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What an export may replace at its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replaceable {
    /// An empty directory (`type=local`).
    EmptyDirectory,
    /// An empty directory or an earlier OCI layout (`type=oci,tar=false`).
    EmptyDirectoryOrLayout,
    /// A file (an archive's destination): never a directory.
    File,
}

impl Replaceable {
    fn what(self) -> &'static str {
        match self {
            Replaceable::EmptyDirectory => "an empty directory",
            Replaceable::EmptyDirectoryOrLayout => "an empty directory or an OCI layout",
            Replaceable::File => "a file",
        }
    }
}

/// Whether an export may write `dest`, which must be missing or what `replaceable` says:
/// checked before a build runs, so that a destination it could never write fails at once,
/// and again by the export, which then replaces it. `Ok(true)` when `dest` exists.
pub fn check_destination(dest: &Path, replaceable: Replaceable) -> Result<bool, ExportError> {
    let meta = match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(dest)(e)),
        Ok(meta) => meta,
    };
    let ok = match replaceable {
        Replaceable::File => !meta.is_dir(),
        _ if !meta.is_dir() => false,
        Replaceable::EmptyDirectory => is_empty_dir(dest)?,
        Replaceable::EmptyDirectoryOrLayout => {
            is_empty_dir(dest)? || dest.join("oci-layout").is_file()
        }
    };
    match ok {
        true => Ok(true),
        false => Err(ExportError::Occupied {
            path: dest.to_path_buf(),
            replaceable,
        }),
    }
}

fn is_empty_dir(dir: &Path) -> Result<bool, ExportError> {
    Ok(fs::read_dir(dir).map_err(io_err(dir))?.next().is_none())
}

/// Removes `dest` if it is an empty directory or an earlier OCI layout; refuses anything else.
fn clear_destination(dest: &Path) -> Result<(), ExportError> {
    if check_destination(dest, Replaceable::EmptyDirectoryOrLayout)? {
        fs::remove_dir_all(dest).map_err(io_err(dest))?;
    }
    Ok(())
}

/// Removes `dest` if it is an empty directory; refuses anything else that exists.
pub(crate) fn clear_empty_destination(dest: &Path) -> Result<(), ExportError> {
    if check_destination(dest, Replaceable::EmptyDirectory)? {
        fs::remove_dir(dest).map_err(io_err(dest))?;
    }
    Ok(())
}

/// Opens `path` for writing a small metadata file (iidfile, metadata file) atomically.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let parent = parent_of(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".ossb-")
        .tempfile_in(&parent)
        .map_err(io_err(&parent))?;
    tmp.write_all(bytes).map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| ExportError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ossb_protocol::Digest;
    use std::fs::File;

    fn sample(store: &BlobStore) -> Descriptor {
        let layer = store.put(b"layer").unwrap();
        let config = store
            .put(br#"{"architecture":"amd64","os":"linux"}"#)
            .unwrap();
        let d = |mt: &str, digest: Digest, size| Descriptor {
            media_type: mt.into(),
            digest,
            size,
            platform: None,
            annotations: None,
        };
        let m = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            config: d(media_type::OCI_CONFIG, config, 37),
            layers: vec![d(media_type::OCI_LAYER_GZIP, layer, 5)],
            annotations: None,
        };
        let bytes = to_canonical_json(&m);
        d(
            media_type::OCI_MANIFEST,
            store.put(&bytes).unwrap(),
            bytes.len() as u64,
        )
    }

    #[test]
    fn writes_a_layout_directory_with_every_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let mut top = sample(&store);
        top.annotations = Some([("org.example.kept".to_string(), "yes".to_string())].into());
        let dest = dir.path().join("out");
        let images = [NamedImage {
            descriptor: top.clone(),
            names: vec!["example.com/app:1.0".into()],
        }];
        write_oci_dir(&store, &images, &dest).unwrap();
        assert_eq!(fs::read(dest.join("oci-layout")).unwrap(), OCI_LAYOUT);
        let index: Index =
            serde_json::from_slice(&fs::read(dest.join("index.json")).unwrap()).unwrap();
        assert_eq!(index.manifests[0].digest, top.digest);
        assert_eq!(
            index.manifests[0].annotations.as_ref().unwrap()[REF_NAME],
            "1.0"
        );
        assert_eq!(
            index.manifests[0].annotations.as_ref().unwrap()["org.example.kept"],
            "yes",
            "the descriptor's own annotations were dropped"
        );
        assert_eq!(fs::read_dir(dest.join("blobs/sha256")).unwrap().count(), 3);
        // Writing again replaces the earlier layout.
        write_oci_dir(&store, &images, &dest).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_unrelated_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let top = sample(&store);
        let dest = dir.path().join("precious");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("thesis.txt"), "x").unwrap();
        let err = write_oci_dir(
            &store,
            &[NamedImage {
                descriptor: top,
                names: vec![],
            }],
            &dest,
        )
        .unwrap_err();
        assert!(matches!(err, ExportError::Occupied { .. }));
        assert!(dest.join("thesis.txt").exists());
    }

    #[test]
    fn writes_a_layout_tar() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let top = sample(&store);
        let dest = dir.path().join("image.tar");
        write_oci_tar(
            &store,
            &[NamedImage {
                descriptor: top,
                names: vec!["app".into()],
            }],
            &dest,
        )
        .unwrap();
        let mut names: Vec<String> = tar::Archive::new(File::open(&dest).unwrap())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(names.len(), 5);
        assert_eq!(&names[3..], ["index.json", "oci-layout"]);
    }
}
