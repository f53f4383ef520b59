//! A platform's image: the layer of a change and the manifest and config of the stage.

use super::*;

impl PlatformBuild<'_> {
    pub(super) async fn write_layer(
        &self,
        rootfs: &Path,
        changes: Vec<Change>,
    ) -> Result<(Descriptor, Digest), StepError> {
        let store = self.shared.store.clone();
        let rootfs = rootfs.to_path_buf();
        let opts = LayerOptions {
            compression: self.req().compression,
            source_date_epoch: self.req().source_date_epoch,
        };
        tokio::task::spawn_blocking(move || -> Result<(Descriptor, Digest), StepError> {
            let mut writer = store.writer()?;
            let written = layer::write_layer(&rootfs, &changes, &mut writer, &opts)?;
            writer.commit(Some(&written.digest))?;
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

    pub(super) fn write_image(
        &self,
        mut config: ImageConfig,
        layers: &[Descriptor],
        stage: BuiltStage,
        rootfs: Option<std::path::PathBuf>,
        chain: Vec<(CacheKey, CacheRecord)>,
    ) -> Result<PlatformImage, BuildError> {
        let store = &self.shared.store;
        config.created = Some(self.shared.created.clone());
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
