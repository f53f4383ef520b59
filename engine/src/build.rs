//! The build engine's entry point: parse, build each requested platform (see [`crate::stage`]),
//! merge the platforms' manifests into an index, export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ossb_dockerfile::dockerignore::{self, Dockerignore};
use ossb_dockerfile::{self as dockerfile, Network, PlanOptions};
use ossb_image::export::{self, check_destination, NamedImage, Replaceable};
use ossb_image::layer::{ApplyOptions, Compression};
use ossb_image::oci::MediaTypes;
use ossb_image::oci::{self, Descriptor, ImageConfig, Index};
use ossb_image::registry::{
    parse_reference, PushOptions, Registry, RegistryConfig, RegistryError, RegistryOptions,
};
use ossb_image::store::BlobStore;
use ossb_protocol::{Digest, Platform};
use ossb_worker::checksum::ChecksumCache;
use ossb_worker::sandbox::Isolation;

use crate::cache::{record_build, BuildStats, CacheKey, CacheRecord, LocalCache, CHECKSUMS_FILE};
use crate::error::StepError;
use crate::progress::Progress;
use crate::remote_cache::{self, CacheExport, CacheLocation, CacheMode};
use crate::stage::{PlatformBuild, PlatformImage, Shared, Stats};

/// Where a built image goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Push to the registry of each tag.
    Registry,
    /// An OCI image layout, as a tar archive (`tar: true`) or a directory.
    Oci {
        /// Destination path.
        dest: PathBuf,
        /// Whether to write a tar archive.
        tar: bool,
    },
    /// A `docker load` / `podman load` archive (one platform).
    Docker {
        /// Destination path.
        dest: PathBuf,
    },
    /// The image's filesystem in a directory (one subdirectory per platform for several).
    Local {
        /// Destination directory (missing or empty).
        dest: PathBuf,
    },
    /// The image's filesystem as a tar archive (one top directory per platform for several).
    Tar {
        /// Destination file.
        dest: PathBuf,
    },
    /// Nothing: the build only fills the cache (`--cache-to` included), as buildx's
    /// `type=cacheonly`.
    CacheOnly,
}

/// Everything a build needs to know.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// The context directory.
    pub context: PathBuf,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The Dockerfile's name for messages (a path, or `-` for stdin).
    pub dockerfile_name: String,
    /// Image names, e.g. `registry:5000/app:1.0`.
    pub tags: Vec<String>,
    /// The platforms to build for (at least one).
    pub platforms: Vec<Platform>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--label` values, applied to the final image.
    pub labels: BTreeMap<String, String>,
    /// Where the image goes.
    pub outputs: Vec<Output>,
    /// The cache directory (blob store, step cache and work space).
    pub cache_dir: PathBuf,
    /// Run every step, ignoring cached results (results are still recorded).
    pub no_cache: bool,
    /// `--cache-from`: registry repositories or directories to read cached steps from.
    pub cache_from: Vec<CacheLocation>,
    /// `--cache-to`: the registry repository or directory to store cached steps in, or the
    /// image itself (inline), and which steps.
    pub cache_to: Option<CacheExport>,
    /// How to reach registries.
    pub registry: RegistryOptions,
    /// Mirrors and other registry client settings.
    pub registry_config: RegistryConfig,
    /// Compression of the layers the build writes.
    pub compression: Compression,
    /// Steps store their layers as plain tars, compressed only once an export needs them,
    /// because no output of this build reads blobs (see [`BuildRequest::outputs_read_blobs`]):
    /// as BuildKit, whose layers get a compressed blob only when exported. A later build
    /// that exports such a layer compresses it then, once, to the bytes a compressing build
    /// gives (`Shared::export_layer`).
    pub defer_compression: bool,
    /// OCI (default) or Docker schema 2 media types for the manifests written.
    pub media_types: MediaTypes,
    /// The image exporter's other options (`compression-level=`, `force-compression=`,
    /// `push-by-digest=`, `name-canonical=`).
    pub export: ExportOptions,
    /// SOURCE_DATE_EPOCH, for reproducible timestamps.
    pub source_date_epoch: Option<i64>,
    /// The ossb binary, which implements the sandbox subcommand.
    pub sandbox_exe: PathBuf,
    /// How RUN steps are isolated.
    pub isolation: Isolation,
    /// `--build-context NAME=VALUE`: named contexts by name (as
    /// `ossb_dockerfile::context_name` spells it), which `FROM NAME`, `COPY --from=NAME` and
    /// `RUN --mount from=NAME` read, and which replace a stage of that name.
    pub build_contexts: BTreeMap<String, crate::ContextSource>,
    /// `--secret`: secrets by id, for `RUN --mount=type=secret`.
    pub secrets: BTreeMap<String, ossb_worker::mounts::Secret>,
    /// `--ssh ID=SOCKET`: SSH agent sockets by id, for `RUN --mount=type=ssh`.
    pub ssh: BTreeMap<String, PathBuf>,
    /// Build only this stage (its Dockerfile index) and what it needs: a cluster's stage task.
    pub stage: Option<usize>,
    /// Stages an earlier build made (a cluster's other tasks): taken as done, never built
    /// again, with their layer blobs in the store. For a one-platform build.
    pub built_stages: Vec<BuiltStage>,
    /// BUILDPLATFORM; the host's when `None`. A cluster chooses one for the whole build.
    pub build_platform: Option<Platform>,
    /// `--network`: the network of the RUN steps that name none.
    pub network: Network,
    /// `--add-host NAME:IP`: lines every RUN's `/etc/hosts` gets.
    pub extra_hosts: Vec<(String, String)>,
    /// `--annotation`: what the manifests, their descriptors and the index carry.
    pub annotations: Annotations,
    /// `--provenance`, `--sbom`, `--attest`: attestations attached to the images.
    pub attestations: crate::Attestations,
}

/// The options BuildKit's image and registry exporters take beyond `compression=` and
/// `oci-mediatypes=`, as ossb carries them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// `compression-level=`: within the compression's [`Compression::levels`]. Part of the
    /// step cache keys (it changes the layers' bytes).
    pub compression_level: Option<u32>,
    /// `force-compression=true`: the image's layers compressed otherwise (a base image's) are
    /// recompressed as `compression` asks. As BuildKit's, a layer of the same compression at
    /// another level is kept.
    pub force_compression: bool,
    /// `push-by-digest=true`: the image goes to each name's repository by digest, under no
    /// tag (the names are repositories: a tag is refused).
    pub push_by_digest: bool,
    /// `name-canonical=true`: each name's `REPOSITORY@DIGEST` is pushed and reported too.
    pub name_canonical: bool,
}

/// OCI annotations asked for with `--annotation [TYPE:]KEY=VALUE`, by where they go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotations {
    /// `manifest:` (the default): each platform's manifest.
    pub manifest: BTreeMap<String, String>,
    /// `manifest-descriptor:`: each manifest's descriptor in the index (or the OCI layout).
    pub manifest_descriptor: BTreeMap<String, String>,
    /// `index:`: the index of a multi-platform build.
    pub index: BTreeMap<String, String>,
}

impl Annotations {
    /// The kinds, as `--annotation TYPE:` and the cluster's spec name them.
    pub const KINDS: [&'static str; 3] = ["manifest", "manifest-descriptor", "index"];

    /// The annotations of `kind` (one of [`Annotations::KINDS`]).
    pub fn of_kind(&mut self, kind: &str) -> Option<&mut BTreeMap<String, String>> {
        match kind {
            "manifest" => Some(&mut self.manifest),
            "manifest-descriptor" => Some(&mut self.manifest_descriptor),
            "index" => Some(&mut self.index),
            _ => None,
        }
    }

    /// Every annotation as (kind, key, value).
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, &String, &String)> {
        [
            (Self::KINDS[0], &self.manifest),
            (Self::KINDS[1], &self.manifest_descriptor),
            (Self::KINDS[2], &self.index),
        ]
        .into_iter()
        .flat_map(|(kind, map)| map.iter().map(move |(k, v)| (kind, k, v)))
    }

    /// `None` for an empty map: the field is then left out of the JSON.
    pub fn some(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
        (!map.is_empty()).then(|| map.clone())
    }
}

impl BuildRequest {
    /// Whether a build with these outputs reads its layers' blobs as they are exported: a
    /// push, an OCI or docker archive, `--cache-to`. A filesystem (`type=local`, `type=tar`)
    /// or the cache alone does not, so such a build may defer its layers' compression.
    pub fn outputs_read_blobs(outputs: &[Output], cache_to: Option<&CacheExport>) -> bool {
        cache_to.is_some()
            || outputs.iter().any(|o| {
                matches!(
                    o,
                    Output::Registry | Output::Oci { .. } | Output::Docker { .. }
                )
            })
    }

    /// Checks what can be checked before any step runs, so that a bad tag or output fails in
    /// a second with exit 2, not after the whole build: every tag, every registry cache
    /// reference, and outputs that cannot hold the platforms asked for.
    pub fn check(&self) -> Result<(), BuildError> {
        check_references(
            &self.tags,
            self.cache_from
                .iter()
                .chain(self.cache_to.iter().filter_map(|c| c.location.as_ref())),
        )?;
        if self.outputs.contains(&Output::Registry) && self.tags.is_empty() {
            return Err(BuildError::Usage(
                "--push / --output type=registry needs at least one --tag naming the registry and repository".into(),
            ));
        }
        if self.platforms.len() > 1
            && self
                .outputs
                .iter()
                .any(|o| matches!(o, Output::Docker { .. }))
        {
            return Err(BuildError::Usage(
                "--output type=docker holds one platform; build one --platform, or use type=oci or type=registry for several".into(),
            ));
        }
        if let Some(level) = self.export.compression_level {
            check_level(self.compression, level)?;
        }
        for output in &self.outputs {
            let (dest, replaceable) = match output {
                Output::Local { dest } => (dest, Replaceable::EmptyDirectory),
                Output::Oci { dest, tar: false } => (dest, Replaceable::EmptyDirectoryOrLayout),
                Output::Oci { dest, tar: true }
                | Output::Docker { dest }
                | Output::Tar { dest } => (dest, Replaceable::File),
                Output::Registry | Output::CacheOnly => continue,
            };
            check_destination(dest, replaceable)
                .map_err(|e| BuildError::Usage(format!("--output: {e}")))?;
        }
        if self.export.push_by_digest {
            if let Some(tagged) = self.tags.iter().find(|t| !is_name_only(t)) {
                return Err(BuildError::Usage(format!(
                    "push-by-digest=true: can't push tagged ref {} by digest: name the repository only (name=REGISTRY/REPOSITORY)",
                    ossb_dockerfile::clip(tagged, 200)
                )));
            }
        }
        if let Some(epoch) = self.source_date_epoch {
            if ossb_protocol::rfc3339(epoch).is_none() {
                return Err(BuildError::Usage(format!(
                    "SOURCE_DATE_EPOCH={epoch} is not a time of the years 0 to 9999: give seconds since 1970-01-01"
                )));
            }
        }
        Ok(())
    }

    /// How the Dockerfile is planned for `target_platform`.
    pub fn plan_options(&self, target_platform: &Platform) -> PlanOptions {
        PlanOptions {
            build_args: self.build_args.clone(),
            target: self.target.clone(),
            target_index: self.stage,
            target_platform: target_platform.clone(),
            build_platform: self.build_platform.clone().unwrap_or_else(Platform::host),
            network: self.network,
            extra_hosts: self.extra_hosts.clone(),
            named_contexts: self.build_contexts.keys().cloned().collect(),
        }
    }
}

/// Refuses a `compression-level=` that `compression` does not take (BuildKit's ranges: gzip
/// 0-9, zstd 0-22).
pub fn check_level(compression: Compression, level: u32) -> Result<(), BuildError> {
    match compression.levels() {
        Some(levels) if levels.contains(&level) => Ok(()),
        Some(levels) => Err(BuildError::Usage(format!(
            "compression-level={level} is out of range for compression={} ({}-{})",
            compression.name(),
            levels.start(),
            levels.end()
        ))),
        // BuildKit ignores it; so does the writer of a plain tar.
        None => Ok(()),
    }
}

/// Whether `name` is a repository without a tag or digest (`registry:5000/app`, not
/// `registry:5000/app:1`): what a push by digest names, as BuildKit's `IsNameOnly`.
pub fn is_name_only(name: &str) -> bool {
    // A tag is after a ':' in the last component (a ':' before a '/' is a port).
    let last = name.rsplit('/').next().unwrap_or(name);
    !name.contains('@') && !last.contains(':')
}

/// The classic builder's warning for `--build-arg`s no ARG declares (a typo, usually):
/// `One or more build-args [FOO] were not consumed`.
pub fn unused_build_args_warning(
    df: &dockerfile::Dockerfile,
    build_args: &BTreeMap<String, String>,
    target: Option<&str>,
) -> Option<String> {
    let opts = PlanOptions {
        build_args: build_args.clone(),
        target: target.map(str::to_string),
        ..PlanOptions::default()
    };
    let unused = dockerfile::unused_build_args(df, &opts);
    (!unused.is_empty()).then(|| {
        let names: Vec<String> = unused
            .iter()
            .map(|n| ossb_dockerfile::clip(n, 100).into_owned())
            .collect();
        format!(
            "warning: One or more build-args [{}] were not consumed",
            names.join(" ")
        )
    })
}

/// Refuses a tag or a registry cache reference that is not a valid image reference, as buildx
/// does before it builds (`invalid tag "Bad Tag!!": invalid reference format`).
pub fn check_references<'a>(
    tags: &[String],
    caches: impl IntoIterator<Item = &'a CacheLocation>,
) -> Result<(), BuildError> {
    let bad = |what: &str, given: &str, e: RegistryError| {
        let detail = match e {
            RegistryError::BadReference { detail, .. } => detail,
            other => other.to_string(),
        };
        BuildError::Usage(format!(
            "invalid {what} {}: {detail} (a reference is [registry[:port]/]repository[:tag], in lower case)",
            ossb_dockerfile::go_quote(&ossb_dockerfile::clip(given, 200))
        ))
    };
    for tag in tags {
        parse_reference(tag).map_err(|e| bad("tag", tag, e))?;
    }
    for cache in caches {
        if let CacheLocation::Registry(r) = cache {
            parse_reference(r).map_err(|e| bad("cache reference", r, e))?;
        }
    }
    Ok(())
}

/// A finished stage: what a stage reading it starts from. A cluster's task hands the stage it
/// built to the tasks of the stages that read it ([`BuildRequest::built_stages`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltStage {
    /// The stage's index in the Dockerfile.
    pub index: usize,
    /// The cache key of its last step.
    pub key: CacheKey,
    /// Its image config.
    pub config: ImageConfig,
    /// Its layers, base first.
    pub layers: Vec<Descriptor>,
}

/// What a successful build produced.
#[derive(Clone, Debug)]
pub struct BuildResult {
    /// The image: a manifest, or an index when several platforms were built.
    pub image: Descriptor,
    /// The config digest (the image ID) of a single-platform build.
    pub config_digest: Option<Digest>,
    /// The references pushed, with their digest.
    pub pushed: Vec<String>,
    /// Steps run and taken from the cache.
    pub stats: Stats,
    /// Total size of the image's blobs (configs and layers of every platform), in bytes.
    pub size: u64,
    /// The target stage of a one-platform build.
    pub stage: Option<BuiltStage>,
    /// What each platform's build read and did (a cluster task's go to the coordinator, for
    /// the provenance it writes).
    pub facts: Vec<(Platform, crate::attestations::PlatformFacts)>,
    /// Each platform image's SBOM, when asked for.
    pub sboms: Vec<(Platform, Vec<u8>)>,
    /// The extra SBOMs (`BUILDKIT_SBOM_SCAN_*`) of each platform image, by name.
    pub extra_sboms: Vec<(Platform, String, Vec<u8>)>,
}

/// Why a build failed. [`BuildError::exit_code`] maps it to the CLI's exit code.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile is invalid.
    #[error("{0}")]
    Dockerfile(#[from] dockerfile::Error),
    /// The request is invalid (bad flags, bad context).
    #[error("{0}")]
    Usage(String),
    /// A step failed.
    #[error("{location}: {instruction}\n{source}")]
    Step {
        /// `Dockerfile:12`.
        location: String,
        /// The instruction's history text.
        instruction: String,
        /// What went wrong (boxed: it is larger than the other variants).
        source: Box<StepError>,
    },
    /// A registry refused or failed.
    #[error("{0}")]
    Registry(#[from] RegistryError),
    /// A requested platform cannot run here.
    #[error("{0}")]
    Platform(String),
    /// Writing an output failed.
    #[error("{0}")]
    Export(String),
    /// A local failure (disk, store).
    #[error("{0}")]
    Local(String),
    /// An attestation could not be made.
    #[error("writing the attestations: {0}")]
    Attest(#[from] ossb_attest::AttestError),
}

impl BuildError {
    /// 2 for bad usage or a bad Dockerfile, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Dockerfile(_) | BuildError::Usage(_) => 2,
            _ => 1,
        }
    }
}

pub(crate) fn local<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> BuildError + '_ {
    move |e| BuildError::Local(format!("{what}: {e}"))
}

/// Runs the build described by `req`, reporting to `progress`.
pub async fn build(req: &BuildRequest, progress: &dyn Progress) -> Result<BuildResult, BuildError> {
    build_with(req, progress, None).await
}

/// [`build`] with `cluster` (a cluster's step records) as the last level of the step cache
/// chain: asked for the steps the other levels lack, and told the steps this build ran.
pub async fn build_with(
    req: &BuildRequest,
    progress: &dyn Progress,
    cluster: Option<&dyn crate::cache::CacheLevel>,
) -> Result<BuildResult, BuildError> {
    req.check()?;
    let started = std::time::SystemTime::now();
    let df = dockerfile::parse(&req.dockerfile, &req.dockerfile_name)?;
    let result = run(req, &df, progress, cluster).await;
    if let Some(message) = collect_garbage(&req.cache_dir, started).await {
        progress.event(crate::progress::Event::Info(message));
    }
    result
}

/// [`build_with`] of a Dockerfile the caller parsed already (`req.dockerfile` parsed): a
/// cluster worker parses once per task, for its base images and for the build. The cache is
/// not collected: the worker still reads the store afterwards, and collects once the task is
/// done ([`collect_garbage`]).
pub async fn build_parsed(
    req: &BuildRequest,
    df: &dockerfile::Dockerfile,
    progress: &dyn Progress,
    cluster: Option<&dyn crate::cache::CacheLevel>,
) -> Result<BuildResult, BuildError> {
    req.check()?;
    run(req, df, progress, cluster).await
}

/// Once a build (or a cluster task) that began at `started` let go of the cache in
/// `cache_dir`: collects it if its disk is short (`cache_gc`), sparing what it used. Says
/// what was removed, when anything was.
pub async fn collect_garbage(cache_dir: &Path, started: std::time::SystemTime) -> Option<String> {
    let dir = cache_dir.to_path_buf();
    let report = tokio::task::spawn_blocking(move || crate::cache_gc::after_build(&dir, started))
        .await
        .ok()??;
    Some(format!(
        "less than a fifth of the disk holding the cache {} was free: removed the {} least recently used blobs ({} MB)",
        cache_dir.display(),
        report.blobs,
        report.bytes / 1_000_000
    ))
}

async fn run(
    req: &BuildRequest,
    df: &dockerfile::Dockerfile,
    progress: &dyn Progress,
    cluster: Option<&dyn crate::cache::CacheLevel>,
) -> Result<BuildResult, BuildError> {
    // A cluster's stage task leaves this to the coordinator, which says it once per build.
    if req.stage.is_none() {
        if let Some(warning) = unused_build_args_warning(df, &req.build_args, req.target.as_deref())
        {
            progress.event(crate::progress::Event::Info(warning));
        }
    }
    let started = now();
    if !req.context.is_dir() {
        return Err(BuildError::Usage(format!(
            "build context {} is not a directory",
            req.context.display()
        )));
    }
    if req.platforms.is_empty() {
        return Err(BuildError::Usage("no platform to build for".into()));
    }
    let store = BlobStore::open(&req.cache_dir).map_err(local("opening the cache"))?;
    // Held until the build ends: `ossb cache prune` waits for it.
    let _lease = store
        .lease()
        .map_err(local("locking the cache directory"))?;
    let cache = LocalCache::open(&req.cache_dir).map_err(local("opening the cache"))?;
    // What builds killed outright left in the temporary directory (older versions' step specs).
    ossb_worker::sandbox::remove_stale_step_files();
    let work_root = req.cache_dir.join("work");
    std::fs::create_dir_all(&work_root).map_err(local("creating the work directory"))?;
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&work_root)
        .map_err(local("creating the work directory"))?;
    let shared = Shared {
        req,
        progress,
        store,
        cache,
        registry: Registry::with_config(&req.registry, &req.registry_config)?,
        work: work.path().to_path_buf(),
        rootfs_pool: crate::rootfs_pool::RootfsPool::open(&req.cache_dir),
        // SOURCE_DATE_EPOCH is checked to be within RFC 3339's years (`BuildRequest::check`).
        created: ossb_protocol::rfc3339(req.source_date_epoch.unwrap_or_else(now))
            .unwrap_or_default(),
        ignore: load_dockerignore(req)?,
        next_id: std::sync::atomic::AtomicUsize::new(1),
        stats: std::sync::Mutex::new(Stats::default()),
        cache_exports: std::sync::Mutex::new(Vec::new()),
        inline_caches: Default::default(),
        base_images: Default::default(),
        durations: std::sync::Mutex::new(crate::cache::Durations::load(&req.cache_dir)),
        eta: std::sync::Mutex::new(Default::default()),
        checksums: ChecksumCache::open(&req.cache_dir.join(CHECKSUMS_FILE)),
        built: Default::default(),
        cluster,
        facts: Default::default(),
        said_adaptation: Default::default(),
    };
    // Every platform is pulled, planned and checked before any step runs (a platform that
    // cannot run here is refused first); then every platform builds at once, a platform's
    // stages in dependency waves. The first failure stops the other platforms.
    let prepared = futures_util::future::try_join_all(
        req.platforms
            .iter()
            .map(|p| PlatformBuild::new(&shared, p.clone()).prepare(df)),
    )
    .await?;
    let results = futures_util::future::try_join_all(
        prepared
            .into_iter()
            .map(|(platform, plan)| platform.build(plan)),
    )
    .await;
    // The hashes read are right whether or not the build succeeded.
    if let Err(e) = shared.checksums.save() {
        tracing::debug!("saving the checksum cache: {e}");
    }
    let images = results?;
    let manifests: Vec<Descriptor> = images.iter().map(|i| i.manifest.clone()).collect();
    // The image without attestations: what a docker archive and a local export hold.
    let (plain, config_digest) = match images.as_slice() {
        [one] => (one.manifest.clone(), Some(one.config)),
        _ => (write_index(&shared.store, &manifests, req)?, None),
    };
    let attestations = crate::attestations::attach(&shared, &images, started).await?;
    // Written where the image is exported (a cluster's task hands its SBOM and facts to the
    // coordinator, which writes them).
    let attested = match req.outputs.is_empty() {
        true => Vec::new(),
        false => {
            let pairs: Vec<_> = images
                .iter()
                .map(|i| &i.manifest)
                .zip(&attestations)
                .collect();
            crate::attestations::write_manifests(
                &shared.store,
                &crate::attestations::AttestInputs::of(req),
                &pairs,
            )?
        }
    };
    // As BuildKit: the attestation manifests follow the images in the index.
    let image = match attested.is_empty() {
        true => plain.clone(),
        false => write_index(&shared.store, &[manifests, attested].concat(), req)?,
    };
    let pushed = export(&shared, &images, &image, &plain, &attestations).await?;
    if let Some(
        to @ CacheExport {
            location: Some(location),
            ..
        },
    ) = &req.cache_to
    {
        let records = match to.mode {
            CacheMode::Max => std::mem::take(
                &mut *shared
                    .cache_exports
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
            CacheMode::Min => images
                .iter()
                .flat_map(|i| {
                    let platform = i.stage.config.platform();
                    i.chain
                        .iter()
                        .map(move |(k, r)| (*k, r.clone(), platform.clone()))
                })
                .collect(),
        };
        // As buildx's ignore-error: the image is built (and pushed); only the cache is not.
        let ignored = |e: &dyn std::fmt::Display| {
            shared.progress.event(crate::progress::Event::Info(format!(
                "warning: --cache-to {location}: {e} (ignore-error=true)"
            )))
        };
        match compressed_records(&shared, records).await {
            Ok(records) => {
                let (id, t) = shared.start(format!(
                    "exporting {} cached steps to {location}",
                    records.len()
                ));
                let result = shared
                    .with_transfer(id, remote_cache::export(&shared, to, &records))
                    .await;
                match shared.finish(id, t, result) {
                    Ok(()) => {}
                    Err(e) if to.ignore_error => ignored(&e),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) if to.ignore_error => ignored(&e),
            Err(e) => return Err(e),
        }
    }
    shared
        .durations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .save();
    let stats = *shared.stats.lock().unwrap_or_else(|e| e.into_inner());
    let _ = record_build(
        &req.cache_dir,
        BuildStats {
            time: now(),
            run: stats.run,
            cached: stats.cached,
        },
    );
    let size = images.iter().flat_map(|i| &i.blobs).map(|b| b.size).sum();
    let stage = match images.as_slice() {
        [one] => Some(one.stage.clone()),
        _ => None,
    };
    let sboms = attestations
        .iter()
        .filter_map(|a| Some((a.platform().clone(), a.sbom()?.to_vec())))
        .collect();
    let extra_sboms = attestations
        .iter()
        .flat_map(|a| {
            a.extra_sboms()
                .iter()
                .map(|(name, doc)| (a.platform().clone(), name.clone(), doc.clone()))
        })
        .collect();
    Ok(BuildResult {
        image,
        config_digest,
        pushed,
        stats,
        size,
        stage,
        facts: shared.facts.all(),
        sboms,
        extra_sboms,
    })
}

/// The index of several platforms' manifests, as `ossb build` and the cluster's coordinator
/// both write it: its descriptor and its bytes.
pub fn index_of(
    manifests: &[Descriptor],
    types: MediaTypes,
    index_annotations: &BTreeMap<String, String>,
) -> (Descriptor, Vec<u8>) {
    let mut index = Index::new(manifests, types);
    index.annotations = Annotations::some(index_annotations);
    let bytes = oci::to_canonical_json(&index);
    let descriptor = Descriptor {
        media_type: types.index().into(),
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
        platform: None,
        annotations: None,
    };
    (descriptor, bytes)
}

/// Stores the index of `manifests` (the platforms', then their attestations').
fn write_index(
    store: &BlobStore,
    manifests: &[Descriptor],
    req: &BuildRequest,
) -> Result<Descriptor, BuildError> {
    let (descriptor, bytes) = index_of(manifests, req.media_types, &req.annotations.index);
    store.put(&bytes).map_err(local("storing the index"))?;
    Ok(descriptor)
}

/// `records` with each layer as the build's exports write it: one an earlier build left
/// uncompressed is stored compressed, as in the image.
async fn compressed_records(
    shared: &Shared<'_>,
    mut records: Vec<(CacheKey, CacheRecord, Platform)>,
) -> Result<Vec<(CacheKey, CacheRecord, Platform)>, BuildError> {
    for (_, record, _) in &mut records {
        if let Some(layer) = &record.layer {
            let layer = shared.export_layer(layer, record.diff_id.as_ref()).await?;
            record.layer = Some(layer);
        }
    }
    Ok(records)
}

/// Sends the image to every requested output. Returns the references pushed. `image` holds
/// the attestations (a push and an OCI layout carry them); `plain` does not (a docker
/// archive cannot, and a local export writes them beside the files, as BuildKit does).
async fn export(
    shared: &Shared<'_>,
    images: &[PlatformImage],
    image: &Descriptor,
    plain: &Descriptor,
    attestations: &[crate::attestations::Attestation],
) -> Result<Vec<String>, BuildError> {
    let req = shared.req;
    let mut pushed = Vec::new();
    for output in &req.outputs {
        match output {
            Output::Registry => {
                if req.tags.is_empty() {
                    return Err(BuildError::Usage(
                        "--push / --output type=registry needs at least one --tag".into(),
                    ));
                }
                for tag in &req.tags {
                    for reference in push_references(tag, &image.digest, &req.export)? {
                        let (id, t) = shared.start(format!("pushing {}", reference.whole()));
                        let result = shared
                            .with_transfer(id, push(shared, &reference, image))
                            .await;
                        shared.finish(id, t, result)?;
                        pushed.push(pushed_name(&reference, &image.digest));
                    }
                }
            }
            Output::Oci { dest, tar } => {
                let (id, t) = shared.start(format!("exporting OCI layout to {}", dest.display()));
                let named = [NamedImage {
                    descriptor: image.clone(),
                    names: req.tags.clone(),
                }];
                let result = if *tar {
                    export::write_oci_tar(&shared.store, &named, dest)
                } else {
                    export::write_oci_dir(&shared.store, &named, dest)
                };
                shared
                    .finish(id, t, result)
                    .map_err(|e| BuildError::Export(e.to_string()))?;
            }
            Output::Docker { dest } => {
                let [one] = images else {
                    return Err(BuildError::Usage(
                        "--output type=docker holds one platform; build one --platform, or use type=oci or type=registry for several".into(),
                    ));
                };
                let (id, t) =
                    shared.start(format!("exporting docker archive to {}", dest.display()));
                let platform = one
                    .manifest
                    .platform
                    .as_ref()
                    .map(|p| p.platform())
                    .unwrap_or_else(|| req.platforms[0].clone());
                let named = [NamedImage {
                    descriptor: plain.clone(),
                    names: req.tags.clone(),
                }];
                let result = export::write_docker_archive(&shared.store, &named, dest, &platform);
                shared
                    .finish(id, t, result)
                    .map_err(|e| BuildError::Export(e.to_string()))?;
            }
            Output::Local { dest } => {
                let (id, t) =
                    shared.start(format!("exporting the filesystem to {}", dest.display()));
                let result =
                    export::write_local(&shared.store, plain, dest, &ApplyOptions::default());
                let warnings = shared
                    .finish(id, t, result)
                    .map_err(|e| BuildError::Export(e.to_string()))?;
                for attestation in attestations {
                    // One directory per platform for several, as the filesystems.
                    let dir = match images {
                        [_] => dest.clone(),
                        _ => dest.join(attestation.platform().to_string().replace('/', "_")),
                    };
                    crate::attestations::write_local_files(&dir, attestation)?;
                }
                for w in warnings {
                    shared
                        .progress
                        .event(crate::progress::Event::Info(format!("warning: {w}")));
                }
            }
            Output::Tar { dest } => {
                let (id, t) = shared.start(format!(
                    "exporting the filesystem as a tar archive to {}",
                    dest.display()
                ));
                let result =
                    export::write_tar(&shared.store, plain, dest, &ApplyOptions::default());
                let warnings = shared
                    .finish(id, t, result)
                    .map_err(|e| BuildError::Export(e.to_string()))?;
                for w in warnings {
                    shared
                        .progress
                        .event(crate::progress::Event::Info(format!("warning: {w}")));
                }
            }
            Output::CacheOnly => {}
        }
    }
    Ok(pushed)
}

/// Where a push of the image `digest` to the name `name` goes, in order: `name` (its tag), then
/// with `name-canonical=true` `REPOSITORY@DIGEST` too (its blobs are there by then: a few HEAD
/// requests); `REPOSITORY@DIGEST` alone with
/// `push-by-digest=true`. `ossb build` and the cluster's coordinator push through here.
pub fn push_references(
    name: &str,
    digest: &Digest,
    export: &ExportOptions,
) -> Result<Vec<ossb_image::Reference>, RegistryError> {
    let reference = parse_reference(name)?;
    let by_digest = || {
        parse_reference(&format!(
            "{}/{}@{digest}",
            reference.registry(),
            reference.repository()
        ))
    };
    Ok(match (export.push_by_digest, export.name_canonical) {
        (true, _) => vec![by_digest()?],
        (false, true) => {
            let canonical = by_digest()?;
            vec![reference, canonical]
        }
        (false, false) => vec![reference],
    })
}

/// How a push to `reference` of the image `digest` is reported: `NAME:TAG@DIGEST`, or
/// `NAME@DIGEST` for a push by digest.
pub fn pushed_name(reference: &ossb_image::Reference, digest: &Digest) -> String {
    match reference.digest() {
        Some(_) => reference.whole(),
        None => format!("{}@{digest}", reference.whole()),
    }
}

/// Pushes the image of this build under `reference`, the base images pulled as the sources of
/// layer mounts.
async fn push(
    shared: &Shared<'_>,
    reference: &ossb_image::Reference,
    image: &Descriptor,
) -> Result<(), RegistryError> {
    let bases: Vec<ossb_image::Reference> = shared
        .base_images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|b| parse_reference(b).ok())
        .collect();
    push_image(&shared.registry, &shared.store, reference, image, &bases).await
}

/// Pushes `image` (a manifest or an index, with every blob it names in `store`) under
/// `reference`: layers skipped when present, mounted from the repositories of `bases` on the
/// same registry, else streamed several at once; manifests by digest, and `reference` last.
/// `ossb build` and a cluster worker both push through here.
pub async fn push_image(
    registry: &Registry,
    store: &BlobStore,
    reference: &ossb_image::Reference,
    image: &Descriptor,
    bases: &[ossb_image::Reference],
) -> Result<(), RegistryError> {
    let mount_from = bases
        .iter()
        .filter(|b| b.resolve_registry() == reference.resolve_registry())
        .map(|b| b.repository().to_string())
        .collect();
    registry
        .push_image(reference, store, image, &PushOptions { mount_from })
        .await
        .map(|_| ())
}

/// The `.dockerignore` of the build: `<Dockerfile>.dockerignore` beside the Dockerfile, else
/// the context's `.dockerignore`.
fn load_dockerignore(req: &BuildRequest) -> Result<Option<Dockerignore>, BuildError> {
    let Some(path) = dockerignore::ignore_file(&req.context, Path::new(&req.dockerfile_name))
    else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BuildError::Usage(format!("cannot read {}: {e}", path.display())))?;
    Dockerignore::parse(&text)
        .map(Some)
        .map_err(|e| BuildError::Usage(format!("{}: {e}", path.display())))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
