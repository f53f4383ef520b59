//! The registry client: pull an image for a platform into the blob store, push blobs and
//! manifests. Wraps `oci-client` for the HTTP and token flows and adds what it lacks: our
//! credentials lookup, platform selection with variants, verification into the store, retries,
//! and errors that say which registry answered what and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use ossb_protocol::{Digest, Platform};
use tokio::io::AsyncWriteExt;

use crate::oci::{media_type, Descriptor, ImageConfig, Index, Manifest};
use crate::store::{BlobStore, StoreError};

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// `host:port` of registries spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// `(host:port, CA file)`: extra certificate authorities to trust.
    pub certificates: Vec<(String, PathBuf)>,
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

/// An image resolved for one platform, with its config and layers in the blob store.
#[derive(Clone, Debug)]
pub struct PulledImage {
    /// The digest of the platform's manifest.
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// The parsed config.
    pub config: ImageConfig,
}

/// A client for every registry a build talks to.
pub struct Registry {
    client: Client,
}

const MANIFEST_TYPES: &[&str] = &[
    media_type::OCI_INDEX,
    media_type::OCI_MANIFEST,
    media_type::DOCKER_MANIFEST_LIST,
    media_type::DOCKER_MANIFEST,
];

/// Parses a user's image reference with docker.io normalization (`busybox` is
/// `docker.io/library/busybox:latest`).
pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    s.parse::<Reference>()
        .map_err(|e| RegistryError::BadReference {
            reference: s.to_string(),
            detail: e.to_string(),
        })
}

impl Registry {
    /// A client configured with `options`.
    pub fn new(options: &RegistryOptions) -> Result<Registry, RegistryError> {
        let mut extra_root_certificates = Vec::new();
        for (registry, path) in &options.certificates {
            let data = std::fs::read(path).map_err(|source| RegistryError::Certificate {
                registry: registry.clone(),
                path: path.clone(),
                source,
            })?;
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(options.insecure.clone()),
            extra_root_certificates,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(300)),
            user_agent: concat!("ossb/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        Ok(Registry {
            client: Client::new(config),
        })
    }

    /// Authenticates for `action` on `reference` with the credentials from the Docker config.
    async fn authenticate(
        &self,
        reference: &Reference,
        op: RegistryOperation,
    ) -> Result<(), RegistryError> {
        let auth = credentials_for(reference.resolve_registry());
        self.client
            .auth(reference, &auth, op)
            .await
            .map(|_| ())
            .map_err(|e| self.classify(e, reference, action_name(op), "authentication".into()))
    }

    /// Resolves `reference` for `platform` and brings its manifest, config and layers into the
    /// store. Blobs already in the store are not fetched again.
    pub async fn pull(
        &self,
        reference: &Reference,
        platform: &Platform,
        store: &BlobStore,
    ) -> Result<PulledImage, RegistryError> {
        self.authenticate(reference, RegistryOperation::Pull)
            .await?;
        let (bytes, digest) = self.fetch_manifest(reference, reference).await?;
        let (manifest_digest, manifest) = match serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("manifests").map(|_| ()))
        {
            Some(()) => {
                let index: Index = self.parse(reference, "index", &bytes)?;
                let entry = index
                    .find(platform)
                    .ok_or_else(|| RegistryError::PlatformMissing {
                        reference: reference.whole(),
                        wanted: platform.clone(),
                        available: index.platforms(),
                    })?;
                let by_digest = reference.clone_with_digest(entry.digest.to_string());
                let (bytes, digest) = self.fetch_manifest(reference, &by_digest).await?;
                (
                    digest,
                    self.parse::<Manifest>(reference, "manifest", &bytes)?,
                )
            }
            None => (
                digest,
                self.parse::<Manifest>(reference, "manifest", &bytes)?,
            ),
        };
        self.fetch_blob(reference, &manifest.config, store).await?;
        let config: ImageConfig = self.parse(
            reference,
            "image config",
            &store.read(&manifest.config.digest)?,
        )?;
        if config.platform() != *platform {
            return Err(RegistryError::PlatformMissing {
                reference: reference.whole(),
                wanted: platform.clone(),
                available: vec![config.platform().to_string()],
            });
        }
        for layer in &manifest.layers {
            self.fetch_blob(reference, layer, store).await?;
        }
        Ok(PulledImage {
            manifest_digest,
            manifest,
            config,
        })
    }

    async fn fetch_manifest(
        &self,
        image: &Reference,
        at: &Reference,
    ) -> Result<(Vec<u8>, Digest), RegistryError> {
        let auth = credentials_for(image.resolve_registry());
        let (bytes, _) = retry(|| self.client.pull_manifest_raw(at, &auth, MANIFEST_TYPES))
            .await
            .map_err(|e| self.classify(e, image, "pull", "manifest".into()))?;
        let digest = Digest::of(&bytes);
        // A manifest fetched by digest must hash to it; one fetched by tag is named by its hash.
        if let Some(expected) = at.digest() {
            if expected != digest.to_string() {
                return Err(RegistryError::Invalid {
                    registry: image.resolve_registry().into(),
                    reference: image.whole(),
                    what: "manifest".into(),
                    detail: format!("its digest is {digest}, not {expected}"),
                });
            }
        }
        Ok((bytes.to_vec(), digest))
    }

    async fn fetch_blob(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        store: &BlobStore,
    ) -> Result<(), RegistryError> {
        if store.contains(&desc.digest) {
            return Ok(());
        }
        let what = format!("blob {}", desc.digest);
        let tmp =
            tempfile::NamedTempFile::new_in(store.tmp_dir()).map_err(|source| StoreError::Io {
                path: store.tmp_dir(),
                source,
            })?;
        let file = tokio::fs::File::from_std(tmp.reopen().map_err(|source| StoreError::Io {
            path: tmp.path().into(),
            source,
        })?);
        let mut out = tokio::io::BufWriter::new(file);
        let digest = desc.digest.to_string();
        self.client
            .pull_blob(reference, digest.as_str(), &mut out)
            .await
            .map_err(|e| self.classify(e, reference, "pull", what.clone()))?;
        out.flush().await.map_err(|source| StoreError::Io {
            path: tmp.path().into(),
            source,
        })?;
        // Verified again here: the store never holds bytes it has not hashed itself.
        store.adopt(tmp, &desc.digest)?;
        Ok(())
    }

    /// Pushes the blobs (those the registry lacks), then the manifest, under `reference`'s tag
    /// (or by digest when it has none). Returns the manifest digest.
    pub async fn push(
        &self,
        reference: &Reference,
        store: &BlobStore,
        blobs: &[Descriptor],
        manifest: &[u8],
        manifest_media_type: &str,
    ) -> Result<Digest, RegistryError> {
        self.authenticate(reference, RegistryOperation::Push)
            .await?;
        for desc in blobs {
            let digest = desc.digest.to_string();
            let what = format!("blob {}", desc.digest);
            let exists = self
                .client
                .blob_exists(reference, &digest)
                .await
                .map_err(|e| self.classify(e, reference, "push", what.clone()))?;
            if exists {
                continue;
            }
            let path = store.path(&desc.digest);
            let data = tokio::fs::read(&path)
                .await
                .map_err(|source| StoreError::Io { path, source })?;
            retry(|| self.client.push_blob(reference, data.clone(), &digest))
                .await
                .map_err(|e| self.classify(e, reference, "push", what.clone()))?;
        }
        let digest = Digest::of(manifest);
        let content_type = http_header(manifest_media_type);
        retry(|| {
            self.client
                .push_manifest_raw(reference, manifest.to_vec(), content_type.clone())
        })
        .await
        .map_err(|e| self.classify(e, reference, "push", format!("manifest {digest}")))?;
        Ok(digest)
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        reference: &Reference,
        what: &str,
        bytes: &[u8],
    ) -> Result<T, RegistryError> {
        serde_json::from_slice(bytes).map_err(|e| RegistryError::Invalid {
            registry: reference.resolve_registry().into(),
            reference: reference.whole(),
            what: what.into(),
            detail: e.to_string(),
        })
    }

    fn classify(
        &self,
        err: OciDistributionError,
        reference: &Reference,
        action: &'static str,
        what: String,
    ) -> RegistryError {
        let registry = reference.resolve_registry().to_string();
        let reference_s = reference.whole();
        match err {
            OciDistributionError::UnauthorizedError { url } => RegistryError::Auth {
                registry,
                action,
                reference: reference_s,
                detail: format!("401 Unauthorized from {url}"),
            },
            OciDistributionError::AuthenticationFailure(detail) => RegistryError::Auth {
                registry,
                action,
                reference: reference_s,
                detail,
            },
            OciDistributionError::ImageManifestNotFoundError(detail) => RegistryError::NotFound {
                registry,
                reference: reference_s,
                detail,
            },
            OciDistributionError::ServerError {
                code: 404, message, ..
            } if action == "pull" => RegistryError::NotFound {
                registry,
                reference: reference_s,
                detail: message,
            },
            OciDistributionError::RegistryError { envelope, url }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::Unauthorized
                            | oci_client::errors::OciErrorCode::Denied
                    )
                }) =>
            {
                RegistryError::Auth {
                    registry,
                    action,
                    reference: reference_s,
                    detail: format!("{url}: {envelope}"),
                }
            }
            OciDistributionError::RegistryError { envelope, url }
                if action == "pull"
                    && envelope.errors.iter().any(|e| {
                        matches!(
                            e.code,
                            oci_client::errors::OciErrorCode::ManifestUnknown
                                | oci_client::errors::OciErrorCode::NameUnknown
                        )
                    }) =>
            {
                RegistryError::NotFound {
                    registry,
                    reference: reference_s,
                    detail: format!("{url}: {envelope}"),
                }
            }
            other => {
                let detail = describe(&other);
                let hint = transport_hint(&detail, &registry);
                RegistryError::Transfer(Box::new(TransferFailure {
                    action,
                    what,
                    reference: reference_s,
                    registry,
                    detail,
                    hint,
                }))
            }
        }
    }
}

/// The error and its causes on one line: reqwest hides the useful part (connection refused,
/// certificate unknown) in its source chain.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn transport_hint(detail: &str, registry: &str) -> String {
    let d = detail.to_ascii_lowercase();
    if d.contains("certificate") || d.contains("unknownissuer") || d.contains("tls") {
        format!("\n  hint: the TLS certificate of {registry} is not trusted: pass --registry-certificate {registry}=CA.pem, or --insecure-registry {registry} if it speaks plain HTTP")
    } else if d.contains("http2")
        || d.contains("invalid http version")
        || d.contains("wrong version number")
        || d.contains("invalid content type")
    {
        format!("\n  hint: {registry} may speak plain HTTP: pass --insecure-registry {registry}")
    } else if d.contains("connection refused") || d.contains("dns error") || d.contains("timed out")
    {
        format!("\n  hint: check that {registry} is reachable from here and retry")
    } else {
        String::new()
    }
}

/// Retries transient failures (connection errors, 5xx, 429) with backoff and jitter.
async fn retry<T, F, Fut>(mut op: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    const ATTEMPTS: u32 = 4;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < ATTEMPTS && is_transient(&e) => {
                let base = 250u64 << attempt;
                let jitter = (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0) as u64)
                    % base;
                tracing::warn!(
                    "registry request failed ({}), retrying in {} ms",
                    describe(&e),
                    base + jitter
                );
                tokio::time::sleep(Duration::from_millis(base + jitter)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::RequestError(r) => {
            r.is_connect() || r.is_timeout() || r.status().is_some_and(|s| s.is_server_error())
        }
        _ => false,
    }
}

fn action_name(op: RegistryOperation) -> &'static str {
    match op {
        RegistryOperation::Pull => "pull",
        RegistryOperation::Push => "push",
    }
}

fn http_header(media_type: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(media_type)
        .unwrap_or(http::HeaderValue::from_static(media_type::OCI_MANIFEST))
}

/// The credentials for `registry` from `$DOCKER_CONFIG/config.json` (auths, credHelpers,
/// credsStore); anonymous when there are none.
pub fn credentials_for(registry: &str) -> RegistryAuth {
    // Docker Hub's credentials are stored under its legacy v1 address.
    let server = match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        other => other,
    };
    match docker_credential::get_credential(server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(user, pass)) => {
            RegistryAuth::Basic(user, pass)
        }
        Ok(docker_credential::DockerCredential::IdentityToken(_)) => {
            tracing::warn!(
                "identity tokens for {registry} are not supported yet; pulling anonymously"
            );
            RegistryAuth::Anonymous
        }
        Err(_) => RegistryAuth::Anonymous,
    }
}
