//! What a rootless RUN sandbox gets in the container ossb runs in.
//!
//! The full rootless sandbox gives each step a fresh `/proc` in a pid namespace of its own and
//! sets its hostname. A container runtime's defaults refuse both to an unprivileged pod (the Pod
//! Security "baseline" level): it masks parts of `/proc`, and the kernel then refuses a new
//! procfs in a user namespace (a mount that would reveal what is masked); and its default
//! seccomp profile allows `sethostname` only with CAP_SYS_ADMIN. Everything else the sandbox
//! does (user, mount, uts and ipc namespaces, binds, tmpfs, `pivot_root`) still works there.
//!
//! So the first rootless RUN of a process probes what the container allows (`ossb __sandbox`,
//! [`crate::sandbox`]), once. Under `--isolation auto` the sandbox then adapts: a step whose
//! fresh `/proc` is refused gets the container's `/proc`, read-only, in the build's pid
//! namespace (pids and `/proc` must agree), and a user namespace of its own so that it cannot
//! read the memory, files or environment of ossb or of other steps through that `/proc`; a step
//! whose hostname cannot be set keeps the container's. What it got and what is lost is logged
//! once, as a warning. A mode the user forced (`--isolation rootless`) is never weakened: the
//! step fails with what was refused and what to do.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// What the container refused to the rootless sandbox: each field is the failed call and its
/// errno, or `None` when it worked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusals {
    /// Mounting a fresh procfs in the step's pid namespace.
    pub fresh_proc: Option<String>,
    /// Setting the step's hostname in its uts namespace.
    pub hostname: Option<String>,
}

impl Refusals {
    /// Whether the container allows the full sandbox.
    pub fn none(&self) -> bool {
        self.fresh_proc.is_none() && self.hostname.is_none()
    }
}

/// The probe's result in this process: found once, by the first rootless step.
static FOUND: OnceLock<Result<Refusals, String>> = OnceLock::new();

/// The warning logged when the sandbox adapted, for the builds to repeat to their clients.
static ADAPTED: OnceLock<String> = OnceLock::new();

/// How the rootless sandbox adapted to this container, once a rootless step found out: what
/// the process logged once, for a build cluster's worker to say to each client too (its log is
/// not theirs).
pub fn adaptation() -> Option<&'static str> {
    ADAPTED.get().map(String::as_str)
}

/// What the rootless sandbox of a step may skip in this container, probed once per process
/// with `probe` (which runs `exe __sandbox`). `forced`: the user forced `--isolation rootless`,
/// so a refusal is an error. Under auto, the first call logs once what the sandbox adapted and
/// what that loses. Blocks for the probe's few milliseconds the first time.
pub(crate) fn refusals(
    exe: &Path,
    forced: bool,
    probe: fn(&Path) -> Result<Refusals, String>,
) -> Result<Refusals, String> {
    let exe: PathBuf = exe.to_path_buf();
    FOUND
        .get_or_init(|| {
            let (refusals, warning) = decide(probe(&exe), forced)?;
            if let Some(w) = warning {
                tracing::warn!("{w}");
                let _ = ADAPTED.set(w);
            }
            Ok(refusals)
        })
        .clone()
}

/// From the probe's result: the refusals the sandbox adapts to and the warning to log once, or
/// the error of a forced mode (or of a container where no rootless sandbox can run).
fn decide(
    probed: Result<Refusals, String>,
    forced: bool,
) -> Result<(Refusals, Option<String>), String> {
    let refusals = probed?;
    if refusals.none() {
        return Ok((refusals, None));
    }
    if forced {
        return Err(forced_error(&refusals));
    }
    let warning = adapted_warning(&refusals);
    Ok((refusals, Some(warning)))
}

/// The hint for a refused fresh procfs.
const UNMASK: &str = "unmask /proc (Kubernetes: securityContext.procMount: Unmasked, which the \
                      baseline Pod Security Standard forbids; podman: --security-opt unmask=ALL)";
/// The hint for a refused sethostname.
const SETHOSTNAME: &str =
    "a seccomp profile that allows sethostname (deploy/security-profiles/ossb-rootless.json)";

fn forced_error(r: &Refusals) -> String {
    let mut refused = Vec::new();
    let mut fixes = Vec::new();
    if let Some(why) = &r.fresh_proc {
        refused.push(format!(
            "a fresh /proc in a pid namespace of the step's own ({why}: the kernel refuses a new \
             procfs in a user namespace while parts of the container's /proc are masked)"
        ));
        fixes.push(UNMASK);
    }
    if let Some(why) = &r.hostname {
        refused.push(format!(
            "the step's hostname ({why}: the container's seccomp profile refuses sethostname)"
        ));
        fixes.push(SETHOSTNAME);
    }
    format!(
        "--isolation rootless was asked for, and this container refuses what it gives each RUN \
         step: {}. To fix: {}; or use --isolation auto, which adapts the sandbox to the container \
         and logs what that loses",
        refused.join("; "),
        fixes.join(", and ")
    )
}

fn adapted_warning(r: &Refusals) -> String {
    let mut got = Vec::new();
    let mut lost = Vec::new();
    let mut fixes = Vec::new();
    if let Some(why) = &r.fresh_proc {
        got.push(format!(
            "a fresh /proc is refused ({why}: parts of the container's /proc are masked), so each \
             step gets the container's /proc, read-only, in the build's pid namespace, with a user \
             namespace of its own"
        ));
        lost.push(
            "a step sees the container's processes and their command lines, and as root can \
             signal ossb's (its own user namespace keeps their memory, files and environment \
             from it); it is not pid 1 of a namespace of its own, so what it leaves running is \
             killed by ossb when it ends, not by the kernel; writing to /proc fails",
        );
        fixes.push(UNMASK);
    }
    if let Some(why) = &r.hostname {
        got.push(format!(
            "setting the step's hostname is refused ({why}: the container's seccomp profile), so \
             it keeps the container's"
        ));
        lost.push("`hostname` in a step prints the container's name, not \"ossb\"");
        fixes.push(SETHOSTNAME);
    }
    format!(
        "isolation: rootless, adapted to this container: {}. Lost: {}. For the full sandbox: {} \
         (--isolation rootless then insists on it)",
        got.join("; "),
        lost.join("; "),
        fixes.join(", and ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_sandbox_needs_no_word() {
        let (r, warning) = decide(Ok(Refusals::default()), true).unwrap();
        assert!(r.none());
        assert!(warning.is_none());
    }

    #[test]
    fn auto_adapts_and_says_what_is_lost() {
        let refused = Refusals {
            fresh_proc: Some("mount(proc): EPERM".into()),
            hostname: Some("sethostname: EPERM".into()),
        };
        let (r, warning) = decide(Ok(refused.clone()), false).unwrap();
        assert_eq!(r, refused);
        let w = warning.unwrap();
        assert!(w.starts_with("isolation: rootless, adapted"), "{w}");
        for part in [
            "mount(proc): EPERM",
            "sethostname: EPERM",
            "the container's /proc, read-only",
            "build's pid namespace",
            "Lost:",
            "procMount: Unmasked",
        ] {
            assert!(w.contains(part), "{part:?} missing: {w}");
        }
        let (_, only_hostname) = decide(
            Ok(Refusals {
                hostname: Some("sethostname: EPERM".into()),
                ..Refusals::default()
            }),
            false,
        )
        .unwrap();
        assert!(!only_hostname.unwrap().contains("/proc"));
    }

    #[test]
    fn a_forced_mode_is_an_error_naming_the_refused_call_and_the_fixes() {
        let refused = Refusals {
            fresh_proc: Some("mount(proc): EPERM".into()),
            hostname: None,
        };
        let e = decide(Ok(refused), true).unwrap_err();
        for part in [
            "--isolation rootless",
            "mount(proc): EPERM",
            "procMount: Unmasked",
            "--isolation auto",
        ] {
            assert!(e.contains(part), "{part:?} missing: {e}");
        }
        assert!(!e.contains("sethostname"), "{e}");
        // A container where no rootless sandbox runs is an error in every mode.
        assert_eq!(
            decide(Err("unshare: EPERM".into()), false).unwrap_err(),
            "unshare: EPERM"
        );
    }
}
