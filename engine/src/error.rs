//! Why a step fails ([`StepError`], carried by [`crate::BuildError::Step`]), why an ADD source
//! cannot be fetched or unpacked ([`AddError`]), and why a `--cache-from`/`--cache-to` spec is
//! refused ([`CacheSpecError`]). Each Display is the message the user reads.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use ossb_dockerfile::dockerignore::PatternError;
use ossb_image::layer::LayerError;
use ossb_image::store::StoreError;
use ossb_protocol::Digest;
use ossb_worker::base::SkeletonError;
use ossb_worker::fs::FsError;
use ossb_worker::mounts::MountError;
use ossb_worker::sandbox::RunError;

/// Why a step (RUN, COPY, ADD, WORKDIR) failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The RUN command failed or its sandbox could not start, with the step's secrets masked
    /// (made only by the RUN step, hence no `From`).
    #[error(transparent)]
    Run(RunError),
    /// `RUN --security=insecure`, which ossb never grants.
    #[error("RUN --security=insecure is not allowed: ossb runs every step unprivileged in its sandbox and has no entitlement to grant more; remove --security=insecure (a step that needs privileges, e.g. to mount filesystems, cannot be built by ossb)")]
    InsecureRun,
    /// A RUN heredoc the planner did not put under /dev.
    #[error("RUN heredoc file {0} is not under /dev (a bug in the planner)")]
    HeredocNotUnderDev(String),
    /// A `RUN --mount` cannot be provided.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The step's `/etc/hosts` (for `--add-host`) could not be written.
    #[error("writing the step's /etc/hosts for --add-host: {0}")]
    HostsFile(#[source] io::Error),
    /// The sandbox's mount points could not be made in the rootfs.
    #[error("preparing the sandbox: {0}")]
    MountPoints(#[source] io::Error),
    /// ADD of a URL, a git repository or an archive.
    #[error(transparent)]
    Add(#[from] AddError),
    /// A file operation of COPY, ADD or WORKDIR (missing source, unknown user, I/O).
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A file the engine writes for the step (a heredoc, a work directory).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A COPY/ADD heredoc whose name cannot be a file name.
    #[error("heredoc name {0:?} cannot be a file name")]
    HeredocName(String),
    /// An `--exclude` pattern Docker would refuse.
    #[error("--exclude: {0}")]
    Exclude(#[source] PatternError),
    /// A `--chmod` that is no mode.
    #[error("--chmod={0}: expected an octal mode (755) or a symbolic one (u+x,go-w)")]
    Chmod(String),
    /// `COPY --from` or `RUN --mount from` names a stage not built yet (a scheduling bug).
    #[error("{from}: stage {stage} has not been built")]
    StageNotBuilt {
        /// `COPY --from` or `RUN --mount from`.
        from: &'static str,
        /// The stage's plan position.
        stage: usize,
    },
    /// `COPY --from` or `RUN --mount from` names an image that was not pulled.
    #[error("{from}={image}: the image was not pulled")]
    ImageNotPulled {
        /// `COPY --from` or `RUN --mount from`.
        from: &'static str,
        /// The reference as written.
        image: String,
    },
    /// A metadata snapshot of the rootfs failed.
    #[error("snapshot of the rootfs: {0}")]
    Snapshot(#[source] io::Error),
    /// The overlay's upper directory could not be merged into the rootfs.
    #[error("merging the step's overlay into the rootfs: {0}")]
    OverlayMerge(#[source] io::Error),
    /// The rootfs directory could not be cleared or made.
    #[error("{doing}: {source}")]
    Rootfs {
        /// "clearing a rootfs", "creating the rootfs".
        doing: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A layer of the stage cannot be applied to its rootfs.
    #[error("cannot unpack layer {digest}: {source}\n  hint: the image is malformed or hostile; ossb never writes outside the rootfs, so use an image whose layers stay inside it")]
    UnpackLayer {
        /// The layer.
        digest: Digest,
        /// Why.
        source: LayerError,
    },
    /// A layer of a stage another task of the cluster built could not be brought here.
    #[error("layer {digest} of a stage another task built cannot be brought from the peer cache: {reason}\n  hint: check that this worker reaches the cache nodes of --cache-peers; submitting the build again rebuilds what is missing")]
    Bring {
        /// The layer.
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// Writing the step's layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The blob store failed (reading or writing a layer).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A COPY on a skeleton of the layers cannot be done there, or its files failed.
    #[error(transparent)]
    Skeleton(#[from] SkeletonError),
    /// Blocking work of the step panicked or was cancelled.
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
}

impl StepError {
    /// The exit code of the command that ran and failed: the RUN command (128+signal when
    /// killed), or git for an ADD of a repository.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            StepError::Run(RunError::Failed { code, .. }) => Some(*code),
            StepError::Add(AddError::Git { status, .. }) => status.code(),
            _ => None,
        }
    }
}

/// Why an ADD source could not be fetched or unpacked. `url` is the source as written (a URL
/// or a git repository).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The download failed before an answer (DNS, connection, TLS, body).
    #[error("ADD {url}: {}", chain(.source))]
    Fetch {
        /// The source.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("ADD {url}: the server answered {status}")]
    HttpStatus {
        /// The source.
        url: String,
        /// The status.
        status: reqwest::StatusCode,
    },
    /// The download is not what `--checksum` says.
    #[error("ADD {url}: checksum mismatch: --checksum={expected}, the download is {actual}")]
    Checksum {
        /// The source.
        url: String,
        /// `--checksum` as given.
        expected: String,
        /// The digest of the download.
        actual: Digest,
    },
    /// The `git` command could not be started.
    #[error("ADD {url}: cannot run git{}: {source}", if *.ask_installed { " (is it installed?)" } else { "" })]
    GitSpawn {
        /// The source.
        url: String,
        /// Whether to ask if git is installed (not once a git command has run).
        ask_installed: bool,
        /// Why.
        source: io::Error,
    },
    /// A git command exited unsuccessfully.
    #[error("ADD {url}: git {command} exited with {status}: {stderr}")]
    Git {
        /// The source.
        url: String,
        /// The git subcommand (`clone`, `checkout`, `ls-remote`).
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// A file operation while fetching the source.
    #[error("ADD {url}: {source}")]
    Io {
        /// The source.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// A fetched file or an archive could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The subdirectory of a repository, or the destination of an archive, cannot be used.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// An xz archive is not a valid xz stream.
    #[error("unpacking {}: not a valid xz stream: {source}", archive.display())]
    Xz {
        /// The archive.
        archive: PathBuf,
        /// Why.
        source: lzma_rs::error::Error,
    },
    /// The temporary file of an archive being unpacked failed.
    #[error("unpacking {}: {source}", archive.display())]
    UnpackIo {
        /// The archive.
        archive: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An archive's entries could not be unpacked.
    #[error("unpacking {}: {source}", archive.display())]
    Unpack {
        /// The archive.
        archive: PathBuf,
        /// Why.
        source: LayerError,
    },
}

/// A `--cache-from`/`--cache-to` spec that is not `REF`, `type=registry,ref=REF`,
/// `type=local,src|dest=DIR` or `type=inline`, or an option of it with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheSpecError {
    /// `type=` names a cache type ossb does not have (gha, s3, ...).
    #[error("{spec:?}: cache type {kind:?} is not supported; use {usage}")]
    UnsupportedType {
        /// The spec as given.
        spec: String,
        /// The `type=` value.
        kind: String,
        /// The spellings accepted.
        usage: &'static str,
    },
    /// An option with a value it cannot take.
    #[error("{spec:?}: {key}={value:?}: expected {expected}")]
    BadValue {
        /// The spec as given.
        spec: String,
        /// The option.
        key: String,
        /// Its value.
        value: String,
        /// What it takes.
        expected: &'static str,
    },
    /// A part without `=`, or missing or conflicting keys.
    #[error("{spec:?}: expected {usage}")]
    Malformed {
        /// The spec as given.
        spec: String,
        /// The spellings accepted.
        usage: &'static str,
    },
}

/// `err` and its causes, joined by `: ` (reqwest's own Display omits the cause).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing RUN keeps its exit code, and reads as before the error was typed.
    #[test]
    fn run_failure_carries_the_exit_code_and_the_same_message() {
        let err = StepError::Run(RunError::Failed {
            command: "/bin/sh -c exit 3".into(),
            status: "exit code: 3".into(),
            code: 3,
            output: vec!["oops".into()],
        });
        assert_eq!(err.exit_code(), Some(3));
        assert_eq!(
            err.to_string(),
            "process \"/bin/sh -c exit 3\" did not complete successfully: exit code: 3\n  last output lines:\n    oops"
        );
        let setup = StepError::Run(RunError::Setup("no /proc".into()));
        assert_eq!(setup.exit_code(), None);
        assert_eq!(setup.to_string(), "cannot start the RUN sandbox: no /proc");
    }

    /// A step's failure under `BuildError::Step` reads `location: instruction`, then the
    /// message, and keeps the step error as its source.
    #[test]
    fn build_error_names_the_step_then_the_message() {
        let err = crate::BuildError::Step {
            location: "Dockerfile:4".into(),
            instruction: "COPY --chmod=9 a /a".into(),
            source: Box::new(StepError::Chmod("9".into())),
        };
        assert_eq!(
            err.to_string(),
            "Dockerfile:4: COPY --chmod=9 a /a\n--chmod=9: expected an octal mode (755) or a symbolic one (u+x,go-w)"
        );
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(
            source.as_deref(),
            Some("--chmod=9: expected an octal mode (755) or a symbolic one (u+x,go-w)")
        );
    }

    #[test]
    fn add_messages_name_the_source() {
        let mismatch = AddError::Checksum {
            url: "https://h/f".into(),
            expected: "sha256:00".into(),
            actual: Digest::of(b"x"),
        };
        assert_eq!(
            mismatch.to_string(),
            format!(
                "ADD https://h/f: checksum mismatch: --checksum=sha256:00, the download is {}",
                Digest::of(b"x")
            )
        );
        let spawn = |ask_installed| AddError::GitSpawn {
            url: "git@h:r.git".into(),
            ask_installed,
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(
            spawn(true).to_string(),
            format!(
                "ADD git@h:r.git: cannot run git (is it installed?): {}",
                io::Error::from(io::ErrorKind::NotFound)
            )
        );
        assert!(spawn(false)
            .to_string()
            .starts_with("ADD git@h:r.git: cannot run git: "));
        let git = StepError::Add(AddError::Git {
            url: "https://h/r.git#v1".into(),
            command: "clone".into(),
            status: std::os::unix::process::ExitStatusExt::from_raw(128 << 8),
            stderr: "fatal: repository not found".into(),
        });
        assert_eq!(git.exit_code(), Some(128));
        assert_eq!(
            git.to_string(),
            "ADD https://h/r.git#v1: git clone exited with exit status: 128: fatal: repository not found"
        );
    }
}
