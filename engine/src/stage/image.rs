//! A platform's image: the layer of a change and the manifest and config of the stage.

use super::*;
use crate::compressed_copies::CompressedCopies;
use ossb_image::layer::ContentSources;

impl PlatformBuild<'_> {
    /// Writes the layer of `changes` of `rootfs` into the store; the files `contents` names
    /// are placeholders whose bytes are read from there (see [`ContentSources`]). A plain tar
    /// marked [`DEFERRED`] when the build defers compression.
    pub(super) async fn write_layer(
        &self,
        rootfs: &Path,
        changes: Vec<Change>,
        contents: ContentSources,
    ) -> Result<(Descriptor, Digest), StepError> {
        let store = self.shared.store.clone();
        let rootfs = rootfs.to_path_buf();
        let req = self.req();
        let deferred = req.defer_compression && req.compression != layer::Compression::None;
        let opts = LayerOptions {
            compression: match deferred {
                true => layer::Compression::None,
                false => req.compression,
            },
            source_date_epoch: req.source_date_epoch,
            level: req.export.compression_level,
        };
        tokio::task::spawn_blocking(move || -> Result<(Descriptor, Digest), StepError> {
            if !contents.is_empty() {
                tracing::debug!(
                    files = contents.len(),
                    "layer bytes read from the context, not from a copy"
                );
            }
            // write_layer hashes every byte it writes: the store need not hash them again.
            let mut writer = store.writer_hashed_by_caller()?;
            let written =
                layer::write_layer_from(&rootfs, &changes, &contents, &mut writer, &opts)?;
            writer.commit(&written.digest, written.size)?;
            let mut desc = descriptor_of(&written);
            if deferred {
                desc.annotations = Some(BTreeMap::from([(DEFERRED.into(), "true".into())]));
            }
            Ok((desc, written.diff_id))
        })
        .await?
    }

    /// The image's `layers` as its outputs take them ([`Shared::export_layer`]); `config`
    /// holds their diff IDs.
    pub(super) async fn export_layers(
        &self,
        layers: &[Descriptor],
        config: &ImageConfig,
    ) -> Result<Vec<Descriptor>, BuildError> {
        let mut out = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let diff_id = config.rootfs.diff_ids.get(i);
            out.push(self.shared.export_layer(layer, diff_id).await?);
        }
        Ok(out)
    }

    pub(super) fn write_image(
        &self,
        mut config: ImageConfig,
        layers: &[Descriptor],
        stage: BuiltStage,
        rootfs: Option<std::path::PathBuf>,
        chain: Vec<(CacheKey, CacheRecord)>,
    ) -> Result<PlatformImage, BuildError> {
        let store = &self.shared.store;
        config.created = match self.req().source_date_epoch {
            Some(_) => Some(self.shared.created.clone()),
            None => {
                history_times(&mut config.history).or_else(|| Some(self.shared.created.clone()))
            }
        };
        // A base image's inline cache names its build's steps, not this one's.
        config.extra.remove(crate::remote_cache::INLINE_FIELD);
        if self
            .req()
            .cache_to
            .as_ref()
            .is_some_and(|c| c.location.is_none())
        {
            config.extra.insert(
                crate::remote_cache::INLINE_FIELD.into(),
                crate::remote_cache::inline_steps(&chain, &config.rootfs.diff_ids),
            );
        }
        let config_bytes = oci::to_canonical_json(&config);
        let config_digest = store
            .put(&config_bytes)
            .map_err(local("storing the config"))?;
        let layers: Vec<Descriptor> = layers
            .iter()
            .map(|l| Descriptor {
                media_type: oci_layer_type(&l.media_type).to_string(),
                annotations: None,
                platform: None,
                ..l.clone()
            })
            .collect();
        let config_desc = Descriptor {
            media_type: media_type::OCI_CONFIG.into(),
            digest: config_digest,
            size: config_bytes.len() as u64,
            platform: None,
            annotations: None,
        };
        let types = self.req().media_types;
        let annotations = &self.req().annotations;
        let mut manifest = Manifest::new(&config_desc, &layers, types)
            .map_err(|e| BuildError::Export(e.to_string()))?;
        manifest.annotations = Annotations::some(&annotations.manifest);
        let bytes = oci::to_canonical_json(&manifest);
        let digest = store.put(&bytes).map_err(local("storing the manifest"))?;
        let mut blobs = manifest.layers.clone();
        blobs.push(manifest.config.clone());
        Ok(PlatformImage {
            manifest: Descriptor {
                media_type: types.manifest().into(),
                digest,
                size: bytes.len() as u64,
                platform: Some(DescriptorPlatform::from(&config.platform())),
                annotations: Annotations::some(&annotations.manifest_descriptor),
            },
            config: config_digest,
            blobs,
            stage,
            rootfs,
            chain,
            sbom_extras: Default::default(),
        })
    }
}

/// The descriptor of a layer blob just written.
fn descriptor_of(written: &layer::WrittenLayer) -> Descriptor {
    Descriptor {
        media_type: written.media_type.to_string(),
        digest: written.digest,
        size: written.size,
        platform: None,
        annotations: None,
    }
}

/// The annotation of a layer descriptor a step stored as a plain tar because its build
/// deferred compression: an export compresses it as asked, where a base image's plain tar
/// is kept unless `force-compression=true`, as BuildKit keeps a pulled blob. Kept in step
/// records, never written into a manifest.
pub(crate) const DEFERRED: &str = "ossb.compression.deferred";

impl Shared<'_> {
    /// `layer` as this build's exports write it, without ossb's own annotations: a layer whose
    /// compression was deferred compressed as the build asks, and with
    /// `force-compression=true` a layer compressed otherwise (a base image's, a named
    /// context's) recompressed, as BuildKit's `NeedsConversion` (one of the same compression
    /// at another level is kept). Nothing is compressed for a build whose outputs read no
    /// blobs. The tar is kept byte for byte: the result must decompress to `diff_id`. A copy
    /// made once is taken from the cache's [`CompressedCopies`] afterwards.
    pub(crate) async fn export_layer(
        &self,
        layer: &Descriptor,
        diff_id: Option<&Digest>,
    ) -> Result<Descriptor, BuildError> {
        let req = self.req;
        let wanted = req.compression;
        let deferred = layer
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(DEFERRED));
        let plain = Descriptor {
            annotations: None,
            ..layer.clone()
        };
        if req.defer_compression {
            return Ok(plain);
        }
        let force = req.export.force_compression;
        let from = match layer::Compression::of_media_type(&layer.media_type) {
            Some(from) => from,
            None if force => {
                let what = format!(
                    "layer {} has the media type {:?}",
                    layer.digest, layer.media_type
                );
                return Err(BuildError::Export(format!(
                    "force-compression: {what}, which ossb cannot recompress"
                )));
            }
            None => return Ok(plain),
        };
        if from == wanted || !(force || deferred) {
            return Ok(plain);
        }
        let settings = format!(
            "{};level={:?}",
            wanted.media_type(),
            req.export.compression_level
        );
        let copies = CompressedCopies::open(&req.cache_dir);
        if let Some(copy) = copies.get(&layer.digest, &settings) {
            if self.store.contains(&copy.digest) {
                self.store.touch(&copy.digest);
                return Ok(copy);
            }
        }
        let (id, t) = self.start(match deferred {
            true => format!("compressing layer {} ({})", layer.digest, wanted.name()),
            false => format!(
                "recompressing layer {} ({} to {})",
                layer.digest,
                from.name(),
                wanted.name()
            ),
        });
        let opts = LayerOptions {
            compression: wanted,
            source_date_epoch: None,
            level: req.export.compression_level,
        };
        let (store, source) = (self.store.clone(), layer.digest);
        let result = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let blob = store.open_blob(&source).map_err(|e| e.to_string())?;
            let mut writer = store.writer().map_err(|e| e.to_string())?;
            let written = layer::recompress(std::io::BufReader::new(blob), &mut writer, &opts)
                .map_err(|e| e.to_string())?;
            writer
                .commit(Some(&written.digest))
                .map_err(|e| e.to_string())?;
            Ok(written)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let what = match deferred {
            true => "compressing",
            false => "force-compression",
        };
        let written = self
            .finish(id, t, result)
            .map_err(|e| BuildError::Export(format!("{what}: layer {}: {e}", layer.digest)))?;
        if diff_id != Some(&written.diff_id) {
            return Err(BuildError::Export(format!(
                "{what}: layer {} decompresses to {}, but the image config says its diff_id is {}",
                layer.digest,
                written.diff_id,
                diff_id.map_or_else(|| "missing".to_string(), |d| d.to_string())
            )));
        }
        let copy = descriptor_of(&written);
        // Best effort: without the record the next export compresses the layer again.
        let _ = copies.put(&layer.digest, &settings, &copy);
        Ok(copy)
    }
}

/// Fills the times of history entries that have none (steps without a layer), as BuildKit's
/// image writer does: an entry after a layer made by this build takes that layer's time, those
/// before the first one take the first one's; returns the last time, the image's `created`
/// (so a fully cached build, whose layers keep their first build's times, gives the same image).
pub(crate) fn history_times(history: &mut [History]) -> Option<String> {
    // The first layer time after an entry without one, else the last time of all.
    let mut created: Option<String> = None;
    let mut untimed = false;
    for h in history.iter() {
        match &h.created {
            Some(t) => {
                created = Some(t.clone());
                if untimed {
                    break;
                }
            }
            None => untimed = true,
        }
    }
    let mut untimed = false;
    for h in history.iter_mut() {
        match &h.created {
            Some(t) if untimed => created = Some(t.clone()),
            Some(_) => {}
            None => {
                untimed = true;
                h.created = created.clone();
            }
        }
    }
    history.iter().rev().find_map(|h| h.created.clone())
}

#[cfg(test)]
mod history_tests {
    use super::*;

    fn entry(t: Option<&str>) -> History {
        History {
            created: t.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn untimed_entries_take_the_first_new_layer_time_then_the_latest() {
        // base, ENV, RUN (layer at t2), LABEL, COPY (layer at t3), CMD
        let mut history = vec![
            entry(Some("t0")),
            entry(None),
            entry(Some("t2")),
            entry(None),
            entry(Some("t3")),
            entry(None),
        ];
        assert_eq!(history_times(&mut history).as_deref(), Some("t3"));
        let times: Vec<&str> = history
            .iter()
            .map(|h| h.created.as_deref().unwrap())
            .collect();
        assert_eq!(times, ["t0", "t2", "t2", "t2", "t3", "t3"]);
        // Only metadata after the base: the base's last time.
        let mut history = vec![entry(Some("t0")), entry(None)];
        assert_eq!(history_times(&mut history).as_deref(), Some("t0"));
        assert!(history_times(&mut []).is_none());
    }
}
