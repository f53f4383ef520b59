//! Pulling: resolve a reference (through a mirror first when one is configured), select the
//! platform's manifest from an index, and bring the config and layers into the blob store,
//! verified, resumed by `Range` when a transfer breaks off.

use futures_util::stream::{self, TryStreamExt};
use oci_client::Reference;
use ossb_protocol::{Digest, Platform};
use reqwest::header::{ACCEPT, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::StatusCode;

use super::http::{pause_before_retry, retry, status_error, HttpError, Scope};
use super::{Context, Registry, RegistryError, Repo};
use crate::oci::{media_type, Descriptor, ImageConfig, Index, Manifest};
use crate::store::{BlobStore, PartialBlob};

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

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and indexes larger than this are refused (the largest real ones are ~100 KiB).
const MAX_MANIFEST: usize = 4 * 1024 * 1024;

/// Where a blob's bytes are copied as they arrive ([`Registry::pull_blob`]): a cluster worker
/// streams a blob it fetches for the cluster to the peer cache while it downloads. Only bytes
/// in order from the tee's start are copied; once a transfer starts over, the copy stops (its
/// receiver sees the channel close early).
pub struct Tee {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// The next byte the receiver wants.
    next: u64,
    /// Whether any byte was copied (bytes before the start are skipped until then).
    started: bool,
}

impl Tee {
    /// Copies to `tx` from the first byte.
    pub fn new(tx: tokio::sync::mpsc::Sender<bytes::Bytes>) -> Tee {
        Tee::starting_at(tx, 0)
    }

    /// Copies to `tx` the bytes from `start` on (a resumed fetch puts only those).
    pub fn starting_at(tx: tokio::sync::mpsc::Sender<bytes::Bytes>, start: u64) -> Tee {
        Tee {
            tx,
            next: start,
            started: false,
        }
    }

    /// Copies what `chunk`, which starts at byte `at`, holds from the tee's next byte on;
    /// drops the tee when it would leave a gap or repeat bytes, or when its receiver is gone.
    pub async fn copy(slot: &mut Option<Tee>, at: u64, chunk: &bytes::Bytes) {
        let Some(tee) = slot else { return };
        let end = at + chunk.len() as u64;
        if !tee.started && end <= tee.next {
            return;
        }
        if at > tee.next || (tee.started && at != tee.next) {
            *slot = None;
            return;
        }
        let part = chunk.slice((tee.next - at) as usize..);
        if tee.tx.send(part).await.is_err() {
            *slot = None;
            return;
        }
        tee.next = end;
        tee.started = true;
    }
}

/// A manifest or index as fetched.
pub(crate) struct Fetched {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
}

impl Registry {
    /// Resolves `reference` for `platform` and brings its manifest, config and layers into the
    /// store. Blobs already in the store are not fetched again. With a mirror configured for
    /// the reference's registry the mirror is tried first; any failure there falls back to
    /// the registry itself.
    pub async fn pull(
        &self,
        reference: &Reference,
        platform: &Platform,
        store: &BlobStore,
    ) -> Result<PulledImage, RegistryError> {
        let origin = Repo::of(reference);
        for via in self.mirrors_of(&origin) {
            match self.pull_from(&via, reference, platform, store).await {
                Ok(pulled) => return Ok(pulled),
                Err(e) => tracing::warn!(
                    "mirror {} failed for {}, pulling from {}: {e}",
                    via.host,
                    reference.whole(),
                    origin.host
                ),
            }
        }
        self.pull_from(&origin, reference, platform, store).await
    }

    /// Brings one blob of `reference` into the store (through a mirror first, as
    /// [`Registry::pull`]), verified, copying its bytes to `tee` as they arrive. With `start`
    /// (its first bytes, from elsewhere) only the rest is asked for, by `Range`.
    pub async fn pull_blob(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        store: &BlobStore,
        mut start: Option<PartialBlob>,
        mut tee: Option<Tee>,
    ) -> Result<(), RegistryError> {
        let origin = Repo::of(reference);
        for via in self.mirrors_of(&origin) {
            if self
                .fetch_blob(&via, reference, desc, store, start.take(), tee.take())
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        self.fetch_blob(&origin, reference, desc, store, start, tee)
            .await
    }

    /// Resolves `reference` for `platform` to its manifest (stored, with the index it was
    /// chosen from) without fetching the config or the layers, through a mirror first as
    /// [`Registry::pull`] does: a cluster worker learns which blobs an image needs and looks
    /// for them in its peer cache before the pull.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
        store: &BlobStore,
    ) -> Result<(Digest, Manifest), RegistryError> {
        let origin = Repo::of(reference);
        for via in self.mirrors_of(&origin) {
            if let Ok(resolved) = self.resolve_from(&via, reference, platform, store).await {
                return Ok(resolved);
            }
        }
        self.resolve_from(&origin, reference, platform, store).await
    }

    /// The mirrors configured for `origin`'s registry, as repositories to try before it.
    fn mirrors_of(&self, origin: &Repo) -> Vec<Repo> {
        let registry = super::auth::normalize_host(&origin.host);
        self.config()
            .mirrors
            .iter()
            .filter(|m| m.registry == registry)
            .map(|m| Repo {
                host: m.mirror.clone(),
                repository: origin.repository.clone(),
            })
            .collect()
    }

    async fn pull_from(
        &self,
        repo: &Repo,
        reference: &Reference,
        platform: &Platform,
        store: &BlobStore,
    ) -> Result<PulledImage, RegistryError> {
        let (digest, manifest) = self.resolve_from(repo, reference, platform, store).await?;
        self.fetch_blob(repo, reference, &manifest.config, store, None, None)
            .await?;
        let config: ImageConfig = parse(
            repo,
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
        self.fetch_blobs(repo, reference, &manifest.layers, store)
            .await?;
        Ok(PulledImage {
            manifest_digest: digest,
            manifest,
            config,
        })
    }

    async fn resolve_from(
        &self,
        repo: &Repo,
        reference: &Reference,
        platform: &Platform,
        store: &BlobStore,
    ) -> Result<(Digest, Manifest), RegistryError> {
        let tag_or_digest = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let top = self
            .fetch_manifest(repo, reference, &tag_or_digest, reference.digest())
            .await?;
        let chosen = if media_type::is_index(&top.media_type) {
            let index: Index = parse(repo, reference, "index", &top.bytes)?;
            let entry = index
                .find(platform)
                .ok_or_else(|| RegistryError::PlatformMissing {
                    reference: reference.whole(),
                    wanted: platform.clone(),
                    available: index.platforms(),
                })?;
            let digest = entry.digest.to_string();
            let child = self
                .fetch_manifest(repo, reference, &digest, Some(&digest))
                .await?;
            store.put(&top.bytes)?;
            child
        } else {
            top
        };
        if !media_type::is_manifest(&chosen.media_type) {
            return Err(RegistryError::Invalid {
                registry: repo.host.clone(),
                reference: reference.whole(),
                what: "manifest".into(),
                detail: format!(
                    "media type {:?} is neither an OCI nor a Docker schema 2 manifest (Docker schema 1 images are not supported: push the image again with a current tool)",
                    chosen.media_type
                ),
            });
        }
        let manifest: Manifest = parse(repo, reference, "manifest", &chosen.bytes)?;
        store.put(&chosen.bytes)?;
        Ok((chosen.digest, manifest))
    }

    /// Fetches several blobs at once (at most [`super::RegistryConfig::parallel_blobs`]).
    pub(crate) async fn fetch_blobs(
        &self,
        repo: &Repo,
        reference: &Reference,
        blobs: &[Descriptor],
        store: &BlobStore,
    ) -> Result<(), RegistryError> {
        stream::iter(blobs.iter().map(Ok))
            .try_for_each_concurrent(self.config().parallel_blobs.max(1), |d| {
                self.fetch_blob(repo, reference, d, store, None, None)
            })
            .await
    }

    /// Fetches a manifest or index by tag or digest. A manifest asked for by digest must hash
    /// to it; one asked for by tag must hash to the `Docker-Content-Digest` the registry
    /// names, when it names one. Wrong bytes are fetched again.
    pub(crate) async fn fetch_manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
        tag_or_digest: &str,
        expected: Option<&str>,
    ) -> Result<Fetched, RegistryError> {
        let url = format!(
            "{}{}/manifests/{tag_or_digest}",
            self.transport.base_url(&repo.host),
            repo.repository
        );
        let scopes = [Scope::pull(&repo.repository)];
        let what = format!("manifest {tag_or_digest}");
        let policy = &self.config().retry;
        let log = format!("pull {what} of {} from {}", reference.whole(), repo.host);
        let fetched = retry(policy, &log, || async {
            let resp = self
                .transport
                .send(&repo.host, &scopes, &|c| {
                    c.get(&url).header(ACCEPT, MANIFEST_TYPES)
                })
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(status_error(resp).await);
            }
            let header_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
            let named = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_bounded(resp, MAX_MANIFEST).await?;
            let digest = Digest::of(&bytes);
            if let Some(want) = expected.map(str::to_string).or(named) {
                if want.starts_with("sha256:") && want != digest.to_string() {
                    return Err(HttpError::WrongBytes {
                        detail: format!("the manifest sent as {want} hashes to {digest}"),
                    });
                }
            }
            let media_type = sniff_media_type(&bytes, header_type.as_deref());
            Ok(Fetched {
                bytes,
                digest,
                media_type,
            })
        })
        .await
        .map_err(|(e, attempts)| {
            Context {
                action: "pull",
                what: what.clone(),
                reference,
                registry: &repo.host,
            }
            .error(e, attempts)
        })?;
        Ok(fetched)
    }

    /// Downloads one blob into the store, verified, continuing `start` when given; resumes by
    /// `Range` after a break, starts over after wrong bytes.
    pub(crate) async fn fetch_blob(
        &self,
        repo: &Repo,
        reference: &Reference,
        desc: &Descriptor,
        store: &BlobStore,
        start: Option<PartialBlob>,
        mut tee: Option<Tee>,
    ) -> Result<(), RegistryError> {
        if store.contains(&desc.digest) {
            store.touch(&desc.digest);
            return Ok(());
        }
        let ctx = Context {
            action: "pull",
            what: format!("blob {}", desc.digest),
            reference,
            registry: &repo.host,
        };
        let url = format!(
            "{}{}/blobs/{}",
            self.transport.base_url(&repo.host),
            repo.repository,
            desc.digest
        );
        let scopes = [Scope::pull(&repo.repository)];
        let policy = &self.config().retry;
        let log = format!(
            "pull blob {} of {} from {}",
            desc.digest,
            reference.whole(),
            repo.host
        );
        let mut partial = match start {
            Some(p) if p.len() < desc.size => p,
            _ => store.partial()?,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .download(&repo.host, &scopes, &url, desc, &mut partial, &mut tee)
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    if let HttpError::Local(_) = e {
                        return Err(ctx.error(e, attempt));
                    }
                    if !pause_before_retry(policy, &log, attempt, &e).await {
                        return Err(ctx.error(e, attempt));
                    }
                }
            }
        }
        // The store hashes what it was given (PartialBlob) and renames only on a match.
        let digest = desc.digest;
        tokio::task::spawn_blocking(move || partial.commit(&digest))
            .await
            .map_err(|e| {
                RegistryError::Store(crate::store::StoreError::Io {
                    path: store.tmp_dir(),
                    source: std::io::Error::other(e.to_string()),
                })
            })??;
        Ok(())
    }

    /// One attempt: asks for what is still missing and appends it to `partial`.
    async fn download(
        &self,
        host: &str,
        scopes: &[Scope],
        url: &str,
        desc: &Descriptor,
        partial: &mut crate::store::PartialBlob,
        tee: &mut Option<Tee>,
    ) -> Result<(), HttpError> {
        let from = partial.len();
        let resp = self
            .transport
            .send(host, scopes, &|c| {
                let req = c.get(url);
                if from > 0 {
                    req.header(RANGE, format!("bytes={from}-"))
                } else {
                    req
                }
            })
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if from > 0 => {
                let start = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(from) {
                    partial.reset().map_err(HttpError::Local)?;
                    return Err(HttpError::WrongBytes {
                        detail: format!(
                            "asked for bytes from {from}, got a range starting at {start:?}"
                        ),
                    });
                }
            }
            StatusCode::OK => {
                if from > 0 {
                    // The registry ignores Range: take the whole blob again.
                    partial.reset().map_err(HttpError::Local)?;
                }
            }
            _ => return Err(status_error(resp).await),
        }
        let mut resp = resp;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return Err(HttpError::transport(e)),
            };
            if partial.len() + chunk.len() as u64 > desc.size {
                partial.reset().map_err(HttpError::Local)?;
                return Err(HttpError::WrongBytes {
                    detail: format!(
                        "blob {} is larger than the {} bytes its descriptor says",
                        desc.digest, desc.size
                    ),
                });
            }
            Tee::copy(tee, partial.len(), &chunk).await;
            partial.write(&chunk).map_err(HttpError::Local)?;
            super::transfer::received(chunk.len() as u64);
        }
        if partial.len() < desc.size {
            return Err(HttpError::Transport {
                detail: format!(
                    "the transfer ended after {} of {} bytes",
                    partial.len(),
                    desc.size
                ),
                url: url.to_string(),
            });
        }
        let actual = partial.digest();
        if actual != desc.digest {
            partial.reset().map_err(HttpError::Local)?;
            return Err(HttpError::WrongBytes {
                detail: format!(
                    "blob {} arrived as bytes hashing to {actual}; they were discarded",
                    desc.digest
                ),
            });
        }
        Ok(())
    }
}

/// Reads a response body, refusing more than `limit` bytes.
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(HttpError::transport)? {
        if out.len() + chunk.len() > limit {
            return Err(HttpError::Protocol {
                detail: format!("the answer is larger than {limit} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The media type of a manifest: its own `mediaType`, else the Content-Type, else guessed
/// from its shape (an index has `manifests`).
fn sniff_media_type(bytes: &[u8], header: Option<&str>) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let probe: Option<Probe> = serde_json::from_slice(bytes).ok();
    if let Some(mt) = probe.as_ref().and_then(|p| p.media_type.clone()) {
        return mt;
    }
    if let Some(h) = header.filter(|h| media_type::is_index(h) || media_type::is_manifest(h)) {
        return h.to_string();
    }
    match probe {
        Some(p) if p.manifests.is_some() => media_type::OCI_INDEX.into(),
        Some(p) if p.config.is_some() => media_type::OCI_MANIFEST.into(),
        _ => header.unwrap_or("unknown").to_string(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    repo: &Repo,
    reference: &Reference,
    what: &str,
    bytes: &[u8],
) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Invalid {
        registry: repo.host.clone(),
        reference: reference.whole(),
        what: what.into(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_are_sniffed() {
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":2,"manifests":[]}"#, None),
            media_type::OCI_INDEX
        );
        assert_eq!(
            sniff_media_type(
                br#"{"schemaVersion":2,"config":{}}"#,
                Some(media_type::DOCKER_MANIFEST)
            ),
            media_type::DOCKER_MANIFEST
        );
        assert_eq!(
            sniff_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#,
                Some("application/json")
            ),
            media_type::DOCKER_MANIFEST_LIST
        );
    }

    /// A tee copies the bytes from its start, in order: earlier ones are skipped, a chunk
    /// across the start is cut, and a transfer that starts over ends the copy.
    #[tokio::test]
    async fn a_tee_copies_from_its_start_in_order() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let mut tee = Some(Tee::starting_at(tx, 4));
        let b = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
        Tee::copy(&mut tee, 0, &b("abc")).await;
        Tee::copy(&mut tee, 3, &b("def")).await;
        Tee::copy(&mut tee, 6, &b("gh")).await;
        assert_eq!(rx.try_recv().unwrap(), b("ef"));
        assert_eq!(rx.try_recv().unwrap(), b("gh"));
        // Starting over (a registry ignoring Range, or wrong bytes) ends the copy.
        Tee::copy(&mut tee, 0, &b("abcdefgh")).await;
        assert!(tee.is_none());
        assert!(rx.try_recv().is_err());
        // A gap ends it too.
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let mut tee = Some(Tee::new(tx));
        Tee::copy(&mut tee, 2, &b("cd")).await;
        assert!(tee.is_none());
    }
}
