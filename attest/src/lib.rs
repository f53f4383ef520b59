//! Attestations of an image, laid out as BuildKit lays them out: SLSA provenance (v0.2 or
//! v1) and SPDX SBOM in-toto statements, the attestation manifest that carries a platform's
//! statements in an index, and the files a `local`/`tar` export writes beside its own.
//!
//! The engine gathers a build's facts into a [`Provenance`], names the image with
//! [`subjects`], makes statements with [`provenance_statement`] and [`sbom_statement`], then
//! stores them with [`write_attestation_manifest`] and lists the returned descriptor in the
//! index after the images. Every byte written is canonical JSON, so the same build gives the
//! same attestation digests. `FORMAT.md` gives each field, its source in BuildKit, and where
//! ossb differs. No value of a secret can reach a statement: the API takes secret ids only.

mod json;
mod local;
mod manifest;
mod provenance;
mod purl;
pub use purl::image_purl;
mod statement;

pub use local::{local_files, PROVENANCE_FILE, SBOM_FILE};
pub use manifest::{
    is_attestation_manifest, write_attestation_manifest, Layout, ATTESTATION_ARTIFACT_TYPE,
    ATTESTATION_MANIFEST, IN_TOTO_MEDIA_TYPE, OCI_EMPTY_MEDIA_TYPE, PREDICATE_TYPE_ANNOTATION,
    REFERENCE_DIGEST_ANNOTATION, REFERENCE_TYPE_ANNOTATION,
};
pub use provenance::{
    provenance_statement, redact_credentials, BuildStep, Material, Mode, Provenance, SlsaVersion,
    SourceFile, StepInput, BUILDKIT_BUILD_TYPE_V02, BUILDKIT_BUILD_TYPE_V1, DOCKERFILE_FRONTEND,
    OSSB_BUILD_TYPE, PREDICATE_SLSA_V02, PREDICATE_SLSA_V1,
};
pub use statement::{
    extra_sbom_statement, file_subjects, sbom_statement, subjects, with_subjects, Statement,
    Subject, MAX_PREDICATE_BYTES, PREDICATE_SPDX, STATEMENT_TYPE,
};

/// Why an attestation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// An image name to attest is not a valid reference.
    #[error("cannot name the attestation's subject {name:?}: {detail}")]
    BadName {
        /// The name.
        name: String,
        /// The parser's complaint.
        detail: String,
    },
    /// A statement to re-subject is not an in-toto statement.
    #[error("not an in-toto statement: {0}")]
    BadStatement(String),
    /// The SBOM scanner's output is not a JSON object.
    #[error("the SBOM is not an SPDX JSON document: {0}")]
    BadSpdx(String),
    /// A predicate is larger than BuildKit accepts.
    #[error("the attestation is {size} bytes, more than the {limit} an attestation may be")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A timestamp outside the years RFC 3339 can write.
    #[error("timestamp {0} is outside the years 0 to 9999: check SOURCE_DATE_EPOCH")]
    Timestamp(i64),
    /// A step names an input that is not an earlier step or a listed material.
    #[error("build step {step} reads {input}, which is not an earlier step or a material")]
    BadStepInput {
        /// The step's index.
        step: usize,
        /// The input.
        input: String,
    },
    /// Attestations were asked for with Docker media types.
    #[error(
        "attestations need OCI media types: drop oci-mediatypes=false (BuildKit refuses it too)"
    )]
    DockerMediaTypes,
    /// An attestation manifest with nothing in it.
    #[error("an attestation manifest needs at least one statement")]
    NoStatements,
    /// Two attestations would be written to the same file.
    #[error("two attestations would be written to {0}")]
    DuplicateFile(String),
    /// An attestation's file name is not a plain file name.
    #[error("attestation file name {0:?} is not a plain file name")]
    BadFileName(String),
    /// The blob store failed.
    #[error(transparent)]
    Store(#[from] ossb_image::store::StoreError),
}
