//! A build's attestations made and stored: per platform image, its provenance (from the
//! request and the facts gathered) and its SBOM (a scan of the image's filesystem), as
//! statements in an attestation manifest listed in the index after the images.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ossb_attest::{BuildStep, Layout, Provenance, SourceFile, Statement, StepInput, Subject};
use ossb_image::oci::Descriptor;
use ossb_protocol::{Digest, Platform};

use super::{PlatformFacts, ProvenanceMode, ProvenanceOptions};
use crate::build::{local, BuildError, BuildRequest};
use crate::stage::{PlatformImage, Shared};

/// What one platform image's attestations say, before they are named after their subjects
/// (the image in a push or an OCI layout; the files of a local export).
pub(crate) struct Attestation {
    platform: Platform,
    provenance: Option<(ProvenanceOptions, Provenance)>,
    sbom: Option<Vec<u8>>,
}

impl Attestation {
    /// The statements about `subjects`.
    pub(crate) fn statements(&self, subjects: &[Subject]) -> Result<Vec<Statement>, BuildError> {
        let mut out = Vec::new();
        if let Some((options, provenance)) = &self.provenance {
            out.push(ossb_attest::provenance_statement(
                options.version,
                subjects,
                provenance,
            )?);
        }
        if let Some(document) = &self.sbom {
            out.push(ossb_attest::sbom_statement(subjects, document)?);
        }
        Ok(out)
    }

    /// The platform of the image it attests.
    pub(crate) fn platform(&self) -> &Platform {
        &self.platform
    }
}

/// The attestations of each of `images`, in order (none when none are asked for).
/// `started`: when the build began (seconds since the epoch).
pub(crate) async fn attach(
    shared: &Shared<'_>,
    images: &[PlatformImage],
    started: i64,
) -> Result<Vec<Attestation>, BuildError> {
    let req = shared.req;
    if !req.attestations.any() {
        return Ok(Vec::new());
    }
    let finished = crate::build::now();
    let mut out = Vec::new();
    for image in images {
        let platform = image
            .manifest
            .platform
            .as_ref()
            .map(|p| p.platform())
            .unwrap_or_else(|| req.platforms[0].clone());
        let provenance = req.attestations.provenance.as_ref().map(|options| {
            let facts = shared.facts.of(&platform);
            let p = provenance_of(req, options, &platform, &facts, started, finished);
            (options.clone(), p)
        });
        let sbom = match req.attestations.sbom {
            true => Some(sbom_of(shared, image, &platform).await?),
            false => None,
        };
        out.push(Attestation {
            platform,
            provenance,
            sbom,
        });
    }
    Ok(out)
}

/// Stores each image's attestation manifest (`attestations` in the order of `images`); their
/// descriptors, for the index.
pub(crate) fn write_manifests(
    shared: &Shared<'_>,
    images: &[PlatformImage],
    attestations: &[Attestation],
) -> Result<Vec<Descriptor>, BuildError> {
    let req = shared.req;
    images
        .iter()
        .zip(attestations)
        .map(|(image, attestation)| {
            let subjects =
                ossb_attest::subjects(&req.tags, &attestation.platform, &image.manifest)?;
            let statements = attestation.statements(&subjects)?;
            Ok(ossb_attest::write_attestation_manifest(
                &shared.store,
                &image.manifest,
                &statements,
                req.media_types,
                Layout::Image,
            )?)
        })
        .collect()
}

/// Writes the statements of a local export beside its files, as BuildKit does: about the
/// files exported into `dir` (every regular file, by sha256).
pub(crate) fn write_local_files(dir: &Path, attestation: &Attestation) -> Result<(), BuildError> {
    let mut files = Vec::new();
    hash_files(dir, dir, &mut files).map_err(local("hashing the exported files"))?;
    let subjects = ossb_attest::file_subjects(&files);
    let statements = attestation.statements(&subjects)?;
    for (name, bytes) in ossb_attest::local_files(&statements, None)? {
        ossb_image::export::write_file_atomically(&dir.join(name), &bytes)
            .map_err(|e| BuildError::Export(e.to_string()))?;
    }
    Ok(())
}

/// Every regular file under `dir` (symlinks not followed), by path relative to `root`.
fn hash_files(root: &Path, dir: &Path, out: &mut Vec<(String, Digest)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            hash_files(root, &path, out)?;
        } else if kind.is_file() {
            let mut file = std::fs::File::open(&path)?;
            let mut hasher = ossb_protocol::Sha256Writer::new(std::io::sink());
            std::io::copy(&mut file, &mut hasher)?;
            let name = path.strip_prefix(root).unwrap_or(&path);
            out.push((name.to_string_lossy().into_owned(), hasher.finish().0));
        }
    }
    Ok(())
}

/// The provenance of one platform's image.
fn provenance_of(
    req: &BuildRequest,
    options: &ProvenanceOptions,
    platform: &Platform,
    facts: &PlatformFacts,
    started: i64,
    finished: i64,
) -> Provenance {
    let max = options.mode == ProvenanceMode::Max;
    let dockerfile_name = Path::new(&req.dockerfile_name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != "-")
        .unwrap_or_else(|| "Dockerfile".into());
    // With SOURCE_DATE_EPOCH the build is meant to be reproducible: its attestation too, so
    // no wall-clock times and an invocation id derived from what was asked.
    let reproducible = req.source_date_epoch.is_some();
    let invocation_id = match req.source_date_epoch {
        Some(epoch) => {
            let asked = format!(
                "{}\0{:?}\0{:?}\0{platform}\0{epoch}",
                req.dockerfile, req.build_args, req.target
            );
            Digest::of(asked.as_bytes()).hex()[..32].to_string()
        }
        None => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            let seed = format!("{}\0{}\0{platform}", now.as_nanos(), std::process::id());
            Digest::of(seed.as_bytes()).hex()[..32].to_string()
        }
    };
    let mut locals = vec!["context".to_string(), "dockerfile".to_string()];
    locals.extend(req.build_contexts.keys().cloned());
    // Each step reads the one before it in its stage.
    let mut steps: Vec<BuildStep> = Vec::new();
    if max {
        let mut last_of_stage = std::collections::HashMap::new();
        for (n, step) in facts.steps.iter().enumerate() {
            let inputs = last_of_stage
                .insert(step.stage, n)
                .map(StepInput::Step)
                .into_iter()
                .collect();
            steps.push(BuildStep {
                instruction: step.instruction.clone(),
                inputs,
                platform: platform.clone(),
                layer: step.layer,
                worker: None,
            });
        }
    }
    Provenance {
        builder_id: options.builder_id.clone().unwrap_or_default(),
        build_type: None,
        config_source: None,
        entry_point: dockerfile_name.clone(),
        build_args: req.build_args.clone(),
        labels: req.labels.clone(),
        target: req.target.clone(),
        secret_ids: req.secrets.keys().cloned().collect(),
        ssh_ids: req.ssh.keys().cloned().collect(),
        locals,
        builder_platform: req.build_platform.clone().unwrap_or_else(Platform::host),
        materials: facts.materials.iter().cloned().collect(),
        vcs: Default::default(),
        invocation_id,
        started: (!reproducible).then_some(started),
        finished: (!reproducible).then_some(finished),
        reproducible,
        hermetic: false,
        parameters_complete: max,
        materials_complete: false,
        mode: options.mode,
        steps,
        source: max.then(|| SourceFile {
            filename: dockerfile_name,
            data: req.dockerfile.clone().into_bytes(),
        }),
    }
}

/// The SPDX document of `image`'s filesystem, unpacked for the scan into the build's work
/// directory.
async fn sbom_of(
    shared: &Shared<'_>,
    image: &PlatformImage,
    platform: &Platform,
) -> Result<Vec<u8>, BuildError> {
    let req = shared.req;
    let root = shared
        .work
        .join(format!("sbom-{}", image.manifest.digest.hex()));
    std::fs::create_dir_all(&root).map_err(local("creating the SBOM's scan directory"))?;
    let layers = image.stage.layers.clone();
    let (id, t) = shared.start(format!("[{platform}] scanning the image for its SBOM"));
    let scanned = async {
        crate::stage::unpack(&shared.store, &layers, &root)
            .await
            .map_err(|e| e.to_string())?;
        let scan_root = root.clone();
        tokio::task::spawn_blocking(move || ossb_sbom::scan(&scan_root))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
    .await;
    let packages = shared
        .finish(id, t, scanned)
        .map_err(|e| BuildError::Local(format!("scanning the image for its SBOM: {e}")))?;
    let _ = std::fs::remove_dir_all(&root);
    let created = UNIX_EPOCH
        + Duration::from_secs(
            req.source_date_epoch
                .unwrap_or_else(crate::build::now)
                .max(0) as u64,
        );
    let name = req.tags.first().cloned().unwrap_or_else(|| "image".into());
    let info = ossb_sbom::DocumentInfo {
        supplier: supplier_of(req, &image.stage.config),
        name,
        created,
        version: Some(image.manifest.digest.to_string()),
    };
    Ok(ossb_sbom::spdx_json(&info, &packages))
}

/// Who supplies the image: its `org.opencontainers.image.vendor` label, else its authors
/// label or MAINTAINER, else the repository it is pushed to (SPDX's supplier is who
/// distributes a package).
fn supplier_of(
    req: &BuildRequest,
    config: &ossb_image::oci::ImageConfig,
) -> Option<ossb_sbom::Supplier> {
    let labels = config.config.labels.clone().unwrap_or_default();
    if let Some(vendor) = labels.get("org.opencontainers.image.vendor") {
        return ossb_sbom::Supplier::organization(vendor);
    }
    if let Some(author) = labels
        .get("org.opencontainers.image.authors")
        .or(config.author.as_ref())
    {
        return ossb_sbom::Supplier::person(author);
    }
    let repository = req.tags.first()?.rsplit_once(':').map_or_else(
        || req.tags[0].clone(),
        |(repo, tag)| {
            if tag.contains('/') {
                req.tags[0].clone()
            } else {
                repo.to_string()
            }
        },
    );
    ossb_sbom::Supplier::organization(&repository)
}
