//! A build's attestations made and stored: per platform image, its provenance (from the
//! request and the facts gathered) and its SBOM (a scan of the image's filesystem), as
//! statements in an attestation manifest listed in the index after the images. `ossb build`
//! and the cluster's coordinator both write them through here.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ossb_attest::{
    AttestError, BuildStep, Layout, Provenance, SourceFile, Statement, StepInput, Subject,
};
use ossb_image::oci::{Descriptor, MediaTypes};
use ossb_image::store::BlobStore;
use ossb_protocol::{Digest, Platform};

use super::{Attestations, PlatformFacts, ProvenanceMode, ProvenanceOptions};
use crate::build::{local, BuildError, BuildRequest};
use crate::stage::{PlatformImage, Shared};

/// What the attestations take from the request: the same from `ossb build`'s request and from
/// a cluster build's spec.
#[derive(Clone, Debug, Default)]
pub struct AttestInputs {
    /// What is asked for.
    pub options: Attestations,
    /// The image's names (the statements' subjects).
    pub tags: Vec<String>,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// Its name as given.
    pub dockerfile_name: String,
    /// `--build-arg`.
    pub build_args: BTreeMap<String, String>,
    /// `--label`.
    pub labels: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// The ids of `--secret` (never their values).
    pub secret_ids: Vec<String>,
    /// The ids of `--ssh`.
    pub ssh_ids: Vec<String>,
    /// `--build-context`: each name and its value as buildx hands it to the frontend
    /// ([`crate::ContextSource::provenance_value`]), and whether it is a directory.
    pub build_contexts: Vec<(String, String, bool)>,
    /// BUILDPLATFORM, when chosen.
    pub build_platform: Option<Platform>,
    /// SOURCE_DATE_EPOCH.
    pub source_date_epoch: Option<i64>,
    /// The index's media types.
    pub media_types: MediaTypes,
}

impl AttestInputs {
    /// What `req` says.
    pub fn of(req: &BuildRequest) -> AttestInputs {
        AttestInputs {
            options: req.attestations.clone(),
            tags: req.tags.clone(),
            dockerfile: req.dockerfile.clone(),
            dockerfile_name: req.dockerfile_name.clone(),
            build_args: req.build_args.clone(),
            labels: req.labels.clone(),
            target: req.target.clone(),
            secret_ids: req.secrets.keys().cloned().collect(),
            ssh_ids: req.ssh.keys().cloned().collect(),
            build_contexts: req
                .build_contexts
                .iter()
                .map(|(name, source)| {
                    let dir = matches!(source, crate::ContextSource::Dir(_));
                    (name.clone(), source.provenance_value(name), dir)
                })
                .collect(),
            build_platform: req.build_platform.clone(),
            source_date_epoch: req.source_date_epoch,
            media_types: req.media_types,
        }
    }
}

/// What one platform image's attestations say, before they are named after their subjects
/// (the image in a push or an OCI layout; the files of a local export).
pub struct Attestation {
    platform: Platform,
    provenance: Option<(ProvenanceOptions, Provenance)>,
    sbom: Option<Vec<u8>>,
    /// The SBOMs of the stages and context `BUILDKIT_SBOM_SCAN_*` add, by name.
    extra_sboms: Vec<(String, Vec<u8>)>,
}

impl Attestation {
    /// The attestation of `platform`'s image from what its build read and did (`facts`) and
    /// its SBOM (when asked for); the build ran from `started` to `finished` (seconds).
    pub fn new(
        inputs: &AttestInputs,
        platform: Platform,
        facts: &PlatformFacts,
        sbom: Option<Vec<u8>>,
        started: i64,
        finished: i64,
    ) -> Attestation {
        let provenance = inputs.options.provenance.as_ref().map(|options| {
            let p = provenance_of(inputs, options, &platform, facts, started, finished);
            (options.clone(), p)
        });
        Attestation {
            platform,
            provenance,
            sbom,
            extra_sboms: Vec::new(),
        }
    }

    /// Keeps the provenance's times and invocation id of the last build that made `image`
    /// with the same provenance otherwise, when this build `ran_nothing` (see
    /// [`super::unchanged`]); records them otherwise. `dir`: the cache or state directory.
    pub fn keep_stamp_when_unchanged(
        mut self,
        dir: &Path,
        image: &Digest,
        ran_nothing: bool,
    ) -> Self {
        if let Some((options, provenance)) = &mut self.provenance {
            super::unchanged::keep_stamp(dir, image, options, provenance, ran_nothing);
        }
        self
    }

    /// With the SBOMs of the stages and context `BUILDKIT_SBOM_SCAN_*` add, by name; they
    /// follow the image's own, sorted by name, as BuildKit's unbundling orders them.
    pub fn with_extra_sboms(mut self, mut extras: Vec<(String, Vec<u8>)>) -> Attestation {
        extras.sort();
        self.extra_sboms = extras;
        self
    }
    /// The statements about `subjects`.
    pub fn statements(&self, subjects: &[Subject]) -> Result<Vec<Statement>, AttestError> {
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
            for (name, document) in &self.extra_sboms {
                out.push(ossb_attest::extra_sbom_statement(subjects, name, document)?);
            }
        }
        Ok(out)
    }

    /// The platform of the image it attests.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Its SBOM, if one was made.
    pub fn sbom(&self) -> Option<&[u8]> {
        self.sbom.as_deref()
    }

    /// The extra SBOMs, by name.
    pub fn extra_sboms(&self) -> &[(String, Vec<u8>)] {
        &self.extra_sboms
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
    let inputs = AttestInputs::of(req);
    let finished = crate::build::now();
    let mut out = Vec::new();
    for image in images {
        let platform = image
            .manifest
            .platform
            .as_ref()
            .map(|p| p.platform())
            .unwrap_or_else(|| req.platforms[0].clone());
        let (sbom, extras) = match req.attestations.sbom {
            true => (
                Some(sbom_of(shared, image, &platform).await?),
                extra_sboms_of(shared, image, &platform).await?,
            ),
            false => (None, Vec::new()),
        };
        let facts = shared.facts.of(&platform);
        let ran_nothing = shared.stats.lock().unwrap_or_else(|e| e.into_inner()).run == 0;
        out.push(
            Attestation::new(&inputs, platform, &facts, sbom, started, finished)
                .with_extra_sboms(extras)
                .keep_stamp_when_unchanged(&req.cache_dir, &image.manifest.digest, ran_nothing),
        );
    }
    Ok(out)
}

/// Stores the attestation manifest of each image (its manifest's descriptor, and its
/// attestation); their descriptors, for the index after the images.
pub fn write_manifests(
    store: &BlobStore,
    inputs: &AttestInputs,
    images: &[(&Descriptor, &Attestation)],
) -> Result<Vec<Descriptor>, AttestError> {
    images
        .iter()
        .map(|(manifest, attestation)| {
            let subjects = ossb_attest::subjects(&inputs.tags, &attestation.platform, manifest)?;
            let statements = attestation.statements(&subjects)?;
            ossb_attest::write_attestation_manifest(
                store,
                manifest,
                &statements,
                inputs.media_types,
                match inputs.options.oci_artifact {
                    true => Layout::Artifact,
                    false => Layout::Image,
                },
            )
        })
        .collect()
}

/// The file name a local export gives each statement [`write_manifests`] stores, by the
/// statement's digest: what a cluster's client needs to write them beside its download.
pub fn statement_files(
    inputs: &AttestInputs,
    images: &[(&Descriptor, &Attestation)],
) -> Result<Vec<(Digest, String)>, AttestError> {
    let mut out = Vec::new();
    for (manifest, attestation) in images {
        let subjects = ossb_attest::subjects(&inputs.tags, &attestation.platform, manifest)?;
        for st in attestation.statements(&subjects)? {
            out.push((Digest::of(&st.bytes), st.file_name));
        }
    }
    Ok(out)
}

/// Writes the statements about an image (`statements`, with their file names) beside the
/// files of its local export in `dir`, about those files: what a cluster's client does with
/// the attestations it downloaded.
pub fn write_local_statements(
    dir: &Path,
    statements: &[(String, Vec<u8>)],
) -> Result<(), BuildError> {
    let mut files = Vec::new();
    hash_files(dir, dir, &mut files).map_err(local("hashing the exported files"))?;
    let subjects = ossb_attest::file_subjects(&files);
    let mut resubjected = Vec::new();
    for (name, bytes) in statements {
        resubjected.push(Statement {
            predicate_type: String::new(),
            file_name: name.clone(),
            bytes: ossb_attest::with_subjects(bytes, &subjects)?,
        });
    }
    write_statement_files(dir, &resubjected)
}

fn write_statement_files(dir: &Path, statements: &[Statement]) -> Result<(), BuildError> {
    for (name, bytes) in ossb_attest::local_files(statements, None)? {
        ossb_image::export::write_file_atomically(&dir.join(name), &bytes)
            .map_err(|e| BuildError::Export(e.to_string()))?;
    }
    Ok(())
}

/// Writes the statements of a local export beside its files, as BuildKit does: about the
/// files exported into `dir` (every regular file, by sha256).
pub(crate) fn write_local_files(dir: &Path, attestation: &Attestation) -> Result<(), BuildError> {
    let mut files = Vec::new();
    hash_files(dir, dir, &mut files).map_err(local("hashing the exported files"))?;
    let subjects = ossb_attest::file_subjects(&files);
    let statements = attestation.statements(&subjects)?;
    write_statement_files(dir, &statements)
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
    req: &AttestInputs,
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
            // Spelled out, never `Debug`: the id must not change with a compiler version.
            let args: Vec<String> = req
                .build_args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let asked = format!(
                "{}\0{}\0{}\0{platform}\0{epoch}",
                req.dockerfile,
                args.join("\0"),
                req.target.as_deref().unwrap_or_default()
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
    locals.extend(
        req.build_contexts
            .iter()
            .filter(|(_, _, dir)| *dir)
            .map(|(name, _, _)| crate::named_context::local_name(name)),
    );
    let contexts = req
        .build_contexts
        .iter()
        .map(|(name, value, _)| (name.clone(), value.clone()))
        .collect();
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
                worker: step.worker.clone(),
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
        secret_ids: req.secret_ids.clone(),
        ssh_ids: req.ssh_ids.clone(),
        locals,
        contexts,
        builder_platform: req.build_platform.clone().unwrap_or_else(Platform::host),
        materials: facts.materials.iter().cloned().collect(),
        vcs: req.options.vcs.clone(),
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
    let label = format!("[{platform}] scanning the image for its SBOM");
    let packages = scan_layers(shared, &image.stage.layers, image.rootfs.clone(), label).await?;
    let name = req.tags.first().cloned().unwrap_or_else(|| "image".into());
    let supplier = supplier_of(req, &image.stage.config);
    Ok(spdx(&shared.store, req, name, supplier, image, &packages))
}

/// The SBOMs `BUILDKIT_SBOM_SCAN_STAGE` (each stage asked for, by its name) and
/// `BUILDKIT_SBOM_SCAN_CONTEXT` (`context`: the context as the build reads it, without what
/// `.dockerignore` leaves out) add to `image`'s.
async fn extra_sboms_of(
    shared: &Shared<'_>,
    image: &PlatformImage,
    platform: &Platform,
) -> Result<Vec<(String, Vec<u8>)>, BuildError> {
    let req = shared.req;
    let image_name = req.tags.first().cloned().unwrap_or_else(|| "image".into());
    let supplier = supplier_of(req, &image.stage.config);
    let mut out = Vec::new();
    for (name, layers, rootfs) in &image.sbom_extras.stages {
        let label = format!("[{platform}] scanning stage {name} for its SBOM");
        let packages = scan_layers(shared, layers, rootfs.clone(), label).await?;
        let doc_name = format!("{image_name} (stage {name})");
        out.push((
            name.clone(),
            spdx(
                &shared.store,
                req,
                doc_name,
                supplier.clone(),
                image,
                &packages,
            ),
        ));
    }
    if image.sbom_extras.context {
        let (id, t) = shared.start(format!(
            "[{platform}] scanning the build context for its SBOM"
        ));
        let root = shared
            .work
            .join(format!("sbom-context-{}", image.manifest.digest.hex()));
        let (context, ignore, scan_root) =
            (req.context.clone(), shared.ignore.clone(), root.clone());
        let scanned = tokio::task::spawn_blocking(move || {
            copy_scanned_files(&context, &scan_root, "", ignore.as_ref())
                .map_err(|e| format!("reading the context: {e}"))?;
            ossb_sbom::scan(&scan_root).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let _ = std::fs::remove_dir_all(&root);
        let packages = shared.finish(id, t, scanned).map_err(|e| {
            BuildError::Local(format!("scanning the build context for its SBOM: {e}"))
        })?;
        let doc_name = format!("{image_name} (build context)");
        out.push((
            "context".into(),
            spdx(&shared.store, req, doc_name, supplier, image, &packages),
        ));
    }
    Ok(out)
}

/// Copies what the scanner reads of the directory `from` (regular files only, never through
/// a symlink) into `to`, leaving out what `ignore` excludes.
fn copy_scanned_files(
    from: &Path,
    to: &Path,
    rel: &str,
    ignore: Option<&ossb_dockerfile::dockerignore::Dockerignore>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    let mut entries: Vec<_> = std::fs::read_dir(from)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let kind = entry.file_type()?;
        let excluded = ignore.is_some_and(|i| i.is_excluded(&path));
        if kind.is_dir() {
            if !excluded || ignore.is_some_and(|i| i.may_include_below(&path)) {
                copy_scanned_files(&entry.path(), &to.join(&name), &path, ignore)?;
            }
        } else if kind.is_file() && !excluded {
            let meta = entry.metadata()?;
            if ossb_sbom::reads(&path, meta.permissions().mode(), meta.len()) {
                std::fs::copy(entry.path(), to.join(&name))?;
            }
        }
    }
    Ok(())
}

/// When the image whose config is `config` was made (the config's `created`).
fn made_at(store: &BlobStore, config: &Digest) -> Option<i64> {
    let bytes = store.read(config).ok()?;
    let config: ossb_image::oci::ImageConfig = serde_json::from_slice(&bytes).ok()?;
    ossb_protocol::parse_rfc3339(config.created.as_deref()?)
}

/// An SPDX document of `packages`, named `name`, for an attestation of `image`.
fn spdx(
    store: &BlobStore,
    req: &BuildRequest,
    name: String,
    supplier: Option<ossb_sbom::Supplier>,
    image: &PlatformImage,
    packages: &[ossb_sbom::Package],
) -> Vec<u8> {
    // Dated when the image was made (its config's time, SOURCE_DATE_EPOCH's when set), so
    // a rebuild that runs nothing gives the same document.
    let made = made_at(store, &image.config);
    let created = UNIX_EPOCH
        + Duration::from_secs(
            req.source_date_epoch
                .or(made)
                .unwrap_or_else(crate::build::now)
                .max(0) as u64,
        );
    let info = ossb_sbom::DocumentInfo {
        supplier,
        name,
        created,
        version: Some(image.manifest.digest.to_string()),
    };
    ossb_sbom::spdx_json(&info, packages)
}

/// The packages of the filesystem `layers` make (scanned in `rootfs` when the build left it
/// unpacked), kept by the layers' digests so a rebuild of the same filesystem is not scanned
/// again.
async fn scan_layers(
    shared: &Shared<'_>,
    layers: &[Descriptor],
    rootfs: Option<std::path::PathBuf>,
    label: String,
) -> Result<Vec<ossb_sbom::Package>, BuildError> {
    let req = shared.req;
    // What a scan finds depends on the layers only (the config's times change build after
    // build).
    let digests: Vec<u8> = layers
        .iter()
        .flat_map(|l| l.digest.to_string().into_bytes())
        .collect();
    let filesystem = Digest::of(&digests);
    if let Some(packages) = read_scan(req, &filesystem) {
        return Ok(packages);
    }
    let packages = scan(shared, layers, rootfs, &filesystem, label).await?;
    keep_scan(req, &filesystem, &packages);
    Ok(packages)
}

/// Where the scan of the filesystem made of the layers `digest` names is kept: a rebuild of
/// the same image (every step cached) is not scanned again.
fn scan_file(req: &BuildRequest, digest: &Digest) -> std::path::PathBuf {
    req.cache_dir.join("sbom").join(format!(
        "v{}-{}.json",
        ossb_sbom::SCANNER_VERSION,
        digest.hex()
    ))
}

fn read_scan(req: &BuildRequest, digest: &Digest) -> Option<Vec<ossb_sbom::Package>> {
    let bytes = std::fs::read(scan_file(req, digest)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Keeps a scan (best effort: a failure only costs the next build a scan).
fn keep_scan(req: &BuildRequest, digest: &Digest, packages: &[ossb_sbom::Package]) {
    let path = scan_file(req, digest);
    let kept = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::to_vec(packages).map_err(|e| e.to_string()))
        .and_then(|bytes| {
            ossb_image::export::write_file_atomically(&path, &bytes).map_err(|e| e.to_string())
        });
    if let Err(e) = kept {
        tracing::debug!(path = %path.display(), "keeping an SBOM scan: {e}");
    }
}

/// Scans the filesystem of `layers`: where the build left it unpacked (`rootfs`), else
/// unpacked into the build's work directory for the scan (the files it reads only).
async fn scan(
    shared: &Shared<'_>,
    layers: &[Descriptor],
    rootfs: Option<std::path::PathBuf>,
    filesystem: &Digest,
    label: String,
) -> Result<Vec<ossb_sbom::Package>, BuildError> {
    let what = label.clone();
    if let Some(rootfs) = rootfs {
        let (id, t) = shared.start(label);
        let scanned = tokio::task::spawn_blocking(move || ossb_sbom::scan(&rootfs))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        return shared
            .finish(id, t, scanned)
            .map_err(|e| BuildError::Local(format!("{what}: {e}")));
    }
    shared
        .bring(layers)
        .await
        .map_err(|e| BuildError::Local(format!("{what}: {e}")))?;
    let root = shared.work.join(format!("sbom-{}", filesystem.hex()));
    std::fs::create_dir_all(&root).map_err(local("creating the SBOM's scan directory"))?;
    let layers = layers.to_vec();
    let (id, t) = shared.start(label);
    let (store, scan_root) = (shared.store.clone(), root.clone());
    let scanned = tokio::task::spawn_blocking(move || {
        // Only the files the scan reads (package databases and metadata, executables): the
        // rest of the image is never written out.
        let options = ossb_image::layer::ApplyOptions {
            chown: false,
            xattrs: false,
            only: Some(std::sync::Arc::new(|path, mode, size| {
                path.to_str()
                    .is_some_and(|p| ossb_sbom::reads(p, mode, size))
            })),
            ..Default::default()
        };
        for layer in &layers {
            let blob = store.open_blob(&layer.digest).map_err(|e| e.to_string())?;
            ossb_image::layer::apply_layer(std::io::BufReader::new(blob), &scan_root, &options)
                .map_err(|e| format!("layer {}: {e}", layer.digest))?;
        }
        ossb_sbom::scan(&scan_root).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let _ = std::fs::remove_dir_all(&root);
    shared
        .finish(id, t, scanned)
        .map_err(|e| BuildError::Local(format!("{what}: {e}")))
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
