//! A RUN step: from the planned instruction and the stage's state to a sandboxed process.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ossb_dockerfile::{Network, Run, Security};
use ossb_image::layer::Change;
use ossb_image::oci::RuntimeConfig;
use ossb_worker::fs as wfs;
use ossb_worker::mounts::{self, MountSources};
use ossb_worker::overlay::OverlayDirs;
use ossb_worker::sandbox::{self, DevFile, Isolation, RunError, RunSpec};
use ossb_worker::userns::IdMapping;

use crate::error::StepError;

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
    pub context: &'a Path,
    /// Rootfs of the finished stages, by plan position (for `--mount from=`).
    pub stages: &'a HashMap<usize, PathBuf>,
    /// Unpacked images and named contexts, by name (for `--mount from=IMAGE`).
    pub images: &'a HashMap<String, PathBuf>,
    /// The cache directory (for `--mount=type=cache`).
    pub cache_dir: &'a Path,
    /// How the step is isolated.
    pub isolation: Isolation,
    /// Secret files by id (`--secret`), for `--mount=type=secret`.
    pub secrets: &'a BTreeMap<String, ossb_worker::mounts::Secret>,
    /// SSH agent sockets by id (`--ssh`), for `--mount=type=ssh`.
    pub ssh: &'a BTreeMap<String, PathBuf>,
    /// When set, the step runs on this overlay of the rootfs (see `ossb_worker::overlay`).
    pub overlay: Option<&'a OverlayDirs>,
}

/// Runs `run` in the sandbox; each output line goes to `on_line`. Secret values never reach `on_line` or the error: they are masked. Returns the
/// directories made in the rootfs for the working directory before the step ran (on overlayfs
/// they are not in the upper directory).
pub(crate) async fn execute(
    ctx: &RunContext<'_>,
    run: &Run,
    mut on_line: impl FnMut(&str),
) -> Result<Vec<Change>, StepError> {
    if run.security == Security::Insecure {
        return Err(StepError::InsecureRun);
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
    let u = wfs::lookup_user(ctx.rootfs, user)?;
    let workdir = wfs::make_workdir(ctx.rootfs, cwd, (u.uid, u.gid))?;
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
    let dev_files = run
        .heredocs
        .iter()
        .map(|f| match f.name.strip_prefix("/dev/") {
            Some(name) => Ok(DevFile {
                name: name.to_string(),
                content: f.content.clone(),
                mode: f.mode,
            }),
            None => Err(StepError::HeredocNotUnderDev(f.name.clone())),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let sources = MountSources {
        context: ctx.context.to_path_buf(),
        stages: ctx.stages.clone(),
        images: ctx.images.clone(),
        cache_dir: ctx.cache_dir.to_path_buf(),
        secrets: ctx.secrets.clone(),
        ssh: ctx.ssh.clone(),
    };
    let (rootfs, wanted) = (ctx.rootfs.to_path_buf(), run.mounts.clone());
    // May wait for another build's lock on a cache mount.
    let prepared =
        tokio::task::spawn_blocking(move || mounts::prepare(&rootfs, &wanted, &sources)).await??;
    for kv in &prepared.env {
        // A secret exposed as a variable wins over ENV and ARG of the same name.
        let name = kv.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(name));
        env.push(kv.clone());
    }
    if let Some(sock) = &prepared.ssh_auth_sock {
        // As BuildKit: the first agent, unless the step sets its own.
        if !env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
            env.push(format!("SSH_AUTH_SOCK={sock}"));
        }
    }
    let secrets = prepared.secret_values.clone();
    // Kept until the step ends: the sandbox binds it on /etc/hosts.
    let hosts = hosts_file(&run.extra_hosts).map_err(StepError::HostsFile)?;

    let spec = RunSpec {
        rootfs: ctx.rootfs.to_path_buf(),
        argv: run.argv.clone(),
        env,
        cwd: cwd.to_string(),
        uid: u.uid,
        gid: u.gid,
        groups: u.groups,
        hostname: "ossb".into(),
        isolation: effective_isolation(ctx.isolation),
        network: match run.network {
            Network::None => sandbox::Network::None,
            Network::Default | Network::Host => sandbox::Network::Host,
        },
        mounts: prepared.mounts.clone(),
        dev_files,
        hosts: hosts.as_ref().map(|h| h.path().to_path_buf()),
        overlay: ctx.overlay.cloned(),
    };
    // As BuildKit's message: the command as the process saw it.
    let display = run.argv.join(" ");
    let result = sandbox::run(ctx.sandbox_exe, &spec, &display, |line| {
        on_line(&mask(line, &secrets))
    })
    .await;
    let _ = tokio::task::spawn_blocking(move || prepared.cleanup()).await;
    result.map_err(|e| StepError::Run(mask_error(e, &secrets)))?;
    Ok(workdir)
}

/// `err` with every secret value masked in what it shows.
fn mask_error(err: RunError, secrets: &[String]) -> RunError {
    match err {
        RunError::Failed {
            command,
            status,
            code,
            output,
        } => RunError::Failed {
            command: mask(&command, secrets),
            status: mask(&status, secrets),
            code,
            output: output.iter().map(|l| mask(l, secrets)).collect(),
        },
        RunError::Setup(m) => RunError::Setup(mask(&m, secrets)),
    }
}

/// The host's `/etc/hosts` followed by the `--add-host` lines, or `None` when there are none
/// (the step then sees the host's file itself).
fn hosts_file(extra: &[(String, String)]) -> std::io::Result<Option<tempfile::NamedTempFile>> {
    use std::io::Write;
    if extra.is_empty() {
        return Ok(None);
    }
    let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for (name, ip) in extra {
        text.push_str(&format!("{ip}\t{name}\n"));
    }
    let mut file = tempfile::Builder::new().prefix("ossb-hosts-").tempfile()?;
    file.write_all(text.as_bytes())?;
    // Readable by the step's user, whoever it is (a tempfile is 0600).
    std::fs::set_permissions(
        file.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    Ok(Some(file))
}

/// The isolation a step runs with: `auto` stays auto, the rootless sandbox adapting to what
/// the pod allows (a forced `rootless` never adapts), when the build runs in its user
/// namespace (the CLI entered it); chroot otherwise (it fell back).
fn effective_isolation(asked: Isolation) -> Isolation {
    match asked {
        Isolation::Auto if IdMapping::current().is_some() => Isolation::Auto,
        Isolation::Auto => Isolation::Chroot,
        other => other,
    }
}

/// `text` with every secret value replaced by `****`.
fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() >= 3 {
            out = out.replace(s.as_str(), "****");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secret_values() {
        let secrets = vec!["hunter2".to_string(), "ab".to_string()];
        assert_eq!(mask("pw=hunter2 ab", &secrets), "pw=**** ab");
    }

    /// A failed RUN's error shows no secret, in the command or its last lines, and keeps its
    /// exit code.
    #[test]
    fn masks_secrets_in_a_failed_run() {
        let secrets = vec!["hunter2".to_string()];
        let err = RunError::Failed {
            command: "/bin/sh -c echo hunter2; exit 7".into(),
            status: "exit code: 7".into(),
            code: 7,
            output: vec!["hunter2".into(), "done".into()],
        };
        let err = StepError::Run(mask_error(err, &secrets));
        assert_eq!(err.exit_code(), Some(7));
        assert_eq!(
            err.to_string(),
            "process \"/bin/sh -c echo ****; exit 7\" did not complete successfully: exit code: 7\n  last output lines:\n    ****\n    done"
        );
    }
}
