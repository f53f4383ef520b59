//! The images a platform's build pulls: its bases (`prepare`), and those it reads late
//! (`COPY --from=IMAGE`, `RUN --mount from=IMAGE`, image contexts), unpacked once to read from.

use super::*;

pub(super) fn pulled_key(reference: &str, platform: &Platform) -> String {
    format!("{reference}@{platform}")
}

impl PlatformBuild<'_> {
    /// Pulls and unpacks the images `COPY --from` and `RUN --mount from=` name, for this
    /// platform.
    pub(super) async fn pull_copy_images(&mut self, plan: &BuildPlan) -> Result<(), BuildError> {
        let mut refs: Vec<String> = Vec::new();
        let mut contexts: Vec<String> = Vec::new();
        for step in plan.stages.iter().flat_map(|s| &s.steps) {
            let named: Vec<&Source> = match &step.instruction {
                Instruction::Copy(c) | Instruction::Add(c) => c.from.iter().collect(),
                Instruction::Run(r) => r.mounts.iter().filter_map(|m| m.from.as_ref()).collect(),
                _ => Vec::new(),
            };
            for source in named {
                match source {
                    Source::Image(r) if !refs.contains(r) => refs.push(r.clone()),
                    Source::Context(n) if !contexts.contains(n) => contexts.push(n.clone()),
                    _ => {}
                }
            }
        }
        for name in contexts {
            self.unpack_context(&name).await?;
        }
        for reference in refs {
            let pulled = self.pull_read(&reference, &self.platform.clone()).await?;
            let root = self
                .unpack_to_read(&pulled, format!("unpacking {reference} to read from"))
                .await?;
            self.copy_images
                .insert(reference, (root, pulled.manifest_digest));
        }
        Ok(())
    }

    /// Pulls an image the build reads late (not a base, which a cluster's worker brought
    /// before the build): in a cluster, its blobs first through the cluster's single-flight, so
    /// that workers reading the same image fetch it from the registry once.
    pub(super) async fn pull_read(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<PulledImage, BuildError> {
        if let (Some(cluster), Ok(parsed)) = (self.shared.cluster, parse_reference(reference)) {
            let store = &self.shared.store;
            if let Ok((_, manifest)) = self.shared.registry.resolve(&parsed, platform, store).await
            {
                let blobs = std::iter::once(&manifest.config).chain(&manifest.layers);
                for blob in blobs.filter(|b| !store.contains(&b.digest)) {
                    cluster.image_blob(&parsed, blob, store).await;
                }
            }
        }
        self.pull(reference, platform).await
    }

    /// The filesystem of an image the build reads (`COPY --from=IMAGE`, an image context),
    /// unpacked once per build into the work directory under its manifest digest.
    pub(super) async fn unpack_to_read(
        &self,
        pulled: &PulledImage,
        label: String,
    ) -> Result<PathBuf, BuildError> {
        let root = self
            .shared
            .work
            .join(format!("image-{}", pulled.manifest_digest.hex()));
        if !root.exists() {
            std::fs::create_dir_all(&root).map_err(local("creating an image's filesystem"))?;
            let (id, t) = self.shared.start(label);
            let result = unpack(&self.shared.store, &pulled.manifest.layers, &root).await;
            self.shared
                .finish(id, t, result)
                .map_err(|e| BuildError::Local(e.to_string()))?;
        }
        Ok(root)
    }

    pub(super) async fn pull(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<PulledImage, BuildError> {
        let parsed = parse_reference(reference)?;
        self.shared
            .base_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(parsed.whole());
        let (id, t) = self.shared.start(format!(
            "[{platform}] load metadata and layers for {}",
            parsed.whole()
        ));
        let pull = self
            .shared
            .registry
            .pull(&parsed, platform, &self.shared.store);
        let result = self.shared.with_transfer(id, pull).await;
        let pulled = self.shared.finish(id, t, result)?;
        self.shared.facts.material(
            &self.platform,
            crate::attestations::image_material(&parsed, platform, &pulled.manifest_digest),
        );
        for blob in pulled
            .manifest
            .layers
            .iter()
            .chain(std::iter::once(&pulled.manifest.config))
        {
            self.shared.store.touch(&blob.digest);
        }
        Ok(pulled)
    }
}
