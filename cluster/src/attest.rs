//! Attestations across the cluster: the request's options on the wire, each task's facts on
//! their way to the coordinator, and the inputs the coordinator writes the attestations from
//! (through the engine's writer, as `ossb build` does).

use ossb_engine::attestations::{
    AttestInputs, Attestations, PlatformFacts, ProvenanceMode, ProvenanceOptions, SlsaVersion,
    StepFact,
};
use ossb_protocol::cluster::{AttestSpec, BuildSpec, ProvenanceSpec, WireFacts, WireStepFact};

/// The attestations asked for, as they travel.
pub fn spec_of(options: &Attestations) -> AttestSpec {
    AttestSpec {
        provenance: options.provenance.as_ref().map(|p| ProvenanceSpec {
            max: p.mode == ProvenanceMode::Max,
            v1: p.version == SlsaVersion::V1,
            builder_id: p.builder_id.clone(),
        }),
        sbom: options.sbom,
        oci_artifact: options.oci_artifact,
        vcs: options.vcs.clone().into_iter().collect(),
    }
}

/// The attestations a spec asks for.
pub fn options_of(spec: &AttestSpec) -> Attestations {
    Attestations {
        provenance: spec.provenance.as_ref().map(|p| ProvenanceOptions {
            mode: if p.max {
                ProvenanceMode::Max
            } else {
                ProvenanceMode::Min
            },
            version: if p.v1 {
                SlsaVersion::V1
            } else {
                SlsaVersion::V02
            },
            builder_id: p.builder_id.clone(),
        }),
        sbom: spec.sbom,
        oci_artifact: spec.oci_artifact,
        vcs: spec.vcs.iter().cloned().collect(),
    }
}

/// What the coordinator writes a build's attestations from. Secret ids only: their values
/// never leave the task that mounts them.
pub fn inputs_of(spec: &BuildSpec) -> AttestInputs {
    AttestInputs {
        options: options_of(&spec.attest),
        tags: spec.tags.clone(),
        dockerfile: spec.dockerfile.clone(),
        dockerfile_name: spec.dockerfile_name.clone(),
        build_args: spec.build_args.iter().cloned().collect(),
        labels: spec.labels.iter().cloned().collect(),
        target: spec.target.clone(),
        secret_ids: spec.secrets.iter().map(|s| s.id.clone()).collect(),
        ssh_ids: Vec::new(),
        build_contexts: spec
            .build_contexts
            .iter()
            .map(|(n, _)| {
                (
                    n.clone(),
                    format!("local:{}", ossb_engine::named_context::local_name(n)),
                    true,
                )
            })
            .chain(
                spec.context_sources
                    .iter()
                    .map(|(n, v)| (n.clone(), v.clone(), false)),
            )
            .collect(),
        build_platform: None,
        source_date_epoch: spec.source_date_epoch,
        media_types: crate::context::media_types(spec),
    }
}

/// A task's facts as they travel, its steps marked with the worker that ran them.
pub fn facts_to_wire(facts: &PlatformFacts, worker: &str) -> WireFacts {
    WireFacts {
        materials: facts
            .materials
            .iter()
            .map(|m| (m.uri.clone(), m.algorithm.clone(), m.hex.clone()))
            .collect(),
        steps: facts
            .steps
            .iter()
            .map(|s| WireStepFact {
                stage: s.stage as u32,
                line: s.line as u32,
                instruction: s.instruction.clone(),
                key: s.key.clone(),
                layer: s.layer,
                worker: s.worker.clone().unwrap_or_else(|| worker.to_string()),
            })
            .collect(),
    }
}

/// A task's facts, back from the wire.
pub fn facts_from_wire(wire: &WireFacts) -> PlatformFacts {
    let mut facts = PlatformFacts {
        materials: wire
            .materials
            .iter()
            .map(|(uri, algorithm, hex)| ossb_attest::Material {
                uri: uri.clone(),
                algorithm: algorithm.clone(),
                hex: hex.clone(),
            })
            .collect(),
        steps: Vec::new(),
    };
    facts.merge(PlatformFacts {
        materials: Default::default(),
        steps: wire
            .steps
            .iter()
            .map(|s| StepFact {
                stage: s.stage as usize,
                line: s.line as usize,
                instruction: s.instruction.clone(),
                key: s.key.clone(),
                layer: s.layer,
                worker: Some(s.worker.clone()),
            })
            .collect(),
    });
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_facts_round_trip_through_the_wire() {
        let options = Attestations {
            provenance: Some(ProvenanceOptions {
                mode: ProvenanceMode::Max,
                version: SlsaVersion::V1,
                builder_id: Some("https://ci/1".into()),
            }),
            sbom: true,
            oci_artifact: true,
            vcs: [("source".to_string(), "https://g/r.git".to_string())].into(),
        };
        assert_eq!(options_of(&spec_of(&options)), options);
        let mut facts = PlatformFacts::default();
        facts
            .materials
            .insert(ossb_attest::Material::git("https://g/r.git#main", "ab12"));
        facts.merge(PlatformFacts {
            materials: Default::default(),
            steps: vec![StepFact {
                stage: 1,
                line: 4,
                instruction: "RUN x".into(),
                key: "00".into(),
                layer: Some(ossb_protocol::Digest::of(b"l")),
                worker: None,
            }],
        });
        let back = facts_from_wire(&facts_to_wire(&facts, "amd64-a"));
        assert_eq!(back.materials, facts.materials);
        assert_eq!(back.steps[0].worker.as_deref(), Some("amd64-a"));
        assert_eq!(back.steps[0].layer, facts.steps[0].layer);
    }
}
