//! The local exporter (`--output type=local,dest=DIR`): the image's filesystem, its layers
//! applied in order with the safe applier (whiteouts honoured, nothing written outside the
//! destination whatever the layers hold). A multi-platform image gets one directory per
//! platform, `DIR/linux_amd64`, `DIR/linux_arm64`, as buildx does.
//!
//! The tree is assembled beside `dest` and renamed into place, so `dest` is either what it
//! was or complete; `dest` must not exist or be an empty directory.

use std::fs;
use std::io;
use std::path::Path;

use super::{clear_empty_destination, io_err, manifest_for, parent_of, ExportError};
use crate::layer::{apply_layer, ApplyOptions, ApplyReport};
use crate::oci::{media_type, Descriptor, Index};
use crate::store::BlobStore;

/// Writes the filesystem of `top` (a manifest, or an index: every platform) into `dest`.
/// Returns what the applier skipped (ownership without privilege, device nodes), one line
/// each, to show as warnings.
pub fn write_local(
    store: &BlobStore,
    top: &Descriptor,
    dest: &Path,
    options: &ApplyOptions,
) -> Result<Vec<String>, ExportError> {
    let parent = parent_of(dest);
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".ossb-local-")
        .tempdir_in(&parent)
        .map_err(io_err(&parent))?;
    let mut skipped = Vec::new();
    if media_type::is_index(&top.media_type) {
        let index: Index = serde_json::from_slice(&store.read(&top.digest)?).map_err(|e| {
            ExportError::InvalidManifest {
                digest: top.digest.to_string(),
                detail: e.to_string(),
            }
        })?;
        // The images, not the attestation manifests listed after them (their platform is
        // unknown/unknown; BuildKit's `vnd.docker.reference.type` names them).
        let platforms: Vec<ossb_protocol::Platform> = index
            .manifests
            .iter()
            .filter(|m| {
                m.annotations
                    .as_ref()
                    .and_then(|a| a.get("vnd.docker.reference.type"))
                    .is_none()
            })
            .filter_map(|m| m.platform.as_ref().map(|p| p.platform()))
            .collect();
        match platforms.as_slice() {
            // One image (with its attestations): its filesystem at the top, as a manifest's.
            [one] => skipped.extend(unpack(store, top, one, staging.path(), options)?),
            many => {
                for platform in many {
                    let name = platform.to_string().replace('/', "_");
                    let dir = staging.path().join(name);
                    fs::create_dir(&dir).map_err(io_err(&dir))?;
                    skipped.extend(unpack(store, top, platform, &dir, options)?);
                }
            }
        }
    } else {
        skipped.extend(unpack(
            store,
            top,
            &ossb_protocol::Platform::host(),
            staging.path(),
            options,
        )?);
    }
    clear_empty_destination(dest)?;
    let staged = staging.keep();
    if let Err(e) = fs::rename(&staged, dest) {
        let _ = fs::remove_dir_all(&staged);
        return Err(io_err(dest)(e));
    }
    // A staging directory is 0700; the result gets the usual mode of a directory.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(io_err(dest))?;
    Ok(skipped)
}

fn unpack(
    store: &BlobStore,
    top: &Descriptor,
    platform: &ossb_protocol::Platform,
    rootfs: &Path,
    options: &ApplyOptions,
) -> Result<Vec<String>, ExportError> {
    let (_, manifest) = manifest_for(store, top, platform)?;
    let mut skipped = Vec::new();
    for layer in &manifest.layers {
        let blob = io::BufReader::new(store.open_blob(&layer.digest)?);
        let report: ApplyReport =
            apply_layer(blob, rootfs, options).map_err(|source| ExportError::Layer {
                digest: layer.digest.to_string(),
                source,
            })?;
        skipped.extend(report.warnings());
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_filesystem_and_refuses_an_occupied_destination() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let top = super::super::docker::tests::stored_image(&store, dir.path());
        let dest = dir.path().join("out");
        write_local(&store, &top, &dest, &ApplyOptions::default()).unwrap();
        assert_eq!(fs::read_to_string(dest.join("hello.txt")).unwrap(), "hi\n");
        let err = write_local(&store, &top, &dest, &ApplyOptions::default()).unwrap_err();
        assert!(matches!(err, ExportError::Occupied { .. }), "{err}");
        assert_eq!(fs::read_to_string(dest.join("hello.txt")).unwrap(), "hi\n");
    }
}
