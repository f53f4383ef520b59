//! The attestations a build attaches to its images: buildx's `--provenance`, `--sbom` and
//! `--attest`, as options of the request.

mod facts;
mod unchanged;
mod vcs;
mod write;

pub use ossb_attest::{Mode as ProvenanceMode, SlsaVersion};

pub(crate) use facts::{image_material, Facts};
pub use facts::{PlatformFacts, StepFact};
pub(crate) use unchanged::DIR as STAMPS;
pub use vcs::vcs_of;
pub(crate) use write::{attach, write_local_files};
pub use write::{
    statement_files, write_local_statements, write_manifests, AttestInputs, Attestation,
};

/// `--provenance` / `--attest type=provenance`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenanceOptions {
    /// How much it tells (buildx's default: min).
    pub mode: ProvenanceMode,
    /// Its format (buildx's default: SLSA v0.2).
    pub version: SlsaVersion,
    /// `builder-id`: who built (a CI run's URL); empty when not given.
    pub builder_id: Option<String>,
}

/// What a build attests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attestations {
    /// A SLSA provenance attestation per platform.
    pub provenance: Option<ProvenanceOptions>,
    /// An SPDX SBOM attestation per platform (`--sbom=true`); what it scans beyond the final
    /// image comes from the build args `BUILDKIT_SBOM_SCAN_STAGE` and
    /// `BUILDKIT_SBOM_SCAN_CONTEXT`, as in BuildKit.
    pub sbom: bool,
    /// The exporter's `oci-artifact=true`: attestation manifests in BuildKit v0.32's OCI
    /// artifact layout (`artifactType`, empty config, `subject`) instead of the image layout
    /// of BuildKit v0.11 to v0.31, which ossb writes by default.
    pub oci_artifact: bool,
    /// The context's git facts (`source`, `revision`, `localdir:*`) as buildx sends them in
    /// its `vcs:*` attributes; the provenance states them (BuildKit's `vcs` metadata).
    pub vcs: std::collections::BTreeMap<String, String>,
}

impl Default for ProvenanceOptions {
    fn default() -> ProvenanceOptions {
        ProvenanceOptions {
            mode: ProvenanceMode::Min,
            version: SlsaVersion::V02,
            builder_id: None,
        }
    }
}

impl Attestations {
    /// Whether any attestation is asked for.
    pub fn any(&self) -> bool {
        self.provenance.is_some() || self.sbom
    }
}
