//! The OCI image model: descriptors, manifests, indexes and the image config.
//!
//! These are our own types rather than `oci-spec`'s because the config must keep Docker's
//! extensions (Healthcheck, Shell, OnBuild, ArgsEscaped) and serialize deterministically:
//! struct fields in a fixed order, maps as `BTreeMap`, so the same image always has the same
//! digest. Fields we do not model are kept in `extra` and written back unchanged.

use std::collections::BTreeMap;

use ossb_protocol::{Digest, Platform};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// OCI media types.
pub mod media_type {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI gzip layer.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI zstd layer.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// OCI uncompressed layer.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker gzip layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker uncompressed layer.
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

    /// Whether `mt` is a single-image manifest (OCI or Docker).
    pub fn is_manifest(mt: &str) -> bool {
        mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
    }

    /// Whether `mt` is an index or manifest list.
    pub fn is_index(mt: &str) -> bool {
        mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
    }
}

/// A reference to a blob: its media type, digest and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// What the blob is.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Its content digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// For index entries: the platform the manifest is for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub platform: Option<DescriptorPlatform>,
    /// Annotations, e.g. `org.opencontainers.image.ref.name` in an OCI layout's index.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The platform field of an index entry, in the OCI spelling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorPlatform {
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// CPU variant.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub variant: Option<String>,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub os_version: Option<String>,
}

impl DescriptorPlatform {
    /// The normalized platform.
    pub fn platform(&self) -> Platform {
        Platform::new(&self.os, &self.architecture, self.variant.as_deref())
    }
}

impl From<&Platform> for DescriptorPlatform {
    fn from(p: &Platform) -> Self {
        DescriptorPlatform {
            architecture: p.architecture.clone(),
            os: p.os.clone(),
            variant: p.variant.clone(),
            os_version: None,
        }
    }
}

/// An image manifest (OCI, or Docker schema 2 which has the same shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The manifest's own media type.
    #[serde(rename = "mediaType", skip_serializing_if = "Option::is_none", default)]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index or Docker manifest list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's own media type.
    #[serde(rename = "mediaType", skip_serializing_if = "Option::is_none", default)]
    pub media_type: Option<String>,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Index {
    /// The entry for `platform`, or `None`. Entries without a platform are skipped.
    pub fn find(&self, platform: &Platform) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.platform() == *platform)
        })
    }

    /// The platforms the index offers, for error messages.
    pub fn platforms(&self) -> Vec<String> {
        self.manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| p.platform().to_string())
            .collect()
    }
}

/// A HEALTHCHECK in the image config (Docker extension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", ...]` or `["CMD-SHELL", cmd]`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub test: Option<Vec<String>>,
    /// Nanoseconds between checks.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interval: Option<i64>,
    /// Nanoseconds before a check is considered hung.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timeout: Option<i64>,
    /// Nanoseconds of start-up grace.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start_period: Option<i64>,
    /// Nanoseconds between checks during the start period.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start_interval: Option<i64>,
    /// Consecutive failures before unhealthy.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retries: Option<i64>,
}

/// The runtime part of the image config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    /// User (name or uid[:gid]).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    /// `port/proto` keys with empty objects.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exposed_ports: Option<BTreeMap<String, Value>>,
    /// `K=V` entries.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entrypoint: Option<Vec<String>>,
    /// Cmd.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cmd: Option<Vec<String>>,
    /// Volumes, as keys with empty objects.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub volumes: Option<BTreeMap<String, Value>>,
    /// Working directory.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub working_dir: Option<String>,
    /// Labels.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Stop signal.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stop_signal: Option<String>,
    /// Docker extension: whether Cmd/Entrypoint args are already escaped (Windows).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub args_escaped: Option<bool>,
    /// Docker extension: the health check.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub healthcheck: Option<Healthcheck>,
    /// Docker extension: ONBUILD triggers for images built FROM this one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub on_build: Option<Vec<String>>,
    /// Docker extension: the SHELL for shell-form instructions.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shell: Option<Vec<String>>,
    /// Fields not modelled here, kept as they were.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl RuntimeConfig {
    /// The environment as `(name, value)` pairs.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .flatten()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect()
    }

    /// Sets `name=value`, replacing an earlier value in place (as Docker does).
    pub fn set_env(&mut self, name: &str, value: &str) {
        let env = self.env.get_or_insert_with(Vec::new);
        let entry = format!("{name}={value}");
        match env
            .iter_mut()
            .find(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) == name)
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
}

/// One history entry of the image config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct History {
    /// RFC 3339 time.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub created: Option<String>,
    /// The instruction, e.g. `RUN /bin/sh -c make # buildkit`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub created_by: Option<String>,
    /// Author.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub author: Option<String>,
    /// Comment.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comment: Option<String>,
    /// True when the step made no layer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub empty_layer: Option<bool>,
}

/// The rootfs section of the image config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The uncompressed digests of the layers, base first.
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".into(),
            diff_ids: Vec::new(),
        }
    }
}

/// The image config blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct ImageConfig {
    /// When the image was created (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub created: Option<String>,
    /// Author.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub author: Option<String>,
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// CPU variant.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub variant: Option<String>,
    /// Runtime defaults.
    #[serde(default)]
    pub config: RuntimeConfig,
    /// Layer diff ids.
    #[serde(default)]
    pub rootfs: RootFs,
    /// How the image was made.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub history: Vec<History>,
    /// Fields not modelled here, kept as they were.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl ImageConfig {
    /// The platform the config declares.
    pub fn platform(&self) -> Platform {
        Platform::new(&self.os, &self.architecture, self.variant.as_deref())
    }
}

/// Which family of media types an image is written with (`oci-mediatypes=true|false`).
/// Both are read; OCI is written by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MediaTypes {
    /// `application/vnd.oci.image.*`.
    #[default]
    Oci,
    /// Docker schema 2: `application/vnd.docker.distribution.manifest.v2+json` and friends,
    /// for consumers that predate OCI. Has no zstd layer type.
    Docker,
}

/// Why an image cannot be written with the media types asked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaTypeError {
    /// Docker schema 2 has no media type for this layer.
    #[error("layer {digest} is {media_type}, which has no Docker media type: use OCI media types (oci-mediatypes=true) or gzip compression")]
    NoDockerType {
        /// The layer.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
}

impl MediaTypes {
    /// The media type of an image manifest.
    pub fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Oci => media_type::OCI_MANIFEST,
            MediaTypes::Docker => media_type::DOCKER_MANIFEST,
        }
    }

    /// The media type of an index / manifest list.
    pub fn index(self) -> &'static str {
        match self {
            MediaTypes::Oci => media_type::OCI_INDEX,
            MediaTypes::Docker => media_type::DOCKER_MANIFEST_LIST,
        }
    }

    /// The media type of the image config.
    pub fn config(self) -> &'static str {
        match self {
            MediaTypes::Oci => media_type::OCI_CONFIG,
            MediaTypes::Docker => media_type::DOCKER_CONFIG,
        }
    }

    /// The media type of a layer of `layer_type` (either family) in this family.
    pub fn layer(self, layer: &Descriptor) -> Result<String, MediaTypeError> {
        use media_type::*;
        let gzip = [OCI_LAYER_GZIP, DOCKER_LAYER_GZIP].contains(&layer.media_type.as_str());
        let tar = [OCI_LAYER_TAR, DOCKER_LAYER_TAR].contains(&layer.media_type.as_str());
        Ok(match self {
            MediaTypes::Oci if gzip => OCI_LAYER_GZIP.into(),
            MediaTypes::Oci if tar => OCI_LAYER_TAR.into(),
            MediaTypes::Docker if gzip => DOCKER_LAYER_GZIP.into(),
            MediaTypes::Docker if tar => DOCKER_LAYER_TAR.into(),
            MediaTypes::Docker
                if layer
                    .media_type
                    .starts_with("application/vnd.oci.image.layer.") =>
            {
                return Err(MediaTypeError::NoDockerType {
                    digest: layer.digest,
                    media_type: layer.media_type.clone(),
                })
            }
            // zstd in OCI, and foreign or unknown types, stay as they are.
            _ => layer.media_type.clone(),
        })
    }
}

impl Manifest {
    /// A manifest of `config` and `layers` with the media types of `types` (descriptors'
    /// media types are converted; digests and sizes are kept, blobs are the same bytes).
    pub fn new(
        config: &Descriptor,
        layers: &[Descriptor],
        types: MediaTypes,
    ) -> Result<Manifest, MediaTypeError> {
        let mut config = config.clone();
        config.media_type = types.config().into();
        let layers = layers
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.media_type = types.layer(&l)?;
                Ok(l)
            })
            .collect::<Result<Vec<_>, MediaTypeError>>()?;
        Ok(Manifest {
            schema_version: 2,
            media_type: Some(types.manifest().into()),
            config,
            layers,
            annotations: None,
        })
    }

    /// This manifest with the media types of `types`; its annotations are kept for OCI and
    /// dropped for Docker (schema 2 has none).
    pub fn with_media_types(&self, types: MediaTypes) -> Result<Manifest, MediaTypeError> {
        let mut m = Manifest::new(&self.config, &self.layers, types)?;
        if types == MediaTypes::Oci {
            m.annotations = self.annotations.clone();
        }
        Ok(m)
    }
}

impl Index {
    /// An index (or Docker manifest list) of per-platform `manifests` (descriptors with
    /// their platform set), whose media types are set to the family of `types`.
    pub fn new(manifests: &[Descriptor], types: MediaTypes) -> Index {
        let manifests = manifests
            .iter()
            .map(|d| {
                let mut d = d.clone();
                d.media_type = types.manifest().into();
                d
            })
            .collect();
        Index {
            schema_version: 2,
            media_type: Some(types.index().into()),
            manifests,
            annotations: None,
        }
    }
}

/// Serializes `value` as compact JSON; with fixed field order and ordered maps the bytes (and
/// so the digest) depend only on the value.
pub fn to_canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own types into a Vec cannot fail: they hold no maps with non-string keys.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_docker_extensions_and_unknown_fields() {
        let json = r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Healthcheck":{"Test":["CMD","true"],"Interval":1000},"Shell":["/bin/bash","-c"],"OnBuild":["RUN x"],"Custom":7},"rootfs":{"type":"layers","diff_ids":[]},"container":"abc"}"#;
        let cfg: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            cfg.config.shell.as_deref(),
            Some(&["/bin/bash".to_string(), "-c".to_string()][..])
        );
        let back = String::from_utf8(to_canonical_json(&cfg)).unwrap();
        for needle in [
            "\"Healthcheck\"",
            "\"OnBuild\"",
            "\"Custom\":7",
            "\"container\":\"abc\"",
        ] {
            assert!(back.contains(needle), "{needle} missing from {back}");
        }
    }

    #[test]
    fn serialization_is_stable() {
        let mut cfg = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        };
        cfg.config.labels = Some([("b".into(), "2".into()), ("a".into(), "1".into())].into());
        let a = to_canonical_json(&cfg);
        let b = to_canonical_json(&cfg.clone());
        assert_eq!(a, b);
        assert!(String::from_utf8(a)
            .unwrap()
            .contains(r#""Labels":{"a":"1","b":"2"}"#));
    }

    #[test]
    fn manifests_convert_between_oci_and_docker_media_types() {
        let d = |mt: &str, s: &[u8]| Descriptor {
            media_type: mt.into(),
            digest: Digest::of(s),
            size: s.len() as u64,
            platform: None,
            annotations: None,
        };
        let oci = Manifest::new(
            &d(media_type::OCI_CONFIG, b"c"),
            &[d(media_type::OCI_LAYER_GZIP, b"l")],
            MediaTypes::Oci,
        )
        .unwrap();
        let docker = oci.with_media_types(MediaTypes::Docker).unwrap();
        assert_eq!(
            docker.media_type.as_deref(),
            Some(media_type::DOCKER_MANIFEST)
        );
        assert_eq!(docker.config.media_type, media_type::DOCKER_CONFIG);
        assert_eq!(docker.layers[0].media_type, media_type::DOCKER_LAYER_GZIP);
        assert_eq!(docker.layers[0].digest, oci.layers[0].digest);
        assert_eq!(docker.with_media_types(MediaTypes::Oci).unwrap(), oci);
        let zstd = Manifest::new(
            &d(media_type::OCI_CONFIG, b"c"),
            &[d(media_type::OCI_LAYER_ZSTD, b"z")],
            MediaTypes::Docker,
        );
        assert!(matches!(zstd, Err(MediaTypeError::NoDockerType { .. })));
        let list = Index::new(&[d(media_type::OCI_MANIFEST, b"m")], MediaTypes::Docker);
        assert_eq!(
            list.media_type.as_deref(),
            Some(media_type::DOCKER_MANIFEST_LIST)
        );
        assert_eq!(list.manifests[0].media_type, media_type::DOCKER_MANIFEST);
    }

    #[test]
    fn reads_a_docker_schema2_manifest() {
        let json = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7023,"digest":"sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":32654,"digest":"sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f"}]}"#;
        let m: Manifest = serde_json::from_str(json).unwrap();
        assert_eq!(m.layers[0].size, 32654);
        assert_eq!(
            m.with_media_types(MediaTypes::Oci).unwrap().layers[0].media_type,
            media_type::OCI_LAYER_GZIP
        );
    }

    #[test]
    fn set_env_replaces_in_place() {
        let mut rc = RuntimeConfig {
            env: Some(vec!["PATH=/bin".into(), "A=1".into()]),
            ..Default::default()
        };
        rc.set_env("PATH", "/usr/bin:/bin");
        rc.set_env("B", "2");
        assert_eq!(rc.env.unwrap(), vec!["PATH=/usr/bin:/bin", "A=1", "B=2"]);
    }

    #[test]
    fn index_finds_platform_with_normalized_variant() {
        let d = |arch: &str, variant: Option<&str>| Descriptor {
            media_type: media_type::OCI_MANIFEST.into(),
            digest: Digest::of(arch.as_bytes()),
            size: 1,
            platform: Some(DescriptorPlatform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
                os_version: None,
            }),
            annotations: None,
        };
        let idx = Index {
            schema_version: 2,
            media_type: None,
            manifests: vec![d("amd64", None), d("arm64", Some("v8"))],
            annotations: None,
        };
        assert!(idx.find(&"linux/arm64".parse().unwrap()).is_some());
        assert!(idx.find(&"linux/s390x".parse().unwrap()).is_none());
        assert_eq!(idx.platforms(), vec!["linux/amd64", "linux/arm64"]);
    }
}
