//! `ossb build`'s build checks (BuildKit's Dockerfile rules, `ossb_dockerfile::checks`): run
//! beside every build with buildx's summary at the end (a failing check fails the build
//! before it starts under `# check=error=true`), and `--check` / `--call=check|outline|targets`
//! (`,format=json`), which print what buildx prints and build nothing.
//!
//! The checks need the base images' configs (their environment for `UndefinedVar`, their
//! SHELL, their platform): they are resolved here through the build's registry client, beside
//! the build. An image that cannot be resolved is left unknown to the checks, which then say
//! nothing that its config could contradict.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use ossb_dockerfile::checks::{self, BaseImage, CheckOptions, Report};
use ossb_dockerfile::{BaseImageInfo, Dockerfile};
use ossb_engine::{BuildError, BuildRequest, BuildResult, Event};
use ossb_image::oci::ImageConfig;
use ossb_image::registry::{parse_reference, Registry};
use ossb_image::store::BlobStore;
use ossb_protocol::Platform;

use crate::args::ProgressMode;
use crate::display::Display;

/// `--call` and `--check`, as buildx has them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CallFlags {
    /// Evaluate the build another way instead of building: check (the build checks), outline
    /// (the target's build args, secrets, SSH), targets (the stages); add ,format=json for
    /// JSON and, for check, ,ignorestatus=true for exit 0 despite warnings.
    #[arg(long = "call", value_name = "METHOD[,format=json]")]
    pub call: Option<String>,
    /// Shorthand for --call=check.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub check: Option<String>,
}

/// What `--call` asks for instead of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    method: Method,
    json: bool,
    ignore_status: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Check,
    Outline,
    Targets,
}

impl CallFlags {
    /// The call asked for, `None` for a build (buildx's `ParseCallFunc`; `--check` wins).
    pub fn call(&self) -> Result<Option<Call>, String> {
        let check = match self.check.as_deref() {
            None => false,
            Some(v) => {
                parse_bool(v).ok_or_else(|| format!("--check={v}: expected true or false"))?
            }
        };
        let spec = match (check, self.call.as_deref()) {
            (true, Some(c)) => format!("check{}", c.find(',').map(|i| &c[i..]).unwrap_or_default()),
            (true, None) => "check".to_string(),
            (false, Some(c)) => c.to_string(),
            (false, None) => return Ok(None),
        };
        let mut name: Option<String> = None;
        let mut call = Call {
            method: Method::Check,
            json: false,
            ignore_status: false,
        };
        for field in spec.split(',').map(str::trim) {
            match field.split_once('=') {
                Some(("format", "json")) => call.json = true,
                Some(("format", "text" | "")) => call.json = false,
                Some(("format", f)) => {
                    return Err(format!("--call {spec:?}: format={f}: expected json"))
                }
                Some(("ignorestatus", v)) => {
                    call.ignore_status = parse_bool(v).ok_or_else(|| {
                        format!("--call {spec:?}: invalid ignorestatus print value: {v}")
                    })?
                }
                Some(_) => return Err(format!("--call {spec:?}: invalid print field: {field}")),
                None if name.is_some() => {
                    return Err(format!("--call {spec:?}: invalid print value: {spec}"))
                }
                None => name = Some(field.to_string()),
            }
        }
        call.method = match name.as_deref().unwrap_or("build") {
            "build" => return Ok(None),
            "check" | "lint" => Method::Check,
            "outline" => Method::Outline,
            "targets" => Method::Targets,
            other => {
                return Err(format!(
                    "--call {other}: unknown method; ossb has build, check, outline and targets"
                ))
            }
        };
        Ok(Some(call))
    }
}

/// Go's `strconv.ParseBool`.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The checks' options for `request` (its first platform, as BuildKit warns for the first).
fn options(request: &BuildRequest, all_stages: bool) -> CheckOptions {
    let dockerignore = ossb_dockerfile::dockerignore::ignore_file(
        &request.context,
        std::path::Path::new(&request.dockerfile_name),
    )
    .and_then(|p| std::fs::read_to_string(p).ok())
    .and_then(|t| ossb_dockerfile::dockerignore::Dockerignore::parse(&t).ok());
    CheckOptions {
        build_args: request.build_args.clone(),
        target: request.target.clone(),
        all_stages,
        target_platform: request
            .platforms
            .first()
            .cloned()
            .unwrap_or_else(Platform::host),
        build_platform: request
            .build_platform
            .clone()
            .unwrap_or_else(Platform::host),
        dockerignore,
        bases: HashMap::new(),
    }
}

/// Resolves the configs of the base images the checks read, through the build's registry
/// client and blob store; one that fails is left out (unknown to the checks).
async fn resolve_bases(request: &BuildRequest, df: &Dockerfile, opts: &mut CheckOptions) {
    let wanted: Vec<(String, Platform)> = checks::base_images(df, opts)
        .into_iter()
        .filter(|(name, _)| {
            !request
                .build_contexts
                .contains_key(&ossb_dockerfile::context_name(name))
        })
        .collect();
    if wanted.is_empty() {
        return;
    }
    let (Ok(registry), Ok(store)) = (
        Registry::with_config(&request.registry, &request.registry_config),
        BlobStore::open(&request.cache_dir),
    ) else {
        return;
    };
    let fetches = wanted.iter().map(|(name, platform)| {
        let (registry, store) = (&registry, &store);
        async move {
            let config = base_config(registry, store, name, platform).await;
            if let Err(e) = &config {
                tracing::debug!("build checks: the config of {name} is unknown: {e}");
            }
            (name.clone(), config.ok())
        }
    });
    for (name, config) in futures_util::future::join_all(fetches).await {
        if let Some(config) = config {
            let rc = &config.config;
            let info = BaseImageInfo {
                env: rc.env_pairs(),
                onbuild: rc.on_build.clone().unwrap_or_default(),
                working_dir: rc.working_dir.clone().unwrap_or_default(),
                user: rc.user.clone().unwrap_or_default(),
                shell: rc.shell.clone().unwrap_or_default(),
            };
            opts.bases.insert(
                name,
                BaseImage {
                    info,
                    platform: Some(config.platform()),
                },
            );
        }
    }
}

async fn base_config(
    registry: &Registry,
    store: &BlobStore,
    name: &str,
    platform: &Platform,
) -> Result<ImageConfig, String> {
    let reference = parse_reference(name).map_err(|e| e.to_string())?;
    let (_, manifest) = registry
        .resolve(&reference, platform, store)
        .await
        .map_err(|e| e.to_string())?;
    registry
        .pull_blob(&reference, &manifest.config, store, None, None)
        .await
        .map_err(|e| e.to_string())?;
    let bytes = store
        .read(&manifest.config.digest)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Runs the checks of a build's target (its first platform). First as if every base image's
/// config were empty: a real one can only define more (variables, a SHELL), so when that
/// reports no undefined variable and no shell-form CMD/ENTRYPOINT it is the answer, and the
/// build costs no registry round trip; else again with the configs resolved. (A base image
/// of another platform is not reported here: the build's pull refuses it anyway.)
async fn checks_of(
    request: &BuildRequest,
    df: &Dockerfile,
    all_stages: bool,
) -> Result<Report, ossb_dockerfile::Error> {
    let mut opts = options(request, all_stages);
    let config = checks::CheckConfig::for_build(df, &opts.build_args)
        .map_err(|m| ossb_dockerfile::Error::new(&df.file_name, m))?;
    if config.skip_all && !config.experimental_all && config.experimental.is_empty() {
        return Ok(Report {
            config,
            ..Report::default()
        });
    }
    for (name, _) in checks::base_images(df, &opts) {
        opts.bases.insert(name, BaseImage::default());
    }
    let report = checks::check(df, &opts)?;
    let base_dependent = [
        checks::rules::UNDEFINED_VAR.name,
        checks::rules::JSON_ARGS_RECOMMENDED.name,
    ];
    if !report
        .warnings
        .iter()
        .any(|w| base_dependent.contains(&w.rule.name))
    {
        return Ok(report);
    }
    opts.bases.clear();
    resolve_bases(request, df, &mut opts).await;
    checks::check(df, &opts)
}

/// A build with its checks: beside it, and their summary after it as buildx prints it
/// (one JSON object per warning with `--progress json`, nothing with `--quiet`). With
/// `# check=error=true` the checks run first and a failing one fails the build (exit 2, a
/// bad Dockerfile) before any step. `build` is the build itself (the engine's, or a
/// cluster's submission), not started yet.
pub async fn build_checked(
    request: &BuildRequest,
    display: &dyn Display,
    mode: ProgressMode,
    build: impl std::future::Future<Output = Result<BuildResult, BuildError>>,
) -> Result<BuildResult, BuildError> {
    let Ok(df) = ossb_dockerfile::parse(&request.dockerfile, &request.dockerfile_name) else {
        // The build reports the parse error.
        return build.await;
    };
    let config = checks::CheckConfig::for_build(&df, &request.build_args)
        .map_err(|m| BuildError::Dockerfile(ossb_dockerfile::Error::new(&df.file_name, m)))?;
    if config.error {
        let report = checks_of(request, &df, false).await?;
        if let Some(violation) = report.violation() {
            summarize(&report, display, mode);
            return Err(BuildError::Dockerfile(
                ossb_dockerfile::Error::new(&df.file_name, violation).with_hint(
                    "the Dockerfile's check=error=true makes a failing check fail the build; the warnings above say what to fix",
                ),
            ));
        }
        let result = build.await;
        summarize(&report, display, mode);
        return result;
    }
    let (report, result) = tokio::join!(checks_of(request, &df, false), build);
    if let Ok(report) = report {
        summarize(&report, display, mode);
    }
    result
}

/// The warnings at the end of a build.
fn summarize(report: &Report, display: &dyn Display, mode: ProgressMode) {
    match mode {
        ProgressMode::Quiet => {}
        ProgressMode::Json => {
            let mut out = std::io::stdout().lock();
            for w in &report.warnings {
                let event = serde_json::json!({
                    "event": "check",
                    "rule": w.rule.name,
                    "description": w.rule.description,
                    "url": w.rule.url,
                    "message": w.message,
                    "line": w.start_line,
                });
                let _ = writeln!(out, "{event}");
            }
        }
        _ => {
            let text = checks::summary(&report.warnings);
            if !text.is_empty() {
                display.event(Event::Info(format!(" {}", text.trim_end())));
            }
        }
    }
}

/// `--call`: prints what buildx prints for it and builds nothing. Exit 0; for check, 1 when a
/// rule reported (unless ignorestatus=true) or the Dockerfile has an error there.
pub fn run_call(call: &Call, request: &BuildRequest) -> ExitCode {
    let file = request.dockerfile_name.as_str();
    let source = request.dockerfile.as_str();
    let df = ossb_dockerfile::parse(source, file);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let printed = |text: String| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    };
    let failed = |e: &ossb_dockerfile::Error| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    match call.method {
        Method::Targets => match df.and_then(|df| checks::targets(&df)) {
            Ok(t) if call.json => printed(format!("{}\n", checks::targets_json(&t, source))),
            Ok(t) => printed(checks::targets_text(&t)),
            Err(e) => return failed(&e),
        },
        Method::Outline => {
            let outline = df.and_then(|df| {
                let mut opts = options(request, false);
                runtime.block_on(resolve_bases(request, &df, &mut opts));
                checks::outline(&df, &opts)
            });
            match outline {
                Ok(o) if call.json => printed(format!("{}\n", checks::outline_json(&o, source))),
                Ok(o) => printed(checks::outline_text(&o)),
                Err(e) => return failed(&e),
            }
        }
        Method::Check => {
            let report = match df {
                Ok(df) => runtime.block_on(lint(request, &df)),
                Err(e) => Report {
                    error: Some(e),
                    ..Report::default()
                },
            };
            if call.json {
                printed(format!("{}\n", checks::lint_json(file, source, &report)));
            } else {
                printed(checks::lint_text(file, source, &report));
            }
            if let Some(e) = &report.error {
                let mut message = e.message.clone();
                if let Some(h) = &e.hint {
                    message.push_str(&format!(" ({h})"));
                }
                eprint!(
                    "error: {}",
                    checks::error_text(file, source, &message, e.line)
                );
                return ExitCode::from(1);
            }
            if !report.warnings.is_empty() && !call.ignore_status {
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// `--call=check`: the checks over every stage (the target's when `--target` is given), then,
/// when they found no error, the planner's view of the target, so an error the build would
/// meet is reported as BuildKit's lint reports it; `error=true` turns warnings into the
/// "lint violation" error.
async fn lint(request: &BuildRequest, df: &Dockerfile) -> Report {
    let mut opts = options(request, request.target.is_none());
    let mut report = match checks::CheckConfig::for_build(df, &opts.build_args) {
        Err(m) => {
            return Report {
                error: Some(ossb_dockerfile::Error::new(&df.file_name, m)),
                ..Report::default()
            }
        }
        Ok(_) => {
            resolve_bases(request, df, &mut opts).await;
            match checks::check(df, &opts) {
                Ok(r) => r,
                Err(e) => {
                    return Report {
                        error: Some(e),
                        ..Report::default()
                    }
                }
            }
        }
    };
    if report.error.is_none() {
        let plan_opts = request.plan_options(&opts.target_platform);
        let bases: HashMap<String, BaseImageInfo> = opts
            .bases
            .iter()
            .map(|(k, v)| (k.clone(), v.info.clone()))
            .collect();
        if let Err(e) = ossb_dockerfile::plan(df, &plan_opts, &bases) {
            report.error = Some(e);
        }
    }
    if report.error.is_none() {
        if let Some(v) = report.violation() {
            report.error = Some(ossb_dockerfile::Error::new(&df.file_name, v));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(call: Option<&str>, check: Option<&str>) -> Result<Option<Call>, String> {
        CallFlags {
            call: call.map(str::to_string),
            check: check.map(str::to_string),
        }
        .call()
    }

    #[test]
    fn parses_call_as_buildx() {
        assert_eq!(call(None, None).unwrap(), None);
        assert_eq!(call(Some("build"), None).unwrap(), None);
        let c = call(None, Some("true")).unwrap().unwrap();
        assert_eq!((c.method, c.json), (Method::Check, false));
        assert_eq!(call(None, Some("false")).unwrap(), None);
        let c = call(Some("check,format=json"), None).unwrap().unwrap();
        assert_eq!((c.method, c.json), (Method::Check, true));
        let c = call(Some("outline,format=json"), None).unwrap().unwrap();
        assert_eq!((c.method, c.json), (Method::Outline, true));
        let c = call(Some("targets"), None).unwrap().unwrap();
        assert_eq!(c.method, Method::Targets);
        let c = call(Some("check,ignorestatus=true"), None)
            .unwrap()
            .unwrap();
        assert!(c.ignore_status);
        for (spec, error) in [
            ("frobnicate", "unknown method"),
            ("check,format=yaml", "expected json"),
            ("check,bogus=1", "invalid print field"),
            ("check,outline", "invalid print value"),
            ("check,ignorestatus=maybe", "invalid ignorestatus"),
        ] {
            let err = call(Some(spec), None).unwrap_err();
            assert!(err.contains(error), "{spec}: {err}");
        }
        assert!(call(None, Some("maybe")).is_err());
    }
}
