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

use ossb_image::oci::{self, media_type, Descriptor, ImageConfig, Manifest, RootFs};
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

/// `REF`, buildx's `type=registry,ref=REF[,...]`, or `type=local,src=DIR` (`--cache-from`) /
/// `type=local,dest=DIR` (`--cache-to`, `export`).
pub fn parse_cache(spec: &str, export: bool) -> Result<CacheLocation, CacheSpecError> {
    if !spec.contains('=') {
        return Ok(CacheLocation::Registry(spec.to_string()));
    }
    let (dir_key, usage) = if export {
        ("dest", "REF, type=registry,ref=REF or type=local,dest=DIR")
    } else {
        ("src", "REF, type=registry,ref=REF or type=local,src=DIR")
    };
    let malformed = || CacheSpecError::Malformed {
        spec: spec.to_string(),
        usage,
    };
    let (mut kind, mut reference, mut dir) = ("registry", None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("type", "registry")) => kind = "registry",
            Some(("type", "local")) => kind = "local",
            Some(("type", other)) => {
                return Err(CacheSpecError::UnsupportedType {
                    spec: spec.to_string(),
                    kind: other.to_string(),
                    usage,
                })
            }
            Some(("ref", r)) => reference = Some(r.to_string()),
            Some((k, d)) if k == dir_key => dir = Some(PathBuf::from(d)),
            // mode=max, image-manifest=true and the like change nothing here: every step is stored.
            Some(_) => {}
            None => return Err(malformed()),
        }
    }
    match (kind, reference, dir) {
        ("registry", Some(r), None) => Ok(CacheLocation::Registry(r)),
        ("local", None, Some(d)) if !d.as_os_str().is_empty() => Ok(CacheLocation::Local(d)),
        _ => Err(malformed()),
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

/// Stores `records` in the `--cache-to` repository or directory.
pub(crate) async fn export(
    shared: &Shared<'_>,
    records: &[(CacheKey, CacheRecord, Platform)],
) -> Result<(), RegistryError> {
    let repo = match &shared.req.cache_to {
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
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            config: config_desc.clone(),
            layers: record.layer.iter().cloned().collect(),
            annotations: None,
        };
        let bytes = oci::to_canonical_json(&manifest);
        let mut blobs: Vec<Descriptor> = record.layer.iter().cloned().collect();
        blobs.push(config_desc);
        shared
            .registry
            .push(
                &reference,
                &shared.store,
                &blobs,
                &bytes,
                media_type::OCI_MANIFEST,
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildx_spellings() {
        let registry = CacheLocation::Registry("reg:5000/cache".into());
        for export in [false, true] {
            assert_eq!(parse_cache("reg:5000/cache", export).unwrap(), registry);
            assert_eq!(
                parse_cache("type=registry,ref=reg:5000/cache,mode=max", export).unwrap(),
                registry
            );
            assert!(parse_cache("type=registry", export).is_err());
            let gha = parse_cache("type=gha", export).unwrap_err();
            assert!(
                matches!(gha, CacheSpecError::UnsupportedType { ref kind, .. } if kind == "gha")
            );
            assert!(gha.to_string().starts_with(
                "\"type=gha\": cache type \"gha\" is not supported; use REF, type=registry,ref=REF or type=local,"
            ));
        }
        assert_eq!(
            parse_cache("type=local,src=/tmp/c", false).unwrap(),
            CacheLocation::Local("/tmp/c".into())
        );
        assert_eq!(
            parse_cache("type=local,dest=/tmp/c,mode=max", true).unwrap(),
            CacheLocation::Local("/tmp/c".into())
        );
        // buildx's keys: src= to read, dest= to write.
        assert!(parse_cache("type=local,dest=/tmp/c", false).is_err());
        assert!(parse_cache("type=local,src=/tmp/c", true).is_err());
        assert_eq!(
            parse_cache("type=local,src=", false)
                .unwrap_err()
                .to_string(),
            "\"type=local,src=\": expected REF, type=registry,ref=REF or type=local,src=DIR"
        );
    }
}
