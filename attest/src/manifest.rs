//! The attestation manifest: an image manifest whose layers are a platform's statements,
//! listed in the index beside the image it attests, in either of BuildKit's two layouts.

use std::collections::BTreeMap;

use ossb_image::oci::{media_type, Descriptor, DescriptorPlatform, MediaTypes};
use ossb_image::store::BlobStore;
use ossb_protocol::Digest;
use serde_json::{json, Value};

use crate::json::to_canonical;
use crate::statement::Statement;
use crate::AttestError;

/// The media type of a statement layer.
pub const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
/// The layer annotation repeating the statement's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// The index annotation naming what the manifest is.
pub const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
/// Its value for an attestation manifest.
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";
/// The index annotation holding the digest of the image manifest attested.
pub const REFERENCE_DIGEST_ANNOTATION: &str = "vnd.docker.reference.digest";
/// The `artifactType` of an attestation manifest in the artifact layout.
pub const ATTESTATION_ARTIFACT_TYPE: &str = "application/vnd.docker.attestation.manifest.v1+json";
/// OCI's empty JSON descriptor's media type, the artifact layout's config.
pub const OCI_EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";
/// The platform of an attestation manifest's index entry, so no runtime ever picks it.
const UNKNOWN: &str = "unknown";

/// Which of BuildKit's attestation manifest layouts to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// BuildKit v0.32's default (`oci-artifact=true`): an OCI artifact manifest with
    /// `artifactType`, the empty config and a `subject` pointing at the image manifest, so
    /// the OCI 1.1 referrers API (Docker Scout, cosign, oras) finds it.
    #[default]
    Artifact,
    /// BuildKit v0.11 to v0.31's layout (`oci-artifact=false`): a manifest whose config is a
    /// minimal image config (`unknown/unknown`, the statements as diff ids), for registries
    /// that refuse a manifest with a subject or an empty config.
    Image,
}

/// Stores `statements` (one platform's), a config and the attestation manifest over them in
/// `store`, and returns the manifest's index entry: platform `unknown/unknown`, annotated with
/// the image manifest's digest. BuildKit refuses attestations with Docker media types; so do
/// we: the caller writes the index with OCI media types instead.
pub fn write_attestation_manifest(
    store: &BlobStore,
    image_manifest: &Descriptor,
    statements: &[Statement],
    media_types: MediaTypes,
    layout: Layout,
) -> Result<Descriptor, AttestError> {
    if media_types == MediaTypes::Docker {
        return Err(AttestError::DockerMediaTypes);
    }
    if statements.is_empty() {
        return Err(AttestError::NoStatements);
    }
    let mut layers = Vec::with_capacity(statements.len());
    let mut diff_ids = Vec::with_capacity(statements.len());
    for st in statements {
        let digest = store.put(&st.bytes)?;
        diff_ids.push(json!(digest.to_string()));
        layers.push(json!({
            "mediaType": IN_TOTO_MEDIA_TYPE,
            "digest": digest.to_string(),
            "size": st.bytes.len(),
            "annotations": { PREDICATE_TYPE_ANNOTATION: st.predicate_type },
        }));
    }
    let manifest = match layout {
        Layout::Artifact => {
            let config = store.put(EMPTY_JSON)?;
            json!({
                "schemaVersion": 2,
                "mediaType": media_type::OCI_MANIFEST,
                "artifactType": ATTESTATION_ARTIFACT_TYPE,
                "config": {
                    "mediaType": OCI_EMPTY_MEDIA_TYPE,
                    "digest": config.to_string(),
                    "size": EMPTY_JSON.len(),
                    // `{}` in base64, inlined as the OCI spec's empty descriptor has it.
                    "data": "e30=",
                },
                "layers": layers,
                "subject": {
                    "mediaType": image_manifest.media_type,
                    "digest": image_manifest.digest.to_string(),
                    "size": image_manifest.size,
                },
            })
        }
        Layout::Image => {
            let config = to_canonical(&attestation_config(diff_ids));
            let digest = store.put(&config)?;
            json!({
                "schemaVersion": 2,
                "mediaType": media_type::OCI_MANIFEST,
                "config": {
                    "mediaType": media_type::OCI_CONFIG,
                    "digest": digest.to_string(),
                    "size": config.len(),
                },
                "layers": layers,
            })
        }
    };
    let bytes = to_canonical(&manifest);
    let digest: Digest = store.put(&bytes)?;
    Ok(Descriptor {
        media_type: media_type::OCI_MANIFEST.into(),
        digest,
        size: bytes.len() as u64,
        platform: Some(DescriptorPlatform {
            architecture: UNKNOWN.into(),
            os: UNKNOWN.into(),
            variant: None,
            os_version: None,
        }),
        annotations: Some(BTreeMap::from([
            (
                REFERENCE_DIGEST_ANNOTATION.into(),
                image_manifest.digest.to_string(),
            ),
            (
                REFERENCE_TYPE_ANNOTATION.into(),
                ATTESTATION_MANIFEST.into(),
            ),
        ])),
    })
}

/// The image config of the `Image` layout: what BuildKit marshals from an OCI image with only
/// the platform and root filesystem set (Go writes the empty `config` object too).
fn attestation_config(diff_ids: Vec<Value>) -> Value {
    json!({
        "architecture": UNKNOWN,
        "os": UNKNOWN,
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    })
}

/// Whether an index entry is an attestation manifest (for readers that must skip it).
pub fn is_attestation_manifest(entry: &Descriptor) -> bool {
    entry
        .annotations
        .as_ref()
        .and_then(|a| a.get(REFERENCE_TYPE_ANNOTATION))
        .is_some_and(|t| t == ATTESTATION_MANIFEST)
}

#[cfg(test)]
mod tests;
