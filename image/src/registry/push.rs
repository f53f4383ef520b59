//! Pushing: blobs the registry lacks (skipped after a HEAD, mounted from another repository
//! when possible, else uploaded streamed from the store, chunked when large, several at once),
//! then manifests, then an index last, so that a tag never names something incomplete.

use std::io::{Seek, SeekFrom};

use futures_util::stream::{self, TryStreamExt};
use oci_client::Reference;
use ossb_protocol::Digest;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Body, StatusCode};

use super::http::{pause_before_retry, retry, status_error, with_query, HttpError, Scope};
use super::{Context, Registry, RegistryError, Repo};
use crate::oci::{media_type, Descriptor, Index, Manifest};
use crate::store::{BlobStore, StoreError};

/// How [`Registry::push_image`] pushes.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Repositories on the target's registry that may already hold some of the blobs (the
    /// base images' repositories): blobs are mounted from them instead of uploaded. Entries
    /// on another registry are ignored. Example: `["library/busybox"]`.
    pub mount_from: Vec<String>,
}

/// What happened to one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlobPush {
    Present,
    Mounted,
    Uploaded,
}

impl Registry {
    /// Pushes the image `top` (a manifest or an index, already in `store`) and everything it
    /// references to `reference`: layers and configs, then the manifests (by digest when
    /// `top` is an index), then `top` under the reference's tag (or by digest when the
    /// reference has only a digest). Returns the digest of `top`.
    ///
    /// Siblings go at once, as containerd's push (BuildKit's) does: every blob (layers and
    /// configs alike: nothing names them before a manifest does), then the index's manifests
    /// (images and BuildKit-layout attestation manifests, which name their image only in an
    /// annotation). Each wave costs a registry round trip or three (HEAD, upload) that the
    /// next would otherwise wait for, and an index with attestations has a few new small blobs
    /// and one more manifest per image in every build. A manifest whose `subject` is another
    /// manifest of this push (`oci-artifact=true`) waits for it: the OCI spec says a registry
    /// must accept it first, but some have refused it (GitLab's, until it was fixed).
    pub async fn push_image(
        &self,
        reference: &Reference,
        store: &BlobStore,
        top: &Descriptor,
        options: &PushOptions,
    ) -> Result<Digest, RegistryError> {
        let repo = Repo::of(reference);
        let invalid = |what: &str, e: serde_json::Error| RegistryError::Invalid {
            registry: "the local store".into(),
            reference: reference.whole(),
            what: what.into(),
            detail: e.to_string(),
        };
        let tag = reference
            .tag()
            .map(str::to_string)
            .or(reference.digest().map(str::to_string))
            .unwrap_or_else(|| "latest".into());
        // A rebuild that changed nothing: the registry holds this very manifest under the
        // tag, and so everything it names (a registry takes a manifest only once what it
        // names is there, and this one pushes them first). One round trip instead of a HEAD
        // per blob and a PUT per manifest.
        if self.tagged_already(&repo, &tag, top).await {
            tracing::debug!(%top.digest, tag, "already in the registry under the tag");
            return Ok(top.digest);
        }
        let top_bytes = store.read(&top.digest)?;
        let manifests: Vec<(Descriptor, Vec<u8>)> = if media_type::is_index(&top.media_type) {
            let index: Index =
                serde_json::from_slice(&top_bytes).map_err(|e| invalid("index", e))?;
            let mut out = Vec::new();
            for d in index.manifests {
                let bytes = store.read(&d.digest)?;
                out.push((d, bytes));
            }
            out
        } else {
            Vec::new()
        };
        let mut layers = Vec::new();
        let mut configs = Vec::new();
        let single = [(top.clone(), top_bytes.clone())];
        let images = if manifests.is_empty() {
            &single[..]
        } else {
            &manifests[..]
        };
        for (_, bytes) in images {
            let m: Manifest = serde_json::from_slice(bytes).map_err(|e| invalid("manifest", e))?;
            layers.extend(m.layers);
            configs.push(m.config);
        }
        // Layers first in the list: the big ones start while the small configs queue.
        let mut blobs = layers;
        blobs.extend(configs);
        dedup(&mut blobs);
        self.push_blobs(&repo, reference, store, &blobs, &options.mount_from)
            .await?;
        let repo = &repo;
        let (referrers, others): (Vec<_>, Vec<_>) = manifests
            .iter()
            .partition(|(_, bytes)| names_a_subject_among(bytes, &manifests));
        for wave in [others, referrers] {
            stream::iter(wave.into_iter().map(Ok))
                .try_for_each_concurrent(self.config().parallel_blobs.max(1), |(d, bytes)| {
                    let digest = d.digest.to_string();
                    async move {
                        self.put_manifest(repo, reference, &digest, bytes, &d.media_type)
                            .await
                            .map(|_| ())
                    }
                })
                .await?;
        }
        self.put_manifest(repo, reference, &tag, &top_bytes, &top.media_type)
            .await
    }

    /// Whether `tag` of `repo` names `top` already (`Docker-Content-Digest` of a HEAD);
    /// false on any error, so the push goes on as usual.
    async fn tagged_already(&self, repo: &Repo, tag: &str, top: &Descriptor) -> bool {
        let url = format!(
            "{}{}/manifests/{tag}",
            self.transport.base_url(&repo.host),
            repo.repository
        );
        let scopes = [Scope::push(&repo.repository)];
        let resp = self
            .transport
            .send(&repo.host, &scopes, &|c| {
                c.head(&url)
                    .header(reqwest::header::ACCEPT, &top.media_type)
            })
            .await;
        let Ok(resp) = resp else { return false };
        resp.status() == StatusCode::OK
            && resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                == Some(top.digest.to_string().as_str())
    }

    /// Pushes `blobs` (those the registry lacks), then `manifest` under `reference`'s tag (or
    /// by digest when it has only a digest). Returns the manifest digest. The blobs are pushed
    /// in the order given, several at once: put the config last.
    pub async fn push(
        &self,
        reference: &Reference,
        store: &BlobStore,
        blobs: &[Descriptor],
        manifest: &[u8],
        manifest_media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let repo = Repo::of(reference);
        let (configs, layers): (Vec<Descriptor>, Vec<Descriptor>) =
            blobs.iter().cloned().partition(|d| {
                d.media_type == media_type::OCI_CONFIG || d.media_type == media_type::DOCKER_CONFIG
            });
        self.push_blobs(&repo, reference, store, &layers, &[])
            .await?;
        self.push_blobs(&repo, reference, store, &configs, &[])
            .await?;
        let tag = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        self.put_manifest(&repo, reference, &tag, manifest, manifest_media_type)
            .await
    }

    /// Pushes several blobs at once.
    async fn push_blobs(
        &self,
        repo: &Repo,
        reference: &Reference,
        store: &BlobStore,
        blobs: &[Descriptor],
        mount_from: &[String],
    ) -> Result<(), RegistryError> {
        stream::iter(blobs.iter().map(Ok))
            .try_for_each_concurrent(self.config().parallel_blobs.max(1), |d| async move {
                let how = self
                    .push_blob(repo, reference, store, d, mount_from)
                    .await?;
                tracing::debug!("push {} to {}: {how:?}", d.digest, repo.host);
                Ok(())
            })
            .await
    }

    async fn push_blob(
        &self,
        repo: &Repo,
        reference: &Reference,
        store: &BlobStore,
        desc: &Descriptor,
        mount_from: &[String],
    ) -> Result<BlobPush, RegistryError> {
        let ctx = Context {
            action: "push",
            what: format!(
                "blob {} ({} bytes, {})",
                desc.digest, desc.size, desc.media_type
            ),
            reference,
            registry: &repo.host,
        };
        let path = store.path(&desc.digest);
        let size = std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    RegistryError::Store(StoreError::Missing(desc.digest))
                }
                _ => RegistryError::Store(StoreError::Io {
                    path: path.clone(),
                    source: e,
                }),
            })?;
        let sources: Vec<&String> = mount_from
            .iter()
            .filter(|s| **s != repo.repository)
            .collect();
        let mut scopes = vec![Scope::push(&repo.repository)];
        scopes.extend(sources.iter().map(|s| Scope::pull(s)));
        let policy = &self.config().retry;
        let log = format!("push blob {} to {}", desc.digest, repo.host);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .try_push_blob(repo, &scopes, &sources, desc, &path, size)
                .await;
            match result {
                Ok(how) => return Ok(how),
                Err(e) => {
                    if !pause_before_retry(policy, &log, attempt, &e).await {
                        return Err(ctx.error(e, attempt));
                    }
                }
            }
        }
    }

    async fn try_push_blob(
        &self,
        repo: &Repo,
        scopes: &[Scope],
        sources: &[&String],
        desc: &Descriptor,
        path: &std::path::Path,
        size: u64,
    ) -> Result<BlobPush, HttpError> {
        let base = format!(
            "{}{}/blobs/",
            self.transport.base_url(&repo.host),
            repo.repository
        );
        let digest = desc.digest.to_string();
        let head_url = format!("{base}{digest}");
        let resp = self
            .transport
            .send(&repo.host, scopes, &|c| c.head(&head_url))
            .await?;
        match resp.status() {
            StatusCode::OK => return Ok(BlobPush::Present),
            StatusCode::NOT_FOUND => {}
            _ => return Err(status_error(resp).await),
        }
        let uploads = format!("{base}uploads/");
        let mut location = None;
        for source in sources {
            let url = with_query(
                &uploads,
                &[("mount", digest.clone()), ("from", source.to_string())],
            );
            let resp = self
                .transport
                .send(&repo.host, scopes, &|c| {
                    c.post(&url).header(CONTENT_LENGTH, 0)
                })
                .await?;
            match resp.status() {
                StatusCode::CREATED => return Ok(BlobPush::Mounted),
                // Not mountable from there: the registry opened an ordinary upload instead.
                StatusCode::ACCEPTED => {
                    location = Some(self.location(&repo.host, &resp)?);
                    break;
                }
                s => tracing::debug!("mount of {digest} from {source} refused: {s}"),
            }
        }
        let location = match location {
            Some(l) => l,
            None => {
                let resp = self
                    .transport
                    .send(&repo.host, scopes, &|c| {
                        c.post(&uploads).header(CONTENT_LENGTH, 0)
                    })
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(status_error(resp).await);
                }
                self.location(&repo.host, &resp)?
            }
        };
        let chunk = self.config().chunk_size.max(1);
        let location = if size > chunk {
            self.upload_chunks(repo, scopes, location, path, size, chunk)
                .await?
        } else {
            location
        };
        let url = with_query(&location, &[("digest", digest.clone())]);
        let monolithic = size <= chunk;
        let resp = self
            .transport
            .send(&repo.host, scopes, &|c| {
                let req = c.put(&url);
                if monolithic {
                    req.header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, size)
                        .body(file_body(path, 0, size))
                } else {
                    req.header(CONTENT_LENGTH, 0)
                }
            })
            .await?;
        if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::NO_CONTENT {
            return Err(status_error(resp).await);
        }
        Ok(BlobPush::Uploaded)
    }

    /// PATCHes `path` in chunks of `chunk` bytes; after a broken chunk asks the registry how
    /// much it has and continues from there. Returns the location for the closing PUT.
    async fn upload_chunks(
        &self,
        repo: &Repo,
        scopes: &[Scope],
        mut location: String,
        path: &std::path::Path,
        size: u64,
        chunk: u64,
    ) -> Result<String, HttpError> {
        let mut offset = 0;
        let mut failures = 0;
        while offset < size {
            let len = chunk.min(size - offset);
            let url = location.clone();
            let sent = self
                .transport
                .send(&repo.host, scopes, &|c| {
                    c.patch(&url)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_RANGE, format!("{}-{}", offset, offset + len - 1))
                        .header(CONTENT_LENGTH, len)
                        .body(file_body(path, offset, len))
                })
                .await;
            let err = match sent {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    location = self.location(&repo.host, &resp)?;
                    offset += len;
                    continue;
                }
                Ok(resp) => status_error(resp).await,
                Err(e) => e,
            };
            failures += 1;
            let log = format!("push chunk at {offset} to {}", repo.host);
            if !pause_before_retry(&self.config().retry, &log, failures, &err).await {
                return Err(err);
            }
            // Where did the registry get to? (204 with `Range: 0-LAST`.)
            let url = location.clone();
            let resp = self
                .transport
                .send(&repo.host, scopes, &|c| c.get(&url))
                .await?;
            if resp.status() != StatusCode::NO_CONTENT {
                // Many registries drop an upload whose chunk broke off: start it over
                // (transient, so the caller's retry does).
                let answer = status_error(resp).await.detail();
                return Err(HttpError::Transport {
                    detail: format!(
                        "a chunk upload broke off ({}) and the registry cannot resume it ({answer})",
                        err.detail()
                    ),
                    url: String::new(),
                });
            }
            offset = resp
                .headers()
                .get(RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('-').next())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |last| last + 1);
            if let Ok(l) = self.location(&repo.host, &resp) {
                location = l;
            }
        }
        Ok(location)
    }

    /// The absolute upload URL from a response's `Location`.
    fn location(&self, host: &str, resp: &reqwest::Response) -> Result<String, HttpError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| HttpError::Protocol {
                detail: format!("{host} started an upload without a Location"),
            })?;
        let base = reqwest::Url::parse(&self.transport.base_url(host)).map_err(|e| {
            HttpError::Protocol {
                detail: e.to_string(),
            }
        })?;
        base.join(loc)
            .map(|u| u.to_string())
            .map_err(|e| HttpError::Protocol {
                detail: format!("{host} sent an invalid upload Location {loc:?}: {e}"),
            })
    }

    /// PUTs a manifest or index under `tag_or_digest`; returns its digest.
    async fn put_manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
        tag_or_digest: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        let url = format!(
            "{}{}/manifests/{tag_or_digest}",
            self.transport.base_url(&repo.host),
            repo.repository
        );
        let scopes = [Scope::push(&repo.repository)];
        let kind = if media_type::is_index(media_type) {
            "index"
        } else {
            "manifest"
        };
        let log = format!("push {kind} {digest} to {}", repo.host);
        retry(&self.config().retry, &log, || async {
            let resp = self
                .transport
                .send(&repo.host, &scopes, &|c| {
                    c.put(&url)
                        .header(CONTENT_TYPE, media_type)
                        .body(bytes.to_vec())
                })
                .await?;
            if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::OK {
                return Err(status_error(resp).await);
            }
            Ok(())
        })
        .await
        .map_err(|(e, attempts)| {
            Context {
                action: "push",
                what: format!("{kind} {digest} (as {tag_or_digest})"),
                reference,
                registry: &repo.host,
            }
            .error(e, attempts)
        })?;
        Ok(digest)
    }
}

/// Whether the manifest `bytes` has a `subject` that is one of `manifests`.
fn names_a_subject_among(bytes: &[u8], manifests: &[(Descriptor, Vec<u8>)]) -> bool {
    #[derive(serde::Deserialize)]
    struct Referrer {
        subject: Option<Descriptor>,
    }
    match serde_json::from_slice::<Referrer>(bytes) {
        Ok(Referrer { subject: Some(s) }) => manifests.iter().any(|(d, _)| d.digest == s.digest),
        _ => false,
    }
}

fn dedup(v: &mut Vec<Descriptor>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|d| seen.insert(d.digest));
}

/// `len` bytes of `path` from `offset`, streamed (never read whole into memory).
fn file_body(path: &std::path::Path, offset: u64, len: u64) -> Body {
    let opened = std::fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        Ok(f)
    });
    match opened {
        Ok(f) => {
            use futures_util::StreamExt;
            use tokio::io::AsyncReadExt;
            let reader = tokio::fs::File::from_std(f).take(len);
            // Counted as the HTTP client sends it (on its own task, hence taken along).
            let transfer = super::transfer::current();
            let counted = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).inspect(
                move |chunk| {
                    if let (Some(t), Ok(bytes)) = (&transfer, chunk) {
                        t.add_sent(bytes.len() as u64);
                    }
                },
            );
            Body::wrap_stream(counted)
        }
        Err(e) => Body::wrap_stream(stream::once(async move { Err::<bytes::Bytes, _>(e) })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(digest: &Digest) -> (Descriptor, Vec<u8>) {
        let bytes = format!(r#"{{"schemaVersion":2,"layers":[],"n":"{digest}"}}"#).into_bytes();
        (
            Descriptor {
                media_type: media_type::OCI_MANIFEST.into(),
                digest: Digest::of(&bytes),
                size: bytes.len() as u64,
                platform: None,
                annotations: None,
            },
            bytes,
        )
    }

    #[test]
    fn a_manifest_waits_only_for_a_subject_of_the_same_push() {
        let image = manifest(&Digest::of(b"image"));
        let manifests = vec![image.clone()];
        let referrer = |subject: &Digest| {
            format!(
                r#"{{"schemaVersion":2,"subject":{{"mediaType":"{}","digest":"{subject}","size":1}}}}"#,
                media_type::OCI_MANIFEST
            )
        };
        assert!(names_a_subject_among(
            referrer(&image.0.digest).as_bytes(),
            &manifests
        ));
        // A subject elsewhere (already in the registry, or never) is no reason to wait.
        assert!(!names_a_subject_among(
            referrer(&Digest::of(b"elsewhere")).as_bytes(),
            &manifests
        ));
        // BuildKit's layout names the image in an annotation only.
        assert!(!names_a_subject_among(&image.1, &manifests));
    }
}
