//! The step cache in a registry repository (`--cache-to REF`, `--cache-from REF`), so that
//! ephemeral CI pods share it, as Kaniko's cache repository does; or in a directory
//! (`type=local`, as buildx's) that a CI system saves and restores between jobs.
//!
//! A directory is laid out as an ossb cache directory: the records under `cache/keys` and
//! their layer blobs in the blob store, each blob verified when it is copied in or out.
//!
//! Every step that changed files is stored as a small image tagged with its cache key (the 64
//! hex digits): one layer (or none when the step changed nothing) and a config whose
//! `rootfs.diff_ids` names the layer's uncompressed digest. Reading it is an ordinary pull, so
//! every blob is verified on arrival; writing it is an ordinary push, so blobs the repository
//! already has are not sent again.

use std::path::PathBuf;

use ossb_image::oci::{self, media_type, Descriptor, ImageConfig, Manifest, MediaTypes, RootFs};
use ossb_image::registry::{parse_reference, RegistryError};
use ossb_image::store::{BlobStore, StoreError};
use ossb_image::Reference;
use ossb_protocol::Platform;

use crate::cache::{CacheKey, CacheLevel, CacheRecord, LocalCache};
use crate::error::CacheSpecError;
use crate::stage::Shared;

/// Where `--cache-from` / `--cache-to` keep step records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheLocation {
    /// A registry repository: one tag per step.
    Registry(String),
    /// A directory laid out as an ossb cache directory.
    Local(PathBuf),
}

impl std::fmt::Display for CacheLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheLocation::Registry(repo) => f.write_str(repo),
            CacheLocation::Local(dir) => write!(f, "the directory {}", dir.display()),
        }
    }
}

/// `--cache-to`: where the step records go and which of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheExport {
    /// The repository or directory; `None` for `type=inline` (the records ride in the image's
    /// config, read back by `--cache-from` of the image).
    pub location: Option<CacheLocation>,
    /// `mode=`: min (the default, as buildx's) or max.
    pub mode: CacheMode,
    /// `ignore-error=true`: a failed export is a warning, not a failed build.
    pub ignore_error: bool,
    /// `oci-mediatypes=`: the media types of the records' manifests and configs.
    pub media_types: MediaTypes,
    /// Options buildx knows that change nothing here, to warn about (`key=value`, why).
    pub no_effect: Vec<(String, &'static str)>,
}

/// Which steps `--cache-to` stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// The steps whose results are in the final image: its stage and the stages it is `FROM`.
    #[default]
    Min,
    /// Every step of every stage the build ran or found cached.
    Max,
}

impl std::fmt::Display for CacheExport {
    /// The spec back in buildx's spelling (a cluster's task carries it to the workers).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            None => f.write_str("type=inline")?,
            Some(CacheLocation::Registry(r)) => write!(f, "type=registry,ref={r}")?,
            Some(CacheLocation::Local(d)) => write!(f, "type=local,dest={}", d.display())?,
        }
        if self.mode == CacheMode::Max {
            f.write_str(",mode=max")?;
        }
        if self.ignore_error {
            f.write_str(",ignore-error=true")?;
        }
        if self.media_types == MediaTypes::Docker {
            f.write_str(",oci-mediatypes=false")?;
        }
        Ok(())
    }
}

const FROM_USAGE: &str = "REF, type=registry,ref=REF or type=local,src=DIR";
const TO_USAGE: &str = "REF, type=registry,ref=REF, type=local,dest=DIR or type=inline";

/// `--cache-from`: `REF`, buildx's `type=registry,ref=REF[,...]` or `type=local,src=DIR`.
pub fn parse_cache(spec: &str) -> Result<CacheLocation, CacheSpecError> {
    let parts = CacheSpec::parse(spec, "src", FROM_USAGE)?;
    parts.location(spec, FROM_USAGE)
}

/// `--cache-to`: `REF`, `type=registry,ref=REF`, `type=local,dest=DIR` or `type=inline`,
/// with buildx's options `mode=min|max`, `ignore-error=`, `oci-mediatypes=`,
/// `image-manifest=`, `compression=` (and its kin).
pub fn parse_cache_export(spec: &str) -> Result<CacheExport, CacheSpecError> {
    let parts = CacheSpec::parse(spec, "dest", TO_USAGE)?;
    let location = match parts.kind {
        "inline" => None,
        _ => Some(parts.location(spec, TO_USAGE)?),
    };
    let bad = |key: &str, value: &str, expected: &'static str| CacheSpecError::BadValue {
        spec: spec.to_string(),
        key: key.to_string(),
        value: value.to_string(),
        expected,
    };
    let mut export = CacheExport {
        location,
        mode: CacheMode::Min,
        ignore_error: false,
        media_types: MediaTypes::Oci,
        no_effect: Vec::new(),
    };
    for (key, value) in parts.options {
        match key {
            "mode" => {
                export.mode = match value {
                    "min" => CacheMode::Min,
                    "max" => CacheMode::Max,
                    _ => return Err(bad(key, value, "min or max")),
                }
            }
            "ignore-error" => {
                export.ignore_error =
                    ossb_protocol::parse_bool(value).ok_or_else(|| bad(key, value, BOOL))?
            }
            "oci-mediatypes" => {
                let oci = ossb_protocol::parse_bool(value).ok_or_else(|| bad(key, value, BOOL))?;
                export.media_types = if oci {
                    MediaTypes::Oci
                } else {
                    MediaTypes::Docker
                };
            }
            "image-manifest" => {
                let manifest =
                    ossb_protocol::parse_bool(value).ok_or_else(|| bad(key, value, BOOL))?;
                if !manifest {
                    export.no_effect.push((
                        format!("{key}={value}"),
                        "ossb stores every cache record as an image manifest, which every registry takes",
                    ));
                }
            }
            "compression" | "compression-level" | "force-compression" => {
                export.no_effect.push((
                    format!("{key}={value}"),
                    "the cache stores each layer as the build compressed it (--output compression=)",
                ));
            }
            _ => export
                .no_effect
                .push((format!("{key}={value}"), "ossb does not know this option")),
        }
    }
    if export.location.is_none() && export.mode == CacheMode::Max {
        return Err(bad(
            "mode",
            "max",
            "min: an inline cache holds only what the image has (use type=registry for mode=max)",
        ));
    }
    Ok(export)
}

const BOOL: &str = "true or false";

/// A cache spec split into its type, reference or directory, and other options.
struct CacheSpec<'s> {
    kind: &'s str,
    reference: Option<&'s str>,
    dir: Option<&'s str>,
    options: Vec<(&'s str, &'s str)>,
}

impl<'s> CacheSpec<'s> {
    fn parse(
        spec: &'s str,
        dir_key: &str,
        usage: &'static str,
    ) -> Result<CacheSpec<'s>, CacheSpecError> {
        let mut parts = CacheSpec {
            kind: "registry",
            reference: None,
            dir: None,
            options: Vec::new(),
        };
        if !spec.contains('=') {
            parts.reference = Some(spec);
            return Ok(parts);
        }
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("type", kind @ ("registry" | "local"))) => parts.kind = kind,
                Some(("type", "inline")) if usage == TO_USAGE => parts.kind = "inline",
                Some(("type", other)) => {
                    return Err(CacheSpecError::UnsupportedType {
                        spec: spec.to_string(),
                        kind: other.to_string(),
                        usage,
                    })
                }
                Some(("ref", r)) => parts.reference = Some(r),
                Some((k, d)) if k == dir_key => parts.dir = Some(d),
                Some(option) => parts.options.push(option),
                None => {
                    return Err(CacheSpecError::Malformed {
                        spec: spec.to_string(),
                        usage,
                    })
                }
            }
        }
        Ok(parts)
    }

    fn location(&self, spec: &str, usage: &'static str) -> Result<CacheLocation, CacheSpecError> {
        match (self.kind, self.reference, self.dir) {
            ("registry", Some(r), None) => Ok(CacheLocation::Registry(r.to_string())),
            ("local", None, Some(d)) if !d.is_empty() => Ok(CacheLocation::Local(d.into())),
            _ => Err(CacheSpecError::Malformed {
                spec: spec.to_string(),
                usage,
            }),
        }
    }
}

fn tagged(repo: &str, key: &CacheKey) -> Result<Reference, RegistryError> {
    // The repository without its tag, then the key as the tag.
    let base = parse_reference(repo)?;
    parse_reference(&format!(
        "{}/{}:{}",
        base.registry(),
        base.repository(),
        key.hex()
    ))
}

/// The `--cache-from` sources of a build, for one platform, as a level of the step cache
/// chain: it serves records and keeps none (`--cache-to` is written at the end of the build).
pub(crate) struct CacheFrom<'s, 'b> {
    pub shared: &'s Shared<'b>,
    pub platform: &'s Platform,
}

impl CacheLevel for CacheFrom<'_, '_> {
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
        _store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, Option<CacheRecord>> {
        Box::pin(fetch(self.shared, key, self.platform))
    }

    fn put<'a>(
        &'a self,
        _key: &'a CacheKey,
        _record: &'a CacheRecord,
        _store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Looks `key` up in the `--cache-from` repositories; on a hit the layer is in the store and
/// the record is returned. Failures other than "not there" are warnings: the step then runs.
async fn fetch(shared: &Shared<'_>, key: &CacheKey, platform: &Platform) -> Option<CacheRecord> {
    for location in &shared.req.cache_from {
        let repo = match location {
            CacheLocation::Registry(repo) => repo,
            CacheLocation::Local(dir) => match fetch_local(shared, dir, key) {
                Ok(Some(record)) => return Some(record),
                Ok(None) => continue,
                Err(e) => {
                    shared.progress.event(crate::progress::Event::Info(format!(
                        "warning: --cache-from {location}: {e}"
                    )));
                    continue;
                }
            },
        };
        if let Some(record) = fetch_inline(shared, repo, key, platform).await {
            return Some(record);
        }
        let Ok(reference) = tagged(repo, key) else {
            continue;
        };
        match shared
            .registry
            .pull(&reference, platform, &shared.store)
            .await
        {
            Ok(pulled) => {
                let layer = pulled.manifest.layers.first().cloned();
                let diff_id = pulled.config.rootfs.diff_ids.first().copied();
                if layer.is_some() != diff_id.is_some() {
                    continue;
                }
                return Some(CacheRecord {
                    layer,
                    diff_id,
                    duration_ms: 0,
                    created: crate::build::now(),
                });
            }
            Err(RegistryError::NotFound { .. }) => {}
            Err(e) => {
                shared.progress.event(crate::progress::Event::Info(format!(
                    "warning: --cache-from {repo}: {e}"
                )));
            }
        }
    }
    None
}

/// The record of `key` in the cache directory `dir`, its layer copied into the build's store;
/// `None` when the directory (the first CI run has none yet) or the record is not there.
fn fetch_local(
    shared: &Shared<'_>,
    dir: &std::path::Path,
    key: &CacheKey,
) -> Result<Option<CacheRecord>, StoreError> {
    if !dir.join("cache/keys").is_dir() {
        return Ok(None);
    }
    let records = LocalCache::open(dir).map_err(records_error(dir))?;
    let Some(record) = records.get(key) else {
        return Ok(None);
    };
    if let Some(layer) = &record.layer {
        shared
            .store
            .copy_from(&BlobStore::open(dir)?, &layer.digest)?;
    }
    Ok(Some(record))
}

fn records_error(dir: &std::path::Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: dir.join("cache/keys"),
        source,
    }
}

/// Stores `records` in the cache directory `dir` (made if missing), with their layers.
fn export_local(
    shared: &Shared<'_>,
    dir: &std::path::Path,
    records: &[(CacheKey, CacheRecord, Platform)],
) -> Result<(), StoreError> {
    let store = BlobStore::open(dir)?;
    let cache = LocalCache::open(dir).map_err(records_error(dir))?;
    for (key, record, _) in records {
        // The blob first: a record is never there without its layer.
        if let Some(layer) = &record.layer {
            store.copy_from(&shared.store, &layer.digest)?;
        }
        cache.put(key, record).map_err(records_error(dir))?;
    }
    Ok(())
}

/// Stores `records` in the `--cache-to` repository or directory (nothing for an inline
/// cache: its records are in the image's config).
pub(crate) async fn export(
    shared: &Shared<'_>,
    to: &CacheExport,
    records: &[(CacheKey, CacheRecord, Platform)],
) -> Result<(), RegistryError> {
    let repo = match &to.location {
        None => return Ok(()),
        Some(CacheLocation::Local(dir)) => return Ok(export_local(shared, dir, records)?),
        Some(CacheLocation::Registry(repo)) => repo,
    };
    for (key, record, platform) in records {
        let reference = tagged(repo, key)?;
        let config = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: record.diff_id.into_iter().collect(),
            },
            ..Default::default()
        };
        let config_bytes = oci::to_canonical_json(&config);
        let config_digest = shared.store.put(&config_bytes)?;
        let config_desc = Descriptor {
            media_type: media_type::OCI_CONFIG.into(),
            digest: config_digest,
            size: config_bytes.len() as u64,
            platform: None,
            annotations: None,
        };
        let layers: Vec<Descriptor> = record.layer.iter().cloned().collect();
        let manifest = Manifest::new(&config_desc, &layers, to.media_types).map_err(|e| {
            RegistryError::Invalid {
                registry: reference.registry().to_string(),
                reference: reference.whole(),
                what: "cache record (oci-mediatypes=false)".into(),
                detail: e.to_string(),
            }
        })?;
        let bytes = oci::to_canonical_json(&manifest);
        let mut blobs = manifest.layers.clone();
        blobs.push(manifest.config.clone());
        shared
            .registry
            .push(
                &reference,
                &shared.store,
                &blobs,
                &bytes,
                to.media_types.manifest(),
            )
            .await?;
    }
    Ok(())
}

/// The field of an image config that holds its inline cache (`--cache-to type=inline`): the
/// cache key of each step whose result is in the image, with the index of its layer among
/// the image's (none for a step that changed no file).
pub(crate) const INLINE_FIELD: &str = "ossb.cache.v1";

/// One step of an inline cache.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct InlineStep {
    /// The step's cache key, 64 hex digits.
    pub key: String,
    /// Its layer's position in the image's layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
}

/// The inline cache of an image whose layers' diff IDs are `diff_ids`: the steps of `chain`
/// with the position of their layer. Found by diff ID (the image's blob may be a compressed
/// copy of the record's, a layer whose compression was deferred), from the last layer back:
/// the chain's layers are the image's last, in order, and a base layer of the same tar must
/// not be taken for a step's.
pub(crate) fn inline_steps(
    chain: &[(CacheKey, CacheRecord)],
    diff_ids: &[ossb_protocol::Digest],
) -> serde_json::Value {
    let mut before = diff_ids.len();
    let mut steps: Vec<InlineStep> = chain
        .iter()
        .rev()
        .map(|(key, record)| {
            let diff_id = record.layer.as_ref().and(record.diff_id);
            let layer = diff_id.and_then(|d| diff_ids[..before].iter().rposition(|id| *id == d));
            if let Some(at) = layer {
                before = at;
            }
            InlineStep {
                key: key.hex(),
                layer,
            }
        })
        .collect();
    steps.reverse();
    serde_json::to_value(steps).unwrap_or_default()
}

/// The inline cache of a `--cache-from` image, for one platform: records by key, and the
/// image they come from (their layers are pulled from it on a hit).
pub(crate) struct Inline {
    reference: Option<Reference>,
    records: std::collections::HashMap<CacheKey, CacheRecord>,
}

/// The inline cache of `repo` for `platform`: empty when the image is not there or has none.
async fn load_inline(shared: &Shared<'_>, repo: &str, platform: &Platform) -> Inline {
    let mut inline = Inline {
        reference: None,
        records: Default::default(),
    };
    let Ok(reference) = parse_reference(repo) else {
        return inline;
    };
    let resolved = shared
        .registry
        .resolve(&reference, platform, &shared.store)
        .await;
    let manifest = match resolved {
        Ok((_, manifest)) => manifest,
        Err(RegistryError::NotFound { .. } | RegistryError::PlatformMissing { .. }) => {
            return inline
        }
        Err(e) => {
            warn(shared, repo, &e);
            return inline;
        }
    };
    let config = match read_config(shared, &reference, &manifest).await {
        Ok(config) => config,
        Err(e) => {
            warn(shared, repo, &e);
            return inline;
        }
    };
    let Some(steps) = config.extra.get(INLINE_FIELD) else {
        return inline;
    };
    let Ok(steps) = serde_json::from_value::<Vec<InlineStep>>(steps.clone()) else {
        shared.progress.event(crate::progress::Event::Info(format!(
            "warning: --cache-from {repo}: the image's inline cache is not one ossb reads"
        )));
        return inline;
    };
    for step in steps {
        let Some(key) = CacheKey::from_hex(&step.key) else {
            continue;
        };
        let (layer, diff_id) = match step.layer {
            None => (None, None),
            Some(i) => match (manifest.layers.get(i), config.rootfs.diff_ids.get(i)) {
                (Some(layer), Some(diff_id)) => (Some(layer.clone()), Some(*diff_id)),
                _ => continue,
            },
        };
        inline.reference = Some(reference.clone());
        inline.records.insert(
            key,
            CacheRecord {
                layer,
                diff_id,
                duration_ms: 0,
                created: crate::build::now(),
            },
        );
    }
    inline
}

async fn read_config(
    shared: &Shared<'_>,
    reference: &Reference,
    manifest: &Manifest,
) -> Result<ImageConfig, RegistryError> {
    shared
        .registry
        .pull_blob(reference, &manifest.config, &shared.store, None, None)
        .await?;
    let bytes = shared.store.read(&manifest.config.digest)?;
    serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid {
        registry: reference.registry().to_string(),
        reference: reference.whole(),
        what: "image config".into(),
        detail: e.to_string(),
    })
}

fn warn(shared: &Shared<'_>, repo: &str, e: &dyn std::fmt::Display) {
    shared.progress.event(crate::progress::Event::Info(format!(
        "warning: --cache-from {repo}: {e}"
    )));
}

/// The record of `key` in the inline cache of the image `repo` (loaded once per build and
/// platform), its layer pulled into the store.
async fn fetch_inline(
    shared: &Shared<'_>,
    repo: &str,
    key: &CacheKey,
    platform: &Platform,
) -> Option<CacheRecord> {
    let inline = {
        let mut loaded = shared.inline_caches.lock().await;
        let slot = (repo.to_string(), platform.clone());
        if !loaded.contains_key(&slot) {
            let inline = load_inline(shared, repo, platform).await;
            loaded.insert(slot.clone(), std::sync::Arc::new(inline));
        }
        loaded[&slot].clone()
    };
    let record = inline.records.get(key)?;
    if let (Some(layer), Some(reference)) = (&record.layer, &inline.reference) {
        if let Err(e) = shared
            .registry
            .pull_blob(reference, layer, &shared.store, None, None)
            .await
        {
            warn(shared, repo, &e);
            return None;
        }
    }
    Some(record.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildx_spellings() {
        let registry = CacheLocation::Registry("reg:5000/cache".into());
        assert_eq!(parse_cache("reg:5000/cache").unwrap(), registry);
        assert_eq!(
            parse_cache("type=registry,ref=reg:5000/cache,mode=max").unwrap(),
            registry
        );
        assert!(parse_cache("type=registry").is_err());
        let gha = parse_cache("type=gha").unwrap_err();
        assert!(matches!(gha, CacheSpecError::UnsupportedType { ref kind, .. } if kind == "gha"));
        assert!(gha.to_string().starts_with(
            "\"type=gha\": cache type \"gha\" is not supported; use REF, type=registry,ref=REF or type=local,"
        ));
        assert_eq!(
            parse_cache("type=local,src=/tmp/c").unwrap(),
            CacheLocation::Local("/tmp/c".into())
        );
        // buildx's keys: src= to read, dest= to write; inline is only written.
        assert!(parse_cache("type=local,dest=/tmp/c").is_err());
        assert!(parse_cache_export("type=local,src=/tmp/c").is_err());
        assert!(parse_cache("type=inline").is_err());
        assert_eq!(
            parse_cache("type=local,src=").unwrap_err().to_string(),
            "\"type=local,src=\": expected REF, type=registry,ref=REF or type=local,src=DIR"
        );
    }

    #[test]
    fn export_options_as_buildx() {
        let plain = parse_cache_export("reg:5000/cache").unwrap();
        assert_eq!(plain.mode, CacheMode::Min, "buildx's default mode is min");
        assert_eq!(
            plain.location,
            Some(CacheLocation::Registry("reg:5000/cache".into()))
        );
        let max = parse_cache_export(
            "type=registry,ref=r/c,mode=max,ignore-error=true,oci-mediatypes=false,image-manifest=true",
        )
        .unwrap();
        assert_eq!(
            (max.mode, max.ignore_error, max.media_types),
            (CacheMode::Max, true, MediaTypes::Docker)
        );
        assert!(max.no_effect.is_empty(), "{:?}", max.no_effect);
        assert_eq!(
            max.to_string(),
            "type=registry,ref=r/c,mode=max,ignore-error=true,oci-mediatypes=false"
        );
        assert_eq!(
            parse_cache_export(&max.to_string()).unwrap().no_effect,
            vec![]
        );
        let inline = parse_cache_export("type=inline").unwrap();
        assert_eq!(inline.location, None);
        assert_eq!(inline.to_string(), "type=inline");
        assert!(parse_cache_export("type=inline,mode=max").is_err());
        let local = parse_cache_export("type=local,dest=/tmp/c,mode=max").unwrap();
        assert_eq!(local.location, Some(CacheLocation::Local("/tmp/c".into())));
        assert_eq!(local.mode, CacheMode::Max);

        let bad = parse_cache_export("type=registry,ref=r/c,mode=all").unwrap_err();
        assert_eq!(
            bad.to_string(),
            "\"type=registry,ref=r/c,mode=all\": mode=\"all\": expected min or max"
        );
        assert!(parse_cache_export("type=registry,ref=r/c,ignore-error=yes").is_err());
        let warned = parse_cache_export("type=registry,ref=r/c,compression=zstd,store=x").unwrap();
        let options: Vec<&str> = warned.no_effect.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(options, ["compression=zstd", "store=x"]);
    }

    #[test]
    fn inline_steps_name_layers_by_the_position_of_their_diff_id() {
        let layer = |n: u8| Descriptor {
            media_type: media_type::OCI_LAYER_GZIP.into(),
            digest: ossb_protocol::Digest::of(&[n]),
            size: 1,
            platform: None,
            annotations: None,
        };
        let record = |l: Option<Descriptor>| CacheRecord {
            diff_id: l.as_ref().map(|l| l.digest),
            layer: l,
            duration_ms: 0,
            created: 0,
        };
        let k1 = CacheKey::from_bytes([1; 32]);
        let k2 = CacheKey::from_bytes([2; 32]);
        let chain = vec![(k1, record(Some(layer(9)))), (k2, record(None))];
        // A base layer of the same tar as the step's comes first: the step's is the last.
        let value = inline_steps(&chain, &[layer(9).digest, layer(9).digest]);
        let steps: Vec<InlineStep> = serde_json::from_value(value).unwrap();
        assert_eq!(
            steps,
            [
                InlineStep {
                    key: k1.hex(),
                    layer: Some(1)
                },
                InlineStep {
                    key: k2.hex(),
                    layer: None
                }
            ]
        );
        assert_eq!(CacheKey::from_hex(&k1.hex()), Some(k1));
        assert_eq!(CacheKey::from_hex("zz"), None);
    }
}
