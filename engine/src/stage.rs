//! Building one platform's image: pull the bases, plan, run the needed stages' steps with the
//! step cache, and assemble config and manifest.
//!
//! A stage's rootfs is made lazily: while every step hits the cache only layer descriptors are
//! chained; the first step that must run unpacks the layers so far, and later cache hits are
//! applied to it, so a fully cached build unpacks nothing.

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
use crate::build::{local, Annotations, BuildError, BuildRequest};
use crate::cache::{self, CacheKey, CacheRecord, LocalCache};
use crate::progress::{Event, Progress};
use crate::run::{self, RunContext};
use crate::step_cache;

/// What every platform's build shares.
pub(crate) struct Shared<'a> {
    pub req: &'a BuildRequest,
    pub progress: &'a dyn Progress,
    pub store: BlobStore,
    pub cache: LocalCache,
    pub registry: Registry,
    pub work: PathBuf,
    pub created: String,
    pub ignore: Option<Dockerignore>,
    pub next_id: std::sync::atomic::AtomicUsize,
    pub stats: std::sync::Mutex<Stats>,
    /// The base images pulled (full references), as sources of cross-repository mounts.
    pub base_images: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Durations of steps in earlier builds, updated by this one.
    pub durations: std::sync::Mutex<cache::Durations>,
    /// Progress toward the estimate: (fs steps planned, finished, ms remaining, steps without
    /// a recorded duration still to run).
    pub eta: std::sync::Mutex<Eta>,
    /// Steps to store in the `--cache-to` repository at the end of the build.
    pub cache_exports: std::sync::Mutex<Vec<(CacheKey, CacheRecord, Platform)>>,
    /// Content hashes of context files from earlier builds (COPY sources, bind mounts).
    pub checksums: ChecksumCache,
    /// One lock per step key being run, so that platforms sharing a step run it once.
    pub claims: std::sync::Mutex<HashMap<CacheKey, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// Step keys this build ran (their records are fresh even under `--no-cache`).
    pub built: std::sync::Mutex<std::collections::HashSet<CacheKey>>,
    /// The cluster's step cache, for a worker's task.
    pub steps: Option<&'a dyn cache::SharedSteps>,
}

/// The running estimate of a build's remaining time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Eta {
    steps: usize,
    finished: usize,
    remaining_ms: u64,
    unknown: usize,
}

/// Steps run and cached in a build.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Steps that changed files and were executed.
    pub run: usize,
    /// Steps that changed files and came from the cache.
    pub cached: usize,
}

impl Shared<'_> {
    /// Adds planned steps (their history texts) to the estimate.
    fn plan_estimate<'s>(&self, steps: impl Iterator<Item = &'s str>) {
        let durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        let mut eta = self.eta.lock().unwrap_or_else(|e| e.into_inner());
        for step in steps {
            eta.steps += 1;
            match durations.get(step) {
                Some(ms) => eta.remaining_ms += ms,
                None => eta.unknown += 1,
            }
        }
        drop(durations);
        self.send_estimate(&eta);
    }

    /// Marks a planned step finished: `ran` is how long it took, `None` when cached.
    fn step_finished(&self, step: &str, ran: Option<u64>) {
        let expected = {
            let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
            let expected = durations.get(step);
            if let Some(ms) = ran {
                durations.set(step, ms);
            }
            expected
        };
        let mut eta = self.eta.lock().unwrap_or_else(|e| e.into_inner());
        eta.finished += 1;
        match expected {
            Some(ms) => eta.remaining_ms = eta.remaining_ms.saturating_sub(ms),
            None => eta.unknown = eta.unknown.saturating_sub(1),
        }
        self.send_estimate(&eta);
    }

    fn send_estimate(&self, eta: &Eta) {
        self.progress.event(Event::Estimate {
            steps: eta.steps,
            finished: eta.finished,
            remaining: (eta.unknown == 0)
                .then(|| std::time::Duration::from_millis(eta.remaining_ms)),
        });
    }

    /// Runs `work` (a pull or push of vertex `id`), reporting the blob bytes it moves every
    /// half second and when it ends.
    pub(crate) async fn with_transfer<T>(
        &self,
        id: usize,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let transfer = std::sync::Arc::new(ossb_image::registry::Transfer::default());
        let work = ossb_image::registry::counting(transfer.clone(), work);
        tokio::pin!(work);
        let report = || {
            if transfer.received() + transfer.sent() > 0 {
                self.progress.event(Event::Transfer {
                    id,
                    received: transfer.received(),
                    sent: transfer.sent(),
                });
            }
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        tick.tick().await; // the first tick is at once
        loop {
            tokio::select! {
                out = &mut work => {
                    report();
                    return out;
                }
                _ = tick.tick() => report(),
            }
        }
    }

    pub(crate) fn start(&self, name: String) -> (usize, Instant) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.progress.event(Event::Started { id, name });
        (id, Instant::now())
    }

    pub(crate) fn finish<T, E: std::fmt::Display>(
        &self,
        id: usize,
        started: Instant,
        result: Result<T, E>,
    ) -> Result<T, E> {
        let elapsed = started.elapsed();
        match &result {
            Ok(_) => self.progress.event(Event::Done { id, elapsed }),
            Err(e) => self.progress.event(Event::Failed {
                id,
                elapsed,
                message: e.to_string(),
            }),
        }
        result
    }
}

/// A built image for one platform.
pub(crate) struct PlatformImage {
    /// The manifest, with its platform.
    pub manifest: Descriptor,
    /// The config digest.
    pub config: Digest,
    /// Config and layers, for pushing.
    pub blobs: Vec<Descriptor>,
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
}

/// One platform's build.
pub(crate) struct PlatformBuild<'a> {
    shared: &'a Shared<'a>,
    platform: Platform,
    pulled: HashMap<String, PulledImage>,
    /// Images that `COPY --from` names (not stages): their unpacked filesystem and manifest
    /// digest, by reference as written.
    copy_images: HashMap<String, (PathBuf, Digest)>,
}

fn pulled_key(reference: &str, platform: &Platform) -> String {
    format!("{reference}@{platform}")
}

/// The layer settings that change layer bytes, part of every cache key: the layer media type
/// (it names the compression) and the epoch that clamps mtimes.
fn layer_settings(req: &BuildRequest) -> String {
    let epoch = req
        .source_date_epoch
        .map_or_else(|| "none".to_string(), |e| e.to_string());
    format!("{};epoch={epoch}", req.compression.media_type())
}

impl<'a> PlatformBuild<'a> {
    pub(crate) fn new(shared: &'a Shared<'a>, platform: Platform) -> Self {
        PlatformBuild {
            shared,
            platform,
            pulled: HashMap::new(),
            copy_images: HashMap::new(),
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
        let mut done: Done = HashMap::new();
        let mut started = vec![false; graph.len()];
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
        let mut config = final_state.config.clone();
        if !req.labels.is_empty() {
            let labels = config.config.labels.get_or_insert_with(BTreeMap::new);
            labels.extend(req.labels.clone());
        }
        self.write_image(config, &final_state.layers)
    }

    /// Pulls and unpacks the images `COPY --from` and `RUN --mount from=` name, for this
    /// platform.
    async fn pull_copy_images(&mut self, plan: &BuildPlan) -> Result<(), BuildError> {
        let mut refs: Vec<String> = Vec::new();
        for step in plan.stages.iter().flat_map(|s| &s.steps) {
            let named: Vec<&Source> = match &step.instruction {
                Instruction::Copy(c) | Instruction::Add(c) => c.from.iter().collect(),
                Instruction::Run(r) => r.mounts.iter().filter_map(|m| m.from.as_ref()).collect(),
                _ => Vec::new(),
            };
            for source in named {
                if let Source::Image(r) = source {
                    if !refs.contains(r) && !self.shared.req.build_contexts.contains_key(r) {
                        refs.push(r.clone());
                    }
                }
            }
        }
        for reference in refs {
            let pulled = self.pull(&reference, &self.platform.clone()).await?;
            let root = self
                .shared
                .work
                .join(format!("image-{}", pulled.manifest_digest.hex()));
            if !root.exists() {
                std::fs::create_dir_all(&root).map_err(local("creating an image's filesystem"))?;
                let (id, t) = self
                    .shared
                    .start(format!("unpacking {reference} to read from"));
                let result = unpack(&self.shared.store, &pulled.manifest.layers, &root).await;
                self.shared
                    .finish(id, t, result)
                    .map_err(BuildError::Local)?;
            }
            self.copy_images
                .insert(reference, (root, pulled.manifest_digest));
        }
        Ok(())
    }

    async fn pull(&self, reference: &str, platform: &Platform) -> Result<PulledImage, BuildError> {
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

    async fn run_stage(
        &self,
        plan: &BuildPlan,
        index: usize,
        done: &Done,
    ) -> Result<StageState, BuildError> {
        let stage = &plan.stages[index];
        let rootfs = self.shared.work.join(format!(
            "{}-stage-{index}",
            self.platform.to_string().replace('/', "-")
        ));
        let settings = layer_settings(self.req());
        let (config, layers, key) = match &stage.base {
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
                (pulled.config.clone(), pulled.manifest.layers.clone(), key)
            }
            Base::Stage(dep) => {
                let dep = done
                    .get(dep)
                    .ok_or_else(|| BuildError::Local(format!("stage {dep} has not run")))?;
                (dep.config.clone(), dep.layers.clone(), dep.key)
            }
        };
        let mut state = StageState {
            config,
            layers,
            key,
            rootfs,
            materialized: false,
            unpacked_for_readers: tokio::sync::OnceCell::new(),
            cmd_set: false,
            skeleton_ok: false,
        };
        // ONBUILD triggers of the base were consumed by the planner; they are not inherited.
        state.config.config.on_build = None;
        // Unnamed stages by their Dockerfile index, as BuildKit (plan positions differ
        // between a build and its cluster's stage tasks).
        let name = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", stage.index));
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
            let result = self
                .run_step(step, &mut state, done, &mut vertex)
                .await
                .map_err(|message| BuildError::Step {
                    location: format!(
                        "{}:{}",
                        self.req().dockerfile_name,
                        step.location.start_line
                    ),
                    instruction: step.title(),
                    message,
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
        Ok(state)
    }

    /// Unpacks the stage's layers into its rootfs, if not done yet.
    async fn materialize(&self, state: &mut StageState) -> Result<(), BuildError> {
        if state.materialized {
            return Ok(());
        }
        self.unpack_rootfs(&state.layers, &state.rootfs).await?;
        state.materialized = true;
        Ok(())
    }

    /// The rootfs of a finished stage that a running step reads, unpacked on first use.
    async fn source_rootfs(&self, state: &StageState) -> Result<PathBuf, String> {
        if !state.materialized {
            state
                .unpacked_for_readers
                .get_or_try_init(|| self.unpack_rootfs(&state.layers, &state.rootfs))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(state.rootfs.clone())
    }

    /// Makes `rootfs` hold exactly `layers`.
    async fn unpack_rootfs(&self, layers: &[Descriptor], rootfs: &Path) -> Result<(), BuildError> {
        if rootfs.exists() {
            std::fs::remove_dir_all(rootfs).map_err(local("clearing a rootfs"))?;
        }
        std::fs::create_dir_all(rootfs).map_err(local("creating the rootfs"))?;
        let (id, t) = self
            .shared
            .start(format!("unpacking {} layers", layers.len()));
        let result = unpack(&self.shared.store, layers, rootfs).await;
        let notes = self
            .shared
            .finish(id, t, result)
            .map_err(BuildError::Local)?;
        for note in notes {
            self.shared
                .progress
                .event(Event::Info(format!("warning: {note}")));
        }
        Ok(())
    }

    /// Runs one step. Returns whether it came from the cache; the error is the user's message.
    async fn run_step(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &Done,
        vertex: &mut Vertex,
    ) -> Result<bool, String> {
        let changes_fs = apply_metadata(
            &step.instruction,
            &mut state.config.config,
            &mut state.cmd_set,
        );
        if let Instruction::Maintainer(author) = &step.instruction {
            state.config.author = Some(author.clone());
        }
        let inputs = self.step_inputs(step, done).await?;
        let input_refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let key = state.key.child(
            &ossb_dockerfile::instruction_key_bytes(&step.instruction),
            &input_refs,
        );
        state.key = key;
        let mut cached = false;
        let mut empty_layer = true;
        if changes_fs {
            let record = match step_cache::get_or_claim(self.shared, &self.platform, &key).await {
                step_cache::Lookup::Hit(record) => {
                    let record = *record;
                    cached = true;
                    if let (true, Some(layer)) = (state.materialized, &record.layer) {
                        // Keep an unpacked rootfs in step with the layers.
                        unpack(
                            &self.shared.store,
                            std::slice::from_ref(layer),
                            &state.rootfs,
                        )
                        .await?;
                    }
                    record
                }
                step_cache::Lookup::Miss(claim) => {
                    let id = vertex.start(self.shared);
                    let started = vertex.started;
                    let record = match self
                        .execute_on_skeleton(step, state, done, id, started)
                        .await?
                    {
                        Some(record) => record,
                        None => {
                            self.materialize(state).await.map_err(|e| e.to_string())?;
                            self.execute(step, state, done, id, started).await?
                        }
                    };
                    step_cache::put(self.shared, &key, &record, claim).await;
                    record
                }
            };
            step_cache::export(self.shared, &self.platform, &key, &record);
            if let (Some(layer), Some(diff_id)) = (record.layer, record.diff_id) {
                state.config.rootfs.diff_ids.push(diff_id);
                state.layers.push(layer);
                empty_layer = false;
            }
            {
                let mut stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
                if cached {
                    stats.cached += 1;
                } else {
                    stats.run += 1;
                }
            }
            let ran = (!cached).then(|| vertex.started.elapsed().as_millis() as u64);
            self.shared.step_finished(&step.created_by, ran);
        }
        if !step.created_by.is_empty() {
            state.config.history.push(History {
                created: Some(self.shared.created.clone()),
                created_by: Some(step.created_by.clone()),
                comment: Some("buildkit.dockerfile.v0".into()),
                empty_layer: empty_layer.then_some(true),
                ..Default::default()
            });
        }
        Ok(cached)
    }

    /// What a step reads besides its instruction, for its cache key: the checksums of COPY's
    /// context files, the key of a stage it copies from.
    async fn step_inputs(&self, step: &Step, done: &Done) -> Result<Vec<Vec<u8>>, String> {
        if let Instruction::Run(run) = &step.instruction {
            return self.bind_mount_inputs(run, done);
        }
        let (Instruction::Copy(copy) | Instruction::Add(copy)) = &step.instruction else {
            return Ok(Vec::new());
        };
        let is_add = matches!(step.instruction, Instruction::Add(_));
        let mut inputs = Vec::new();
        let (remote, local): (Vec<&String>, Vec<&String>) = copy
            .sources
            .iter()
            .partition(|s| is_add && add::is_remote(s));
        for source in remote {
            // Fetched now (once per build) and keyed by content or commit; the step reuses it.
            let fetched = add::fetch(
                source,
                copy.checksum.as_deref(),
                copy.keep_git_dir.unwrap_or(false),
                &self.shared.work,
            )
            .await?;
            inputs.push(fetched.key);
        }
        let local: Vec<String> = local.into_iter().cloned().collect();
        if copy.from.is_some() || !local.is_empty() {
            let mut filter = match &self.shared.ignore {
                Some(rules) => CopyFilter::dockerignore(rules),
                None => CopyFilter::none(),
            };
            let exclude = exclude_rules(copy)?;
            if let Some(ex) = &exclude {
                filter = filter.with_exclude(ex);
            }
            inputs.push(self.source_input(
                copy.from.as_ref(),
                &local,
                filter,
                done,
                "COPY --from",
            )?);
        }
        Ok(inputs)
    }

    /// What a step reads from `from` (the paths `sources` in it), for its cache key: the
    /// checksum of those files in the build context (through `context_filter`) or a named
    /// context, the key of a stage, the manifest digest of an image.
    fn source_input(
        &self,
        from: Option<&Source>,
        sources: &[String],
        context_filter: CopyFilter<'_>,
        done: &Done,
        what: &str,
    ) -> Result<Vec<u8>, String> {
        let checksum = |dir: &Path, filter| {
            sources_checksum_cached(dir, sources, filter, &self.shared.checksums)
                .map(|sum| sum.to_vec())
                .map_err(|e| e.to_string())
        };
        match from {
            None => checksum(&self.req().context, context_filter),
            Some(Source::Stage(i)) => match done.get(i) {
                Some(s) => Ok(s.key.as_bytes().to_vec()),
                None => Err(format!("{what}: stage {i} has not been built")),
            },
            Some(Source::Image(name)) if self.req().build_contexts.contains_key(name) => {
                checksum(&self.req().build_contexts[name], CopyFilter::none())
            }
            Some(Source::Image(image)) => match self.copy_images.get(image) {
                Some((_, digest)) => Ok(digest.as_bytes().to_vec()),
                None => Err(format!("{what}={image}: the image was not pulled")),
            },
        }
    }

    /// What a RUN's bind mounts read, for its cache key: the checksum of a context source,
    /// the key of a stage. Secrets and cache mounts stay out of the key, as in BuildKit.
    fn bind_mount_inputs(
        &self,
        run: &ossb_dockerfile::Run,
        done: &Done,
    ) -> Result<Vec<Vec<u8>>, String> {
        let mut inputs = Vec::new();
        for mount in run
            .mounts
            .iter()
            .filter(|m| m.kind == ossb_dockerfile::MountType::Bind)
        {
            let source = mount.source.clone().unwrap_or_else(|| ".".into());
            inputs.push(self.source_input(
                mount.from.as_ref(),
                &[source],
                CopyFilter::none(),
                done,
                "RUN --mount from",
            )?);
        }
        Ok(inputs)
    }

    /// Executes a step that changes files and records its layer. The change list comes from
    /// what the step touched, never from a walk of the whole rootfs, except where that cannot
    /// be known (see [`ChangeSource`]); every source gives the same layer bytes for the same
    /// change.
    async fn execute(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &Done,
        id: usize,
        started: Instant,
    ) -> Result<CacheRecord, String> {
        let is_run = matches!(step.instruction, Instruction::Run(_));
        let source = self.change_source(step, &state.rootfs).await;
        let upper = match source {
            ChangeSource::Overlay => ossb_worker::overlay::Upper::create(&state.rootfs)
                .map_err(|e| tracing::debug!("no overlay for this step: {e}"))
                .ok(),
            _ => None,
        };
        tracing::debug!(
            step = %step.title(),
            source = ?source,
            overlay = upper.is_some(),
            "finding the step's changes"
        );
        let before = match (source, &upper) {
            (ChangeSource::Recorded, _) | (_, Some(_)) => None,
            _ => Some(snapshot(&state.rootfs, is_run).await?),
        };
        let mount_points = match &step.instruction {
            Instruction::Run(_) => sandbox::prepare_mount_points(&state.rootfs)
                .map_err(|e| format!("preparing the sandbox: {e}"))?,
            _ => Vec::new(),
        };
        let overlay = upper.as_ref().map(|u| u.dirs());
        let result = self
            .apply_fs_step(step, state, done, id, started, overlay)
            .await;
        sandbox::remove_mount_points(&mount_points);
        let written = result?;
        let changes = match (before, upper) {
            (Some(before), _) => before.diff(&snapshot(&state.rootfs, is_run).await?),
            (None, Some(upper)) => {
                let rootfs = state.rootfs.clone();
                tokio::task::spawn_blocking(move || {
                    let created: Vec<PathBuf> = written.into_iter().map(|c| c.path).collect();
                    upper.merge(&rootfs, &mount_point_paths(), &created)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("merging the step's overlay into the rootfs: {e}"))?
            }
            (None, None) => written,
        };
        let (layer, diff_id) = if changes.is_empty() {
            (None, None)
        } else {
            let (layer, diff_id) = self.write_layer(&state.rootfs, changes).await?;
            (Some(layer), Some(diff_id))
        };
        Ok(CacheRecord {
            layer,
            diff_id,
            duration_ms: started.elapsed().as_millis() as u64,
            created: crate::build::now(),
        })
    }

    /// Runs a COPY or ADD of a stage that is not unpacked (every earlier step came from the
    /// cache) on a skeleton of its layers instead of unpacking them, so that it costs what it
    /// copies. `None` when the step needs the real rootfs (see [`ossb_worker::base`]).
    async fn execute_on_skeleton(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &Done,
        id: usize,
        started: Instant,
    ) -> Result<Option<CacheRecord>, String> {
        let (Instruction::Copy(copy) | Instruction::Add(copy)) = &step.instruction else {
            return Ok(None);
        };
        if state.materialized
            || !state.skeleton_ok
            || std::env::var_os("OSSB_COPY_ON_ROOTFS").is_some()
            || self.change_source(step, &state.rootfs).await != ChangeSource::Recorded
        {
            return Ok(None);
        }
        let store = self.shared.store.clone();
        let layers = state.layers.clone();
        let tree = tokio::task::spawn_blocking(move || -> Result<BaseTree, String> {
            let mut listings = Vec::with_capacity(layers.len());
            for layer in &layers {
                listings.push(
                    store
                        .layer_listing(&layer.digest)
                        .map_err(|e| e.to_string())?,
                );
            }
            BaseTree::from_layers(&listings).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?;
        let tree = match tree {
            Ok(tree) => std::sync::Arc::new(tree),
            Err(e) => {
                tracing::debug!(step = %step.title(), "no skeleton: {e}");
                return Ok(None);
            }
        };
        let dir = self.shared.work.join(format!("skeleton-{id}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cwd = state
            .config
            .config
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        let is_add = matches!(step.instruction, Instruction::Add(_));
        let target = CopyTarget::Skeleton(tree.clone(), dir.clone());
        let result = self.copy_step(copy, is_add, &cwd, done, id, target).await;
        let outcome = match result {
            Ok(changes) if changes.is_empty() => Ok(Some((None, None))),
            Ok(changes) => self
                .write_layer(&dir, changes)
                .await
                .map(|(layer, diff_id)| Some((Some(layer), Some(diff_id)))),
            Err(CopyFailure::Failed(m)) => Err(m),
            Err(CopyFailure::NeedsRootfs(why)) => {
                tracing::debug!(step = %step.title(), "no skeleton: {why}");
                Ok(None)
            }
        };
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        tracing::debug!(
            step = %step.title(),
            paths = tree.len(),
            skeleton = matches!(outcome, Ok(Some(_))),
            "copy on a skeleton of the layers"
        );
        Ok(outcome?.map(|(layer, diff_id)| CacheRecord {
            layer,
            diff_id,
            duration_ms: started.elapsed().as_millis() as u64,
            created: crate::build::now(),
        }))
    }

    /// Where a step's change list comes from (see [`ChangeSource`]).
    async fn change_source(&self, step: &Step, rootfs: &Path) -> ChangeSource {
        if ossb_worker::overlay::fallback_forced() {
            return ChangeSource::Snapshots;
        }
        match &step.instruction {
            Instruction::Run(_) => {
                let exe = self.req().sandbox_exe.clone();
                let dir = rootfs.parent().unwrap_or(Path::new("/")).to_path_buf();
                let usable = tokio::task::spawn_blocking(move || {
                    ossb_worker::overlay::supported(&exe, &dir)
                })
                .await
                .unwrap_or(false);
                if usable {
                    ChangeSource::Overlay
                } else {
                    ChangeSource::Snapshots
                }
            }
            Instruction::Add(copy) if add_unpacks_archive(copy, &self.req().context) => {
                ChangeSource::Snapshots
            }
            _ => ChangeSource::Recorded,
        }
    }

    /// Applies a file-changing step; returns the changes the engine made itself (COPY, ADD,
    /// WORKDIR, and RUN's working directory), which are complete for all but RUN and archive
    /// ADD. A RUN runs on `overlay` when given.
    async fn apply_fs_step(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &Done,
        id: usize,
        started: Instant,
        overlay: Option<&ossb_worker::overlay::OverlayDirs>,
    ) -> Result<Vec<Change>, String> {
        let req = self.req();
        let cfg = &mut state.config.config;
        let cwd = cfg
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        let user = cfg
            .user
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "0".into());
        match &step.instruction {
            Instruction::Workdir(dir) => {
                let owner = wfs::lookup_owner(&state.rootfs, &user).map_err(|e| e.to_string())?;
                wfs::make_workdir(&state.rootfs, dir, owner).map_err(|e| e.to_string())
            }
            Instruction::Run(run) => {
                // The stages this RUN mounts, unpacked now that it runs.
                let mut stages: HashMap<usize, PathBuf> = HashMap::new();
                for m in &run.mounts {
                    if let Some(Source::Stage(i)) = m.from {
                        if let (Some(s), false) = (done.get(&i), stages.contains_key(&i)) {
                            stages.insert(i, self.source_rootfs(s).await?);
                        }
                    }
                }
                let mut images: HashMap<String, PathBuf> = self
                    .copy_images
                    .iter()
                    .map(|(name, (root, _))| (name.clone(), root.clone()))
                    .collect();
                images.extend(req.build_contexts.clone());
                let ctx = RunContext {
                    images: &images,
                    rootfs: &state.rootfs,
                    config: cfg,
                    default_user: &user,
                    default_cwd: &cwd,
                    sandbox_exe: &req.sandbox_exe,
                    context: &req.context,
                    stages: &stages,
                    cache_dir: &req.cache_dir,
                    isolation: req.isolation,
                    secrets: &req.secrets,
                    ssh: &req.ssh,
                    overlay,
                };
                run::execute(&ctx, run, |line| {
                    self.shared.progress.event(Event::Output {
                        id,
                        elapsed: started.elapsed(),
                        line: line.to_string(),
                    })
                })
                .await
            }
            Instruction::Copy(copy) | Instruction::Add(copy) => {
                let is_add = matches!(step.instruction, Instruction::Add(_));
                let target = CopyTarget::Rootfs(state.rootfs.clone());
                self.copy_step(copy, is_add, &cwd, done, id, target)
                    .await
                    .map_err(|e| match e {
                        CopyFailure::Failed(m) | CopyFailure::NeedsRootfs(m) => m,
                    })
            }
            _ => Ok(Vec::new()),
        }
    }

    /// COPY or ADD onto `target`. On a skeleton the files the copy looks at are made from the
    /// base's listings first (see [`ossb_worker::base`]); `NeedsRootfs` says the step must run
    /// on the unpacked rootfs instead.
    async fn copy_step(
        &self,
        copy: &ossb_dockerfile::Copy,
        is_add: bool,
        cwd: &str,
        done: &Done,
        id: usize,
        target: CopyTarget,
    ) -> Result<Vec<Change>, CopyFailure> {
        let req = self.req();
        let failed = CopyFailure::Failed;
        let from_context = copy.from.is_none();
        let source_root = match &copy.from {
            None => req.context.clone(),
            Some(Source::Stage(i)) => match done.get(i) {
                Some(s) => self.source_rootfs(s).await.map_err(failed)?,
                None => return Err(failed(format!("COPY --from: stage {i} has not been built"))),
            },
            Some(Source::Image(name)) if req.build_contexts.contains_key(name) => {
                req.build_contexts[name].clone()
            }
            Some(Source::Image(image)) => match self.copy_images.get(image) {
                Some((root, _)) => root.clone(),
                None => {
                    return Err(failed(format!(
                        "COPY --from={image}: the image was not pulled"
                    )))
                }
            },
        };
        // --chown, else 0:0 from the context (and downloads, heredocs, named contexts),
        // else the owners the files have in the stage or image copied from.
        let from_build = matches!(&copy.from, Some(Source::Stage(_)))
            || matches!(&copy.from, Some(Source::Image(n)) if !req.build_contexts.contains_key(n));
        let chown = copy.chown.clone();
        let default_owner = if from_build { None } else { Some((0, 0)) };
        let mode = match &copy.chmod {
            Some(m) => Some(Mode::parse(m).ok_or_else(|| {
                failed(format!(
                    "--chmod={m}: expected an octal mode (755) or a symbolic one (u+x,go-w)"
                ))
            })?),
            None => None,
        };
        let exclude = exclude_rules(copy).map_err(failed)?;
        // Files that do not come from the source root: downloads and heredocs.
        let mut extra: Vec<(PathBuf, String)> = Vec::new();
        let mut local = Vec::new();
        for source in &copy.sources {
            if is_add && add::is_remote(source) {
                let fetched = add::fetch(
                    source,
                    copy.checksum.as_deref(),
                    copy.keep_git_dir.unwrap_or(false),
                    &self.shared.work,
                )
                .await
                .map_err(failed)?;
                extra.extend(fetched.names.into_iter().map(|n| (fetched.dir.clone(), n)));
            } else {
                local.push(source.clone());
            }
        }
        if !copy.heredocs.is_empty() {
            let dir = self.shared.work.join(format!("heredocs-{id}"));
            for doc in &copy.heredocs {
                write_inline_file(&dir, &doc.name, &doc.content, doc.mode).map_err(failed)?;
                extra.push((dir.clone(), doc.name.clone()));
            }
        }
        let dest = absolute_in(cwd, &copy.dest);
        // Keep the trailing slash: it means "a directory"; several sources mean one too.
        let dest = if (copy.dest.ends_with('/') || local.len() + extra.len() > 1)
            && !dest.ends_with('/')
        {
            format!("{dest}/")
        } else {
            dest
        };
        let ignore = if from_context {
            self.shared.ignore.clone()
        } else {
            None
        };
        let parents = copy.parents;
        let unpack = is_add && from_context && copy.unpack != Some(false);
        tokio::task::spawn_blocking(move || -> Result<Vec<Change>, CopyFailure> {
            let failed = |e: &dyn std::fmt::Display| CopyFailure::Failed(e.to_string());
            let mut changes = Vec::new();
            let mut filter = match &ignore {
                Some(rules) => CopyFilter::dockerignore(rules),
                None => CopyFilter::none(),
            };
            if let Some(exclude) = &exclude {
                filter = filter.with_exclude(exclude);
            }
            let mut plain = Vec::new();
            let mut archives = Vec::new();
            for source in local {
                // A missing source is left to the copy, which names it.
                let matched = match unpack {
                    true => wfs::expand_source(&source_root, &source, filter).unwrap_or_default(),
                    false => Vec::new(),
                };
                let mut rest = Vec::new();
                for (rel, path) in &matched {
                    match (path.is_file(), add::archive_kind(path)) {
                        (true, Some(_)) => archives.push(path.clone()),
                        _ => rest.push(rel.clone()),
                    }
                }
                // Each archive a wildcard matches is unpacked, the other matches copied.
                if matched.len() == rest.len() {
                    plain.push(source);
                } else {
                    plain.extend(rest);
                }
            }
            let rootfs = match &target {
                CopyTarget::Rootfs(rootfs) => rootfs.clone(),
                CopyTarget::Skeleton(tree, dir) => {
                    if !archives.is_empty() {
                        return Err(CopyFailure::NeedsRootfs("ADD unpacks an archive".into()));
                    }
                    let mut skeleton = Skeleton::new(tree, dir);
                    let need = |e: SkeletonError| match e {
                        SkeletonError::NeedsRootfs(m) => CopyFailure::NeedsRootfs(m),
                        SkeletonError::Fs(e) => CopyFailure::Failed(e.to_string()),
                    };
                    if chown.is_some() {
                        skeleton.prepare_accounts().map_err(need)?;
                    }
                    if !plain.is_empty() {
                        skeleton
                            .prepare_copy(&source_root, &plain, &dest, parents, filter)
                            .map_err(need)?;
                    }
                    for (dir, name) in &extra {
                        skeleton
                            .prepare_copy(
                                dir,
                                std::slice::from_ref(name),
                                &dest,
                                parents,
                                CopyFilter::none(),
                            )
                            .map_err(need)?;
                    }
                    skeleton.materialize().map_err(need)?;
                    dir.clone()
                }
            };
            let owner = match &chown {
                Some(spec) => Some(wfs::lookup_owner(&rootfs, spec).map_err(|e| failed(&e))?),
                None => default_owner,
            };
            let opts = CopyOptions {
                owner,
                mode,
                parents,
            };
            for path in archives {
                add::extract(&path, &rootfs, &dest).map_err(|e| failed(&e))?;
            }
            if !plain.is_empty() {
                changes.extend(
                    wfs::copy_into(&source_root, &plain, &rootfs, &dest, opts.clone(), filter)
                        .map_err(|e| failed(&e))?,
                );
            }
            for (dir, name) in extra {
                changes.extend(
                    wfs::copy_into(
                        &dir,
                        &[name],
                        &rootfs,
                        &dest,
                        opts.clone(),
                        CopyFilter::none(),
                    )
                    .map_err(|e| failed(&e))?,
                );
            }
            Ok(changes)
        })
        .await
        .map_err(|e| CopyFailure::Failed(e.to_string()))?
    }

    async fn write_layer(
        &self,
        rootfs: &Path,
        changes: Vec<Change>,
    ) -> Result<(Descriptor, Digest), String> {
        let store = self.shared.store.clone();
        let rootfs = rootfs.to_path_buf();
        let opts = LayerOptions {
            compression: self.req().compression,
            source_date_epoch: self.req().source_date_epoch,
        };
        tokio::task::spawn_blocking(move || -> Result<(Descriptor, Digest), String> {
            let mut writer = store.writer().map_err(|e| e.to_string())?;
            let written = layer::write_layer(&rootfs, &changes, &mut writer, &opts)
                .map_err(|e| e.to_string())?;
            writer
                .commit(Some(&written.digest))
                .map_err(|e| e.to_string())?;
            let desc = Descriptor {
                media_type: written.media_type.to_string(),
                digest: written.digest,
                size: written.size,
                platform: None,
                annotations: None,
            };
            Ok((desc, written.diff_id))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    fn write_image(
        &self,
        mut config: ImageConfig,
        layers: &[Descriptor],
    ) -> Result<PlatformImage, BuildError> {
        let store = &self.shared.store;
        config.created = Some(self.shared.created.clone());
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
        })
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
    /// The user's error message.
    Failed(String),
    /// It cannot run on a skeleton (why, for the debug log): run it on the rootfs.
    NeedsRootfs(String),
}

/// The `--exclude` patterns of a COPY/ADD, as ignore rules.
fn exclude_rules(copy: &ossb_dockerfile::Copy) -> Result<Option<Dockerignore>, String> {
    if copy.exclude.is_empty() {
        return Ok(None);
    }
    Dockerignore::parse(&copy.exclude.join("\n"))
        .map(Some)
        .map_err(|e| format!("--exclude: {e}"))
}

/// Writes a heredoc's file for COPY/ADD.
fn write_inline_file(dir: &Path, name: &str, content: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if name.contains('/') || name == ".." || name.is_empty() {
        return Err(format!("heredoc name {name:?} cannot be a file name"));
    }
    let path = dir.join(name);
    std::fs::write(&path, content).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
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

/// Applies `layers` onto `rootfs`; returns the warnings (entries skipped).
async fn unpack(
    store: &BlobStore,
    layers: &[Descriptor],
    rootfs: &Path,
) -> Result<Vec<String>, String> {
    let store = store.clone();
    let layers = layers.to_vec();
    let rootfs = rootfs.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut notes = Vec::new();
        for layer in &layers {
            let blob = store.open_blob(&layer.digest).map_err(|e| e.to_string())?;
            let report = layer::apply_layer(std::io::BufReader::new(blob), &rootfs, &ApplyOptions::default()).map_err(|e| {
                format!(
                    "cannot unpack layer {}: {e}\n  hint: the image is malformed or hostile; ossb never writes outside the rootfs, so use an image whose layers stay inside it",
                    layer.digest
                )
            })?;
            notes.extend(report.skipped);
        }
        Ok(notes)
    })
    .await
    .map_err(|e| e.to_string())?
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
async fn snapshot(rootfs: &Path, is_run: bool) -> Result<Snapshot, String> {
    let rootfs = rootfs.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let exclude = if is_run {
            mount_point_paths()
        } else {
            Vec::new()
        };
        Snapshot::take(&rootfs, &exclude)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("snapshot of the rootfs: {e}"))
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

    #[test]
    fn resolves_paths_against_the_workdir() {
        assert_eq!(absolute_in("/app", "src"), "/app/src");
        assert_eq!(absolute_in("/app", "/etc"), "/etc");
        assert_eq!(absolute_in("/app/", "../x/./y"), "/x/y");
        assert_eq!(absolute_in("/", "."), "/");
    }
}
