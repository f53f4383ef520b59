//! The step cache in a registry repository (`--cache-to REF`, `--cache-from REF`), so that
//! ephemeral CI pods share it, as Kaniko's cache repository does.
//!
//! Every step that changed files is stored as a small image tagged with its cache key (the 64
//! hex digits): one layer (or none when the step changed nothing) and a config whose
//! `rootfs.diff_ids` names the layer's uncompressed digest. Reading it is an ordinary pull, so
//! every blob is verified on arrival; writing it is an ordinary push, so blobs the repository
//! already has are not sent again.

use ossb_image::oci::{self, media_type, Descriptor, ImageConfig, Manifest, RootFs};
use ossb_image::registry::{parse_reference, RegistryError};
use ossb_image::Reference;
use ossb_protocol::Platform;

use crate::cache::{CacheKey, CacheRecord};
use crate::stage::Shared;

/// `REF` or buildx's `type=registry,ref=REF[,...]`.
pub fn parse_cache_ref(spec: &str) -> Result<String, String> {
    if !spec.contains('=') {
        return Ok(spec.to_string());
    }
    let mut reference = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("type", "registry")) => {}
            Some(("type", other)) => {
                return Err(format!(
                    "cache type {other:?} is not supported; use type=registry,ref=REF"
                ))
            }
            Some(("ref", r)) => reference = Some(r.to_string()),
            // mode=max, image-manifest=true and the like change nothing here: every step is stored.
            Some(_) => {}
            None => return Err(format!("{spec:?}: expected REF or type=registry,ref=REF")),
        }
    }
    reference.ok_or_else(|| format!("{spec:?}: missing ref=REF"))
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

/// Looks `key` up in the `--cache-from` repositories; on a hit the layer is in the store and
/// the record is returned. Failures other than "not there" are warnings: the step then runs.
pub(crate) async fn fetch(
    shared: &Shared<'_>,
    key: &CacheKey,
    platform: &Platform,
) -> Option<CacheRecord> {
    for repo in &shared.req.cache_from {
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

/// Stores `records` in the `--cache-to` repository.
pub(crate) async fn export(
    shared: &Shared<'_>,
    records: &[(CacheKey, CacheRecord, Platform)],
) -> Result<(), RegistryError> {
    let Some(repo) = &shared.req.cache_to else {
        return Ok(());
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
    fn parses_both_spellings() {
        assert_eq!(parse_cache_ref("reg:5000/cache").unwrap(), "reg:5000/cache");
        assert_eq!(
            parse_cache_ref("type=registry,ref=reg:5000/cache,mode=max").unwrap(),
            "reg:5000/cache"
        );
        assert!(parse_cache_ref("type=local,dest=x").is_err());
        assert!(parse_cache_ref("type=registry").is_err());
    }
}
