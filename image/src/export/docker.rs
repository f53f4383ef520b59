//! The Docker archive exporter: the `docker save` format that `docker load` and `podman load`
//! read. One tar with, per image, the config as `<hex>.json`, each layer uncompressed as
//! `<diff_id hex>.tar`, a `manifest.json` listing them with the image's tags, and the legacy
//! `repositories` file. Layers are decompressed through a temporary file, so memory stays
//! bounded, and each is checked against the config's diff_id on the way.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, BufWriter, Write};

use crate::writeback::WritebackFile;
use std::path::Path;

use ossb_protocol::{Digest, Platform, Sha256Writer};
use serde::Serialize;

use super::{io_err, manifest_for, parent_of, tag_of, ExportError, NamedImage};
use crate::oci::{media_type, ImageConfig};
use crate::store::BlobStore;

#[derive(Serialize)]
struct ArchiveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Writes the images as a Docker archive at `dest`. An image given as an index contributes
/// its manifest for `platform` (a Docker archive holds one platform per image). Names are
/// written in Docker's familiar form (`docker.io/library/x:1` as `x:1`).
pub fn write_docker_archive(
    store: &BlobStore,
    images: &[NamedImage],
    dest: &Path,
    platform: &Platform,
) -> Result<(), ExportError> {
    let parent = parent_of(dest);
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".ossb-docker-")
        .tempfile_in(&parent)
        .map_err(io_err(&parent))?;
    {
        let mut tar = tar::Builder::new(BufWriter::new(WritebackFile::new(tmp.as_file())));
        let mut entries = Vec::new();
        let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut written = HashSet::new();
        for image in images {
            let (_, manifest) = manifest_for(store, &image.descriptor, platform)?;
            let config_bytes = store.read(&manifest.config.digest)?;
            let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
                ExportError::InvalidManifest {
                    digest: manifest.config.digest.to_string(),
                    detail: format!("its config: {e}"),
                }
            })?;
            if config.rootfs.diff_ids.len() != manifest.layers.len() {
                return Err(ExportError::InvalidManifest {
                    digest: manifest.config.digest.to_string(),
                    detail: format!(
                        "the config lists {} diff_ids for {} layers",
                        config.rootfs.diff_ids.len(),
                        manifest.layers.len()
                    ),
                });
            }
            let config_name = format!("{}.json", manifest.config.digest.hex());
            if written.insert(config_name.clone()) {
                append(
                    &mut tar,
                    &config_name,
                    config_bytes.len() as u64,
                    &mut &config_bytes[..],
                )
                .map_err(io_err(dest))?;
            }
            let mut layer_names = Vec::new();
            for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
                let name = format!("{}.tar", diff_id.hex());
                if written.insert(name.clone()) {
                    append_layer(
                        store,
                        &mut tar,
                        &name,
                        &layer.digest,
                        diff_id,
                        &layer.media_type,
                        &parent,
                    )?;
                }
                layer_names.push(name);
            }
            let tags: Vec<String> = image.names.iter().map(|n| familiar(n)).collect();
            for tag in &tags {
                let repo = tag
                    .rsplit_once(':')
                    .filter(|(_, t)| !t.contains('/'))
                    .map_or(tag.as_str(), |(r, _)| r);
                if let Some(last) = config.rootfs.diff_ids.last() {
                    repositories
                        .entry(repo.to_string())
                        .or_default()
                        .insert(tag_of(tag).to_string(), last.hex());
                }
            }
            entries.push(ArchiveEntry {
                config: config_name,
                repo_tags: tags,
                layers: layer_names,
            });
        }
        let manifest_json = serde_json::to_vec(&entries).unwrap_or_default();
        append(
            &mut tar,
            "manifest.json",
            manifest_json.len() as u64,
            &mut &manifest_json[..],
        )
        .map_err(io_err(dest))?;
        if !repositories.is_empty() {
            let repos = serde_json::to_vec(&repositories).unwrap_or_default();
            append(
                &mut tar,
                "repositories",
                repos.len() as u64,
                &mut &repos[..],
            )
            .map_err(io_err(dest))?;
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

fn append(
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    size: u64,
    data: &mut dyn io::Read,
) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, data)
}

/// Appends a layer uncompressed, after checking it against its diff_id.
fn append_layer(
    store: &BlobStore,
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    digest: &Digest,
    diff_id: &Digest,
    layer_media_type: &str,
    scratch_dir: &Path,
) -> Result<(), ExportError> {
    let blob = store.open_blob(digest)?;
    if layer_media_type == media_type::OCI_LAYER_TAR
        || layer_media_type == "application/vnd.docker.image.rootfs.diff.tar"
    {
        let size = blob.metadata().map_err(io_err(&store.path(digest)))?.len();
        let mut blob = blob;
        return append(tar, name, size, &mut blob).map_err(io_err(scratch_dir));
    }
    let layer_err = |source| ExportError::Layer {
        digest: digest.to_string(),
        source,
    };
    let mut plain = tempfile::tempfile_in(scratch_dir).map_err(io_err(scratch_dir))?;
    let mut reader = crate::layer::decompressed(io::BufReader::new(blob)).map_err(|source| {
        layer_err(crate::layer::LayerError::Read {
            after: None,
            source,
        })
    })?;
    let mut hasher = Sha256Writer::new(BufWriter::new(&mut plain));
    io::copy(&mut reader, &mut hasher).map_err(|source| {
        layer_err(crate::layer::LayerError::Read {
            after: None,
            source,
        })
    })?;
    let (actual, size, mut out) = hasher.finish();
    out.flush().map_err(io_err(scratch_dir))?;
    drop(out);
    if actual != *diff_id {
        return Err(ExportError::InvalidManifest {
            digest: digest.to_string(),
            detail: format!(
                "the layer decompresses to {actual}, but the config says its diff_id is {diff_id}"
            ),
        });
    }
    use io::Seek;
    plain
        .seek(io::SeekFrom::Start(0))
        .map_err(io_err(scratch_dir))?;
    append(tar, name, size, &mut plain).map_err(io_err(scratch_dir))
}

/// `docker.io/library/busybox:1` -> `busybox:1`, `docker.io/me/app:1` -> `me/app:1`; names
/// without a tag get `:latest`.
fn familiar(name: &str) -> String {
    let name = name
        .strip_prefix("docker.io/library/")
        .or_else(|| name.strip_prefix("docker.io/"))
        .unwrap_or(name);
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layer::{write_layer, Change, ChangeKind, Compression, LayerOptions};
    use crate::oci::{to_canonical_json, Descriptor, Manifest};

    #[test]
    fn familiar_names() {
        assert_eq!(familiar("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(familiar("docker.io/me/app"), "me/app:latest");
        assert_eq!(familiar("localhost:5000/a/b:2"), "localhost:5000/a/b:2");
        assert_eq!(familiar("localhost:5000/a/b"), "localhost:5000/a/b:latest");
    }

    /// A stored image with one real gzip layer holding `hello.txt`.
    pub(crate) fn stored_image(store: &BlobStore, dir: &Path) -> Descriptor {
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        fs::write(rootfs.join("hello.txt"), "hi\n").unwrap();
        let mut w = store.writer().unwrap();
        let written = write_layer(
            &rootfs,
            &[Change {
                path: "hello.txt".into(),
                kind: ChangeKind::Added,
            }],
            &mut w,
            &LayerOptions {
                compression: Compression::Gzip,
                source_date_epoch: Some(0),
                level: None,
            },
        )
        .unwrap();
        let (digest, size) = w.commit(None).unwrap();
        let mut config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        };
        config.rootfs.diff_ids = vec![written.diff_id];
        let config_bytes = to_canonical_json(&config);
        let d = |mt: &str, digest, size| Descriptor {
            media_type: mt.into(),
            digest,
            size,
            platform: None,
            annotations: None,
        };
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            config: d(
                media_type::OCI_CONFIG,
                store.put(&config_bytes).unwrap(),
                config_bytes.len() as u64,
            ),
            layers: vec![d(media_type::OCI_LAYER_GZIP, digest, size)],
            annotations: None,
        };
        let bytes = to_canonical_json(&manifest);
        d(
            media_type::OCI_MANIFEST,
            store.put(&bytes).unwrap(),
            bytes.len() as u64,
        )
    }

    #[test]
    fn writes_manifest_json_config_and_plain_layers() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let top = stored_image(&store, dir.path());
        let dest = dir.path().join("out/image.tar");
        write_docker_archive(
            &store,
            &[NamedImage {
                descriptor: top,
                names: vec!["docker.io/library/app:1".into()],
            }],
            &dest,
            &Platform::host(),
        )
        .unwrap();
        let mut archive = tar::Archive::new(fs::File::open(&dest).unwrap());
        let mut files = BTreeMap::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(name, data);
        }
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], "app:1");
        let layer = manifest[0]["Layers"][0].as_str().unwrap();
        // The layer is a plain tar holding hello.txt.
        let mut inner = tar::Archive::new(&files[layer][..]);
        let names: Vec<String> = inner
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["hello.txt"]);
        assert!(files.contains_key(manifest[0]["Config"].as_str().unwrap()));
        let repos: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
        assert!(repos["app"]["1"].is_string());
    }
}
