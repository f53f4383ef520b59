//! What a build read and did, gathered while it runs: the facts its provenance states.

use ossb_attest::Material;

/// One build step, as a `mode=max` provenance lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepFact {
    /// The stage's index in the Dockerfile.
    pub stage: usize,
    /// The Dockerfile line it was written on.
    pub line: usize,
    /// What it did, as the image history says it (build args, never secrets).
    pub instruction: String,
    /// Its cache key (hex).
    pub key: String,
    /// The layer it made, if any.
    pub layer: Option<ossb_protocol::Digest>,
    /// The cluster worker that ran it (`None` in `ossb build`).
    pub worker: Option<String>,
}

/// What one platform's build read and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformFacts {
    /// Its materials, each once.
    pub materials: std::collections::BTreeSet<Material>,
    /// Its steps, in Dockerfile order (not the order they finished in: the attestation of
    /// two identical builds must be the same bytes).
    pub steps: Vec<StepFact>,
}

impl PlatformFacts {
    /// Adds another part of the same platform's build (a cluster task's).
    pub fn merge(&mut self, other: PlatformFacts) {
        self.materials.extend(other.materials);
        for step in other.steps {
            self.add_step(step);
        }
    }

    /// Adds a step in its Dockerfile place; a step already there (a stage two tasks read) is
    /// kept once.
    fn add_step(&mut self, step: StepFact) {
        let place = |s: &StepFact| (s.stage, s.line);
        if self.steps.iter().any(|s| place(s) == place(&step)) {
            return;
        }
        let at = self.steps.partition_point(|s| place(s) <= place(&step));
        self.steps.insert(at, step);
    }
}

/// What a build read and did, by platform, gathered while it runs for its attestations.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    by_platform: std::sync::Mutex<std::collections::BTreeMap<String, PlatformFacts>>,
}

impl Facts {
    fn with<T>(
        &self,
        platform: &ossb_protocol::Platform,
        f: impl FnOnce(&mut PlatformFacts) -> T,
    ) -> T {
        let mut all = self.by_platform.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(platform.to_string()).or_default())
    }

    /// `platform`'s build read `material`.
    pub(crate) fn material(&self, platform: &ossb_protocol::Platform, material: Material) {
        self.with(platform, |p| p.materials.insert(material));
    }

    /// `platform`'s build ran (or took from the cache) `step`.
    pub(crate) fn step(&self, platform: &ossb_protocol::Platform, step: StepFact) {
        self.with(platform, |p| p.add_step(step));
    }

    /// `platform`'s steps name each layer of `exported` by its exported blob: a layer whose
    /// compression an earlier build deferred is pushed as a compressed copy.
    pub(crate) fn rename_layers(
        &self,
        platform: &ossb_protocol::Platform,
        exported: &std::collections::HashMap<ossb_protocol::Digest, ossb_protocol::Digest>,
    ) {
        self.with(platform, |p| {
            for layer in p.steps.iter_mut().filter_map(|s| s.layer.as_mut()) {
                if let Some(copy) = exported.get(layer) {
                    *layer = *copy;
                }
            }
        });
    }

    /// Every platform's facts.
    pub(crate) fn all(&self) -> Vec<(ossb_protocol::Platform, PlatformFacts)> {
        let all = self.by_platform.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .filter_map(|(p, f)| Some((p.parse().ok()?, f.clone())))
            .collect()
    }

    /// What `platform`'s build read and did.
    pub(crate) fn of(&self, platform: &ossb_protocol::Platform) -> PlatformFacts {
        self.with(platform, |p| p.clone())
    }
}

/// A base image as a provenance material: its package URL, as BuildKit writes it, and its
/// manifest digest.
pub(crate) fn image_material(
    reference: &ossb_image::Reference,
    platform: &ossb_protocol::Platform,
    manifest: &ossb_protocol::Digest,
) -> Material {
    Material::sha256(ossb_attest::image_purl(reference, Some(platform)), manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ossb_protocol::{Digest, Platform};

    #[test]
    fn steps_name_a_layer_by_its_exported_copy() {
        let facts = Facts::default();
        let platform = Platform::host();
        let (tar, gzip, other) = (Digest::of(b"tar"), Digest::of(b"gzip"), Digest::of(b"x"));
        for (line, layer) in [(1, Some(tar)), (2, Some(other)), (3, None)] {
            facts.step(
                &platform,
                StepFact {
                    stage: 0,
                    line,
                    instruction: format!("step {line}"),
                    key: String::new(),
                    layer,
                    worker: None,
                },
            );
        }
        facts.rename_layers(&platform, &std::collections::HashMap::from([(tar, gzip)]));
        let layers: Vec<_> = facts.of(&platform).steps.iter().map(|s| s.layer).collect();
        assert_eq!(layers, [Some(gzip), Some(other), None]);
    }
}
