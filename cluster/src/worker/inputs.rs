//! What a task brings in before its build: the stages other tasks built, the base images'
//! blobs (through the peer cache's single-flight), the context files; and what it hands back
//! to the peer cache.

use super::*;
use ossb_protocol::cluster::{ContextEntry, EntryKind};

/// The stages the task reads, as the tasks that built them left them. Their layers come
/// from the peer cache only when a step reads them (`ClusterSteps::blob`): a COPY of one file
/// out of a toolchain stage brings one layer. A worker without `--cache-peers` takes only the
/// stages whose layers are all in its store; for the others the engine goes through their
/// steps again, each one a cache hit where the cluster has its record (said in the task's log).
pub(super) fn needs(
    node: &Node,
    task: &TaskSpec,
    store: &BlobStore,
    forward: &Forward,
) -> Vec<BuiltStage> {
    let mut built = Vec::new();
    for wire in &task.needs {
        let stage = match stage_from_wire(wire) {
            Ok(stage) => stage,
            Err(e) => {
                tracing::warn!(task = task.task, error = %e, "an unreadable built stage");
                continue;
            }
        };
        let here = stage.layers.iter().all(|l| store.contains(&l.digest));
        if node.peers.is_some() || here {
            built.push(stage);
        } else {
            forward.event(Event::Info(format!(
                "{}: stage {} was built by another task, but its layers cannot be fetched here (this worker has no --cache-peers); going through its steps again",
                task.platform, stage.index
            )));
        }
    }
    if !built.is_empty() {
        let mut stages: Vec<usize> = built.iter().map(|s| s.index).collect();
        stages.sort_unstable();
        let stages: Vec<String> = stages.iter().map(usize::to_string).collect();
        forward.event(Event::Info(format!(
            "{}: starting from stage {} as built by other tasks (their layers come from the peer cache as steps read them)",
            task.platform,
            stages.join(", ")
        )));
    }
    built
}

/// Sends the image's blobs and manifest to the peer cache. Needed when the client downloads
/// the result (an error then); otherwise a best effort for other workers and builds.
pub(super) async fn publish(
    node: &Node,
    store: &BlobStore,
    blobs: &[Digest],
    manifest: Option<&Digest>,
    required: bool,
) -> Result<(), Failure> {
    let Some(peers) = &node.peers else {
        if required {
            return Err(Failure {
                message: "this build's output is downloaded through the peer cache, but the worker has no --cache-peers".into(),
                exit_code: 1,
            });
        }
        return Ok(());
    };
    for digest in blobs.iter().chain(manifest) {
        match peers.put_from_store(digest, store).await {
            Ok(_) => count_published(node, digest, store),
            Err(e) if required => {
                return Err(Failure {
                    message: format!("publishing {digest} to the peer cache: {e}"),
                    exit_code: 1,
                })
            }
            Err(e) => tracing::warn!(%digest, error = %e, "publishing to the peer cache failed"),
        }
    }
    Ok(())
}

/// Brings the blobs (configs, layers) of the build's base images that the store lacks, through
/// the peer cache's single-flight ([`bring`]), counting where each came from in `inputs`.
/// Returns those it could not bring, with their sizes: the engine pulls them from the
/// registry. Also returns the base images' references (sources of cross-repository mounts).
/// Best effort: a base that cannot be resolved here is left to the engine, which reports the
/// error. Last, whether every base is known to have no `ONBUILD` triggers (their steps, which
/// may read the context, are planned only by the engine).
pub(super) async fn fetch_bases(
    node: &Node,
    req: &BuildRequest,
    df: &ossb_dockerfile::Dockerfile,
    platform: &Platform,
    store: &BlobStore,
    inputs: &mut InputStats,
    steps: &ClusterSteps,
) -> (Vec<(Digest, u64)>, Vec<Reference>, bool) {
    use futures_util::stream::{self, StreamExt};
    let bases = match ossb_dockerfile::base_images_with_platforms(df, &req.plan_options(platform)) {
        Ok(b) => b,
        Err(_) => return (Vec::new(), Vec::new(), false),
    };
    let Ok(registry) = Registry::with_config(&req.registry, &req.registry_config) else {
        return (Vec::new(), Vec::new(), false);
    };
    let mut wanted: Vec<(Reference, Descriptor)> = Vec::new();
    let mut references = Vec::new();
    let (mut configs, mut unresolved) = (Vec::new(), false);
    for (reference, platform) in bases {
        let Ok(parsed) = parse_reference(&reference) else {
            unresolved = true;
            continue;
        };
        references.push(parsed.clone());
        match registry.resolve(&parsed, &platform, store).await {
            Ok((_, manifest)) => {
                configs.push(manifest.config.digest);
                for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
                    if !wanted.iter().any(|(_, w)| w.digest == d.digest) {
                        wanted.push((parsed.clone(), d.clone()));
                    }
                }
            }
            Err(e) => {
                unresolved = true;
                tracing::debug!(%reference, error = %e, "resolving a base image");
            }
        }
    }
    // Known once their configs are here (brought below, or pulled by the engine: unknown).
    let onbuild_free = |store: &BlobStore| {
        !unresolved
            && configs.iter().all(|d| {
                store
                    .read(d)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ossb_image::oci::ImageConfig>(&b).ok())
                    .is_some_and(|c| c.config.on_build.is_none_or(|t| t.is_empty()))
            })
    };
    let (present, absent): (Vec<_>, Vec<_>) = wanted
        .into_iter()
        .partition(|(_, d)| store.contains(&d.digest));
    inputs.local_blobs += present.len() as u64;
    let Some(peers) = &node.peers else {
        let absent = absent.iter().map(|(_, d)| (d.digest, d.size)).collect();
        return (absent, references, onbuild_free(store));
    };
    let registry = &registry;
    let brought: Vec<(Descriptor, Option<Brought>)> = stream::iter(absent)
        .map(|(reference, desc)| async move {
            let how = bring(peers, registry, &reference, &desc, store, steps).await;
            (desc, how)
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut missing = Vec::new();
    for (desc, how) in brought {
        match how {
            Some(Brought::Peer(n)) => {
                inputs.peer_blobs += 1;
                inputs.peer_bytes += n;
            }
            Some(Brought::Registry { registry, peer }) => {
                inputs.registry_blobs += 1;
                inputs.registry_bytes += registry;
                inputs.peer_bytes += peer;
            }
            None => missing.push((desc.digest, desc.size)),
        }
    }
    (missing, references, onbuild_free(store))
}

/// The entries of the task's context that its stages read: every directory and special file,
/// and the regular files a COPY/ADD source or bind mount of a stage it runs names (with
/// `.dockerignore` files, which the engine reads). The whole context when that cannot be known
/// here: a base image with `ONBUILD` triggers or not resolved (`onbuild_free` false), a stage
/// from a named context, a symlink in the context (a source may resolve through it), a source
/// climbing with `..`, or the context's SBOM scan.
pub(super) fn context_read(
    plan: Option<&ossb_dockerfile::BuildPlan>,
    task: &TaskSpec,
    built: &[BuiltStage],
    onbuild_free: bool,
) -> Vec<ContextEntry> {
    let all = || task.spec.context.clone();
    let symlinks = task
        .spec
        .context
        .iter()
        .any(|e| matches!(e.kind, EntryKind::Symlink(_)));
    if !onbuild_free || symlinks {
        return all();
    }
    let Some(plan) = plan else {
        return all();
    };
    let run = plan.stages_to_run(|p| built.iter().any(|b| b.index == plan.stages[p].index));
    let from_context = plan
        .stages
        .iter()
        .zip(&run)
        .any(|(s, r)| *r && matches!(s.base, ossb_dockerfile::Base::Context(_)));
    let Some(sources) = plan.context_reads(&run).filter(|_| !from_context) else {
        return all();
    };
    let mut patterns: Vec<Vec<&str>> = Vec::new();
    for source in &sources {
        let segments: Vec<&str> = source
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        if segments.is_empty() || segments.contains(&"..") {
            return all();
        }
        patterns.push(segments);
    }
    let read = |path: &str| {
        let path: Vec<&str> = path.split('/').collect();
        (path.len() == 1 && path[0].ends_with(".dockerignore"))
            || patterns.iter().any(|p| {
                p.len() <= path.len()
                    && p.iter()
                        .zip(&path)
                        .all(|(p, n)| ossb_worker::fs::wildcard_match(p, n))
            })
    };
    task.spec
        .context
        .iter()
        .filter(|e| !matches!(e.kind, EntryKind::File { .. }) || read(&e.path))
        .cloned()
        .collect()
}

/// Where [`bring`] found a blob, and its size.
pub(super) enum Brought {
    Peer(u64),
    /// Fetched for the cluster: `registry` bytes from there, the `peer` bytes before them
    /// kept by the home node from a fetch that broke off.
    Registry {
        registry: u64,
        peer: u64,
    },
}

/// Brings one blob of `reference` into `store` with the cluster's single-flight: from the peer
/// cache (as another worker's fetch of it arrives there, when one is under way), or, when
/// nobody has it, fetched from the registry by this worker for the whole cluster, streamed to
/// the blob's home node while it downloads. A fetch that breaks off leaves its bytes on the
/// node; the next asker's fetch resumes from them, by `Range`. `None`: left to the engine's
/// pull.
pub(super) async fn bring(
    peers: &PeerCache,
    registry: &Registry,
    reference: &Reference,
    desc: &Descriptor,
    store: &BlobStore,
    steps: &ClusterSteps,
) -> Option<Brought> {
    for _ in 0..3 {
        match peers.get_or_claim(&desc.digest, store).await {
            Ok(Claimed::Got(n)) => return Some(Brought::Peer(n)),
            Ok(Claimed::Fetch(fetch)) => {
                let Fetch { node, from, start } = *fetch;
                tracing::info!(digest = %desc.digest, reference = %reference.whole(), home = %node, from, "fetching a blob from the registry for the cluster");
                let (tx, rx) = mpsc::channel(16);
                let tee = Tee::starting_at(tx, from);
                let (pulled, put) = tokio::join!(
                    registry.pull_blob(reference, desc, store, Some(start), Some(tee)),
                    peers.put_stream(&node, &desc.digest, desc.size, from, rx)
                );
                if let Err(e) = pulled {
                    tracing::warn!(digest = %desc.digest, error = %e, "fetching a base blob for the cluster");
                    return None;
                }
                if let Err(e) = put {
                    tracing::debug!(digest = %desc.digest, error = %e, "streaming a fetched blob to its home node");
                }
                // Its second home too (the first answers that it has it), off the task's path.
                steps.publish_blob(desc.digest, store);
                return Some(Brought::Registry {
                    registry: desc.size - from,
                    peer: from,
                });
            }
            Err(e) => tracing::debug!(digest = %desc.digest, error = %e, "single-flight get"),
        }
    }
    None
}

/// Puts `digest` from `store` into the peer cache, counting it; whether it went (a failure is
/// logged: the peer cache is an optimisation here).
pub(super) async fn put(node: &Node, digest: &Digest, store: &BlobStore) -> bool {
    let Some(peers) = &node.peers else {
        return false;
    };
    match peers.put_from_store(digest, store).await {
        Ok(_) => {
            count_published(node, digest, store);
            true
        }
        Err(e) => {
            tracing::warn!(%digest, error = %e, "publishing to the peer cache failed");
            false
        }
    }
}

fn count_published(node: &Node, digest: &Digest, store: &BlobStore) {
    let c = &node.counters;
    c.blobs_published.fetch_add(1, Ordering::Relaxed);
    c.bytes_published
        .fetch_add(store.size(digest).unwrap_or(0), Ordering::Relaxed);
}

/// Where a context file came from, and its size.
pub(super) enum Fetched {
    Peer(u64),
    Coordinator(u64),
}

/// Brings one context file into `store`. A large one goes through the peer cache's
/// single-flight, as base blobs do: from the peers (as another worker's fetch of it arrives,
/// when one is under way), or, when nobody has it, from the coordinator by this worker for
/// the cluster, streamed to the file's home node while it arrives. A small one, or one the
/// peer cache cannot help with, comes from the coordinator.
pub(super) async fn fetch_context_file(
    node: &Node,
    conn: &quinn::Connection,
    store: &BlobStore,
    digest: &Digest,
    size: u64,
    steps: &ClusterSteps,
) -> Result<Fetched, ClusterError> {
    let c = &node.counters;
    let peers = node.peers.as_ref().filter(|_| size >= PEER_CONTEXT_FILE);
    if let Some(peers) = peers {
        match peers.get_or_claim(digest, store).await {
            Ok(Claimed::Got(n)) => {
                c.context_bytes_peer.fetch_add(n, Ordering::Relaxed);
                return Ok(Fetched::Peer(n));
            }
            Ok(Claimed::Fetch(claim)) => {
                let (home, from) = (claim.node, claim.from);
                // The coordinator sends whole files: the bytes the home node kept are skipped.
                let (tx, rx) = mpsc::channel(16);
                let (fetched, put) = tokio::join!(
                    fetch(conn, store, digest, Some(Tee::starting_at(tx, from))),
                    peers.put_stream(&home, digest, size, from, rx)
                );
                let n = fetched?;
                c.context_bytes_coordinator.fetch_add(n, Ordering::Relaxed);
                if let Err(e) = put {
                    tracing::debug!(%digest, error = %e, "streaming a context file to its home node");
                }
                // Its second home too (the first answers that it has it).
                steps.publish_blob(*digest, store);
                return Ok(Fetched::Coordinator(n));
            }
            Err(e) => tracing::debug!(%digest, error = %e, "context file not in the peer cache"),
        }
    }
    let n = fetch(conn, store, digest, None).await?;
    c.context_bytes_coordinator.fetch_add(n, Ordering::Relaxed);
    if peers.is_some() {
        steps.publish_blob(*digest, store);
    }
    Ok(Fetched::Coordinator(n))
}

/// Fetches one context file from the coordinator into `store`, copying its bytes to `tee` as
/// they arrive; returns its size.
async fn fetch(
    conn: &quinn::Connection,
    store: &BlobStore,
    digest: &Digest,
    tee: Option<Tee>,
) -> Result<u64, ClusterError> {
    let (mut tx, mut rx) = conn.open_bi().await.map_err(ossb_net::NetError::from)?;
    send(&mut tx, ClusterMessage::FetchBlob { digest: *digest }).await?;
    let _ = tx.finish();
    match recv(&mut rx, "the coordinator").await? {
        ClusterMessage::Blob { size } => {
            recv_blob_bytes(&mut rx, store, digest, size, tee).await?;
            Ok(size)
        }
        other => Err(ClusterError::Protocol {
            peer: "the coordinator".into(),
            got: other.kind().to_string(),
        }),
    }
}

/// The named contexts of `task` that are other bake targets' images, brought into `store`
/// (manifest from the task, config and layers from the peer cache, each verified) for the
/// engine to read as built images.
pub(super) async fn linked_contexts(
    node: &Node,
    task: &TaskSpec,
    store: &BlobStore,
    forward: &Forward,
) -> Result<Vec<(String, ossb_engine::ContextSource)>, Failure> {
    let fail = |message: String| Failure {
        message,
        exit_code: 1,
    };
    let mut out = Vec::new();
    for context in &task.contexts {
        let what = format!(
            "context {} (target {}'s image)",
            context.name, context.target
        );
        let image: ossb_image::oci::Descriptor = serde_json::from_str(&context.descriptor_json)
            .map_err(|e| fail(format!("{what}: an invalid descriptor: {e}")))?;
        if Digest::of(&context.manifest) != image.digest {
            return Err(fail(format!(
                "{what}: the manifest does not match its digest"
            )));
        }
        store
            .put(&context.manifest)
            .map_err(|e| fail(format!("{what}: storing the manifest: {e}")))?;
        let missing: Vec<&Digest> = context
            .blobs
            .iter()
            .filter(|d| !store.contains(d))
            .collect();
        let mut bytes = 0;
        if !missing.is_empty() {
            let peers = node.peers.as_ref().ok_or_else(|| {
                fail(format!(
                    "{what}: its blobs are in the peer cache, and this worker has no --cache-peers"
                ))
            })?;
            for digest in &missing {
                bytes += peers
                    .get_to_store(digest, store)
                    .await
                    .map_err(|e| fail(format!("{what}: bringing {digest}: {e}")))?;
            }
        }
        forward.event(Event::Info(format!(
            "{}: {what}: {} blobs in this worker's store, {} from the peer cache ({bytes} bytes)",
            task.platform,
            context.blobs.len() - missing.len(),
            missing.len()
        )));
        out.push((
            context.name.clone(),
            ossb_engine::ContextSource::Built {
                target: context.target.clone(),
                image,
            },
        ));
    }
    Ok(out)
}
