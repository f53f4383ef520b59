//! From a parsed [`Dockerfile`] to a [`BuildPlan`]: stages, ARG scoping, expansion of every
//! word, typed instructions and the history text BuildKit writes for each step.
//!
//! Planning has two phases because expansion needs the base images' configs:
//! [`base_images`] names the images to fetch, [`plan`] takes what was fetched.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ossb_protocol::Platform;

use crate::error::{closest, Error};
use crate::flags::Flags;
use crate::shell::{Env, Lexer};
use crate::syntax::{parse, parse_heredoc, Dockerfile, Node, INSTRUCTIONS};

/// The longest `NAME=VALUE` an ARG or ENV may hold: Linux's `MAX_ARG_STRLEN` (32 pages of
/// 4 KiB) less the terminating NUL.
pub const MAX_VARIABLE_LEN: usize = 32 * 4096 - 1;

/// The default shell of Linux stages.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// The PATH BuildKit sets when a stage's image has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Build arguments that are passed to RUN without an ARG declaration and never persisted.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// What the caller decides about a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// `--build-arg K=V` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`: the stage to export; the last stage when `None`.
    pub target: Option<String>,
    /// The stage to build by its index in the Dockerfile (a build cluster's stage task);
    /// wins over `target`.
    pub target_index: Option<usize>,
    /// The platform being built for (TARGETPLATFORM).
    pub target_platform: Platform,
    /// The platform doing the build (BUILDPLATFORM).
    pub build_platform: Platform,
    /// `--network`: the network of a RUN that names none.
    pub network: Network,
    /// `--add-host`: (name, address) lines every RUN's `/etc/hosts` gets.
    pub extra_hosts: Vec<(String, String)>,
    /// `--build-context` names, as [`context_name`] spells them: a `FROM` or `--from` naming
    /// one reads the context ([`Base::Context`], [`Source::Context`]), and a stage named like
    /// one is replaced by it, as BuildKit does.
    pub named_contexts: std::collections::BTreeSet<String>,
}

impl Default for PlanOptions {
    /// No build args, the last stage, host platform for both.
    fn default() -> Self {
        PlanOptions {
            build_args: BTreeMap::new(),
            target: None,
            target_index: None,
            target_platform: Platform::host(),
            build_platform: Platform::host(),
            network: Network::Default,
            extra_hosts: Vec::new(),
            named_contexts: Default::default(),
        }
    }
}

/// The name a `--build-context` is known by, as BuildKit matches them: the reference's short
/// form (Docker Hub's `docker.io/` and `library/` left out) without a `:latest` tag, so that
/// `FROM alpine`, `FROM alpine:latest` and `FROM docker.io/library/alpine` all name the
/// context `alpine`.
pub fn context_name(reference: &str) -> String {
    let (rest, digest) = match reference.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (reference, None),
    };
    let (domain, path) = match rest.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first), path)
        }
        _ => (None, rest),
    };
    let hub = matches!(domain, None | Some("docker.io") | Some("index.docker.io"));
    let mut short = match (hub, path.strip_prefix("library/")) {
        (true, Some(name)) if !name.contains('/') => name.to_string(),
        (true, _) => path.to_string(),
        (false, _) => format!("{}/{path}", domain.unwrap_or_default()),
    };
    match digest {
        Some(d) => {
            short.push('@');
            short.push_str(d);
        }
        None => {
            if let Some(s) = short.strip_suffix(":latest") {
                short = s.to_string();
            }
        }
    }
    short
}

/// The key of a named context's config in the `bases` given to [`plan`] (never an image
/// reference: `//` cannot be in one).
pub fn context_key(name: &str) -> String {
    format!("context://{name}")
}

/// What planning needs to know of a base image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseImageInfo {
    /// `Config.Env`, split at the first `=`.
    pub env: Vec<(String, String)>,
    /// `Config.OnBuild`: triggers run first in a stage built on this image.
    pub onbuild: Vec<String>,
    /// `Config.WorkingDir` (empty = `/`).
    pub working_dir: String,
    /// `Config.User`.
    pub user: String,
    /// `Config.Shell` (empty = `/bin/sh -c`).
    pub shell: Vec<String>,
}

/// Where a step comes from in the Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The Dockerfile name given to [`parse`](crate::parse); for ONBUILD triggers of a base
    /// image, the location is the stage's FROM line.
    pub file: String,
    /// 1-based first line.
    pub start_line: usize,
    /// 1-based last line.
    pub end_line: usize,
}

/// The whole build: the stages the target needs, in an order where every stage comes
/// after the stages it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// The stages to build. Stages the target does not need are pruned.
    pub stages: Vec<Stage>,
    /// Position in `stages` of the stage to export.
    pub target: usize,
    /// What the SBOM scans besides the image (BuildKit's `BUILDKIT_SBOM_SCAN_*` args).
    pub sbom_scan: SbomScan,
}

/// `BUILDKIT_SBOM_SCAN_STAGE` and `BUILDKIT_SBOM_SCAN_CONTEXT`, as BuildKit reads them: an
/// ARG of that name, before the first FROM (every stage) or in a stage (that stage), whose
/// value is `true`/`false` or a comma-separated list of stage names. Only declared ARGs count
/// (a `--build-arg` sets their value); a stage the target does not need is never scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SbomScan {
    /// The stages to scan besides the target, as (position in [`BuildPlan::stages`], name:
    /// `AS name`, else `stage-N`), in plan order.
    pub stages: Vec<(usize, String)>,
    /// Whether the build context is scanned too (set in the target stage).
    pub context: bool,
}

/// The build args that steer the SBOM scan; never in a step's environment (BuildKit's
/// `nonEnvArgs`).
pub const SBOM_SCAN_ARGS: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

/// A stage as a node of the build's graph: what `ossb build` schedules and what the build
/// cluster makes a task of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageNode {
    /// Its position in [`BuildPlan::stages`].
    pub position: usize,
    /// Its index in the Dockerfile.
    pub index: usize,
    /// Where it runs when not on the build's target platform (`FROM --platform=...`).
    pub platform: Option<Platform>,
    /// The positions of the stages it needs built first.
    pub deps: Vec<usize>,
    /// Whether it is the image (the target stage).
    pub is_target: bool,
}

impl BuildPlan {
    /// The stage graph: one node per stage, in plan order (every stage after those it needs).
    /// The one place a plan becomes a schedule, for the local build and the cluster alike.
    pub fn graph(&self) -> Vec<StageNode> {
        self.stages
            .iter()
            .enumerate()
            .map(|(position, stage)| StageNode {
                position,
                index: stage.index,
                platform: stage.platform.clone(),
                deps: stage.deps(),
                is_target: position == self.target,
            })
            .collect()
    }

    /// Which stages run, by position: the target and what it needs, through every stage
    /// that is not `built` already (a stage an earlier task built is not gone through, nor
    /// what only it needed).
    pub fn stages_to_run(&self, built: impl Fn(usize) -> bool) -> Vec<bool> {
        let mut run = vec![false; self.stages.len()];
        let mut todo = vec![self.target];
        while let Some(position) = todo.pop() {
            if run[position] || built(position) {
                continue;
            }
            run[position] = true;
            todo.extend(self.stages[position].deps());
        }
        run
    }

    /// The build context's paths the stages that `run` read (COPY and ADD sources, bind
    /// mounts), as written (wildcards kept, `.` for all); `None` when they read all of it in
    /// a way no source names (the context's SBOM scan).
    pub fn context_reads(&self, run: &[bool]) -> Option<Vec<String>> {
        if self.sbom_scan.context && run.get(self.target) == Some(&true) {
            return None;
        }
        let remote = |s: &str| s.contains("://") || s.starts_with("git@");
        let mut out: Vec<String> = Vec::new();
        for (stage, _) in self.stages.iter().zip(run).filter(|(_, r)| **r) {
            for step in &stage.steps {
                match &step.instruction {
                    Instruction::Copy(c) | Instruction::Add(c) if c.from.is_none() => {
                        out.extend(c.sources.iter().filter(|s| !remote(s)).cloned());
                    }
                    Instruction::Run(r) => out.extend(
                        r.mounts
                            .iter()
                            .filter(|m| m.kind == MountType::Bind && m.from.is_none())
                            .map(|m| m.source.clone().unwrap_or_else(|| ".".into())),
                    ),
                    _ => {}
                }
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }
}

/// One stage (`FROM ... [AS name]` and its steps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The stage's index in the Dockerfile (what `--from=0` means). References between
    /// stages in the plan ([`Base::Stage`], [`Source::Stage`]) are positions in
    /// [`BuildPlan::stages`] instead.
    pub index: usize,
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// What the stage starts from.
    pub base: Base,
    /// `FROM --platform=...`, expanded.
    pub platform: Option<Platform>,
    /// The steps in order: base-image ONBUILD triggers first, then the stage's instructions.
    pub steps: Vec<Step>,
    /// The stage's environment after its last step (base env, PATH default, ENV steps):
    /// what the image config's `Env` should be.
    pub env: Vec<(String, String)>,
    /// The working directory after the last step.
    pub working_dir: String,
    /// The user after the last step.
    pub user: String,
    /// FROM's location.
    pub location: Location,
}

impl Stage {
    /// The stages (positions in [`BuildPlan::stages`]) whose files this stage reads: `COPY
    /// --from`, `ADD --from`, `RUN --mount from=`.
    pub fn reads(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for step in &self.steps {
            match &step.instruction {
                Instruction::Copy(c) | Instruction::Add(c) => {
                    if let Some(Source::Stage(i)) = c.from {
                        out.push(i);
                    }
                }
                Instruction::Run(r) => out.extend(r.mounts.iter().filter_map(|m| match m.from {
                    Some(Source::Stage(i)) => Some(i),
                    _ => None,
                })),
                _ => {}
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The stages this stage needs built first: the one it starts from and those it reads.
    pub fn deps(&self) -> Vec<usize> {
        let mut out = self.reads();
        if let Base::Stage(i) = self.base {
            out.push(i);
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`.
    Scratch,
    /// An image reference, expanded, as written (not normalized).
    Image(String),
    /// Another stage: a position in [`BuildPlan::stages`].
    Stage(usize),
    /// A `--build-context` by its name ([`context_name`]): `FROM name`, or a stage the
    /// context replaces (which then has no steps of its own).
    Context(String),
}

/// Where `COPY --from` or `RUN --mount from=` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A stage: a position in [`BuildPlan::stages`].
    Stage(usize),
    /// An image reference.
    Image(String),
    /// A `--build-context` by its name ([`context_name`]).
    Context(String),
}

/// One step of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Where the step was written.
    pub location: Location,
    /// What to do, every word expanded.
    pub instruction: Instruction,
    /// The image history text BuildKit writes, e.g. `RUN /bin/sh -c make # buildkit`;
    /// empty for instructions BuildKit writes no history for (ONBUILD).
    pub created_by: String,
}

/// The longest step title shown in progress and errors, in characters.
const MAX_TITLE: usize = 400;

impl Step {
    /// How the step is shown in progress and errors: as written and expanded, RUN without the
    /// SHELL prefix and without the build arguments its history lists (a log must not repeat
    /// every build arg at every step), clipped to a few hundred characters.
    pub fn title(&self) -> String {
        let text = match &self.instruction {
            Instruction::Run(run) if run.shell_form => {
                format!(
                    "RUN {}",
                    run.argv.last().map(String::as_str).unwrap_or_default()
                )
            }
            Instruction::Run(run) => format!("RUN {}", run.argv.join(" ")),
            // The history leaves `--link` out (as BuildKit's); its progress names it.
            Instruction::Copy(c) | Instruction::Add(c) if c.link => {
                let text = self.created_by.trim_end_matches(" # buildkit");
                match text.split_once(' ') {
                    Some((word, rest)) => format!("{word} --link {rest}"),
                    None => text.to_string(),
                }
            }
            _ => self.created_by.trim_end_matches(" # buildkit").to_string(),
        };
        crate::clip(&text, MAX_TITLE).into_owned()
    }
}

/// A typed, expanded instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// RUN.
    Run(Run),
    /// COPY.
    Copy(Copy),
    /// ADD (same fields as COPY; `from` is always `None`).
    Add(Copy),
    /// ENV pairs in order.
    Env(Vec<(String, String)>),
    /// WORKDIR, absolute and cleaned.
    Workdir(String),
    /// USER.
    User(String),
    /// LABEL pairs.
    Label(Vec<(String, String)>),
    /// MAINTAINER: the image's author (as BuildKit sets it; no label).
    Maintainer(String),
    /// EXPOSE, as `port/proto` (`80/tcp`), ranges spelled out.
    Expose(Vec<String>),
    /// CMD; shell form already wrapped with the stage's SHELL.
    Cmd(Vec<String>),
    /// ENTRYPOINT; shell form already wrapped with the stage's SHELL; empty = reset.
    Entrypoint(Vec<String>),
    /// VOLUME paths.
    Volume(Vec<String>),
    /// STOPSIGNAL as written (expanded).
    StopSignal(String),
    /// HEALTHCHECK.
    Healthcheck(Healthcheck),
    /// SHELL.
    Shell(Vec<String>),
    /// ONBUILD: the trigger text to store in the image config.
    OnBuild(String),
    /// ARG: names and the values they got (build arg, default, or global); no value when
    /// none. Kept as a step because BuildKit writes a history entry for it.
    Arg(Vec<(String, Option<String>)>),
}

/// A RUN step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The command: shell form is SHELL + the command line; exec form as written.
    pub argv: Vec<String>,
    /// Written in shell form.
    pub shell_form: bool,
    /// Variables set by ARG (and proxy build args) for this step only; put them over the
    /// stage's persisted environment. Never persisted into the image.
    pub build_env: Vec<(String, String)>,
    /// The working directory the command runs in.
    pub working_dir: String,
    /// The user it runs as (empty = root / image default).
    pub user: String,
    /// `--mount`s.
    pub mounts: Vec<Mount>,
    /// `--network`.
    pub network: Network,
    /// `--security`.
    pub security: Security,
    /// The build's `--add-host` entries (part of the step, so of its cache key, as in BuildKit).
    pub extra_hosts: Vec<(String, String)>,
    /// Files to provide read-only while the command runs (a heredoc script with a shebang
    /// is mounted at `/dev/pipes/NAME` with mode 0755 and run from there).
    pub heredocs: Vec<InlineFile>,
}

/// A file made from a heredoc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineFile {
    /// For COPY/ADD: the file name (the heredoc word); for RUN: the absolute path.
    pub name: String,
    /// The content, chomped and (when the delimiter was unquoted, for COPY/ADD) expanded.
    pub content: String,
    /// The mode to create it with (0644 for COPY, 0755 for RUN scripts).
    pub mode: u32,
}

/// `RUN --network` (and the build's `--network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// The default (sandboxed, with network).
    #[default]
    Default,
    /// No network.
    None,
    /// The host's network.
    Host,
}

impl std::str::FromStr for Network {
    type Err = String;

    /// `default`, `none` or `host`, as buildx's `--network`.
    fn from_str(s: &str) -> Result<Network, String> {
        match s {
            "default" => Ok(Network::Default),
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            other => Err(format!(
                "unsupported network mode {other:?}: use default, none or host"
            )),
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Network::Default => "default",
            Network::None => "none",
            Network::Host => "host",
        })
    }
}

/// `RUN --security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Security {
    /// The default sandbox.
    #[default]
    Sandbox,
    /// Privileged.
    Insecure,
}

/// The kind of a `RUN --mount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    /// A read-only (by default) view of the context, a stage or an image.
    Bind,
    /// A persistent cache directory.
    Cache,
    /// A secret file.
    Secret,
    /// An SSH agent socket.
    Ssh,
    /// An empty tmpfs.
    Tmpfs,
}

/// `cache` mount sharing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Concurrent writers share it (default).
    Shared,
    /// Each concurrent writer gets its own.
    Private,
    /// Writers wait for each other.
    Locked,
}

/// One `RUN --mount=...`, expanded and with BuildKit's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The type.
    pub kind: MountType,
    /// Where it appears (absolute; relative targets are joined to the working directory).
    pub target: String,
    /// `source=`: path inside `from` (or the context).
    pub source: Option<String>,
    /// `from=`: a stage or an image; `None` = the build context (bind) or empty (cache).
    pub from: Option<Source>,
    /// Read-only.
    pub read_only: bool,
    /// `id=`: the cache id or secret/ssh id.
    pub id: Option<String>,
    /// `sharing=` for cache mounts.
    pub sharing: Sharing,
    /// `mode=` (octal in the Dockerfile).
    pub mode: Option<u32>,
    /// `uid=`.
    pub uid: Option<u32>,
    /// `gid=`.
    pub gid: Option<u32>,
    /// `required` (secret, ssh).
    pub required: bool,
    /// `size=` for tmpfs, in bytes.
    pub size: Option<u64>,
    /// `env=`: a secret exposed as this environment variable.
    pub env: Option<String>,
}

/// A COPY or ADD step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// Source paths (or URLs for ADD), expanded; heredoc sources are in `heredocs`.
    pub sources: Vec<String>,
    /// Destination, absolute (a relative one is joined to the working directory); a
    /// trailing `/` is kept.
    pub dest: String,
    /// `--from`.
    pub from: Option<Source>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// Heredoc sources, in order.
    pub heredocs: Vec<InlineFile>,
    /// ADD `--checksum`.
    pub checksum: Option<String>,
    /// ADD `--keep-git-dir` when given.
    pub keep_git_dir: Option<bool>,
    /// ADD `--unpack` when given.
    pub unpack: Option<bool>,
    /// The user files are owned by when there is no `--chown`.
    pub user: String,
}

/// A HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", command]`.
    pub test: Vec<String>,
    /// `--interval`.
    pub interval: Option<Duration>,
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// `--start-period`.
    pub start_period: Option<Duration>,
    /// `--start-interval`.
    pub start_interval: Option<Duration>,
    /// `--retries`.
    pub retries: Option<u32>,
}

// ---------------------------------------------------------------------------------------
// Phase 0: check every instruction and split into stages.

struct Command<'a> {
    node: &'a Node,
    name: String,
    flags: Flags,
}

struct RawStage<'a> {
    index: usize,
    name: Option<String>,
    from: Command<'a>,
    commands: Vec<Command<'a>>,
}

struct Checked<'a> {
    meta_args: Vec<Command<'a>>,
    stages: Vec<RawStage<'a>>,
}

struct Ctx<'a> {
    df: &'a Dockerfile,
}

impl Ctx<'_> {
    fn err(&self, node: &Node, message: impl Into<String>) -> Error {
        Error::at(
            &self.df.file_name,
            node.start_line,
            &self.df.source_lines,
            message,
        )
    }
}

fn check_node<'a>(ctx: &Ctx, node: &'a Node) -> Result<Command<'a>, Error> {
    let name = node.name();
    if !INSTRUCTIONS.contains(&name.as_str()) {
        let mut e = ctx.err(node, format!("unknown instruction: {}", node.keyword));
        if let Some(c) = closest(&name, INSTRUCTIONS) {
            e = e.with_hint(format!("did you mean {c}?"));
        }
        return Err(e);
    }
    let flags = Flags::parse(&name, &node.flags).map_err(|f| {
        let mut e = ctx.err(node, f.message).pointing_at(&f.flag);
        e.hint = f.hint;
        e
    })?;
    let n = node.args.len();
    let bad = |m: String| Err(ctx.err(node, m));
    match name.as_str() {
        "ENV" | "LABEL" => {
            if n == 0 {
                return bad(format!("{name} requires at least one argument"));
            }
            if !n.is_multiple_of(3) {
                return bad(format!("Bad input to {name}, too many arguments"));
            }
            if node.args.chunks(3).any(|c| c[0].is_empty()) {
                return bad(format!("{name} names can not be blank"));
            }
        }
        "MAINTAINER" | "WORKDIR" | "USER" | "STOPSIGNAL" if n != 1 => {
            return bad(format!("{name} requires exactly one argument"));
        }
        "COPY" | "ADD" if n < 2 => {
            return Err(ctx.err(
                node,
                format!(
                    "{name} requires at least two arguments, but only one was provided. Destination could not be determined"
                ),
            )
            .with_hint(format!("write {name} SOURCE... DEST")));
        }
        "COPY" | "ADD" if parse_heredoc(&node.args[n - 1]).is_some() => {
            return bad(format!("{name} cannot accept a heredoc as a destination"));
        }
        "FROM" => {
            let ok = n == 1 || (n == 3 && node.args[1].eq_ignore_ascii_case("as"));
            if !ok {
                return Err(ctx
                    .err(node, "FROM requires either one or three arguments")
                    .with_hint("write FROM IMAGE [AS NAME]"));
            }
            if n == 3 {
                let stage = node.args[2].to_lowercase();
                if !valid_stage_name(&stage) {
                    return bad(format!(
                        "invalid name for build stage: {}, name can't start with a number or contain symbols",
                        crate::dump::go_quote(&node.args[2])
                    ));
                }
            }
        }
        "ARG" | "EXPOSE" | "VOLUME" | "HEALTHCHECK" | "ONBUILD"
            if n == 0 && node.child.is_none() =>
        {
            return bad(format!("{name} requires at least one argument"));
        }
        "ARG" if node.args.iter().any(|a| a.starts_with('=')) => {
            return bad("ARG names can not be blank".to_string());
        }
        "SHELL" => {
            if n == 0 {
                return bad("SHELL requires at least one argument".to_string());
            }
            if !node.json {
                return Err(ctx
                    .err(
                        node,
                        format!(
                            "SHELL requires the arguments to be in JSON form: {}",
                            node.original.trim()
                        ),
                    )
                    .with_hint("write SHELL [\"/bin/bash\", \"-c\"]"));
            }
        }
        "ONBUILD" => {
            if let Some(child) = &node.child {
                let trigger = child.name();
                match trigger.as_str() {
                    "ONBUILD" => {
                        return bad(
                            "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".to_string()
                        )
                    }
                    "MAINTAINER" | "FROM" => {
                        return bad(format!("{trigger} isn't allowed as an ONBUILD trigger"))
                    }
                    _ => {
                        check_node(ctx, child)?;
                    }
                }
            }
        }
        "HEALTHCHECK" => {
            let typ = node.args[0].to_uppercase();
            if typ == "NONE" && n > 1 {
                return bad("HEALTHCHECK NONE takes no arguments".to_string());
            }
            if typ != "NONE" && typ != "CMD" {
                return Err(ctx
                    .err(
                        node,
                        format!(
                            "Unknown type {} in HEALTHCHECK (try CMD)",
                            crate::dump::go_quote(&typ)
                        ),
                    )
                    .with_hint("write HEALTHCHECK CMD command or HEALTHCHECK NONE"));
            }
            if typ == "CMD" && n == 1 {
                return bad("Missing command after HEALTHCHECK CMD".to_string());
            }
        }
        _ => {}
    }
    Ok(Command { node, name, flags })
}

fn valid_stage_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
}

fn check<'a>(ctx: &Ctx, df: &'a Dockerfile) -> Result<Checked<'a>, Error> {
    let mut meta_args = Vec::new();
    let mut stages: Vec<RawStage> = Vec::new();
    for node in &df.instructions {
        let cmd = check_node(ctx, node)?;
        if cmd.name == "FROM" {
            let name = (node.args.len() == 3).then(|| node.args[2].to_lowercase());
            if let Some(n) = &name {
                if stages.iter().any(|s| s.name.as_deref() == Some(n)) {
                    return Err(ctx.err(
                        node,
                        format!("duplicate stage name {}", crate::dump::go_quote(n)),
                    ));
                }
            }
            stages.push(RawStage {
                index: stages.len(),
                name,
                from: cmd,
                commands: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.commands.push(cmd);
        } else if cmd.name == "ARG" {
            meta_args.push(cmd);
        } else {
            return Err(ctx
                .err(node, "no build stage in current context")
                .with_hint("only ARG can come before the first FROM"));
        }
    }
    if stages.is_empty() {
        return Err(
            Error::new(&df.file_name, "no build stage in current context")
                .with_hint("a Dockerfile needs at least one FROM"),
        );
    }
    Ok(Checked { meta_args, stages })
}

// ---------------------------------------------------------------------------------------
// Phase 1: the global scope, FROM lines and the stages the target needs.

/// Variables with an ordering; later entries win. Entries set by ARG are marked.
#[derive(Debug, Clone, Default)]
struct Vars {
    vars: Vec<(String, String, bool)>,
}

impl Vars {
    fn is_env(&self, k: &str) -> bool {
        self.vars.iter().any(|e| e.0 == k && !e.2)
    }
    fn set(&mut self, k: &str, v: &str, from_arg: bool) {
        if let Some(e) = self.vars.iter_mut().find(|e| e.0 == k) {
            e.1 = v.to_string();
            e.2 = from_arg;
        } else {
            self.vars.push((k.to_string(), v.to_string(), from_arg));
        }
    }
    fn pairs(&self, args: bool) -> Vec<(String, String)> {
        self.vars
            .iter()
            .filter(|e| e.2 == args)
            .map(|e| (e.0.clone(), e.1.clone()))
            .collect()
    }
}

impl Env for Vars {
    fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|e| e.0 == name).map(|e| e.1.as_str())
    }
}

struct Resolved {
    /// Global ARGs with values, predefined platform ARGs included.
    globals: Vars,
    /// Per Dockerfile stage: base, platform.
    froms: Vec<(FromBase, Option<Platform>)>,
    /// Dockerfile stage indexes needed by the target, ascending.
    needed: Vec<usize>,
    target: usize,
}

#[derive(Clone)]
enum FromBase {
    Scratch,
    Image(String),
    Stage(usize),
    /// A named context: `FROM name`, or the stage it replaces (`replaces`: its own FROM and
    /// steps are not read).
    Context {
        name: String,
        replaces: bool,
    },
}

/// The named context `word` (a FROM or `--from` value) names, if any. `scratch` and
/// `context` never do, as in BuildKit.
fn named_context(opts: &PlanOptions, word: &str) -> Option<String> {
    if opts.named_contexts.is_empty()
        || word.eq_ignore_ascii_case("scratch")
        || word.eq_ignore_ascii_case("context")
    {
        return None;
    }
    let name = context_name(word);
    opts.named_contexts.contains(&name).then_some(name)
}

fn platform_args(opts: &PlanOptions) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (prefix, p) in [
        ("TARGET", &opts.target_platform),
        ("BUILD", &opts.build_platform),
    ] {
        v.push((format!("{prefix}PLATFORM"), p.to_string()));
        v.push((format!("{prefix}OS"), p.os.clone()));
        v.push((format!("{prefix}ARCH"), p.architecture.clone()));
        v.push((
            format!("{prefix}VARIANT"),
            p.variant.clone().unwrap_or_default(),
        ));
    }
    v
}

fn lexer(df: &Dockerfile) -> Lexer {
    Lexer::new(df.escape)
}

fn expand_in(ctx: &Ctx, node: &Node, word: &str, env: &dyn Env) -> Result<String, Error> {
    lexer(ctx.df)
        .process_word(word, env)
        .map_err(|e| ctx.err(node, e.message))
}

/// Refuses a variable that no process could be given: Linux refuses to exec with an
/// environment string longer than `MAX_ARG_STRLEN`, so BuildKit would fail at the first RUN;
/// refusing it while planning fails before anything runs and names the line.
fn check_variable(name: &str, value: &str) -> Result<(), String> {
    let len = name.len() + 1 + value.len();
    if len > MAX_VARIABLE_LEN {
        return Err(format!(
            "{} is {len} bytes long: a variable may be at most {MAX_VARIABLE_LEN} bytes (Linux's limit for one environment string)",
            crate::clip(name, 40)
        ));
    }
    Ok(())
}

fn arg_pairs(node: &Node) -> Vec<(String, Option<String>)> {
    node.args
        .iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        })
        .collect()
}

fn resolve(ctx: &Ctx, checked: &Checked, opts: &PlanOptions) -> Result<Resolved, Error> {
    let mut globals = Vars::default();
    for (k, v) in platform_args(opts) {
        globals.set(&k, &v, true);
    }
    for cmd in &checked.meta_args {
        for (k, default) in arg_pairs(cmd.node) {
            let value = match (opts.build_args.get(&k), default) {
                (Some(v), _) => v.clone(),
                (None, Some(d)) => expand_in(ctx, cmd.node, &d, &globals)?,
                (None, None) => continue,
            };
            check_variable(&k, &value).map_err(|m| ctx.err(cmd.node, m))?;
            globals.set(&k, &value, true);
        }
    }
    let mut froms = Vec::new();
    for stage in &checked.stages {
        let node = stage.from.node;
        let base = expand_in(ctx, node, &node.args[0], &globals)?;
        if base.is_empty() {
            return Err(ctx
                .err(
                    node,
                    format!("base name ({}) should not be blank", node.args[0]),
                )
                .with_hint("pass the ARG it uses with --build-arg or give the ARG a default"));
        }
        let lower = base.to_lowercase();
        let from_stage = checked.stages[..stage.index]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()));
        // A context named like the stage replaces it (BuildKit's `FROM x AS name`).
        let replaced = stage.name.as_deref().and_then(|n| named_context(opts, n));
        let fb = match (replaced, from_stage) {
            (Some(name), _) => FromBase::Context {
                name,
                replaces: true,
            },
            (None, Some(i)) => FromBase::Stage(i),
            (None, None) if lower == "scratch" => FromBase::Scratch,
            (None, None) => match named_context(opts, &base) {
                Some(name) => FromBase::Context {
                    name,
                    replaces: false,
                },
                None => FromBase::Image(base),
            },
        };
        let platform = match stage.from.flags.get("platform") {
            None => None,
            Some(p) => {
                let p = expand_in(ctx, node, p, &globals)?;
                Some(p.parse::<Platform>().map_err(|e| {
                    ctx.err(node, format!("failed to parse platform {p}: {e}"))
                        .pointing_at("--platform")
                })?)
            }
        };
        froms.push((fb, platform));
    }
    let target = match (opts.target_index, &opts.target) {
        (Some(i), _) if i < checked.stages.len() => i,
        (Some(i), _) => {
            return Err(Error::new(
                &ctx.df.file_name,
                format!(
                    "stage {i} does not exist: the Dockerfile has {} stages",
                    checked.stages.len()
                ),
            ))
        }
        (None, None) => checked.stages.len() - 1,
        (None, Some(t)) => {
            let lower = t.to_lowercase();
            match checked
                .stages
                .iter()
                .position(|s| s.name.as_deref() == Some(lower.as_str()))
            {
                Some(i) => i,
                None => {
                    let names: Vec<&str> = checked
                        .stages
                        .iter()
                        .filter_map(|s| s.name.as_deref())
                        .collect();
                    let mut e = Error::new(
                        &ctx.df.file_name,
                        format!("target stage '{t}' could not be found"),
                    );
                    e.hint = Some(match closest(t, names.iter().copied()) {
                        Some(c) => format!("did you mean {c}?"),
                        None if names.is_empty() => {
                            "the Dockerfile names no stage (FROM image AS name)".into()
                        }
                        None => format!("stages are: {}", names.join(", ")),
                    });
                    return Err(e);
                }
            }
        }
    };
    let mut needed = vec![false; checked.stages.len()];
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if needed[i] {
            continue;
        }
        needed[i] = true;
        if let FromBase::Stage(j) = froms[i].0 {
            todo.push(j);
        }
        if let FromBase::Context { replaces: true, .. } = froms[i].0 {
            continue;
        }
        for cmd in &checked.stages[i].commands {
            for dep in stage_refs(ctx, checked, i, cmd, &globals, opts)? {
                todo.push(dep);
            }
        }
    }
    let needed = (0..needed.len()).filter(|i| needed[*i]).collect();
    Ok(Resolved {
        globals,
        froms,
        needed,
        target,
    })
}

/// The `--from` values (COPY, and RUN mounts) of a command, unexpanded.
fn from_words(cmd: &Command) -> Vec<String> {
    let mut out = Vec::new();
    let (name, flags) = match (&cmd.name[..], &cmd.node.child) {
        ("ONBUILD", _) => return out,
        (n, _) => (n, &cmd.flags),
    };
    if name == "COPY" {
        out.extend(flags.get("from").map(str::to_string));
    }
    if name == "RUN" {
        for m in flags.all("mount") {
            for field in split_csv(&m) {
                if let Some((k, v)) = field.split_once('=') {
                    if k.eq_ignore_ascii_case("from") {
                        out.push(v.to_string());
                    }
                }
            }
        }
    }
    out
}

/// Resolves a `--from` value to a Dockerfile stage index, if it names one.
fn stage_by_ref(checked: &Checked, current: usize, word: &str) -> Option<usize> {
    let lower = word.to_lowercase();
    if let Some(i) = checked
        .stages
        .iter()
        .position(|s| s.name.as_deref() == Some(lower.as_str()))
    {
        return Some(i);
    }
    match word.parse::<usize>() {
        Ok(i) if i < current => Some(i),
        _ => None,
    }
}

fn stage_refs(
    ctx: &Ctx,
    checked: &Checked,
    current: usize,
    cmd: &Command,
    globals: &Vars,
    opts: &PlanOptions,
) -> Result<Vec<usize>, Error> {
    let mut out = Vec::new();
    for w in from_words(cmd) {
        let v = expand_in(ctx, cmd.node, &w, globals)?;
        match stage_by_ref(checked, current, &v) {
            Some(i) if i == current => {
                return Err(ctx.err(
                    cmd.node,
                    format!("circular dependency detected on stage: {v}"),
                ))
            }
            Some(i) => out.push(i),
            None if named_context(opts, &v).is_some() => {}
            None => check_not_a_typo(ctx, checked, cmd.node, &v)?,
        }
    }
    Ok(out)
}

/// A `--from` that is no stage but is one typo away from a stage name is most likely a
/// mistake, not an image on Docker Hub: say so instead of pulling `biulder`.
fn check_not_a_typo(ctx: &Ctx, checked: &Checked, node: &Node, v: &str) -> Result<(), Error> {
    if v.contains([':', '/', '@']) {
        return Ok(());
    }
    if let Ok(i) = v.parse::<usize>() {
        return Err(ctx
            .err(
                node,
                format!("invalid stage index {i}: a stage can only use stages before it"),
            )
            .pointing_at(v));
    }
    let names = checked.stages.iter().filter_map(|s| s.name.as_deref());
    if let Some(c) = closest(v, names) {
        return Err(ctx
            .err(node, format!("stage '{v}' not found"))
            .pointing_at(v)
            .with_hint(format!("did you mean {c}?")));
    }
    Ok(())
}

/// Image references of the stages the target needs, after ARG expansion, in order and
/// without duplicates: fetch their configs and pass them to [`plan`]. `scratch` and
/// stage names are not included.
pub fn base_images(df: &Dockerfile, opts: &PlanOptions) -> Result<Vec<String>, Error> {
    let ctx = Ctx { df };
    let checked = check(&ctx, df)?;
    let r = resolve(&ctx, &checked, opts)?;
    let mut out: Vec<String> = Vec::new();
    for &i in &r.needed {
        if let FromBase::Image(img) = &r.froms[i].0 {
            if !out.contains(img) {
                out.push(img.clone());
            }
        }
    }
    Ok(out)
}

/// Like [`base_images`], with the platform each image is needed for: the stage's
/// `FROM --platform` when given, else the target platform. One entry per distinct pair.
pub fn base_images_with_platforms(
    df: &Dockerfile,
    opts: &PlanOptions,
) -> Result<Vec<(String, Platform)>, Error> {
    let ctx = Ctx { df };
    let checked = check(&ctx, df)?;
    let r = resolve(&ctx, &checked, opts)?;
    let mut out: Vec<(String, Platform)> = Vec::new();
    for &i in &r.needed {
        if let (FromBase::Image(img), platform) = &r.froms[i] {
            let entry = (
                img.clone(),
                platform
                    .clone()
                    .unwrap_or_else(|| opts.target_platform.clone()),
            );
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    Ok(out)
}

/// The named contexts the needed stages start from (`FROM name`, or a stage a context
/// replaces), with the platform each is needed for, as [`base_images_with_platforms`]: resolve
/// them and pass their configs to [`plan`] under [`context_key`].
pub fn base_contexts_with_platforms(
    df: &Dockerfile,
    opts: &PlanOptions,
) -> Result<Vec<(String, Platform)>, Error> {
    let ctx = Ctx { df };
    let checked = check(&ctx, df)?;
    let r = resolve(&ctx, &checked, opts)?;
    let mut out: Vec<(String, Platform)> = Vec::new();
    for &i in &r.needed {
        if let (FromBase::Context { name, .. }, platform) = &r.froms[i] {
            let entry = (
                name.clone(),
                platform
                    .clone()
                    .unwrap_or_else(|| opts.target_platform.clone()),
            );
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    Ok(out)
}

/// Checks one instruction as planning does (known instruction and flags, argument counts,
/// stage name) and returns its flags: the build checks walk instructions one by one, as
/// BuildKit's, reporting what came before the first bad one.
pub(crate) fn checked_flags(df: &Dockerfile, node: &Node) -> Result<Flags, Error> {
    check_node(&Ctx { df }, node).map(|c| c.flags)
}

/// Checks every instruction (unknown instructions and flags, argument counts, stage
/// names) without planning.
pub fn validate(df: &Dockerfile) -> Result<(), Error> {
    let ctx = Ctx { df };
    check(&ctx, df).map(|_| ())
}

// ---------------------------------------------------------------------------------------
// Phase 2: dispatch.

struct State {
    vars: Vars,
    persisted: Vec<(String, String)>,
    declared_args: Vec<(String, Option<String>)>,
    shell: Vec<String>,
    workdir: String,
    user: String,
    onbuild: Vec<String>,
}

struct Planner<'a> {
    ctx: Ctx<'a>,
    checked: &'a Checked<'a>,
    opts: &'a PlanOptions,
    resolved: &'a Resolved,
    /// Dockerfile stage index -> position in the plan.
    position: Vec<Option<usize>>,
    /// Final state per Dockerfile stage, for stages built on other stages.
    finals: Vec<Option<State>>,
}

/// Plans the build: every stage the target needs, every step typed and expanded.
/// `bases` holds the configs of the images [`base_images`] named; a missing entry is
/// taken as an empty config.
pub fn plan(
    df: &Dockerfile,
    opts: &PlanOptions,
    bases: &HashMap<String, BaseImageInfo>,
) -> Result<BuildPlan, Error> {
    let ctx = Ctx { df };
    let checked = check(&ctx, df)?;
    let resolved = resolve(&ctx, &checked, opts)?;
    let n = checked.stages.len();
    let mut position = vec![None; n];
    for (p, &i) in resolved.needed.iter().enumerate() {
        position[i] = Some(p);
    }
    let mut planner = Planner {
        ctx: Ctx { df },
        checked: &checked,
        opts,
        resolved: &resolved,
        position,
        finals: (0..n).map(|_| None).collect(),
    };
    let mut stages = Vec::new();
    for &i in &resolved.needed {
        stages.push(planner.stage(i, bases)?);
    }
    let target = planner.position[resolved.target].unwrap_or(0);
    let sbom_scan = sbom_scan(&stages, target, &resolved.globals);
    Ok(BuildPlan {
        stages,
        target,
        sbom_scan,
    })
}

/// Which stages' and whether the context's SBOMs are asked for, as BuildKit's
/// `toDispatchState`: per stage, the global ARG's value, then the stage's own ARGs'.
fn sbom_scan(stages: &[Stage], target: usize, globals: &Vars) -> SbomScan {
    let mut out = SbomScan::default();
    for (position, stage) in stages.iter().enumerate() {
        let name = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", stage.index));
        let enabled = |arg: &str| {
            let mut on = globals.get(arg).is_some_and(|v| enabled_for(&name, v));
            for step in &stage.steps {
                if let Instruction::Arg(args) = &step.instruction {
                    for (k, v) in args {
                        if let (true, Some(v)) = (k == arg, v) {
                            on = enabled_for(&name, v);
                        }
                    }
                }
            }
            on
        };
        if position == target {
            out.context = enabled("BUILDKIT_SBOM_SCAN_CONTEXT");
        } else if enabled("BUILDKIT_SBOM_SCAN_STAGE") {
            out.stages.push((position, name));
        }
    }
    out
}

/// BuildKit's `isEnabledForStage`: a boolean, else a list of stage names.
fn enabled_for(stage: &str, value: &str) -> bool {
    match ossb_protocol::parse_bool(value) {
        Some(b) => b,
        None => value.split(',').any(|n| n == stage),
    }
}

/// The `--build-arg` names no ARG of the build declares, sorted, for the warning the classic
/// Docker builder prints (`One or more build-args [FOO] were not consumed`). As there, an ARG
/// before the first FROM or in any stage up to the target consumes it (the classic builder
/// runs every stage up to the target), and the proxy arguments never need one, nor
/// `BUILDKIT_DOCKERFILE_CHECK`, which configures the build checks.
pub fn unused_build_args(df: &Dockerfile, opts: &PlanOptions) -> Vec<String> {
    let ctx = Ctx { df };
    let Ok(checked) = check(&ctx, df) else {
        return Vec::new();
    };
    let target = match (opts.target_index, &opts.target) {
        (Some(i), _) => i,
        (None, Some(t)) => {
            let lower = t.to_lowercase();
            match checked
                .stages
                .iter()
                .position(|s| s.name.as_deref() == Some(lower.as_str()))
            {
                Some(i) => i,
                None => return Vec::new(),
            }
        }
        (None, None) => checked.stages.len() - 1,
    };
    let declared: std::collections::HashSet<String> = checked
        .meta_args
        .iter()
        .chain(
            checked
                .stages
                .iter()
                .take(target + 1)
                .flat_map(|s| s.commands.iter().filter(|c| c.name == "ARG")),
        )
        .flat_map(|c| arg_pairs(c.node).into_iter().map(|(k, _)| k))
        .collect();
    opts.build_args
        .keys()
        .filter(|k| {
            !declared.contains(*k)
                && !PROXY_ARGS.contains(&k.as_str())
                && k.as_str() != crate::checks::CHECK_BUILD_ARG
        })
        .cloned()
        .collect()
}

fn location(df: &Dockerfile, node: &Node) -> Location {
    Location {
        file: df.file_name.clone(),
        start_line: node.start_line,
        end_line: node.end_line,
    }
}

fn set_env(env: &mut Vec<(String, String)>, k: &str, v: &str) {
    match env.iter_mut().find(|e| e.0 == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    }
}

impl Planner<'_> {
    fn err(&self, node: &Node, m: impl Into<String>) -> Error {
        self.ctx.err(node, m)
    }

    fn stage(&mut self, i: usize, bases: &HashMap<String, BaseImageInfo>) -> Result<Stage, Error> {
        let raw = &self.checked.stages[i];
        let df = self.ctx.df;
        let (fb, platform) = self.resolved.froms[i].clone();
        // A stage a named context replaces is the context as it is: no steps of its own.
        let replaced = matches!(fb, FromBase::Context { replaces: true, .. });
        let (base, mut state) = match fb {
            FromBase::Scratch => (Base::Scratch, self.initial_state(&BaseImageInfo::default())),
            FromBase::Context { ref name, .. } => {
                let info = bases.get(&context_key(name)).cloned().unwrap_or_default();
                (Base::Context(name.clone()), self.initial_state(&info))
            }
            FromBase::Image(r) => {
                let info = bases.get(&r).cloned().unwrap_or_default();
                (Base::Image(r), self.initial_state(&info))
            }
            FromBase::Stage(j) => {
                let parent = self.finals[j].as_ref().map(|s| State {
                    vars: Vars {
                        vars: s
                            .persisted
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone(), false))
                            .collect(),
                    },
                    persisted: s.persisted.clone(),
                    declared_args: Vec::new(),
                    shell: s.shell.clone(),
                    workdir: s.workdir.clone(),
                    user: s.user.clone(),
                    onbuild: s.onbuild.clone(),
                });
                let state = parent.unwrap_or_else(|| self.initial_state(&BaseImageInfo::default()));
                (Base::Stage(self.position[j].unwrap_or(0)), state)
            }
        };
        let from_loc = location(df, raw.from.node);
        let mut steps = Vec::new();
        // The base's ONBUILD triggers run first and are not inherited further.
        let triggers = std::mem::take(&mut state.onbuild);
        for trigger in triggers.into_iter().filter(|_| !replaced) {
            let tdf = parse(&trigger, &df.file_name).map_err(|e| {
                self.err(
                    raw.from.node,
                    format!(
                        "failed to parse ONBUILD trigger {trigger:?} of the base image: {}",
                        e.message
                    ),
                )
            })?;
            let tctx = Ctx { df: &tdf };
            for node in &tdf.instructions {
                let cmd = check_node(&tctx, node).map_err(|e| {
                    self.err(
                        raw.from.node,
                        format!(
                            "ONBUILD trigger {trigger:?} of the base image: {}",
                            e.message
                        ),
                    )
                })?;
                if matches!(cmd.name.as_str(), "FROM" | "ONBUILD" | "MAINTAINER") {
                    return Err(self.err(
                        raw.from.node,
                        format!("{} isn't allowed as an ONBUILD trigger", cmd.name),
                    ));
                }
                let step = self.dispatcher(&tdf).dispatch(i, &cmd, &mut state);
                let mut step = step.map_err(|e| {
                    let mut e2 = self.err(
                        raw.from.node,
                        format!("ONBUILD trigger {trigger:?}: {}", e.message),
                    );
                    e2.hint = e.hint;
                    e2
                })?;
                step.location = from_loc.clone();
                steps.push(step);
            }
        }
        let d = self.dispatcher(df);
        for cmd in raw.commands.iter().filter(|_| !replaced) {
            steps.push(d.dispatch(i, cmd, &mut state)?);
        }
        let stage = Stage {
            index: i,
            name: raw.name.clone(),
            base,
            platform,
            steps,
            env: state.persisted.clone(),
            working_dir: state.workdir.clone(),
            user: state.user.clone(),
            location: from_loc,
        };
        self.finals[i] = Some(state);
        Ok(stage)
    }

    fn dispatcher<'b>(&'b self, df: &'b Dockerfile) -> Dispatcher<'b> {
        Dispatcher {
            ctx: Ctx { df },
            checked: self.checked,
            opts: self.opts,
            resolved: self.resolved,
            position: &self.position,
        }
    }

    fn initial_state(&self, info: &BaseImageInfo) -> State {
        let mut persisted = info.env.clone();
        if !persisted.iter().any(|(k, _)| k == "PATH") {
            persisted.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        State {
            vars: Vars {
                vars: persisted
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone(), false))
                    .collect(),
            },
            persisted,
            declared_args: Vec::new(),
            shell: if info.shell.is_empty() {
                DEFAULT_SHELL.iter().map(|s| s.to_string()).collect()
            } else {
                info.shell.clone()
            },
            workdir: if info.working_dir.is_empty() {
                "/".into()
            } else {
                info.working_dir.clone()
            },
            user: info.user.clone(),
            onbuild: info.onbuild.clone(),
        }
    }
}

/// Expands and types one instruction of a stage; borrows what planning knows.
struct Dispatcher<'b> {
    ctx: Ctx<'b>,
    checked: &'b Checked<'b>,
    opts: &'b PlanOptions,
    resolved: &'b Resolved,
    position: &'b [Option<usize>],
}

impl Dispatcher<'_> {
    fn err(&self, node: &Node, m: impl Into<String>) -> Error {
        self.ctx.err(node, m)
    }

    fn expand(&self, node: &Node, word: &str, st: &State) -> Result<String, Error> {
        expand_in(&self.ctx, node, word, &st.vars)
    }

    fn source(&self, node: &Node, stage: usize, word: &str) -> Result<Source, Error> {
        let v = expand_in(&self.ctx, node, word, &self.resolved.globals)?;
        match stage_by_ref(self.checked, stage, &v) {
            Some(j) => match self.position[j] {
                Some(p) => Ok(Source::Stage(p)),
                None => Err(self.err(node, format!("stage {v} is not part of the build"))),
            },
            None => match named_context(self.opts, &v) {
                Some(name) => Ok(Source::Context(name)),
                None => {
                    check_not_a_typo(&self.ctx, self.checked, node, &v)?;
                    Ok(Source::Image(v))
                }
            },
        }
    }

    fn dispatch(&self, stage: usize, cmd: &Command, st: &mut State) -> Result<Step, Error> {
        let node = cmd.node;
        let df = self.ctx.df;
        let loc = location(df, node);
        let args = &node.args;
        let (instruction, created_by) = match cmd.name.as_str() {
            "ENV" | "LABEL" => {
                // Every pair is expanded with the environment from before the instruction, as
                // BuildKit does (`ENV a=2 b=$a` gives b the old a).
                let mut pairs = Vec::new();
                for c in args.chunks(3) {
                    let k = self.expand(node, &c[0], st)?;
                    let v = self.expand(node, &c[1], st)?;
                    pairs.push((k, v));
                }
                if cmd.name == "ENV" {
                    for (k, v) in &pairs {
                        self.check_variable(node, k, v)?;
                        st.vars.set(k, v, false);
                        set_env(&mut st.persisted, k, v);
                    }
                }
                let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let created = format!("{} {}", cmd.name, text.join(" "));
                if cmd.name == "ENV" {
                    (Instruction::Env(pairs), created)
                } else {
                    (Instruction::Label(pairs), created)
                }
            }
            "MAINTAINER" => {
                let m = args[0].clone();
                (
                    Instruction::Maintainer(m.clone()),
                    format!("MAINTAINER {m}"),
                )
            }
            "WORKDIR" => {
                let p = self.expand(node, &args[0], st)?;
                let wd = if p.starts_with('/') {
                    clean_path(&p)
                } else {
                    clean_path(&format!("{}/{p}", st.workdir))
                };
                st.workdir = wd.clone();
                (Instruction::Workdir(wd.clone()), format!("WORKDIR {wd}"))
            }
            "USER" => {
                let u = self.expand(node, &args[0], st)?;
                st.user = u.clone();
                (Instruction::User(u.clone()), format!("USER {u}"))
            }
            "EXPOSE" => {
                let mut raw = args.clone();
                raw.sort();
                let mut ports = Vec::new();
                for p in &raw {
                    let words = lexer(df)
                        .process_words(p, &st.vars)
                        .map_err(|e| self.err(node, e.message))?;
                    for w in words {
                        ports.extend(parse_port(&w).map_err(|m| self.err(node, m).pointing_at(p))?);
                    }
                }
                let created = format!("EXPOSE [{}]", ports.join(" "));
                (Instruction::Expose(ports), created)
            }
            "VOLUME" => {
                let mut vols = Vec::new();
                for v in args {
                    let v = self.expand(node, v, st)?;
                    let v = v.trim_matches(char::is_whitespace).to_string();
                    if v.is_empty() {
                        return Err(self.err(node, "VOLUME specified can not be an empty string"));
                    }
                    vols.push(v);
                }
                let created = format!("VOLUME [{}]", vols.join(" "));
                (Instruction::Volume(vols), created)
            }
            "STOPSIGNAL" => {
                let s = self.expand(node, &args[0], st)?;
                if !valid_signal(&s) {
                    return Err(self
                        .err(node, format!("Invalid signal: {s}"))
                        .with_hint("use a signal name such as SIGTERM or a number"));
                }
                (
                    Instruction::StopSignal(s.clone()),
                    format!("STOPSIGNAL {s}"),
                )
            }
            "SHELL" => {
                st.shell = args.clone();
                (
                    Instruction::Shell(args.clone()),
                    format!("SHELL [{}]", args.join(" ")),
                )
            }
            "CMD" | "ENTRYPOINT" => {
                let argv = if node.json {
                    args.clone()
                } else if args.is_empty() && cmd.name == "ENTRYPOINT" {
                    Vec::new()
                } else {
                    let mut v = st.shell.clone();
                    v.push(args.join(" "));
                    v
                };
                let created = format!("{} {}", cmd.name, go_quote_list(&argv));
                if cmd.name == "CMD" {
                    (Instruction::Cmd(argv), created)
                } else {
                    (Instruction::Entrypoint(argv), created)
                }
            }
            "HEALTHCHECK" => {
                let h = self.healthcheck(cmd, st)?;
                let created = format!("HEALTHCHECK {}", healthcheck_text(&h));
                (Instruction::Healthcheck(h), created)
            }
            "ONBUILD" => {
                let expr = onbuild_expression(node);
                st.onbuild.push(expr.clone());
                (Instruction::OnBuild(expr), String::new())
            }
            "ARG" => self.arg(node, st)?,
            "RUN" => self.run(stage, cmd, st)?,
            "COPY" | "ADD" => self.copy(stage, cmd, st)?,
            other => return Err(self.err(node, format!("unknown instruction: {other}"))),
        };
        Ok(Step {
            location: loc,
            instruction,
            created_by,
        })
    }

    fn check_variable(&self, node: &Node, name: &str, value: &str) -> Result<(), Error> {
        check_variable(name, value).map_err(|m| {
            self.err(node, m)
                .with_hint("pass large data as a file (COPY, or RUN --mount=type=secret) instead")
        })
    }

    fn arg(&self, node: &Node, st: &mut State) -> Result<(Instruction, String), Error> {
        let mut out = Vec::new();
        let mut texts = Vec::new();
        for (k, default) in arg_pairs(node) {
            // ARG names are expanded too (`ARG ${name}=value`).
            let k = if k.contains('$') {
                self.expand(node, &k, st)?
            } else {
                k
            };
            let value = if let Some(v) = self.opts.build_args.get(&k) {
                Some(v.clone())
            } else if let Some(d) = default {
                Some(self.expand(node, &d, st)?)
            } else {
                self.resolved.globals.get(&k).map(str::to_string)
            };
            if let Some(v) = &value {
                self.check_variable(node, &k, v)?;
            }
            // An ENV of the same name wins over the ARG, in expansion and in RUN; the SBOM
            // scan's args steer the scan only.
            if let (Some(v), false) = (
                &value,
                st.vars.is_env(&k) || SBOM_SCAN_ARGS.contains(&k.as_str()),
            ) {
                st.vars.set(&k, v, true);
            }
            st.declared_args.push((k.clone(), value.clone()));
            texts.push(match &value {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            });
            out.push((k, value));
        }
        Ok((Instruction::Arg(out), format!("ARG {}", texts.join(" "))))
    }

    fn run(&self, stage: usize, cmd: &Command, st: &State) -> Result<(Instruction, String), Error> {
        let node = cmd.node;
        let mut argv: Vec<String> = node.args.clone();
        let mut heredocs = Vec::new();
        if !node.heredocs.is_empty() && !node.json {
            let first = &node.heredocs[0];
            if argv.len() == 1 && parse_heredoc(&argv[0]).is_some() {
                let data = if first.chomp {
                    chomp(&first.content)
                } else {
                    first.content.clone()
                };
                if data.starts_with("#!") {
                    let path = format!("/dev/pipes/{}", first.name);
                    heredocs.push(InlineFile {
                        name: path.clone(),
                        content: data,
                        mode: 0o755,
                    });
                    argv = vec![path];
                } else {
                    argv = vec![data];
                }
            } else {
                let mut b = argv.join(" ");
                for h in &node.heredocs {
                    b.push('\n');
                    b.push_str(&h.content);
                    b.push_str(&h.name);
                }
                argv = vec![b];
            }
        }
        let shell_form = !node.json;
        if shell_form {
            let mut v = st.shell.clone();
            v.push(argv.join(" "));
            argv = v;
        }
        let mut mounts = Vec::new();
        for m in cmd.flags.all("mount") {
            mounts.push(self.mount(stage, node, &m, st)?);
        }
        // As BuildKit: the Nth ssh mount of a step is /run/buildkit/ssh_agent.N by default.
        for (n, m) in mounts
            .iter_mut()
            .filter(|m| m.kind == MountType::Ssh)
            .enumerate()
        {
            if m.target.is_empty() {
                m.target = format!("/run/buildkit/ssh_agent.{n}");
            }
        }
        let network = match cmd.flags.get("network").map(str::to_lowercase).as_deref() {
            // As BuildKit: the build's --network is the default of the steps that name none.
            None | Some("default" | "sandbox") => self.opts.network,
            Some(mode) => mode.parse().map_err(|_| {
                self.err(node, format!("unsupported network mode {mode:?}"))
                    .pointing_at("--network")
                    .with_hint("use --network=default, none or host")
            })?,
        };
        let security = match cmd.flags.get("security").map(str::to_lowercase).as_deref() {
            None | Some("sandbox") => Security::Sandbox,
            Some("insecure") => Security::Insecure,
            Some(other) => {
                return Err(self
                    .err(node, format!("unsupported security mode {other:?}"))
                    .pointing_at("--security")
                    .with_hint("use --security=sandbox or insecure"))
            }
        };
        let mut build_env = st.vars.pairs(true);
        for p in PROXY_ARGS {
            if let Some(v) = self.opts.build_args.get(p) {
                if !build_env.iter().any(|(k, _)| k == p) {
                    build_env.push((p.to_string(), v.clone()));
                }
            }
        }
        // History: `RUN |N K=V ... argv # buildkit`, the declared ARGs with their values.
        let mut hist: Vec<(String, String)> = Vec::new();
        for (k, v) in &st.declared_args {
            let val = st
                .vars
                .get(k)
                .map(str::to_string)
                .or_else(|| v.clone())
                .unwrap_or_default();
            match hist.iter_mut().find(|e| &e.0 == k) {
                Some(e) => e.1 = val,
                None => hist.push((k.clone(), val)),
            }
        }
        let mut parts: Vec<String> = Vec::new();
        if !hist.is_empty() {
            parts.push(format!("|{}", hist.len()));
            parts.extend(hist.iter().map(|(k, v)| format!("{k}={v}")));
        }
        parts.extend(argv.iter().cloned());
        let created = format!("RUN {} # buildkit", parts.join(" "));
        let run = Run {
            argv,
            shell_form,
            build_env,
            working_dir: st.workdir.clone(),
            user: st.user.clone(),
            mounts,
            network,
            security,
            extra_hosts: self.opts.extra_hosts.clone(),
            heredocs,
        };
        Ok((Instruction::Run(run), created))
    }

    fn mount(&self, stage: usize, node: &Node, spec: &str, st: &State) -> Result<Mount, Error> {
        let bad = |m: String| self.err(node, m).pointing_at("--mount");
        let mut m = Mount {
            kind: MountType::Bind,
            target: String::new(),
            source: None,
            from: None,
            read_only: true,
            id: None,
            sharing: Sharing::Shared,
            mode: None,
            uid: None,
            gid: None,
            required: false,
            size: None,
            env: None,
        };
        let mut ro_auto = true;
        let mut read_only = false;
        let parse_bool = |key: &str, v: &str| match v.to_lowercase().as_str() {
            "1" | "t" | "true" => Ok(true),
            "0" | "f" | "false" => Ok(false),
            _ => Err(bad(format!("invalid value for {key}: {v}"))),
        };
        for field in split_csv(spec) {
            let (key, value) = match field.split_once('=') {
                Some((k, v)) => (k.to_lowercase(), Some(v)),
                None => (field.to_lowercase(), None),
            };
            let Some(value) = value else {
                match key.as_str() {
                    "readonly" | "ro" => {
                        read_only = true;
                        ro_auto = false;
                    }
                    "readwrite" | "rw" => {
                        read_only = false;
                        ro_auto = false;
                    }
                    "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                        m.required = true
                    }
                    "required" => {
                        return Err(bad(format!(
                            "unexpected key 'required' for mount type '{}'",
                            mount_name(m.kind)
                        )))
                    }
                    _ => {
                        return Err(bad(format!(
                            "invalid field '{field}' must be a key=value pair"
                        )))
                    }
                }
                continue;
            };
            let value = if key == "from" {
                value.to_string()
            } else {
                self.expand(node, value, st)?
            };
            match key.as_str() {
                "type" => {
                    m.kind = match value.to_lowercase().as_str() {
                        "bind" => MountType::Bind,
                        "cache" => MountType::Cache,
                        "secret" => MountType::Secret,
                        "ssh" => MountType::Ssh,
                        "tmpfs" => MountType::Tmpfs,
                        _ => {
                            let mut e = bad(format!("unsupported mount type {value:?}"));
                            if let Some(c) =
                                closest(&value, ["bind", "cache", "secret", "ssh", "tmpfs"])
                            {
                                e = e.with_hint(format!("did you mean {c}?"));
                            }
                            return Err(e);
                        }
                    }
                }
                "from" => m.from = Some(self.source(node, stage, &value)?),
                "source" | "src" => m.source = Some(value),
                "target" | "dst" | "destination" => m.target = value,
                "readonly" | "ro" => {
                    read_only = parse_bool(&key, &value)?;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    read_only = !parse_bool(&key, &value)?;
                    ro_auto = false;
                }
                "required" => {
                    if !matches!(m.kind, MountType::Secret | MountType::Ssh) {
                        return Err(bad(format!(
                            "unexpected key 'required' for mount type '{}'",
                            mount_name(m.kind)
                        )));
                    }
                    m.required = parse_bool(&key, &value)?;
                }
                "size" => {
                    if m.kind != MountType::Tmpfs {
                        return Err(bad(format!(
                            "unexpected key 'size' for mount type '{}'",
                            mount_name(m.kind)
                        )));
                    }
                    m.size = Some(
                        parse_size(&value)
                            .ok_or_else(|| bad(format!("invalid value for size: {value}")))?,
                    );
                }
                "id" => m.id = Some(value),
                "sharing" => {
                    m.sharing = match value.to_lowercase().as_str() {
                        "shared" => Sharing::Shared,
                        "private" => Sharing::Private,
                        "locked" => Sharing::Locked,
                        _ => return Err(bad(format!("unsupported sharing value {value:?}"))),
                    }
                }
                "mode" => {
                    m.mode = Some(
                        u32::from_str_radix(&value, 8)
                            .map_err(|_| bad(format!("invalid value {value} for mode")))?,
                    )
                }
                "uid" => {
                    m.uid = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("invalid value {value} for uid")))?,
                    )
                }
                "gid" => {
                    m.gid = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("invalid value {value} for gid")))?,
                    )
                }
                "env" => m.env = Some(value),
                _ => {
                    let keys = [
                        "type",
                        "from",
                        "source",
                        "target",
                        "readonly",
                        "id",
                        "sharing",
                        "required",
                        "size",
                        "mode",
                        "uid",
                        "gid",
                        "src",
                        "dst",
                        "destination",
                        "ro",
                        "rw",
                        "readwrite",
                        "env",
                    ];
                    let mut e = bad(format!("unexpected key '{key}' in '{field}'"));
                    if let Some(c) = closest(&key, keys) {
                        e = e.with_hint(format!("did you mean {c}?"));
                    }
                    return Err(e);
                }
            }
        }
        let file_info = matches!(
            m.kind,
            MountType::Secret | MountType::Ssh | MountType::Cache
        );
        if !file_info {
            for (set, what) in [
                (m.mode.is_some(), "mode"),
                (m.uid.is_some(), "uid"),
                (m.gid.is_some(), "gid"),
            ] {
                if set {
                    return Err(bad(format!(
                        "{what} not allowed for {:?} type mounts",
                        mount_name(m.kind)
                    )));
                }
            }
        }
        m.read_only = if ro_auto {
            !matches!(m.kind, MountType::Cache | MountType::Tmpfs)
        } else {
            read_only
        };
        match m.kind {
            MountType::Secret => {
                if m.target.is_empty() && m.env.is_none() {
                    let id = m.id.clone().unwrap_or_default();
                    if id.is_empty() {
                        return Err(bad("one of target or id required for secret mount".into()));
                    }
                    m.target = format!("/run/secrets/{id}");
                }
                if m.id.as_deref().unwrap_or("").is_empty() && !m.target.is_empty() {
                    m.id = Some(m.target.rsplit('/').next().unwrap_or("").to_string());
                }
            }
            MountType::Ssh => {
                if m.id.as_deref().unwrap_or("").is_empty() {
                    m.id = Some("default".into());
                }
                // The default target depends on the other ssh mounts: set by `run`.
            }
            _ => {
                if m.target.is_empty() {
                    return Err(bad("mount target is required: write target=/path".into()));
                }
            }
        }
        if m.kind == MountType::Cache && m.id.as_deref().unwrap_or("").is_empty() {
            m.id = Some(m.target.clone());
        }
        if !m.target.is_empty() && !m.target.starts_with('/') {
            m.target = clean_path(&format!("{}/{}", st.workdir, m.target));
        }
        Ok(m)
    }

    fn copy(
        &self,
        stage: usize,
        cmd: &Command,
        st: &State,
    ) -> Result<(Instruction, String), Error> {
        let node = cmd.node;
        let f = &cmd.flags;
        let opt = |name: &str| -> Result<Option<String>, Error> {
            match f.get(name) {
                None => Ok(None),
                Some(v) => {
                    let v = self.expand(node, v, st)?;
                    Ok((!v.is_empty()).then_some(v))
                }
            }
        };
        let chown = opt("chown")?;
        let chmod = opt("chmod")?;
        if let Some(c) = &chmod {
            if u32::from_str_radix(c, 8).is_err() && !c.contains(['+', '-', '=']) {
                return Err(self
                    .err(node, format!("invalid chmod parameter {c:?}"))
                    .pointing_at("--chmod")
                    .with_hint("use an octal mode such as 0755 or a symbolic one such as u+x"));
            }
        }
        // As BuildKit: a linked copy is made without the layers below, whose /etc/passwd and
        // /etc/group would name an owner (its solver fails with "invalid user index: -1").
        if let (true, None, Some(c)) = (f.bool("link"), &chmod, &chown) {
            if let Some(name) = owner_name(c) {
                return Err(self
                    .err(
                        node,
                        format!(
                            "--chown={c}: {name:?} is a name, and COPY --link does not read the \
                             layers below, whose /etc/passwd and /etc/group would say who it is"
                        ),
                    )
                    .pointing_at("--chown")
                    .with_hint("give numeric ids (--chown=1000:1000), or drop --link"));
            }
        }
        let checksum = opt("checksum")?;
        let from = match f.get("from") {
            Some(w) => Some(self.source(node, stage, w)?),
            None => None,
        };
        let mut exclude = Vec::new();
        for e in f.all("exclude") {
            exclude.push(self.expand(node, &e, st)?);
        }
        let args = &node.args;
        let n = args.len();
        let mut sources = Vec::new();
        let mut heredocs = Vec::new();
        let mut hist_sources = Vec::new();
        let mut hist_docs = Vec::new();
        for src in &args[..n - 1] {
            if let Some(h) = parse_heredoc(src) {
                let doc = node.heredocs.iter().find(|d| d.name == h.name);
                let mut content = doc.map(|d| d.content.clone()).unwrap_or_default();
                if h.chomp {
                    content = chomp(&content);
                }
                if h.expand {
                    let lex = Lexer {
                        skip_process_quotes: true,
                        ..lexer(self.ctx.df)
                    };
                    content = lex
                        .process_word(&content, &st.vars)
                        .map_err(|e| self.err(node, e.message))?;
                }
                hist_docs.push(format!("<<{}", h.name));
                heredocs.push(InlineFile {
                    name: h.name,
                    content,
                    mode: 0o644,
                });
            } else {
                let s = self.expand(node, src, st)?;
                hist_sources.push(s.clone());
                sources.push(s);
            }
        }
        let dest_raw = self.expand(node, &args[n - 1], st)?;
        let dest = resolve_dest(&st.workdir, &dest_raw);
        let is_add = cmd.name == "ADD";
        let mut created = cmd.name.clone();
        if f.bool("parents") {
            created.push_str(" --parents");
        }
        if let Some(c) = &chown {
            created.push_str(&format!(" --chown={c}"));
        }
        if let Some(c) = &chmod {
            created.push_str(&format!(" --chmod={c}"));
        }
        for s in hist_sources.iter().chain(hist_docs.iter()) {
            created.push(' ');
            created.push_str(s);
        }
        created.push(' ');
        created.push_str(&dest_raw);
        created.push_str(" # buildkit");
        let copy = Copy {
            sources,
            dest,
            from,
            chown,
            chmod,
            link: f.bool("link"),
            parents: f.bool("parents"),
            exclude,
            heredocs,
            checksum,
            keep_git_dir: f.opt_bool("keep-git-dir"),
            unpack: f.opt_bool("unpack"),
            user: st.user.clone(),
        };
        Ok((
            if is_add {
                Instruction::Add(copy)
            } else {
                Instruction::Copy(copy)
            },
            created,
        ))
    }

    fn healthcheck(&self, cmd: &Command, st: &State) -> Result<Healthcheck, Error> {
        let node = cmd.node;
        let typ = node.args[0].to_uppercase();
        if typ == "NONE" {
            return Ok(Healthcheck {
                test: vec!["NONE".into()],
                interval: None,
                timeout: None,
                start_period: None,
                start_interval: None,
                retries: None,
            });
        }
        let rest = &node.args[1..];
        let test = if node.json {
            let mut t = vec!["CMD".to_string()];
            t.extend(rest.iter().cloned());
            t
        } else {
            vec!["CMD-SHELL".to_string(), rest.join(" ")]
        };
        let _ = st;
        let dur = |name: &str| -> Result<Option<Duration>, Error> {
            match cmd.flags.get(name) {
                None | Some("") => Ok(None),
                Some(v) => {
                    let d = parse_go_duration(v).ok_or_else(|| {
                        self.err(
                            node,
                            format!("time: invalid duration {}", crate::dump::go_quote(v)),
                        )
                        .pointing_at(&format!("--{name}"))
                        .with_hint("write a duration such as 30s, 1m30s or 500ms")
                    })?;
                    if d.is_zero() {
                        return Ok(None);
                    }
                    if d < Duration::from_millis(1) {
                        return Err(
                            self.err(node, format!("Interval {name:?} cannot be less than 1ms"))
                        );
                    }
                    Ok(Some(d))
                }
            }
        };
        let retries = match cmd.flags.get("retries") {
            None | Some("") => None,
            Some(v) => {
                let r: i64 = v.parse().map_err(|_| {
                    self.err(
                        node,
                        format!(
                            "strconv.ParseInt: parsing {}: invalid syntax",
                            crate::dump::go_quote(v)
                        ),
                    )
                })?;
                if r < 0 {
                    return Err(self.err(node, format!("--retries cannot be negative ({r})")));
                }
                Some(
                    u32::try_from(r)
                        .map_err(|_| self.err(node, format!("--retries out of range ({r})")))?,
                )
            }
        };
        Ok(Healthcheck {
            test,
            interval: dur("interval")?,
            timeout: dur("timeout")?,
            start_period: dur("start-period")?,
            start_interval: dur("start-interval")?,
            retries,
        })
    }
}

fn mount_name(k: MountType) -> &'static str {
    match k {
        MountType::Bind => "bind",
        MountType::Cache => "cache",
        MountType::Secret => "secret",
        MountType::Ssh => "ssh",
        MountType::Tmpfs => "tmpfs",
    }
}

/// Splits a mount spec on commas, honouring double quotes (Go's csv reader, simplified).
pub(crate) fn split_csv(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_q = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if in_q && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => in_q = !in_q,
            ',' if !in_q => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|f| !f.is_empty()).collect()
}

/// `10m`, `1g`, `512k`, `100` (bytes), binary units as docker's `RAMInBytes`.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_lowercase();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let num: f64 = s[..digits_end].parse().ok()?;
    let mul: u64 = match s[digits_end..].trim_end_matches(['b', 'i']) {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return None,
    };
    Some((num * mul as f64) as u64)
}

/// Removes the leading tabs of every line (`<<-`).
fn chomp(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}

/// What ONBUILD stores in the image config: the trigger text, heredocs re-attached.
fn onbuild_expression(node: &Node) -> String {
    let orig = node.original.trim_start_matches(char::is_whitespace);
    let mut expr = if orig.len() >= 7 && orig[..7].eq_ignore_ascii_case("onbuild") {
        orig[7..]
            .trim_start_matches(char::is_whitespace)
            .to_string()
    } else {
        orig.to_string()
    };
    for h in &node.heredocs {
        expr.push('\n');
        expr.push_str(&h.content);
        expr.push_str(&h.name);
    }
    expr
}

/// Go's `path.Clean` for absolute paths.
pub(crate) fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

/// BuildKit's destination rule: relative to the working directory, trailing `/` kept.
/// The first user or group of a `--chown` that is a name to look up (not an id, nor `root`,
/// which BuildKit takes as 0 without a lookup).
fn owner_name(chown: &str) -> Option<&str> {
    chown
        .splitn(2, ':')
        .find(|part| *part != "root" && part.parse::<u32>().is_err())
}

fn resolve_dest(workdir: &str, dest: &str) -> String {
    let d = if dest.is_empty() || dest == "." {
        "./"
    } else {
        dest
    };
    let joined = if d.starts_with('/') {
        d.to_string()
    } else {
        format!("{workdir}/{d}")
    };
    let mut c = clean_path(&joined);
    if (d.ends_with('/') || d.ends_with("/.")) && c != "/" {
        c.push('/');
    }
    c
}

fn go_quote_list(v: &[String]) -> String {
    let q: Vec<String> = v.iter().map(|s| crate::dump::go_quote(s)).collect();
    format!("[{}]", q.join(" "))
}

/// `EXPOSE` words: `80`, `80/udp`, `8000-8002/tcp`, `[ip:][host:]container[/proto]`.
fn parse_port(w: &str) -> Result<Vec<String>, String> {
    let (spec, proto) = match w.rsplit_once('/') {
        Some((s, p)) => (s, p.to_lowercase()),
        None => (w, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    let container = spec.rsplit(':').next().unwrap_or(spec);
    let bad = || format!("invalid containerPort: {container}");
    let (a, b) = match container.split_once('-') {
        Some((a, b)) => (
            a.parse::<u16>().map_err(|_| bad())?,
            b.parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let p = container.parse::<u16>().map_err(|_| bad())?;
            (p, p)
        }
    };
    if b < a {
        return Err(format!(
            "invalid range specified for container port: {container}"
        ));
    }
    Ok((a..=b).map(|p| format!("{p}/{proto}")).collect())
}

fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return n > 0 && n < 65;
    }
    let name = s.to_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    if let Some(rt) = name
        .strip_prefix("RTMIN")
        .or_else(|| name.strip_prefix("RTMAX"))
    {
        return rt.is_empty() || rt.trim_start_matches(['+', '-']).parse::<u32>().is_ok();
    }
    const NAMES: [&str; 31] = [
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM",
    ];
    NAMES.contains(&name) || matches!(name, "WINCH" | "XCPU" | "XFSZ" | "UNUSED")
}

/// Go's `time.ParseDuration` for non-negative durations.
pub(crate) fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return None;
        }
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[u..];
        total += num * unit;
    }
    if !total.is_finite() || total > 9.2e9 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// Go's `time.Duration.String` for whole milliseconds and up.
fn go_duration(d: Option<Duration>) -> String {
    let Some(d) = d else { return "0s".into() };
    let total_ns = d.as_nanos();
    if total_ns == 0 {
        return "0s".into();
    }
    if total_ns < 1_000_000_000 {
        let (v, unit) = if total_ns < 1_000 {
            (total_ns as f64, "ns")
        } else if total_ns < 1_000_000 {
            (total_ns as f64 / 1e3, "µs")
        } else {
            (total_ns as f64 / 1e6, "ms")
        };
        return format!("{}{unit}", trim_float(v));
    }
    let secs = d.as_secs();
    let frac = d.subsec_nanos();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    let sv = s as f64 + frac as f64 / 1e9;
    out.push_str(&format!("{}s", trim_float(sv)));
    out
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// `%+v` of BuildKit's HealthcheckConfig, as its history text.
fn healthcheck_text(h: &Healthcheck) -> String {
    format!(
        "{{Test:[{}] Interval:{} Timeout:{} StartPeriod:{} StartInterval:{} Retries:{}}}",
        h.test.join(" "),
        go_duration(h.interval),
        go_duration(h.timeout),
        go_duration(h.start_period),
        go_duration(h.start_interval),
        h.retries.unwrap_or(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_paths_and_destinations() {
        assert_eq!(clean_path("/a/./b/../c//"), "/a/c");
        assert_eq!(resolve_dest("/app", "."), "/app/");
        assert_eq!(resolve_dest("/app", "x/"), "/app/x/");
        assert_eq!(resolve_dest("/app", "/x"), "/x");
    }

    /// `COPY --link --chown=NAME` is refused with its line, as BuildKit (no layers below to
    /// look the name up in); ids, `root`, and `--chmod` (an ordinary copy then) are not.
    #[test]
    fn a_linked_copy_owned_by_a_name_is_refused() {
        let plan_of = |text: &str| {
            let df = parse(&format!("FROM scratch\n{text}\n"), "Dockerfile").unwrap();
            plan(&df, &PlanOptions::default(), &HashMap::new())
        };
        for text in [
            "COPY --link --chown=app a /b",
            "COPY --link --chown=1000:staff a /b",
            "ADD --link --chown=app:1 a /b",
        ] {
            let e = plan_of(text).unwrap_err();
            assert!(
                e.message.contains("COPY --link does not read"),
                "{text}: {e}"
            );
            assert_eq!(e.line, 2, "{text}");
            assert!(e.hint.as_deref().unwrap().contains("numeric ids"), "{text}");
        }
        for text in [
            "COPY --link --chown=1000 a /b",
            "COPY --link --chown=1000:1000 a /b",
            "COPY --link --chown=root:root a /b",
            "COPY --link --chown=app --chmod=644 a /b",
            "COPY --link=false --chown=app a /b",
            "COPY --chown=app a /b",
        ] {
            assert!(plan_of(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn parses_ports_and_durations() {
        assert_eq!(parse_port("80").unwrap(), vec!["80/tcp"]);
        assert_eq!(parse_port("53/UDP").unwrap(), vec!["53/udp"]);
        assert_eq!(parse_port("8000-8002").unwrap().len(), 3);
        assert!(parse_port("http").is_err());
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration(Some(Duration::from_secs(90))), "1m30s");
        assert_eq!(go_duration(Some(Duration::from_millis(500))), "500ms");
    }
}
