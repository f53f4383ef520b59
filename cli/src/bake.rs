//! `ossb bake`: buildx's bake. `ossb-bake` reads and resolves the bake files; each target
//! becomes the `ossb build` command line it stands for, run through the same path as
//! `ossb build` (one engine). Targets build at once on one cache; a step two targets share
//! runs once (the engine's step lock), the others find its record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use clap::Parser;
use ossb_bake::{SourceFile, Target};
use ossb_engine::{BuildError, BuildRequest, Event, Progress};

use crate::args::{BuildArgs, Isolation, ProgressMode};
use crate::display::BuildFuture;

/// `ossb build`'s flags, to read a target's command line with.
#[derive(Parser)]
struct AsBuild {
    #[command(flatten)]
    build: BuildArgs,
}

/// `ossb bake [TARGET|GROUP...]`.
#[derive(clap::Args, Debug)]
pub struct BakeArgs {
    /// Targets or groups to build (default: the group "default", else every target).
    pub targets: Vec<String>,
    /// A bake file (repeatable; default: docker-bake.hcl, docker-bake.json, compose files and
    /// their overrides in this directory, in buildx's order).
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Override a target's attribute, TARGET.KEY=VALUE (TARGET may be a pattern, e.g. '*';
    /// KEY+=VALUE appends), as buildx.
    #[arg(long = "set", value_name = "TARGET.KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved definition as JSON (as buildx prints it) and build nothing.
    #[arg(long)]
    pub print: bool,
    /// Push every target (its output becomes type=registry).
    #[arg(long)]
    pub push: bool,
    /// buildx's --load: refused as in `ossb build`.
    #[arg(long)]
    pub load: bool,
    /// Build without the step cache.
    #[arg(long = "no-cache")]
    pub no_cache: bool,
    /// How progress is shown.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Write what was built to this file as JSON, one entry per target (as buildx).
    #[arg(long = "metadata-file", value_name = "PATH")]
    pub metadata_file: Option<PathBuf>,
    /// The cache directory (default $OSSB_CACHE_DIR, else $XDG_CACHE_HOME/ossb).
    #[arg(long = "cache-dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A registry whose TLS certificate is not verified, or that speaks plain HTTP, HOST:PORT
    /// (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// How RUN steps are isolated.
    #[arg(long, value_enum, default_value = "auto")]
    pub isolation: Isolation,
}

/// How a bake's targets are built.
#[allow(dead_code)] // each binary constructs one of the two
pub enum Runner<'r> {
    /// One target at a time through a build function, each as soon as the targets its
    /// `target:` contexts name are built (`ossb bake`: the local engine, whose step lock makes
    /// a step two targets share run once).
    Each(Box<BuildOne<'r>>),
    /// Every target at once, as one graph (`ossb-submit bake`: the cluster's coordinator
    /// plans them together, a target's image handed to those reading it): each target and its
    /// progress; the results in their order.
    Together(Box<BuildAll<'r>>),
}

/// Builds one target ([`Runner::Each`]).
pub type BuildOne<'r> = dyn for<'b> Fn(&'b BuildRequest, &'b dyn Progress) -> BuildFuture<'b> + 'r;

/// One target for [`Runner::Together`]: its name, request, and `target:` contexts as
/// (context, target).
pub type TargetRequest<'b> = (&'b str, &'b BuildRequest, &'b [(String, String)]);

/// Builds every target at once ([`Runner::Together`]).
pub type BuildAll<'r> =
    dyn for<'b> Fn(&'b [TargetRequest<'b>], &'b [&'b dyn Progress]) -> TogetherFuture<'b> + 'r;

/// What [`Runner::Together`] returns.
pub type TogetherFuture<'b> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Vec<Result<ossb_engine::BuildResult, BuildError>>> + 'b>,
>;

/// Reads, resolves and prints or builds every target at once. Exit 2 for bad bake files
/// (with file:line); a failed target fails the bake with its exit code.
pub fn run(args: BakeArgs, runner: Runner<'_>) -> ExitCode {
    let mode = args.progress;
    if args.load {
        return crate::display::fail(mode, "--load needs a Docker daemon, and ossb has none: push with --push, or set output = [\"type=docker,dest=image.tar\"] and `podman load -i image.tar`", 2);
    }
    let resolved = match resolve(&args) {
        Ok(r) => r,
        Err(e) => return crate::display::fail(mode, &e, 2),
    };
    if args.print {
        println!("{}", ossb_bake::print_json(&resolved));
        return ExitCode::SUCCESS;
    }
    let inline = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            return crate::display::fail(
                mode,
                &format!("cannot make a temporary directory: {e}"),
                1,
            )
        }
    };
    let mut jobs = Vec::new();
    for (name, target) in &resolved.targets {
        let request = build_argv(name, target, &args, inline.path())
            .and_then(|argv| AsBuild::try_parse_from(&argv).map_err(|e| e.to_string()))
            .and_then(|parsed| parsed.build.into_request());
        let links = target
            .contexts
            .iter()
            .flatten()
            .filter_map(|(c, v)| Some((c.clone(), v.strip_prefix("target:")?.to_string())))
            .collect();
        match request {
            Ok((request, _)) => jobs.push(Job {
                name: name.clone(),
                request,
                links,
            }),
            Err(e) => return crate::display::fail(mode, &format!("target {name:?}: {e}"), 2),
        }
    }
    build_all(&jobs, mode, args.metadata_file.as_deref(), runner)
}

/// One target to build: its request, and the contexts that are other targets' images.
pub(crate) struct Job {
    name: String,
    request: BuildRequest,
    /// (context name, target name) of each `target:NAME` context.
    links: Vec<(String, String)>,
}

/// Whether a job can start: its linked targets built (their images put in its request), one
/// of them failed, or still waiting.
enum Linked {
    Waiting,
    Failed(BuildError),
    Ready(Box<BuildRequest>),
}

type Outcome = Result<(ossb_engine::BuildResult, Vec<crate::display::CacheMiss>), BuildError>;

fn linked_request(job: &Job, jobs: &[Job], outcomes: &[Option<Outcome>]) -> Linked {
    let mut request = job.request.clone();
    for (context, target) in &job.links {
        let Some(i) = jobs.iter().position(|j| &j.name == target) else {
            return Linked::Failed(BuildError::Usage(format!(
                "context {context} = \"target:{target}\": no such target"
            )));
        };
        match &outcomes[i] {
            None => return Linked::Waiting,
            Some(Err(_)) => {
                return Linked::Failed(BuildError::Local(format!(
                    "context {context} is target {target}'s image, and target {target} failed"
                )))
            }
            Some(Ok((result, _))) => {
                request.build_contexts.insert(
                    ossb_dockerfile::context_name(context),
                    ossb_engine::ContextSource::Built {
                        target: target.clone(),
                        image: result.image.clone(),
                    },
                );
            }
        }
    }
    Linked::Ready(Box::new(request))
}

/// Builds every job at once on one runtime and one display, each target's vertices named
/// after it; stops them all on SIGINT or SIGTERM.
fn build_all(
    jobs: &[Job],
    mode: ProgressMode,
    metadata_file: Option<&Path>,
    runner: Runner<'_>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return crate::display::fail(mode, &format!("cannot start the async runtime: {e}"), 1)
        }
    };
    let display = crate::display::for_mode(mode);
    let display = display.as_ref();
    let next = AtomicUsize::new(1);
    let started = std::time::Instant::now();
    // A target whose contexts name other targets (`target:NAME`) starts when they are built,
    // and reads their images from the cache's store: no registry round trip.
    let finals: Vec<std::cell::OnceCell<BuildRequest>> =
        jobs.iter().map(|_| std::cell::OnceCell::new()).collect();
    let outcome = runtime.block_on(async {
        let next = &next;
        let build = match &runner {
            Runner::Each(build) => build,
            Runner::Together(together) => {
                let all = build_together(jobs, together, display, next);
                return tokio::select! {
                    results = all => {
                        for (fin, job) in finals.iter().zip(jobs) {
                            let _ = fin.set(job.request.clone());
                        }
                        Ok(results)
                    }
                    signal = crate::display::stop_signal() => Err(signal),
                };
            }
        };
        let all = async {
            let mut outcomes: Vec<Option<_>> = jobs.iter().map(|_| None).collect();
            let mut started = vec![false; jobs.len()];
            let mut running = futures_util::stream::FuturesUnordered::new();
            loop {
                for (i, job) in jobs.iter().enumerate() {
                    if started[i] {
                        continue;
                    }
                    match linked_request(job, jobs, &outcomes) {
                        Linked::Waiting => continue,
                        Linked::Failed(e) => outcomes[i] = Some(Err(e)),
                        Linked::Ready(request) => {
                            let request = finals[i].get_or_init(|| *request);
                            let name = &job.name;
                            running.push(async move {
                                let log = crate::display::MissLog::default();
                                let progress = Labeled {
                                    inner: display,
                                    label: name,
                                    next,
                                    ids: Mutex::new(HashMap::new()),
                                    log: &log,
                                };
                                let result = build(request, &progress).await;
                                (i, result.map(|r| (r, log.misses())))
                            });
                        }
                    }
                    started[i] = true;
                }
                match futures_util::StreamExt::next(&mut running).await {
                    Some((i, result)) => outcomes[i] = Some(result),
                    None => break,
                }
            }
            jobs.iter()
                .zip(outcomes)
                .map(|(job, o)| {
                    let o = o.unwrap_or_else(|| {
                        Err(BuildError::Local("the target was never started".into()))
                    });
                    (&job.name, o)
                })
                .collect::<Vec<_>>()
        };
        tokio::select! {
            results = all => Ok(results),
            signal = crate::display::stop_signal() => Err(signal),
        }
    });
    let results = match outcome {
        Ok(results) => results,
        Err((name, number)) => {
            display.finish();
            let code = crate::display::fail(
                mode,
                &format!("stopped by {name}: the bake did not finish"),
                128 + number,
            );
            runtime.shutdown_background();
            return code;
        }
    };
    let mut failed = None;
    let mut metadata = serde_json::Map::new();
    for (((name, result), job), fin) in results.into_iter().zip(jobs).zip(&finals) {
        let request = fin.get().unwrap_or(&job.request);
        match result {
            Ok((result, misses)) => {
                crate::display::notice(mode, &format!("target {name}:"));
                display.summary(&result, started.elapsed());
                metadata.insert(
                    name.clone(),
                    crate::args::metadata(request, &result, &misses),
                );
            }
            Err(e) => {
                display.finish();
                let code = u8::try_from(e.exit_code()).unwrap_or(1);
                crate::display::notice(mode, &format!("error: target {name}: {e}"));
                failed.get_or_insert(code);
            }
        }
    }
    if let (Some(path), None) = (metadata_file, failed) {
        let text = serde_json::to_string_pretty(&metadata).unwrap_or_default();
        if let Err(e) = ossb_image::export::write_file_atomically(path, text.as_bytes()) {
            return crate::display::fail(mode, &e.to_string(), 1);
        }
    }
    match failed {
        Some(code) => ExitCode::from(code),
        None => ExitCode::SUCCESS,
    }
}

/// Builds every job at once through `together`, each with its labeled progress; the
/// targets its `target:` contexts name are handed to it there.
async fn build_together<'j>(
    jobs: &'j [Job],
    together: &BuildAll<'_>,
    display: &dyn Progress,
    next: &AtomicUsize,
) -> Vec<(&'j String, Outcome)> {
    let logs: Vec<crate::display::MissLog> = jobs
        .iter()
        .map(|_| crate::display::MissLog::default())
        .collect();
    let labeled: Vec<Labeled> = jobs
        .iter()
        .zip(&logs)
        .map(|(job, log)| Labeled {
            inner: display,
            label: &job.name,
            next,
            ids: Mutex::new(HashMap::new()),
            log,
        })
        .collect();
    let progress: Vec<&dyn Progress> = labeled.iter().map(|l| l as &dyn Progress).collect();
    let pairs: Vec<TargetRequest> = jobs
        .iter()
        .map(|j| (j.name.as_str(), &j.request, j.links.as_slice()))
        .collect();
    let results = together(&pairs, &progress).await;
    jobs.iter()
        .zip(results)
        .zip(&logs)
        .map(|((job, result), log)| (&job.name, result.map(|r| (r, log.misses()))))
        .collect()
}

/// One target's progress on the shared display: its vertex numbers made unique across the
/// bake, its vertex names prefixed with the target, its estimates left out (each target's
/// alone would mislead).
struct Labeled<'a> {
    inner: &'a dyn Progress,
    label: &'a str,
    next: &'a AtomicUsize,
    ids: Mutex<HashMap<usize, usize>>,
    /// The target's cache misses, named as the target's own build names its steps.
    log: &'a crate::display::MissLog,
}

impl Labeled<'_> {
    fn id(&self, own: usize) -> usize {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        *ids.entry(own)
            .or_insert_with(|| self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl Progress for Labeled<'_> {
    fn event(&self, event: Event) {
        self.log.see(&event);
        let event = match event {
            Event::Started { id, name } => Event::Started {
                id: self.id(id),
                name: format!("[{}] {name}", self.label),
            },
            Event::Output { id, elapsed, line } => Event::Output {
                id: self.id(id),
                elapsed,
                line,
            },
            Event::Done { id, elapsed } => Event::Done {
                id: self.id(id),
                elapsed,
            },
            Event::Failed {
                id,
                elapsed,
                message,
            } => Event::Failed {
                id: self.id(id),
                elapsed,
                message,
            },
            Event::Cached { id } => Event::Cached { id: self.id(id) },
            Event::CacheMiss { id, reason } => Event::CacheMiss {
                id: self.id(id),
                reason,
            },
            Event::Transfer { id, received, sent } => Event::Transfer {
                id: self.id(id),
                received,
                sent,
            },
            Event::Estimate { .. } => return,
            Event::Info(text) => Event::Info(format!("[{}] {text}", self.label)),
        };
        self.inner.event(event);
    }
}

fn resolve(args: &BakeArgs) -> Result<ossb_bake::Resolved, String> {
    let files = if args.files.is_empty() {
        let here = std::env::current_dir().map_err(|e| format!("the current directory: {e}"))?;
        let found = ossb_bake::discover(&here).map_err(|e| e.to_string())?;
        if found.is_empty() {
            return Err(format!(
                "no bake file in {}: write a docker-bake.hcl (or name one with -f)",
                here.display()
            ));
        }
        found
    } else {
        args.files
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|text| SourceFile {
                        name: p.display().to_string(),
                        text,
                    })
                    .map_err(|e| format!("cannot read the bake file {}: {e}", p.display()))
            })
            .collect::<Result<_, _>>()?
    };
    let definition = ossb_bake::load(&files).map_err(|e| e.to_string())?;
    ossb_bake::resolve(&definition, &args.targets, &args.set, &|k| {
        std::env::var(k).ok()
    })
    .map_err(|e| e.to_string())
}

/// The `ossb build` command line a target stands for.
fn build_argv(
    name: &str,
    t: &Target,
    args: &BakeArgs,
    scratch: &Path,
) -> Result<Vec<String>, String> {
    let mut v: Vec<String> = vec!["ossb-build".into()];
    let mut flag = |f: &str, value: String| {
        v.push(f.to_string());
        v.push(value);
    };
    let context = t.context.clone().unwrap_or_else(|| ".".into());
    match (&t.dockerfile_inline, &t.dockerfile) {
        (Some(text), _) => {
            let file = scratch.join(format!("{name}.Dockerfile"));
            std::fs::write(&file, text).map_err(|e| format!("writing dockerfile-inline: {e}"))?;
            flag("--file", file.display().to_string());
        }
        // As buildx: a relative Dockerfile is relative to the context.
        (None, Some(file)) if !Path::new(file).is_absolute() => flag(
            "--file",
            Path::new(&context).join(file).display().to_string(),
        ),
        (None, Some(file)) => flag("--file", file.clone()),
        (None, None) => {}
    }
    for tag in t.tags.iter().flatten() {
        flag("--tag", tag.clone());
    }
    if let Some(platforms) = t.platforms.as_ref().filter(|p| !p.is_empty()) {
        flag("--platform", platforms.join(","));
    }
    for (k, value) in &t.args {
        if let Some(value) = value {
            flag("--build-arg", format!("{k}={value}"));
        }
    }
    for (k, value) in &t.labels {
        if let Some(value) = value {
            flag("--label", format!("{k}={value}"));
        }
    }
    if let Some(target) = &t.target {
        flag("--target", target.clone());
    }
    // `target:NAME` contexts are given the built image later (`linked_request`).
    for (ctx_name, source) in t.contexts.iter().flatten() {
        if !source.starts_with("target:") {
            flag("--build-context", format!("{ctx_name}={source}"));
        }
    }
    for o in t.output.iter().flatten() {
        flag("--output", o.to_csv());
    }
    for c in t.cache_from.iter().flatten() {
        flag("--cache-from", c.to_csv());
    }
    for c in t.cache_to.iter().flatten() {
        flag("--cache-to", c.to_csv());
    }
    for s in t.secret.iter().flatten() {
        flag("--secret", s.to_csv());
    }
    for s in t.ssh.iter().flatten() {
        flag("--ssh", s.to_csv());
    }
    for a in t.attest.iter().flatten() {
        flag("--attest", a.to_csv());
    }
    for a in t.annotations.iter().flatten() {
        flag("--annotation", a.clone());
    }
    for (host, ip) in &t.extra_hosts {
        if let Some(ip) = ip {
            flag("--add-host", format!("{host}:{ip}"));
        }
    }
    if let Some(network) = &t.network {
        flag("--network", network.clone());
    }
    for registry in &args.insecure_registries {
        flag("--insecure-registry", registry.clone());
    }
    if let Some(dir) = &args.cache_dir {
        flag("--cache-dir", dir.display().to_string());
    }
    flag(
        "--progress",
        clap::ValueEnum::to_possible_value(&args.progress)
            .map(|p| p.get_name().to_string())
            .unwrap_or_else(|| "auto".into()),
    );
    flag(
        "--isolation",
        clap::ValueEnum::to_possible_value(&args.isolation)
            .map(|p| p.get_name().to_string())
            .unwrap_or_else(|| "auto".into()),
    );
    if args.no_cache || t.no_cache == Some(true) {
        v.push("--no-cache".into());
    }
    // A target only linked as another's context is cache-only (ossb-bake): not pushed.
    let cache_only = t.output.iter().flatten().all(|o| o.kind == "cacheonly")
        && t.output.as_ref().is_some_and(|o| !o.is_empty());
    if args.push && !cache_only {
        v.push("--push".into());
    }
    v.push(context);
    Ok(v)
}
