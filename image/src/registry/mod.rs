//! The registry client: pull an image for a platform into the blob store, push blobs,
//! manifests and indexes. Our own small client of the distribution API over reqwest, because
//! what a builder needs is what `oci-client` lacks: tokens covering several scopes (pull on the
//! source and push on the target, for cross-repository mounts), identity tokens, retries that
//! honour `Retry-After`, downloads resumed by `Range`, streamed and chunked uploads, and
//! pull-through mirrors.
//!
//! - Every blob is verified against its digest as it arrives and only then enters the store;
//!   a registry that serves wrong bytes gets asked again, and never gets them stored.
//! - Transient failures (5xx, 429, 408, connection errors and resets, timeouts, wrong bytes)
//!   are retried with backoff and jitter ([`RetryPolicy`]); a broken-off download continues
//!   from where it stopped.
//! - Pushes skip blobs the registry has (HEAD), mount blobs from other repositories of the same
//!   registry when told where they are ([`PushOptions::mount_from`]), upload the rest streamed
//!   from the store (in chunks above [`RegistryConfig::chunk_size`]), several at once, then the
//!   configs, the manifests, and an index last.
//! - Errors name the registry, the blob or manifest, the registry's answer, and what to try.
//!   Credentials never appear in them (see [`auth`]).

mod auth;
mod http;
mod pull;
mod push;
mod reference;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use oci_client::Reference;
use ossb_protocol::Platform;

pub use auth::{Credential, CredentialError, CredentialFiles};
pub use pull::{PulledImage, Tee};
pub use push::PushOptions;
pub use transfer::{counting, Transfer};

use crate::store::StoreError;
use http::{HttpError, Transport};

/// How to reach registries: what the user said on the command line.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// `host:port` of registries spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// `(host:port, CA file)`: extra certificate authorities to trust for that host.
    pub certificates: Vec<(String, PathBuf)>,
}

/// A pull-through mirror: pulls from `registry` try `mirror` first and fall back to
/// `registry` itself (as `registries.conf` mirrors do). Pushes never go to a mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The registry mirrored, as references spell it: `docker.io`, `ghcr.io`, `host:port`.
    pub registry: String,
    /// The mirror's `host[:port]` (list it in [`RegistryOptions::insecure`] if it is HTTP).
    pub mirror: String,
}

impl std::str::FromStr for Mirror {
    type Err = String;

    /// `docker.io=HOST:PORT` (the `--registry-mirror` syntax); a bare `HOST:PORT` mirrors
    /// docker.io.
    fn from_str(s: &str) -> Result<Mirror, String> {
        let (registry, mirror) = s.split_once('=').unwrap_or(("docker.io", s));
        let strip = |h: &str| {
            h.trim()
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string()
        };
        let (registry, mirror) = (auth::normalize_host(registry), strip(mirror));
        if registry.is_empty() || mirror.is_empty() || mirror.contains('/') {
            return Err(format!(
                "--registry-mirror {s:?}: expected REGISTRY=HOST[:PORT], e.g. docker.io=mirror.example:5000"
            ));
        }
        Ok(Mirror { registry, mirror })
    }
}

/// When and how often to try again.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// The first backoff; it doubles each attempt (half of it random).
    pub initial_delay: Duration,
    /// The largest backoff.
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured; longer asks wait this long.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(15),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// Everything else about the client, with defaults that suit a build.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Pull-through mirrors (`--registry-mirror`).
    pub mirrors: Vec<Mirror>,
    /// A Docker config file (or a mounted dockerconfigjson Secret) read before
    /// `$DOCKER_CONFIG/config.json`.
    pub auth_file: Option<PathBuf>,
    /// Retrying.
    pub retry: RetryPolicy,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Longest silence while reading an answer.
    pub read_timeout: Duration,
    /// Blobs transferred at once.
    pub parallel_blobs: usize,
    /// Blobs larger than this are uploaded in PATCH chunks of this size.
    pub chunk_size: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            mirrors: Vec::new(),
            auth_file: None,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            parallel_blobs: 4,
            chunk_size: 64 * 1024 * 1024,
        }
    }
}

/// Both halves of the client's configuration, as the transport keeps them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Settings {
    pub options: RegistryOptions,
    pub config: RegistryConfig,
}

/// Errors talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {detail}")]
    BadReference {
        /// What was given.
        reference: String,
        /// Why it is wrong.
        detail: String,
    },
    /// The registry refused our credentials (or we had none).
    #[error("authentication failed for registry {registry} ({action} {reference}): {detail}\n  hint: check the credentials for {registry} in $DOCKER_CONFIG/config.json (docker login / a dockerconfigjson Secret), and that the account may {action} this repository")]
    Auth {
        /// The registry host.
        registry: String,
        /// `pull` or `push`.
        action: &'static str,
        /// The image reference.
        reference: String,
        /// The registry's answer.
        detail: String,
    },
    /// The image or tag does not exist.
    #[error("image {reference} not found in registry {registry}: {detail}")]
    NotFound {
        /// The registry host.
        registry: String,
        /// The image reference.
        reference: String,
        /// The registry's answer.
        detail: String,
    },
    /// The index has no manifest for the requested platform.
    #[error("image {reference} has no manifest for platform {wanted}; it offers: {}", .available.join(", "))]
    PlatformMissing {
        /// The image reference.
        reference: String,
        /// The platform requested.
        wanted: Platform,
        /// What the index lists.
        available: Vec<String>,
    },
    /// A transfer or protocol failure.
    #[error("{0}")]
    Transfer(Box<TransferFailure>),
    /// The registry sent something that is not a valid manifest or config.
    #[error("registry {registry} sent an invalid {what} for {reference}: {detail}")]
    Invalid {
        /// The registry host.
        registry: String,
        /// The image reference.
        reference: String,
        /// What was being read.
        what: String,
        /// Why it is invalid.
        detail: String,
    },
    /// A certificate file could not be read.
    #[error("cannot read the certificate {path} given for registry {registry}: {source}")]
    Certificate {
        /// The registry host.
        registry: String,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The credentials file or a credential helper failed.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// The local blob store failed, or the bytes did not verify.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A pull or push that failed for a reason other than authentication or absence.
#[derive(Debug)]
pub struct TransferFailure {
    /// `pull` or `push`.
    pub action: &'static str,
    /// The blob or manifest involved.
    pub what: String,
    /// The image reference.
    pub reference: String,
    /// The registry host.
    pub registry: String,
    /// The registry's answer or the transport error.
    pub detail: String,
    /// What to try, with a leading newline, or empty.
    pub hint: String,
}

impl std::fmt::Display for TransferFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let TransferFailure {
            action,
            what,
            reference,
            registry,
            detail,
            hint,
        } = self;
        write!(
            f,
            "{action} {what} for {reference} at registry {registry} failed: {detail}{hint}"
        )
    }
}

/// A client for every registry a build talks to. Cheap to share by reference across tasks.
pub struct Registry {
    transport: Transport,
}

/// Parses a user's image reference with docker.io normalization (`busybox` is
/// `docker.io/library/busybox:latest`), by the grammar of distribution's `reference` package.
/// Our own parser: `Reference`'s `FromStr` compiles a large regex on first use, about 100 ms
/// of a fully cached build's 200 ms.
pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    reference::parse(s).map_err(|detail| RegistryError::BadReference {
        reference: s.to_string(),
        detail: detail.to_string(),
    })
}

impl Registry {
    /// A client configured with `options` and the default [`RegistryConfig`].
    pub fn new(options: &RegistryOptions) -> Result<Registry, RegistryError> {
        Registry::with_config(options, &RegistryConfig::default())
    }

    /// A client configured with `options` and `config`. Reads the credentials file now
    /// (credential helpers run later, once per registry, when first needed).
    pub fn with_config(
        options: &RegistryOptions,
        config: &RegistryConfig,
    ) -> Result<Registry, RegistryError> {
        for (registry, path) in &options.certificates {
            // Checked now so a typo fails the build before any work.
            std::fs::metadata(path).map_err(|source| RegistryError::Certificate {
                registry: registry.clone(),
                path: path.clone(),
                source,
            })?;
        }
        let credentials = CredentialFiles::from_env(config.auth_file.as_deref())?;
        Ok(Registry {
            transport: Transport::new(
                Settings {
                    options: options.clone(),
                    config: config.clone(),
                },
                credentials,
            ),
        })
    }

    fn config(&self) -> &RegistryConfig {
        &self.transport.settings().config
    }
}

/// Where requests go: a registry host and a repository on it.
#[derive(Clone, Debug)]
pub(crate) struct Repo {
    pub host: String,
    pub repository: String,
}

impl Repo {
    fn of(reference: &Reference) -> Repo {
        Repo {
            host: reference.registry().to_string(),
            repository: reference.repository().to_string(),
        }
    }
}

/// What a failed request was about, to turn an [`HttpError`] into a [`RegistryError`].
pub(crate) struct Context<'a> {
    pub action: &'static str,
    pub what: String,
    pub reference: &'a Reference,
    pub registry: &'a str,
}

impl Context<'_> {
    pub fn error(&self, err: HttpError, attempts: u32) -> RegistryError {
        let registry = self.registry.to_string();
        let reference = self.reference.whole();
        let detail = err.detail();
        match &err {
            HttpError::Auth { .. } => {
                return RegistryError::Auth {
                    registry,
                    action: self.action,
                    reference,
                    detail,
                }
            }
            HttpError::Status { status, .. }
                if status.as_u16() == 401 || status.as_u16() == 403 =>
            {
                return RegistryError::Auth {
                    registry,
                    action: self.action,
                    reference,
                    detail,
                }
            }
            HttpError::Status { status, .. }
                if status.as_u16() == 404
                    && self.action == "pull"
                    && self.what.starts_with("manifest") =>
            {
                return RegistryError::NotFound {
                    registry,
                    reference,
                    detail,
                }
            }
            HttpError::Local(_) => {
                if let HttpError::Local(e) = err {
                    return RegistryError::Store(e);
                }
            }
            _ => {}
        }
        let hint = hint(&err, &registry, self.action, attempts);
        RegistryError::Transfer(Box::new(TransferFailure {
            action: self.action,
            what: self.what.clone(),
            reference,
            registry,
            detail,
            hint,
        }))
    }
}

fn hint(err: &HttpError, registry: &str, action: &str, attempts: u32) -> String {
    let tried = if attempts > 1 {
        format!(" (tried {attempts} times)")
    } else {
        String::new()
    };
    let d = err.detail().to_ascii_lowercase();
    let text = match err {
        HttpError::Transport { .. } => {
            if d.contains("certificate") || d.contains("unknownissuer") || d.contains("tls") {
                format!("the TLS certificate of {registry} is not trusted: pass --registry-certificate {registry}=CA.pem, or --insecure-registry {registry} to skip the check")
            } else if d.contains("http2")
                || d.contains("invalid http version")
                || d.contains("wrong version number")
                || d.contains("invalid content type")
                || d.contains("corrupt message")
                || d.contains("received corrupt")
            {
                format!("{registry} may speak plain HTTP: pass --insecure-registry {registry}")
            } else if d.contains("connection refused") || d.contains("dns error") {
                format!("check that {registry} is reachable from here (and, for a local registry, that it runs){tried}")
            } else {
                format!("the connection to {registry} kept failing{tried}; check the network and retry")
            }
        }
        HttpError::Status { status, .. } if status.is_server_error() || status.as_u16() == 429 => {
            format!("{registry} kept failing{tried}; it may be overloaded or down: retry later")
        }
        HttpError::Status { status, .. } if status.as_u16() == 413 => {
            "the registry (or a proxy in front of it) refused the request's size: check its body size limit".into()
        }
        HttpError::Status { .. } if action == "push" => format!(
            "check that the account in $DOCKER_CONFIG/config.json may push to this repository of {registry}, that the repository name is allowed there, and that the registry accepts pushes"
        ),
        HttpError::WrongBytes { .. } => format!(
            "{registry} (or a proxy between) served bytes that do not match their digest{tried}; nothing corrupt was stored"
        ),
        _ => return String::new(),
    };
    format!("\n  hint: {text}")
}
