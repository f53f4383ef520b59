//! A platform's image: the layer of a change and the manifest and config of the stage.

use super::*;
use ossb_image::layer::ContentSources;

impl PlatformBuild<'_> {
    /// Writes the layer of `changes` of `rootfs` into the store; the files `contents` names
    /// are placeholders whose bytes are read from there (see [`ContentSources`]).
    pub(super) async fn write_layer(
        &self,
        rootfs: &Path,
        changes: Vec<Change>,
        contents: ContentSources,
    ) -> Result<(Descriptor, Digest), StepError> {
        let store = self.shared.store.clone();
        let rootfs = rootfs.to_path_buf();
        let opts = LayerOptions {
            compression: self.req().compression,
            source_date_epoch: self.req().source_date_epoch,
            level: self.req().export.compression_level,
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
            let desc = Descriptor {
                media_type: written.media_type.to_string(),
                digest: written.digest,
                size: written.size,
                platform: None,
                annotations: None,
            };
            Ok((desc, written.diff_id))
        })
        .await?
    }

    /// `force-compression=true`: `layers` with each one compressed otherwise than the build
    /// asks (a base image's, a named context's image's) recompressed, as BuildKit's
    /// `NeedsConversion`: a layer of the same compression at another level is kept. The tar
    /// is kept byte for byte: its diff ID must stay the config's.
    pub(super) async fn force_compression(
        &self,
        layers: &[Descriptor],
        config: &ImageConfig,
    ) -> Result<Vec<Descriptor>, BuildError> {
        let wanted = self.req().compression;
        let opts = LayerOptions {
            compression: wanted,
            source_date_epoch: None,
            level: self.req().export.compression_level,
        };
        let mut out = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let Some(from) = layer::Compression::of_media_type(&layer.media_type) else {
                return Err(BuildError::Export(format!(
                    "force-compression: layer {} has the media type {:?}, which ossb cannot recompress",
                    layer.digest, layer.media_type
                )));
            };
            if from == wanted {
                out.push(layer.clone());
                continue;
            }
            let (id, t) = self.shared.start(format!(
                "recompressing layer {} ({} to {})",
                layer.digest,
                from.name(),
                wanted.name()
            ));
            let (store, source, opts) = (self.shared.store.clone(), layer.clone(), opts.clone());
            let result = tokio::task::spawn_blocking(move || -> Result<_, String> {
                let blob = store.open_blob(&source.digest).map_err(|e| e.to_string())?;
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
            let written = self.shared.finish(id, t, result).map_err(|e| {
                BuildError::Export(format!("force-compression: layer {}: {e}", layer.digest))
            })?;
            if config.rootfs.diff_ids.get(i) != Some(&written.diff_id) {
                return Err(BuildError::Export(format!(
                    "force-compression: layer {} decompresses to {}, but the image config says its diff_id is {}",
                    layer.digest,
                    written.diff_id,
                    config
                        .rootfs
                        .diff_ids
                        .get(i)
                        .map_or_else(|| "missing".to_string(), |d| d.to_string())
                )));
            }
            out.push(Descriptor {
                media_type: written.media_type.to_string(),
                digest: written.digest,
                size: written.size,
                platform: None,
                annotations: None,
            });
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
                crate::remote_cache::inline_steps(&chain, layers),
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
