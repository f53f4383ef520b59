//! Building one platform's image: pull the bases, plan, run the needed stages' steps with the
//! step cache, and assemble config and manifest.
//!
//! A stage's rootfs is made lazily: while every step hits the cache only layer descriptors are
//! chained; the first step that must run unpacks the layers so far, and later cache hits are
//! applied to it, so a fully cached build unpacks nothing.
//!
//! Here: the shared state of a build, the stage scheduling (from the plan's stage graph), pulls
//! and rootfs unpacking. One step's key and cache lookup are in `step`, running a step in
//! `execute`, COPY and ADD in `copy`, layer and image writing in `image`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ossb_dockerfile::dockerignore::Dockerignore;
use ossb_dockerfile::{
    self as dockerfile, Base, BaseImageInfo, BuildPlan, Instruction, Source, Step,
};
use ossb_image::layer::{self, ApplyOptions, Change, LayerOptions};
use ossb_image::oci::{
    self, media_type, Descriptor, DescriptorPlatform, History, ImageConfig, Manifest,
};
use ossb_image::registry::{parse_reference, PulledImage, Registry};
use ossb_image::store::BlobStore;
use ossb_protocol::{Digest, Platform};
use ossb_worker::base::{BaseTree, Skeleton, SkeletonError};
use ossb_worker::checksum::{sources_checksum_cached, ChecksumCache};
use ossb_worker::fs::{self as wfs, CopyFilter, CopyOptions, Mode};
use ossb_worker::sandbox;
use ossb_worker::snapshot::Snapshot;

use crate::add;
use crate::build::{local, Annotations, BuildError, BuildRequest, BuiltStage};
use crate::cache::{self, CacheKey, CacheRecord, LocalCache};
use crate::error::StepError;
use crate::progress::{Event, Progress};
use crate::run::{self, RunContext};
use crate::step_cache;

mod context;
mod copy;
mod execute;
mod image;
mod miss;
mod partial;
mod pull;
mod shared;
mod step;

use pull::pulled_key;
pub(crate) use shared::Shared;
pub use shared::Stats;

/// A built image for one platform.
pub(crate) struct PlatformImage {
    /// The manifest, with its platform.
    pub manifest: Descriptor,
    /// The config digest.
    pub config: Digest,
    /// Config and layers, for pushing.
    pub blobs: Vec<Descriptor>,
    /// The target stage, as the stages reading it start from it.
    pub stage: BuiltStage,
    /// The image's filesystem, when the build left it unpacked and in step with the layers
    /// (the SBOM scan reads it rather than unpack the image again).
    pub rootfs: Option<PathBuf>,
    /// The steps whose results the image holds, with their records (`--cache-to mode=min`).
    pub chain: Vec<(CacheKey, CacheRecord)>,
    /// What the SBOM scans besides the image, when an SBOM is asked for.
    pub sbom_extras: SbomExtras,
}

/// The filesystems `BUILDKIT_SBOM_SCAN_STAGE` and `BUILDKIT_SBOM_SCAN_CONTEXT` add to an
/// image's SBOM.
#[derive(Clone, Debug, Default)]
pub(crate) struct SbomExtras {
    /// Each stage to scan: its name, layers, and its filesystem when left unpacked and in
    /// step with them.
    pub stages: Vec<(String, Vec<Descriptor>, Option<PathBuf>)>,
    /// Whether the build context is scanned.
    pub context: bool,
}

/// The finished stages a stage may read, by plan position.
type Done = HashMap<usize, std::sync::Arc<StageState>>;

/// A step's line in the progress display, started when first needed.
struct Vertex {
    label: String,
    id: Option<usize>,
    started: Instant,
}

impl Vertex {
    /// The vertex's id, starting it (the `Started` event) on first use.
    fn start(&mut self, shared: &Shared<'_>) -> usize {
        if let Some(id) = self.id {
            return id;
        }
        let (id, started) = shared.start(self.label.clone());
        self.id = Some(id);
        self.started = started;
        id
    }
}

/// The state of a stage as its steps run.
struct StageState {
    config: ImageConfig,
    /// Layers of the image so far (base first).
    layers: Vec<Descriptor>,
    /// The cache key of the last step.
    key: CacheKey,
    /// Where the rootfs is (or will be) unpacked.
    rootfs: PathBuf,
    /// Whether `rootfs` holds `layers` now.
    materialized: bool,
    /// Set once the finished stage's rootfs is unpacked for a stage that reads it (COPY
    /// --from, RUN --mount from=); only a step that runs needs it, so a fully cached build
    /// unpacks nothing.
    unpacked_for_readers: tokio::sync::OnceCell<()>,
    /// Whether this stage set CMD (an ENTRYPOINT then keeps it).
    cmd_set: bool,
    /// Whether the current step may run on a skeleton instead of the unpacked rootfs.
    skeleton_ok: bool,
    /// The steps that changed files so far, with their records, from the first stage of the
    /// `FROM` chain (what `--cache-to mode=min` and an inline cache keep).
    chain: Vec<(CacheKey, CacheRecord)>,
    /// Why `key` differs from the last build's at this position (`None`: it does not), for
    /// the next step's cache-miss reason ([`crate::cache_miss`]).
    why: Option<crate::cache_miss::Why>,
    /// The stage's name (`stage-N` when unnamed), as a step reading it names it.
    name: String,
}

impl StageState {
    /// The directory relative paths of its steps start from: WORKDIR, `/` when unset.
    fn cwd(&self) -> String {
        self.config
            .config
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    }
}

/// One platform's build.
pub(crate) struct PlatformBuild<'a> {
    shared: &'a Shared<'a>,
    platform: Platform,
    pulled: HashMap<String, PulledImage>,
    /// Images that `COPY --from` names (not stages): their unpacked filesystem and manifest
    /// digest, by reference as written.
    copy_images: HashMap<String, (PathBuf, Digest)>,
    /// Named contexts resolved, by name and platform.
    contexts: HashMap<(String, Platform), std::sync::Arc<context::ResolvedContext>>,
}

/// The layer settings that change layer bytes, part of every cache key: the layer media type
/// (it names the compression), `compression-level=` when given, and the epoch that clamps
/// mtimes. (BuildKit reuses a cached layer of another level; here a request always gives the
/// same bytes, whatever the cache held.)
fn layer_settings(req: &BuildRequest) -> String {
    let epoch = req
        .source_date_epoch
        .map_or_else(|| "none".to_string(), |e| e.to_string());
    let level = req
        .export
        .compression_level
        .map_or_else(String::new, |l| format!(";level={l}"));
    format!("{}{level};epoch={epoch}", req.compression.media_type())
}

impl<'a> PlatformBuild<'a> {
    pub(crate) fn new(shared: &'a Shared<'a>, platform: Platform) -> Self {
        PlatformBuild {
            shared,
            platform,
            pulled: HashMap::new(),
            copy_images: HashMap::new(),
            contexts: HashMap::new(),
        }
    }

    fn req(&self) -> &BuildRequest {
        self.shared.req
    }

    /// Pulls the bases and plans this platform's build; refuses a platform whose RUN steps
    /// cannot run here. Nothing is built yet: every platform is checked before any builds.
    pub(crate) async fn prepare(
        mut self,
        df: &dockerfile::Dockerfile,
    ) -> Result<(Self, BuildPlan), BuildError> {
        let req = self.shared.req;
        let opts = req.plan_options(&self.platform);
        let mut bases = HashMap::new();
        for (reference, platform) in dockerfile::base_images_with_platforms(df, &opts)? {
            let pulled = self.pull(&reference, &platform).await?;
            bases.insert(reference.clone(), base_info(&pulled.config));
            self.pulled
                .insert(pulled_key(&reference, &platform), pulled);
        }
        for (name, platform) in dockerfile::base_contexts_with_platforms(df, &opts)? {
            self.resolve_context(&name, &platform).await?;
            let info = match self.context(&name, &platform) {
                Ok(context::ResolvedContext::Image { pulled, .. }) => base_info(&pulled.config),
                _ => BaseImageInfo::default(),
            };
            bases.insert(dockerfile::context_key(&name), info);
        }
        let plan = dockerfile::plan(df, &opts, &bases)?;
        self.pull_copy_images(&plan).await?;
        // RUN needs the platform's CPU: natively or through a registered emulator. Refused
        // before any step runs, with the fixes in the message.
        // A cluster's stage task builds one stage: the stages before it were built by other
        // tasks, possibly on other platforms, and come from the cluster's step cache.
        let checked = plan
            .stages
            .iter()
            .enumerate()
            .filter(|(i, _)| req.stage.is_none() || *i == plan.target)
            .map(|(_, s)| s);
        for stage in checked {
            if stage
                .steps
                .iter()
                .any(|s| matches!(s.instruction, Instruction::Run(_)))
            {
                let platform = stage.platform.as_ref().unwrap_or(&self.platform);
                ossb_worker::emulation::check(platform)
                    .map_err(|e| BuildError::Platform(e.to_string()))?;
            }
        }
        Ok((self, plan))
    }

    /// Builds the image of a prepared platform.
    pub(crate) async fn build(self, plan: BuildPlan) -> Result<PlatformImage, BuildError> {
        let req = self.shared.req;
        self.shared.plan_estimate(
            plan.stages
                .iter()
                .flat_map(|s| &s.steps)
                .filter(|s| changes_files(&s.instruction))
                .map(|s| s.created_by.as_str()),
        );
        // A stage starts as soon as the stages it needs are built; independent stages run
        // together. A stage that others read is unpacked only when a step reading it runs
        // (`source_rootfs`).
        let graph = plan.graph();
        // Stages an earlier task built are done already; only what the target still needs
        // through the others runs.
        let mut done: Done = HashMap::new();
        for node in graph.iter().filter(|n| !n.is_target) {
            if let Some(built) = req.built_stages.iter().find(|b| b.index == node.index) {
                done.insert(
                    node.position,
                    std::sync::Arc::new(self.built_state(built, node.position)),
                );
            }
        }
        let mut started = plan
            .stages_to_run(|position| done.contains_key(&position))
            .into_iter()
            .map(|needed| !needed)
            .collect::<Vec<bool>>();
        let mut running = futures_util::stream::FuturesUnordered::new();
        loop {
            for node in &graph {
                let index = node.position;
                if started[index] || !node.deps.iter().all(|d| done.contains_key(d)) {
                    continue;
                }
                started[index] = true;
                let view: Done = node.deps.iter().map(|d| (*d, done[d].clone())).collect();
                let (this, plan) = (&self, &plan);
                running.push(async move { (index, this.run_stage(plan, index, &view).await) });
            }
            match futures_util::StreamExt::next(&mut running).await {
                Some((index, state)) => {
                    done.insert(index, std::sync::Arc::new(state?));
                }
                None => break,
            }
        }
        let final_state = done
            .remove(&plan.target)
            .ok_or_else(|| BuildError::Local("the target stage did not run".into()))?;
        // The image's layers are pushed or exported, including those of a stage another task
        // built that no step here read.
        self.shared
            .bring(&final_state.layers)
            .await
            .map_err(|e| BuildError::Local(e.to_string()))?;
        let stage = BuiltStage {
            index: plan.stages[plan.target].index,
            key: final_state.key,
            config: final_state.config.clone(),
            layers: final_state.layers.clone(),
        };
        let mut config = final_state.config.clone();
        if !req.labels.is_empty() {
            let labels = config.config.labels.get_or_insert_with(BTreeMap::new);
            labels.extend(req.labels.clone());
        }
        let rootfs = final_state.materialized.then(|| final_state.rootfs.clone());
        let chain = final_state.chain.clone();
        let layers = self.export_layers(&final_state.layers, &config).await?;
        let renamed = final_state
            .layers
            .iter()
            .zip(&layers)
            .filter(|(built, exported)| built.digest != exported.digest)
            .map(|(built, exported)| (built.digest, exported.digest))
            .collect();
        self.shared.facts.rename_layers(&self.platform, &renamed);
        let mut image = self.write_image(config, &layers, stage, rootfs, chain)?;
        if req.attestations.sbom {
            image.sbom_extras = self.sbom_extras(&plan, &done)?;
        }
        Ok(image)
    }

    /// The stages and context the plan's `BUILDKIT_SBOM_SCAN_*` args add to the SBOM. Every
    /// stage to scan is one the target needs, so it is built (or was handed to this task).
    fn sbom_extras(&self, plan: &BuildPlan, done: &Done) -> Result<SbomExtras, BuildError> {
        let mut stages = Vec::new();
        for (position, name) in &plan.sbom_scan.stages {
            let state = done.get(position).ok_or_else(|| {
                BuildError::Local(format!(
                    "BUILDKIT_SBOM_SCAN_STAGE: stage {name} is not at hand to scan"
                ))
            })?;
            let rootfs = state.materialized.then(|| state.rootfs.clone());
            stages.push((name.clone(), state.layers.clone(), rootfs));
        }
        Ok(SbomExtras {
            stages,
            context: plan.sbom_scan.context,
        })
    }

    /// The state of a stage an earlier task built, as if it had just run here.
    fn built_state(&self, built: &BuiltStage, position: usize) -> StageState {
        StageState {
            config: built.config.clone(),
            layers: built.layers.clone(),
            key: built.key,
            rootfs: self.rootfs_of(position),
            materialized: false,
            unpacked_for_readers: tokio::sync::OnceCell::new(),
            cmd_set: false,
            skeleton_ok: false,
            chain: Vec::new(),
            why: None,
            name: format!("stage-{}", built.index),
        }
    }

    /// Where the stage at `position` of the plan is unpacked.
    fn rootfs_of(&self, position: usize) -> PathBuf {
        self.shared.work.join(format!(
            "{}-stage-{position}",
            self.platform.to_string().replace('/', "-")
        ))
    }

    async fn run_stage(
        &self,
        plan: &BuildPlan,
        index: usize,
        done: &Done,
    ) -> Result<StageState, BuildError> {
        let stage = &plan.stages[index];
        let rootfs = self.rootfs_of(index);
        let settings = layer_settings(self.req());
        let (config, layers, key, chain) = match &stage.base {
            Base::Scratch => {
                let platform = stage
                    .platform
                    .clone()
                    .unwrap_or_else(|| self.platform.clone());
                let mut config = ImageConfig {
                    architecture: platform.architecture.clone(),
                    os: platform.os.clone(),
                    variant: platform.variant.clone(),
                    ..Default::default()
                };
                // As BuildKit's empty image: scratch starts with the default PATH.
                config.config.set_env("PATH", ossb_dockerfile::DEFAULT_PATH);
                (
                    config,
                    Vec::new(),
                    CacheKey::root(None, &platform, &settings),
                    Vec::new(),
                )
            }
            Base::Image(reference) => {
                let platform = stage
                    .platform
                    .clone()
                    .unwrap_or_else(|| self.platform.clone());
                let pulled = self
                    .pulled
                    .get(&pulled_key(reference, &platform))
                    .ok_or_else(|| {
                        BuildError::Local(format!("base image {reference} was not pulled"))
                    })?;
                let key = CacheKey::root(
                    Some(&pulled.manifest_digest),
                    &pulled.config.platform(),
                    &settings,
                );
                (
                    pulled.config.clone(),
                    pulled.manifest.layers.clone(),
                    key,
                    Vec::new(),
                )
            }
            Base::Context(name) => {
                let platform = stage
                    .platform
                    .clone()
                    .unwrap_or_else(|| self.platform.clone());
                self.context_base(name, &platform, &settings).await?
            }
            Base::Stage(dep) => {
                let dep = done
                    .get(dep)
                    .ok_or_else(|| BuildError::Local(format!("stage {dep} has not run")))?;
                (
                    dep.config.clone(),
                    dep.layers.clone(),
                    dep.key,
                    dep.chain.clone(),
                )
            }
        };
        // Unnamed stages by their Dockerfile index, as BuildKit (plan positions differ
        // between a build and its cluster's stage tasks).
        let name = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", stage.index));
        let (mut position, why) = self.stage_position(stage, &name, &key, &settings, done);
        let mut state = StageState {
            config,
            layers,
            key,
            rootfs,
            materialized: false,
            unpacked_for_readers: tokio::sync::OnceCell::new(),
            cmd_set: false,
            skeleton_ok: false,
            chain,
            why,
            name: name.clone(),
        };
        // ONBUILD triggers of the base were consumed by the planner; they are not inherited.
        state.config.config.on_build = None;
        let prefix = if self.req().platforms.len() > 1 {
            format!("{} {name}", self.platform)
        } else {
            name
        };
        let total = stage.steps.len();
        // A COPY on a skeleton saves unpacking the base only if nothing needs the rootfs
        // afterwards: a later RUN, WORKDIR or archive ADD of the stage, or a stage reading this
        // one, would unpack the base and the COPY's layer again (after a COPY that ran, the
        // later steps' keys have changed, so they run too).
        let read_by_others = plan.stages.iter().any(|s| s.reads().contains(&index));
        let needs_rootfs: Vec<bool> = stage
            .steps
            .iter()
            .map(|s| match &s.instruction {
                Instruction::Run(_) | Instruction::Workdir(_) => true,
                Instruction::Add(c) => add_unpacks_archive(c, &self.req().context),
                _ => false,
            })
            .collect();
        // A cluster's stage task finds the stages before its own in the step cache: their
        // steps are shown only if one has to run.
        let quiet = self.req().stage.is_some() && index != plan.target;
        for (n, step) in stage.steps.iter().enumerate() {
            state.skeleton_ok = !read_by_others && !needs_rootfs[n + 1..].iter().any(|b| *b);
            let mut vertex = Vertex {
                label: format!("[{prefix} {}/{total}] {}", n + 1, step.title()),
                id: None,
                started: Instant::now(),
            };
            if !quiet {
                vertex.start(self.shared);
            }
            let layers_before = state.layers.len();
            let result = self
                .run_step((step, n), &mut state, done, &mut vertex, &mut position)
                .await
                .inspect(|_| {
                    let layer = state.layers.get(layers_before).map(|l| l.digest);
                    self.shared.facts.step(
                        &self.platform,
                        crate::attestations::StepFact {
                            stage: stage.index,
                            line: step.location.start_line,
                            instruction: step.created_by.clone(),
                            key: state.key.hex(),
                            layer,
                            worker: None,
                        },
                    );
                })
                .map_err(|source| BuildError::Step {
                    location: format!(
                        "{}:{}",
                        self.req().dockerfile_name,
                        step.location.start_line
                    ),
                    instruction: step.title(),
                    source: Box::new(source),
                });
            match (result, vertex.id) {
                (Ok(true), Some(id)) => self.shared.progress.event(Event::Cached { id }),
                (Ok(_), None) => {}
                (other, _) => {
                    let id = vertex.start(self.shared);
                    self.shared.finish(id, vertex.started, other)?;
                }
            }
        }
        if state.materialized {
            // What the steps left is what the layers hold: a later build may start from it.
            self.shared
                .rootfs_pool
                .keep_at_end(&state.rootfs, &digests(&state.layers));
        }
        Ok(state)
    }

    /// Unpacks the stage's layers into its rootfs, if not done yet.
    async fn materialize(&self, state: &mut StageState) -> Result<(), StepError> {
        if state.materialized {
            return Ok(());
        }
        self.unpack_rootfs(&state.layers, &state.rootfs).await?;
        state.materialized = true;
        Ok(())
    }

    /// The rootfs of a finished stage that a running step reads, unpacked on first use.
    async fn source_rootfs(&self, state: &StageState) -> Result<PathBuf, StepError> {
        if !state.materialized {
            state
                .unpacked_for_readers
                .get_or_try_init(|| async {
                    self.unpack_rootfs(&state.layers, &state.rootfs).await?;
                    self.shared
                        .rootfs_pool
                        .keep_at_end(&state.rootfs, &digests(&state.layers));
                    Ok::<_, StepError>(())
                })
                .await?;
        }
        Ok(state.rootfs.clone())
    }

    /// Makes `rootfs` hold exactly `layers`: from a tree an earlier build kept, when one holds
    /// the first of them, applying the rest.
    async fn unpack_rootfs(&self, layers: &[Descriptor], rootfs: &Path) -> Result<(), StepError> {
        let failed = |doing| move |source| StepError::Rootfs { doing, source };
        if rootfs.exists() {
            std::fs::remove_dir_all(rootfs).map_err(failed("clearing a rootfs"))?;
        }
        let kept = self.shared.rootfs_pool.take(&digests(layers), rootfs);
        let layers = &layers[kept..];
        if kept == 0 {
            std::fs::create_dir_all(rootfs).map_err(failed("creating the rootfs"))?;
        }
        if layers.is_empty() {
            return Ok(());
        }
        self.shared.bring(layers).await?;
        let (id, t) = self
            .shared
            .start(format!("unpacking {} layers", layers.len()));
        let result = unpack(&self.shared.store, layers, rootfs).await;
        let notes = self.shared.finish(id, t, result)?;
        for note in notes {
            self.shared
                .progress
                .event(Event::Info(format!("warning: {note}")));
        }
        Ok(())
    }
}

/// Where a COPY writes.
enum CopyTarget {
    /// The stage's unpacked rootfs.
    Rootfs(PathBuf),
    /// An empty directory made into a skeleton of the stage's layers (see
    /// [`ossb_worker::base`]).
    Skeleton(std::sync::Arc<BaseTree>, PathBuf),
}

/// Why a COPY did not complete.
enum CopyFailure {
    /// What failed, for the user.
    Failed(StepError),
    /// It cannot run on a skeleton (why, for the debug log): run it on the rootfs.
    NeedsRootfs(String),
}

impl<E: Into<StepError>> From<E> for CopyFailure {
    fn from(e: E) -> Self {
        CopyFailure::Failed(e.into())
    }
}

/// The `--exclude` patterns of a COPY/ADD, as ignore rules.
fn exclude_rules(copy: &ossb_dockerfile::Copy) -> Result<Option<Dockerignore>, StepError> {
    if copy.exclude.is_empty() {
        return Ok(None);
    }
    Dockerignore::parse(&copy.exclude.join("\n"))
        .map(Some)
        .map_err(StepError::Exclude)
}

/// Writes a heredoc's file for COPY/ADD.
fn write_inline_file(dir: &Path, name: &str, content: &str, mode: u32) -> Result<(), StepError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StepError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if name.contains('/') || name == ".." || name.is_empty() {
        return Err(StepError::HeredocName(name.to_string()));
    }
    let path = dir.join(name);
    std::fs::write(&path, content).map_err(io(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io(&path))
}

/// Whether a step changes files (and so makes a layer and takes time).
fn changes_files(instruction: &Instruction) -> bool {
    matches!(
        instruction,
        Instruction::Workdir(_) | Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_)
    )
}

/// Applies a step that only changes the config; returns whether the step changes files instead.
fn apply_metadata(
    instruction: &Instruction,
    cfg: &mut oci::RuntimeConfig,
    cmd_set: &mut bool,
) -> bool {
    match instruction {
        Instruction::Env(pairs) => {
            for (k, v) in pairs {
                cfg.set_env(k, v);
            }
        }
        Instruction::Label(pairs) => cfg
            .labels
            .get_or_insert_with(BTreeMap::new)
            .extend(pairs.iter().cloned()),
        Instruction::User(user) => cfg.user = Some(user.clone()),
        // The author is outside `config`: set by the caller from the step.
        Instruction::Maintainer(_) => {}
        Instruction::Expose(ports) => {
            let exposed = cfg.exposed_ports.get_or_insert_with(BTreeMap::new);
            for p in ports {
                let p = if p.contains('/') {
                    p.clone()
                } else {
                    format!("{p}/tcp")
                };
                exposed.insert(p, serde_json::json!({}));
            }
        }
        Instruction::Cmd(argv) => {
            cfg.cmd = Some(argv.clone());
            *cmd_set = true;
        }
        Instruction::Entrypoint(argv) => {
            cfg.entrypoint = (!argv.is_empty()).then(|| argv.clone());
            // As BuildKit: an ENTRYPOINT drops a CMD inherited from the base, not one this
            // stage set.
            if !*cmd_set {
                cfg.cmd = None;
            }
        }
        Instruction::Volume(vols) => {
            let v = cfg.volumes.get_or_insert_with(BTreeMap::new);
            for vol in vols {
                v.insert(vol.clone(), serde_json::json!({}));
            }
        }
        Instruction::StopSignal(sig) => cfg.stop_signal = Some(sig.clone()),
        Instruction::Shell(shell) => cfg.shell = Some(shell.clone()),
        Instruction::OnBuild(trigger) => cfg
            .on_build
            .get_or_insert_with(Vec::new)
            .push(trigger.clone()),
        Instruction::Healthcheck(h) => {
            let nanos = |d: Option<std::time::Duration>| d.map(|d| d.as_nanos() as i64);
            cfg.healthcheck = Some(oci::Healthcheck {
                test: Some(h.test.clone()),
                interval: nanos(h.interval),
                timeout: nanos(h.timeout),
                start_period: nanos(h.start_period),
                start_interval: nanos(h.start_interval),
                retries: h.retries.map(i64::from),
            });
        }
        // ARG only changes what later steps see, and the planner has already applied it.
        Instruction::Arg(_) => {}
        Instruction::Workdir(dir) => {
            // The planner made it absolute; the directory itself is made by the fs step.
            cfg.working_dir = Some(dir.clone());
            return true;
        }
        Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_) => return true,
    }
    false
}

fn base_info(config: &ImageConfig) -> BaseImageInfo {
    let rc = &config.config;
    BaseImageInfo {
        env: rc.env_pairs(),
        onbuild: rc.on_build.clone().unwrap_or_default(),
        working_dir: rc.working_dir.clone().unwrap_or_default(),
        user: rc.user.clone().unwrap_or_default(),
        shell: rc.shell.clone().unwrap_or_default(),
    }
}

/// The digests of `layers`, in order (what a kept rootfs is known by).
fn digests(layers: &[Descriptor]) -> Vec<Digest> {
    layers.iter().map(|l| l.digest).collect()
}

/// Applies `layers` onto `rootfs`; returns the warnings (entries skipped).
async fn unpack(
    store: &BlobStore,
    layers: &[Descriptor],
    rootfs: &Path,
) -> Result<Vec<String>, StepError> {
    let store = store.clone();
    let layers = layers.to_vec();
    let rootfs = rootfs.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut notes = Vec::new();
        for layer in &layers {
            let blob = store.open_blob(&layer.digest)?;
            let report = layer::apply_layer(
                std::io::BufReader::new(blob),
                &rootfs,
                &ApplyOptions::default(),
            )
            .map_err(|source| StepError::UnpackLayer {
                digest: layer.digest,
                source,
            })?;
            notes.extend(report.warnings());
        }
        Ok(notes)
    })
    .await?
}

/// Where the change list of a step comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeSource {
    /// RUN on overlayfs: the upper directory (`ossb_worker::overlay`).
    Overlay,
    /// COPY, ADD and WORKDIR: what the engine wrote (`ossb_worker::fs`).
    Recorded,
    /// Metadata snapshots of the whole rootfs before and after: RUN where overlayfs is not
    /// available, ADD of a local archive (what the archive holds is not listed in advance), and
    /// every step under `OSSB_SNAPSHOT=metadata`.
    Snapshots,
}

/// Whether an ADD may unpack a local archive (the test `copy_step` makes, without the
/// `.dockerignore`: an excluded archive only makes this answer yes too often).
fn add_unpacks_archive(copy: &ossb_dockerfile::Copy, context: &Path) -> bool {
    copy.from.is_none()
        && copy.unpack != Some(false)
        && copy.sources.iter().filter(|s| !add::is_url(s)).any(|s| {
            wfs::expand_source(context, s, CopyFilter::none())
                .unwrap_or_default()
                .iter()
                .any(|(_, p)| p.is_file() && add::archive_kind(p).is_some())
        })
}

/// The sandbox's mount points, relative to the rootfs: left out of RUN steps' changes.
fn mount_point_paths() -> Vec<PathBuf> {
    sandbox::MOUNT_POINTS
        .iter()
        .map(|(p, _)| PathBuf::from(p))
        .collect()
}

/// A metadata snapshot of the rootfs; for a RUN step without the sandbox's mount points (COPY
/// and WORKDIR write real files there).
async fn snapshot(rootfs: &Path, is_run: bool) -> Result<Snapshot, StepError> {
    let rootfs = rootfs.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let exclude = if is_run {
            mount_point_paths()
        } else {
            Vec::new()
        };
        Snapshot::take(&rootfs, &exclude)
    })
    .await?
    .map_err(StepError::Snapshot)
}

/// The OCI media type for a layer that may carry a Docker media type (same bytes).
fn oci_layer_type(mt: &str) -> &str {
    match mt {
        media_type::DOCKER_LAYER_GZIP => media_type::OCI_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar" => media_type::OCI_LAYER_TAR,
        other => other,
    }
}

/// `path` made absolute against the working directory `cwd`, normalized.
fn absolute_in(cwd: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the stage DAG of `build` waits for: each stage its base and what it copies from.
    #[test]
    fn stages_wait_only_for_what_they_need() {
        let text = "FROM scratch AS a\nFROM scratch AS b\nFROM a AS c\nCOPY --from=b /x /x\nFROM scratch\nCOPY --from=c /x /x\nCOPY --from=a /y /y\n";
        let df = ossb_dockerfile::parse(text, "Dockerfile").unwrap();
        let plan = ossb_dockerfile::plan(
            &df,
            &ossb_dockerfile::PlanOptions::default(),
            &HashMap::new(),
        )
        .unwrap();
        let deps: Vec<Vec<usize>> = plan.stages.iter().map(|s| s.deps()).collect();
        assert_eq!(deps, vec![vec![], vec![], vec![0, 1], vec![0, 2]]);
    }

    /// A stage built elsewhere cuts the walk: what only it needs is not built again.
    #[test]
    fn resolves_paths_against_the_workdir() {
        assert_eq!(absolute_in("/app", "src"), "/app/src");
        assert_eq!(absolute_in("/app", "/etc"), "/etc");
        assert_eq!(absolute_in("/app/", "../x/./y"), "/x/y");
        assert_eq!(absolute_in("/", "."), "/");
    }
}
