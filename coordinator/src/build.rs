//! The build engine: plan, pull, execute each needed stage's steps in order, assemble the
//! image, export it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ossb_dockerfile::dockerignore::{self, Dockerignore};
use ossb_dockerfile::{
    self as dockerfile, Base, BaseImageInfo, Instruction, PlanOptions, Source, Step,
};
use ossb_image::export::{self, NamedImage};
use ossb_image::layer::{self, ApplyOptions, Change, Compression, LayerOptions};
use ossb_image::oci::{
    self, media_type, Descriptor, DescriptorPlatform, History, ImageConfig, Manifest,
};
use ossb_image::registry::{
    parse_reference, PulledImage, Registry, RegistryError, RegistryOptions,
};
use ossb_image::store::BlobStore;
use ossb_protocol::{Digest, Platform};
use ossb_worker::fs::{self as wfs, CopyFilter, Ownership};
use ossb_worker::sandbox::{self, Isolation};

use crate::run::{self, RunContext};
use ossb_worker::snapshot::Snapshot;

use crate::progress::{Event, Progress};

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
    /// The platform to build for.
    pub platform: Platform,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--label` values, applied to the final image.
    pub labels: BTreeMap<String, String>,
    /// Where the image goes.
    pub outputs: Vec<Output>,
    /// The cache directory (blob store and work space).
    pub cache_dir: PathBuf,
    /// How to reach registries.
    pub registry: RegistryOptions,
    /// SOURCE_DATE_EPOCH, for reproducible timestamps.
    pub source_date_epoch: Option<i64>,
    /// The ossb binary, which implements the sandbox subcommand.
    pub sandbox_exe: PathBuf,
    /// How RUN steps are isolated.
    pub isolation: Isolation,
    /// `--secret id=ID,src=PATH`: secret files by id, for `RUN --mount=type=secret`.
    pub secrets: BTreeMap<String, PathBuf>,
}

/// What a successful build produced.
#[derive(Clone, Debug)]
pub struct BuildResult {
    /// The manifest of the image.
    pub manifest: Descriptor,
    /// The digest of its config (the image ID).
    pub config_digest: Digest,
    /// The references pushed.
    pub pushed: Vec<String>,
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
    #[error("{location}: {instruction}\n{message}")]
    Step {
        /// `Dockerfile:12`.
        location: String,
        /// The instruction's history text.
        instruction: String,
        /// What went wrong.
        message: String,
    },
    /// A registry refused or failed.
    #[error("{0}")]
    Registry(#[from] RegistryError),
    /// Writing an output failed.
    #[error("{0}")]
    Export(String),
    /// A local failure (disk, store).
    #[error("{0}")]
    Local(String),
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

fn local<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> BuildError + '_ {
    move |e| BuildError::Local(format!("{what}: {e}"))
}

/// The state of a stage as its steps run.
struct StageState {
    config: ImageConfig,
    /// Layers of the image so far (base first).
    layers: Vec<Descriptor>,
    rootfs: PathBuf,
}

struct Engine<'a> {
    req: &'a BuildRequest,
    progress: &'a dyn Progress,
    store: BlobStore,
    registry: Registry,
    work: tempfile::TempDir,
    next_id: AtomicUsize,
    created: String,
    pulled: HashMap<String, PulledImage>,
    /// The context's `.dockerignore` rules.
    ignore: Option<Dockerignore>,
}

/// Runs the build described by `req`, reporting to `progress`.
pub async fn build(req: &BuildRequest, progress: &dyn Progress) -> Result<BuildResult, BuildError> {
    let df = dockerfile::parse(&req.dockerfile, &req.dockerfile_name)?;
    if !req.context.is_dir() {
        return Err(BuildError::Usage(format!(
            "build context {} is not a directory",
            req.context.display()
        )));
    }
    let store = BlobStore::open(&req.cache_dir).map_err(local("opening the cache"))?;
    let work_root = req.cache_dir.join("work");
    std::fs::create_dir_all(&work_root).map_err(local("creating the work directory"))?;
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&work_root)
        .map_err(local("creating the work directory"))?;
    let mut engine = Engine {
        req,
        progress,
        store,
        registry: Registry::new(&req.registry)?,
        work,
        next_id: AtomicUsize::new(1),
        created: rfc3339(req.source_date_epoch.unwrap_or_else(now)),
        pulled: HashMap::new(),
        ignore: load_dockerignore(req)?,
    };
    let opts = PlanOptions {
        build_args: req.build_args.clone(),
        target: req.target.clone(),
        target_platform: req.platform.clone(),
        build_platform: Platform::host(),
    };
    let mut bases = HashMap::new();
    for reference in dockerfile::base_images(&df, &opts)? {
        let pulled = engine.pull(&reference).await?;
        bases.insert(reference.clone(), base_info(&pulled.config));
        engine.pulled.insert(reference, pulled);
    }
    let plan = dockerfile::plan(&df, &opts, &bases)?;
    let mut done: HashMap<usize, StageState> = HashMap::new();
    for index in needed_stages(&plan, plan.target) {
        let state = engine.run_stage(&plan, index, &done).await?;
        done.insert(index, state);
    }
    let mut final_state = done
        .remove(&plan.target)
        .ok_or_else(|| BuildError::Local("the target stage did not run".into()))?;
    if !req.labels.is_empty() {
        let labels = final_state
            .config
            .config
            .labels
            .get_or_insert_with(BTreeMap::new);
        labels.extend(req.labels.clone());
    }
    let (manifest, config_digest) = engine.write_image(&final_state)?;
    let pushed = engine.export(&final_state, &manifest).await?;
    Ok(BuildResult {
        manifest,
        config_digest,
        pushed,
    })
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

/// The stages `target` depends on (through FROM and COPY --from / RUN --mount from), in order.
fn needed_stages(plan: &dockerfile::BuildPlan, target: usize) -> Vec<usize> {
    let mut needed = vec![false; plan.stages.len()];
    let mut stack = vec![target];
    while let Some(i) = stack.pop() {
        if needed[i] {
            continue;
        }
        needed[i] = true;
        let stage = &plan.stages[i];
        if let Base::Stage(dep) = stage.base {
            stack.push(dep);
        }
        for step in &stage.steps {
            if let Instruction::Copy(c) | Instruction::Add(c) = &step.instruction {
                if let Some(Source::Stage(from)) = c.from {
                    stack.push(from);
                }
            }
        }
    }
    (0..plan.stages.len()).filter(|i| needed[*i]).collect()
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

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Seconds since the epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for the whole proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Engine<'_> {
    fn start(&self, name: String) -> (usize, Instant) {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.progress.event(Event::Started { id, name });
        (id, Instant::now())
    }

    fn finish<T, E: std::fmt::Display>(
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

    async fn pull(&self, reference: &str) -> Result<PulledImage, BuildError> {
        let parsed = parse_reference(reference)?;
        let (id, t) = self.start(format!(
            "[internal] load metadata and layers for {}",
            parsed.whole()
        ));
        let result = self
            .registry
            .pull(&parsed, &self.req.platform, &self.store)
            .await;
        Ok(self.finish(id, t, result)?)
    }

    async fn run_stage(
        &mut self,
        plan: &dockerfile::BuildPlan,
        index: usize,
        done: &HashMap<usize, StageState>,
    ) -> Result<StageState, BuildError> {
        let stage = &plan.stages[index];
        let rootfs = self.work.path().join(format!("stage-{index}"));
        std::fs::create_dir_all(&rootfs).map_err(local("creating the rootfs"))?;
        let (config, layers) = match &stage.base {
            Base::Scratch => (
                ImageConfig {
                    architecture: self.req.platform.architecture.clone(),
                    os: self.req.platform.os.clone(),
                    variant: self.req.platform.variant.clone(),
                    ..Default::default()
                },
                Vec::new(),
            ),
            Base::Image(reference) => {
                let pulled = self.pulled.get(reference).ok_or_else(|| {
                    BuildError::Local(format!("base image {reference} was not pulled"))
                })?;
                (pulled.config.clone(), pulled.manifest.layers.clone())
            }
            Base::Stage(dep) => {
                let dep = done
                    .get(dep)
                    .ok_or_else(|| BuildError::Local(format!("stage {dep} has not run")))?;
                (dep.config.clone(), dep.layers.clone())
            }
        };
        let name = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{index}"));
        let (id, t) = self.start(format!("[{name}] unpack {} layers", layers.len()));
        let unpacked = self.unpack(&layers, &rootfs).await;
        self.finish(id, t, unpacked)?;
        let mut state = StageState {
            config,
            layers,
            rootfs,
        };
        // A new stage's history starts from its base's; ONBUILD triggers are consumed.
        state.config.config.on_build = None;
        let total = stage.steps.len();
        for (n, step) in stage.steps.iter().enumerate() {
            let label = format!("[{name} {}/{total}] {}", n + 1, step_title(step));
            let (id, t) = self.start(label);
            let result = self.run_step(step, &mut state, done, id, t).await;
            self.finish(
                id,
                t,
                result.map_err(|message| BuildError::Step {
                    location: format!("{}:{}", self.req.dockerfile_name, step.location.start_line),
                    instruction: step.created_by.trim_end_matches(" # buildkit").to_string(),
                    message,
                }),
            )?;
        }
        Ok(state)
    }

    async fn unpack(&self, layers: &[Descriptor], rootfs: &Path) -> Result<(), BuildError> {
        let store = self.store.clone();
        let layers = layers.to_vec();
        let rootfs = rootfs.to_path_buf();
        let progress_lines = tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
            let mut notes = Vec::new();
            for layer in &layers {
                let blob = store.open_blob(&layer.digest).map_err(|e| e.to_string())?;
                let report = layer::apply_layer(
                    std::io::BufReader::new(blob),
                    &rootfs,
                    &ApplyOptions::default(),
                )
                .map_err(|e| {
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
        .map_err(local("unpacking"))?
        .map_err(BuildError::Local)?;
        for note in progress_lines {
            self.progress.event(Event::Info(format!("warning: {note}")));
        }
        Ok(())
    }

    /// Runs one step; the error is the message for the user.
    async fn run_step(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &HashMap<usize, StageState>,
        id: usize,
        started: Instant,
    ) -> Result<(), String> {
        let cfg = &mut state.config.config;
        let changes_fs = match &step.instruction {
            Instruction::Env(pairs) => {
                for (k, v) in pairs {
                    cfg.set_env(k, v);
                }
                false
            }
            Instruction::Label(pairs) => {
                cfg.labels
                    .get_or_insert_with(BTreeMap::new)
                    .extend(pairs.iter().cloned());
                false
            }
            Instruction::User(user) => {
                cfg.user = Some(user.clone());
                false
            }
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
                false
            }
            Instruction::Cmd(argv) => {
                cfg.cmd = Some(argv.clone());
                false
            }
            Instruction::Entrypoint(argv) => {
                cfg.entrypoint = (!argv.is_empty()).then(|| argv.clone());
                // As Docker: an ENTRYPOINT drops the CMD inherited from the base.
                cfg.cmd = None;
                false
            }
            Instruction::Volume(vols) => {
                let v = cfg.volumes.get_or_insert_with(BTreeMap::new);
                for vol in vols {
                    v.insert(vol.clone(), serde_json::json!({}));
                }
                false
            }
            Instruction::StopSignal(sig) => {
                cfg.stop_signal = Some(sig.clone());
                false
            }
            Instruction::Shell(shell) => {
                cfg.shell = Some(shell.clone());
                false
            }
            Instruction::OnBuild(trigger) => {
                cfg.on_build
                    .get_or_insert_with(Vec::new)
                    .push(trigger.clone());
                false
            }
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
                false
            }
            // ARG only changes what later steps see, and the planner has already applied it.
            Instruction::Arg(_) => false,
            Instruction::Workdir(_)
            | Instruction::Run(_)
            | Instruction::Copy(_)
            | Instruction::Add(_) => true,
        };
        let mut empty_layer = true;
        if changes_fs {
            let before = snapshot(&state.rootfs).await?;
            let mount_points = match &step.instruction {
                Instruction::Run(_) => sandbox::prepare_mount_points(&state.rootfs)
                    .map_err(|e| format!("preparing the sandbox: {e}"))?,
                _ => Vec::new(),
            };
            let result = self.apply_fs_step(step, state, done, id, started).await;
            sandbox::remove_mount_points(&mount_points);
            result?;
            let after = snapshot(&state.rootfs).await?;
            let changes = before.diff(&after);
            if !changes.is_empty() {
                let desc = self.write_layer(&state.rootfs, changes).await?;
                state.config.rootfs.diff_ids.push(desc.1);
                state.layers.push(desc.0);
                empty_layer = false;
            }
        }
        if step.created_by.is_empty() {
            return Ok(());
        }
        state.config.history.push(History {
            created: Some(self.created.clone()),
            created_by: Some(step.created_by.clone()),
            comment: Some("buildkit.dockerfile.v0".into()),
            empty_layer: empty_layer.then_some(true),
            ..Default::default()
        });
        Ok(())
    }

    async fn apply_fs_step(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &HashMap<usize, StageState>,
        id: usize,
        started: Instant,
    ) -> Result<(), String> {
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
                let dir = absolute_in(&cwd, dir);
                let owner = wfs::lookup_user(&state.rootfs, &user).map_err(|e| e.to_string())?;
                wfs::make_workdir(&state.rootfs, &dir, (owner.uid, owner.gid))
                    .map_err(|e| e.to_string())?;
                cfg.working_dir = Some(dir);
                Ok(())
            }
            Instruction::Run(run) => {
                let stages: HashMap<usize, PathBuf> =
                    done.iter().map(|(i, s)| (*i, s.rootfs.clone())).collect();
                let ctx = RunContext {
                    rootfs: &state.rootfs,
                    config: cfg,
                    default_user: &user,
                    default_cwd: &cwd,
                    sandbox_exe: &self.req.sandbox_exe,
                    context: &self.req.context,
                    stages: &stages,
                    cache_dir: &self.req.cache_dir,
                    isolation: self.req.isolation,
                    secrets: &self.req.secrets,
                };
                run::execute(&ctx, run, |line| {
                    self.progress.event(Event::Output {
                        id,
                        elapsed: started.elapsed(),
                        line: line.to_string(),
                    })
                })
                .await
            }
            Instruction::Copy(copy) | Instruction::Add(copy) => {
                let from_context = copy.from.is_none();
                let source_root = match &copy.from {
                    None => self.req.context.clone(),
                    Some(Source::Stage(i)) => match done.get(i) {
                        Some(s) => s.rootfs.clone(),
                        None => return Err(format!("COPY --from: stage {i} has not been built")),
                    },
                    Some(Source::Image(image)) => {
                        return Err(format!(
                            "COPY --from={image}: copying from an image is not supported yet"
                        ))
                    }
                };
                if !copy.heredocs.is_empty() {
                    return Err("COPY/ADD with heredoc sources is not supported yet".into());
                }
                if matches!(step.instruction, Instruction::Add(_))
                    && copy
                        .sources
                        .iter()
                        .any(|s| s.contains("://") || is_archive(s))
                {
                    return Err("ADD of URLs and archives is not supported yet; use COPY".into());
                }
                let owner = match &copy.chown {
                    Some(spec) => {
                        let u = wfs::lookup_user(&state.rootfs, spec).map_err(|e| e.to_string())?;
                        (u.uid, u.gid)
                    }
                    None => (0, 0),
                };
                let mode = match &copy.chmod {
                    Some(m) => Some(u32::from_str_radix(m, 8).map_err(|_| {
                        format!("--chmod={m}: only octal modes are supported so far")
                    })?),
                    None => None,
                };
                let dest = absolute_in(&cwd, &copy.dest);
                // Keep the trailing slash: it means "a directory".
                let dest = if copy.dest.ends_with('/') && !dest.ends_with('/') {
                    format!("{dest}/")
                } else {
                    dest
                };
                let rootfs = state.rootfs.clone();
                let sources = copy.sources.clone();
                let ignore = if from_context {
                    self.ignore.clone()
                } else {
                    None
                };
                tokio::task::spawn_blocking(move || {
                    let filter = match &ignore {
                        Some(rules) => CopyFilter::dockerignore(rules),
                        None => CopyFilter::none(),
                    };
                    wfs::copy_into(
                        &source_root,
                        &sources,
                        &rootfs,
                        &dest,
                        Ownership { owner, mode },
                        filter,
                    )
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
            _ => Ok(()),
        }
    }

    async fn write_layer(
        &self,
        rootfs: &Path,
        changes: Vec<Change>,
    ) -> Result<(Descriptor, Digest), String> {
        let store = self.store.clone();
        let rootfs = rootfs.to_path_buf();
        let opts = LayerOptions {
            compression: Compression::Gzip,
            source_date_epoch: self.req.source_date_epoch,
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

    fn write_image(&self, state: &StageState) -> Result<(Descriptor, Digest), BuildError> {
        let mut config = state.config.clone();
        config.created = Some(self.created.clone());
        let config_bytes = oci::to_canonical_json(&config);
        let config_digest = self
            .store
            .put(&config_bytes)
            .map_err(local("storing the config"))?;
        let layers = state
            .layers
            .iter()
            .map(|l| Descriptor {
                media_type: oci_layer_type(&l.media_type).to_string(),
                annotations: None,
                platform: None,
                ..l.clone()
            })
            .collect();
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: media_type::OCI_CONFIG.into(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                platform: None,
                annotations: None,
            },
            layers,
            annotations: None,
        };
        let bytes = oci::to_canonical_json(&manifest);
        let digest = self
            .store
            .put(&bytes)
            .map_err(local("storing the manifest"))?;
        let platform = config.platform();
        Ok((
            Descriptor {
                media_type: media_type::OCI_MANIFEST.into(),
                digest,
                size: bytes.len() as u64,
                platform: Some(DescriptorPlatform::from(&platform)),
                annotations: None,
            },
            config_digest,
        ))
    }

    async fn export(
        &self,
        state: &StageState,
        manifest: &Descriptor,
    ) -> Result<Vec<String>, BuildError> {
        let mut pushed = Vec::new();
        for output in &self.req.outputs {
            match output {
                Output::Registry => {
                    if self.req.tags.is_empty() {
                        return Err(BuildError::Usage(
                            "--push / --output type=registry needs at least one --tag".into(),
                        ));
                    }
                    let bytes = self
                        .store
                        .read(&manifest.digest)
                        .map_err(local("reading the manifest"))?;
                    let blobs: Vec<Descriptor> = state
                        .layers
                        .iter()
                        .cloned()
                        .chain(std::iter::once(self.config_descriptor(&bytes)?))
                        .collect();
                    for tag in &self.req.tags {
                        let reference = parse_reference(tag)?;
                        let (id, t) = self.start(format!("pushing {}", reference.whole()));
                        let result = self
                            .registry
                            .push(
                                &reference,
                                &self.store,
                                &blobs,
                                &bytes,
                                media_type::OCI_MANIFEST,
                            )
                            .await;
                        self.finish(id, t, result)?;
                        pushed.push(format!("{}@{}", reference.whole(), manifest.digest));
                    }
                }
                Output::Oci { dest, tar } => {
                    let (id, t) = self.start(format!("exporting OCI layout to {}", dest.display()));
                    let images = [NamedImage {
                        descriptor: manifest.clone(),
                        names: self.req.tags.clone(),
                    }];
                    let result = if *tar {
                        export::write_oci_tar(&self.store, &images, dest)
                    } else {
                        export::write_oci_dir(&self.store, &images, dest)
                    };
                    self.finish(id, t, result)
                        .map_err(|e| BuildError::Export(e.to_string()))?;
                }
            }
        }
        Ok(pushed)
    }

    fn config_descriptor(&self, manifest_bytes: &[u8]) -> Result<Descriptor, BuildError> {
        let m: Manifest =
            serde_json::from_slice(manifest_bytes).map_err(local("reading the manifest"))?;
        Ok(m.config)
    }
}

async fn snapshot(rootfs: &Path) -> Result<Snapshot, String> {
    let rootfs = rootfs.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let exclude: Vec<PathBuf> = sandbox::MOUNT_POINTS
            .iter()
            .map(|(p, _)| PathBuf::from(p))
            .collect();
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

/// How a step is shown in progress: as written, for RUN without the SHELL prefix.
fn step_title(step: &Step) -> String {
    match &step.instruction {
        Instruction::Run(run) if run.shell_form => {
            format!(
                "RUN {}",
                run.argv.last().map(String::as_str).unwrap_or_default()
            )
        }
        _ => step.created_by.trim_end_matches(" # buildkit").to_string(),
    }
}

/// Whether ADD would unpack `source` (Docker unpacks local tar archives).
fn is_archive(source: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"]
        .iter()
        .any(|ext| source.ends_with(ext))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn resolves_paths_against_the_workdir() {
        assert_eq!(absolute_in("/app", "src"), "/app/src");
        assert_eq!(absolute_in("/app", "/etc"), "/etc");
        assert_eq!(absolute_in("/app/", "../x/./y"), "/x/y");
        assert_eq!(absolute_in("/", "."), "/");
    }
}
