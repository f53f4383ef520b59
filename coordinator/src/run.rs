//! A RUN step: from the planned instruction and the stage's state to a sandboxed process.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ossb_dockerfile::Run;
use ossb_image::oci::RuntimeConfig;
use ossb_worker::fs as wfs;
use ossb_worker::sandbox::{self, Isolation, RunSpec};

/// What a RUN needs to know of the build around it.
pub(crate) struct RunContext<'a> {
    /// The stage's rootfs.
    pub rootfs: &'a Path,
    /// The stage's runtime config (ENV) so far.
    pub config: &'a RuntimeConfig,
    /// USER of the stage when the step names none.
    pub default_user: &'a str,
    /// WORKDIR of the stage when the step names none.
    pub default_cwd: &'a str,
    /// The ossb binary, which implements the sandbox subcommand.
    pub sandbox_exe: &'a Path,
    /// The build context (for `--mount=type=bind` without `from`).
    #[allow(dead_code)]
    pub context: &'a Path,
    /// Rootfs of the finished stages, by plan position (for `--mount from=`).
    #[allow(dead_code)]
    pub stages: &'a HashMap<usize, PathBuf>,
    /// The cache directory (for `--mount=type=cache`).
    #[allow(dead_code)]
    pub cache_dir: &'a Path,
    /// How the step is isolated.
    #[allow(dead_code)]
    pub isolation: Isolation,
    /// Secret files by id (`--secret`), for `--mount=type=secret`.
    #[allow(dead_code)]
    pub secrets: &'a BTreeMap<String, PathBuf>,
}

/// Runs `run` in the sandbox; each output line goes to `on_line`. The error is the message
/// for the user.
pub(crate) async fn execute(
    ctx: &RunContext<'_>,
    run: &Run,
    on_line: impl FnMut(&str),
) -> Result<(), String> {
    if !run.heredocs.is_empty() || !run.mounts.is_empty() {
        return Err("RUN --mount and RUN heredocs with a #! line are not supported yet".into());
    }
    let user = if run.user.is_empty() {
        ctx.default_user
    } else {
        &run.user
    };
    let cwd = if run.working_dir.is_empty() {
        ctx.default_cwd
    } else {
        &run.working_dir
    };
    let u = wfs::lookup_user(ctx.rootfs, user).map_err(|e| e.to_string())?;
    wfs::make_workdir(ctx.rootfs, cwd, (u.uid, u.gid)).map_err(|e| e.to_string())?;
    let mut env = ctx.config.env.clone().unwrap_or_default();
    if !env.iter().any(|kv| kv.starts_with("PATH=")) {
        env.push(format!("PATH={}", ossb_dockerfile::DEFAULT_PATH));
    }
    if !env.iter().any(|kv| kv.starts_with("HOME=")) {
        env.push(format!("HOME={}", u.home));
    }
    for (k, v) in &run.build_env {
        // Build args do not override the image's ENV of the same name.
        if !env
            .iter()
            .any(|kv| kv.split_once('=').is_some_and(|(name, _)| name == k))
        {
            env.push(format!("{k}={v}"));
        }
    }
    let spec = RunSpec {
        rootfs: ctx.rootfs.to_path_buf(),
        argv: run.argv.clone(),
        env,
        cwd: cwd.to_string(),
        uid: u.uid,
        gid: u.gid,
        groups: u.groups,
        hostname: "ossb".into(),
    };
    // As BuildKit's message: the command as the process saw it.
    let display = run.argv.join(" ");
    sandbox::run(ctx.sandbox_exe, &spec, &display, on_line)
        .await
        .map_err(|e| e.to_string())
}
