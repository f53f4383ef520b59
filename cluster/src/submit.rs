//! `ossb-submit`: runs a build on the cluster as `ossb build` would run it here.
//!
//! The context is listed by content and only the files the coordinator lacks are uploaded;
//! the coordinator's events are handed to the caller's [`Progress`] as the engine's own; a
//! result to write locally (`--output type=oci|docker|local`) is downloaded from the peer
//! cache. If the connection breaks, the client asks the coordinator how the build ended, for as
//! long as it says the build runs (a restarted coordinator runs the builds it had accepted
//! again), and fails once the coordinator stays out of reach for a minute.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use ossb_cache_node::PeerCache;
use ossb_image::export::{self, NamedImage};
use ossb_image::layer::ApplyOptions;
use ossb_image::oci::Descriptor;
use ossb_image::store::BlobStore;
use ossb_net::{Identity, Role};
use ossb_protocol::cluster::{BuiltImage, ClusterMessage, Failure};
use ossb_protocol::Digest;

use super::context::{scan, scan_named, spec_of};
use super::{event_from_wire, recv, send, send_file, ClusterError};
use ossb_engine::build::{BuildError, BuildRequest, BuildResult, Output};
use ossb_engine::progress::{Event, Progress};
use ossb_engine::Stats;

/// Where the cluster is.
#[derive(Clone, Debug)]
pub struct SubmitConfig {
    /// The coordinator, `host:port`.
    pub coordinator: String,
    /// The certificates (`ossb certs init`): ca.crt, client.crt, client.key.
    pub tls_dir: PathBuf,
}

/// Context files uploaded at once.
const PARALLEL_UPLOADS: usize = 8;

/// What a failure to talk with the coordinator reads as.
fn cluster_error(config: &SubmitConfig, e: ClusterError) -> BuildError {
    BuildError::Local(format!("the build cluster at {}: {e}", config.coordinator))
}

/// A connection to the coordinator as the client of `config`, with the stream of one
/// conversation (a build or a bake) open on it.
struct Conversation {
    /// The client's endpoint (a lost conversation asks again through it).
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    tx: quinn::SendStream,
    rx: quinn::RecvStream,
}

async fn open_conversation(config: &SubmitConfig) -> Result<Conversation, BuildError> {
    let identity = Identity::load(&config.tls_dir, Role::Client).map_err(usage)?;
    let endpoint = ossb_net::client(&identity).map_err(local)?;
    let conn = ossb_net::connect(&endpoint, &config.coordinator, super::CONNECT_TIMEOUT)
        .await
        .map_err(|e| cluster_error(config, e.into()))?;
    let (tx, rx) = conn
        .open_bi()
        .await
        .map_err(|e| cluster_error(config, ossb_net::NetError::from(e).into()))?;
    Ok(Conversation {
        endpoint,
        conn,
        tx,
        rx,
    })
}

/// Runs `req` on the cluster, reporting to `progress`.
pub async fn submit(
    req: &BuildRequest,
    config: &SubmitConfig,
    progress: &dyn Progress,
) -> Result<BuildResult, BuildError> {
    if !req.context.is_dir() {
        return Err(BuildError::Usage(format!(
            "build context {} is not a directory",
            req.context.display()
        )));
    }
    let (entries, mut files) = scan(req).map_err(BuildError::Usage)?;
    let named = scan_named(req, &mut files).map_err(BuildError::Usage)?;
    let spec = spec_of(req, entries, named)?;
    let cluster = |e: ClusterError| cluster_error(config, e);
    let Conversation {
        endpoint,
        conn,
        mut tx,
        mut rx,
    } = open_conversation(config).await?;
    send(&mut tx, ClusterMessage::Submit(spec))
        .await
        .map_err(cluster)?;
    let missing = match recv(&mut rx, "the coordinator").await.map_err(cluster)? {
        ClusterMessage::NeedBlobs { digests } => digests,
        // Refused before anything was uploaded (a bad Dockerfile, a bad tag).
        ClusterMessage::Finished(outcome) => return finish(req, config, outcome.result).await,
        other => return Err(unexpected(other)),
    };
    let (id, t) = (0usize, Instant::now());
    progress.event(Event::Started {
        id,
        name: format!(
            "[internal] sending {} of {} context files to {}",
            missing.len(),
            files.len(),
            config.coordinator
        ),
    });
    upload(&conn, &files, &missing).await.map_err(cluster)?;
    progress.event(Event::Done {
        id,
        elapsed: t.elapsed(),
    });
    send(&mut tx, ClusterMessage::UploadsDone)
        .await
        .map_err(cluster)?;
    let build = match recv(&mut rx, "the coordinator").await.map_err(cluster)? {
        ClusterMessage::Accepted { build } => build,
        ClusterMessage::Finished(outcome) => return finish(req, config, outcome.result).await,
        other => return Err(unexpected(other)),
    };
    progress.event(Event::Info(format!(
        "build {build} accepted by {}",
        config.coordinator
    )));
    let result = loop {
        match recv(&mut rx, "the coordinator").await {
            Ok(ClusterMessage::Event(e)) => progress.event(event_from_wire(e)),
            Ok(ClusterMessage::Finished(outcome)) => break outcome.result,
            Ok(other) => return Err(unexpected(other)),
            Err(e) => {
                progress.event(Event::Info(format!(
                    "lost the coordinator ({e}); asking how build {build} ended"
                )));
                break status_after_loss(&endpoint, config, &build, progress).await?;
            }
        }
    };
    finish(req, config, result).await
}

/// One target of a bake to submit: its name, its request, and its named contexts that are
/// other targets' images, as (context, target).
pub type BakeRequest<'a> = (&'a str, &'a BuildRequest, &'a [(String, String)]);

/// Runs every target of a bake on the cluster at once: the coordinator plans and schedules
/// them as one graph (a stage two targets plan alike is built once, the others spread over the
/// workers together; a target's image another reads as a named context is handed to it
/// through the peer cache). Each target's events go to its own `progress`; the results come
/// in the order of `targets`, each as `submit` gives it.
pub async fn submit_bake(
    targets: &[BakeRequest<'_>],
    config: &SubmitConfig,
    progress: &[&dyn Progress],
) -> Vec<Result<BuildResult, BuildError>> {
    let mut files = BTreeMap::new();
    let mut specs = Vec::new();
    for (name, req, links) in targets {
        let spec = bake_target_spec(req, &mut files).map(|mut spec| {
            for (context, target) in links.iter() {
                spec.context_sources.push((
                    ossb_dockerfile::context_name(context),
                    format!("target:{target}"),
                ));
            }
            spec
        });
        match spec {
            Ok(spec) => specs.push(ossb_protocol::cluster::BakeTarget {
                name: name.to_string(),
                spec,
            }),
            Err(e) => {
                // Nothing is submitted: the others are refused with it.
                let text = e.to_string();
                return targets
                    .iter()
                    .map(|(other, _, _)| match other == name {
                        true => Err(BuildError::Usage(text.clone())),
                        false => Err(BuildError::Usage(format!(
                            "not submitted: target {name}: {text}"
                        ))),
                    })
                    .collect();
            }
        }
    }
    let ends = match run_bake(specs, &files, config, progress).await {
        Ok(ends) => ends,
        Err(e) => {
            let text = e.to_string();
            let code = e.exit_code();
            return targets
                .iter()
                .map(|_| match code {
                    2 => Err(BuildError::Usage(text.clone())),
                    _ => Err(BuildError::Local(text.clone())),
                })
                .collect();
        }
    };
    let mut out = Vec::with_capacity(targets.len());
    for ((_, req, _), end) in targets.iter().zip(ends) {
        out.push(finish(req, config, end).await);
    }
    out
}

/// A bake target's spec, its context files added to `files`.
fn bake_target_spec(
    req: &BuildRequest,
    files: &mut BTreeMap<Digest, PathBuf>,
) -> Result<ossb_protocol::cluster::BuildSpec, BuildError> {
    if !req.context.is_dir() {
        return Err(BuildError::Usage(format!(
            "build context {} is not a directory",
            req.context.display()
        )));
    }
    let (entries, mut own) = scan(req).map_err(BuildError::Usage)?;
    let named = scan_named(req, &mut own).map_err(BuildError::Usage)?;
    files.extend(own);
    spec_of(req, entries, named)
}

/// The conversation of a bake: submitted, its files uploaded, every target's events and end.
/// The targets' outcomes in order (a refused bake is one error for all).
async fn run_bake(
    targets: Vec<ossb_protocol::cluster::BakeTarget>,
    files: &BTreeMap<Digest, PathBuf>,
    config: &SubmitConfig,
    progress: &[&dyn Progress],
) -> Result<Vec<Result<BuiltImage, Failure>>, BuildError> {
    let count = targets.len();
    let cluster = |e: ClusterError| cluster_error(config, e);
    let Conversation {
        endpoint,
        conn,
        mut tx,
        mut rx,
    } = open_conversation(config).await?;
    let refused = |outcome: ossb_protocol::cluster::BuildOutcome| match outcome.result {
        Err(f) if f.exit_code == 2 => BuildError::Usage(f.message),
        Err(f) => BuildError::Local(f.message),
        Ok(_) => BuildError::Local("the coordinator answered a bake with one image".into()),
    };
    send(
        &mut tx,
        ClusterMessage::SubmitBake(ossb_protocol::cluster::BakeSpec { targets }),
    )
    .await
    .map_err(cluster)?;
    let missing = match recv(&mut rx, "the coordinator").await.map_err(cluster)? {
        ClusterMessage::NeedBlobs { digests } => digests,
        ClusterMessage::Finished(outcome) => return Err(refused(outcome)),
        other => return Err(unexpected(other)),
    };
    let (id, t) = (0usize, Instant::now());
    if let Some(first) = progress.first() {
        first.event(Event::Started {
            id,
            name: format!(
                "[internal] sending {} of {} context files to {}",
                missing.len(),
                files.len(),
                config.coordinator
            ),
        });
    }
    upload(&conn, files, &missing).await.map_err(cluster)?;
    if let Some(first) = progress.first() {
        first.event(Event::Done {
            id,
            elapsed: t.elapsed(),
        });
    }
    send(&mut tx, ClusterMessage::UploadsDone)
        .await
        .map_err(cluster)?;
    let builds = match recv(&mut rx, "the coordinator").await.map_err(cluster)? {
        ClusterMessage::BakeAccepted { builds } if builds.len() == count => builds,
        ClusterMessage::Finished(outcome) => return Err(refused(outcome)),
        other => return Err(unexpected(other)),
    };
    for (build, p) in builds.iter().zip(progress) {
        p.event(Event::Info(format!(
            "build {build} accepted by {}",
            config.coordinator
        )));
    }
    let mut ends: Vec<Option<Result<BuiltImage, Failure>>> = vec![None; count];
    while ends.iter().any(Option::is_none) {
        match recv(&mut rx, "the coordinator").await {
            Ok(ClusterMessage::TargetEvent { target, event }) => {
                if let Some(p) = progress.get(target as usize) {
                    p.event(event_from_wire(event));
                }
            }
            Ok(ClusterMessage::TargetFinished { target, outcome }) => {
                match ends.get_mut(target as usize) {
                    Some(end) => *end = Some(outcome.result),
                    None => {
                        return Err(unexpected(ClusterMessage::TargetFinished {
                            target,
                            outcome,
                        }))
                    }
                }
            }
            Ok(other) => return Err(unexpected(other)),
            Err(e) => {
                for ((end, build), p) in ends.iter_mut().zip(&builds).zip(progress) {
                    if end.is_none() {
                        p.event(Event::Info(format!(
                            "lost the coordinator ({e}); asking how build {build} ended"
                        )));
                        *end = Some(status_after_loss(&endpoint, config, build, *p).await?);
                    }
                }
            }
        }
    }
    Ok(ends.into_iter().flatten().collect())
}

fn usage(e: ossb_net::NetError) -> BuildError {
    BuildError::Usage(e.to_string())
}

fn local(e: ossb_net::NetError) -> BuildError {
    BuildError::Local(e.to_string())
}

fn unexpected(m: ClusterMessage) -> BuildError {
    BuildError::Local(format!(
        "the coordinator answered out of turn: {}",
        m.kind()
    ))
}

/// Uploads the context files the coordinator asked for, several at once.
async fn upload(
    conn: &quinn::Connection,
    files: &BTreeMap<Digest, PathBuf>,
    missing: &[Digest],
) -> Result<(), ClusterError> {
    let results: Vec<Result<(), ClusterError>> = stream::iter(missing.iter())
        .map(|digest| async move {
            let path = files.get(digest).ok_or_else(|| ClusterError::Protocol {
                peer: "the coordinator".into(),
                got: format!("a request for {digest}, which is not in the context"),
            })?;
            let size = std::fs::metadata(path)
                .map_err(|e| ClusterError::Local(format!("{}: {e}", path.display())))?
                .len();
            let (mut tx, mut rx) = conn.open_bi().await.map_err(ossb_net::NetError::from)?;
            let upload = ClusterMessage::Upload {
                digest: *digest,
                size,
            };
            let sent = match send(&mut tx, upload).await {
                Ok(()) => send_file(&mut tx, path).await,
                Err(e) => Err(e),
            };
            if let Err(e @ ClusterError::Local(_)) = sent {
                return Err(e);
            }
            let _ = tx.finish();
            // A refused upload stops the stream: the coordinator's reply says why.
            match recv(&mut rx, "the coordinator").await? {
                ClusterMessage::Stored => Ok(()),
                other => Err(ClusterError::Protocol {
                    peer: "the coordinator".into(),
                    got: other.kind().to_string(),
                }),
            }
        })
        .buffer_unordered(PARALLEL_UPLOADS)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Asks how a build ended after the connection broke: a restarted coordinator runs the
/// builds it had accepted again, so the client waits as long as the coordinator says the
/// build runs, and gives up only when it cannot reach the coordinator for a minute.
async fn status_after_loss(
    endpoint: &quinn::Endpoint,
    config: &SubmitConfig,
    build: &str,
    progress: &dyn Progress,
) -> Result<Result<BuiltImage, Failure>, BuildError> {
    let mut unreachable_since = Instant::now();
    let mut last = String::new();
    let mut told = false;
    while unreachable_since.elapsed() < STATUS_PATIENCE {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ask = async {
            let conn =
                ossb_net::connect(endpoint, &config.coordinator, super::CONNECT_TIMEOUT).await?;
            let (mut tx, mut rx) = conn.open_bi().await.map_err(ossb_net::NetError::from)?;
            send(
                &mut tx,
                ClusterMessage::Status {
                    build: build.to_string(),
                },
            )
            .await?;
            recv(&mut rx, "the coordinator").await
        };
        match ask.await {
            Ok(ClusterMessage::Finished(outcome)) => return Ok(outcome.result),
            Ok(ClusterMessage::Running) => {
                if !told {
                    progress.event(Event::Info(format!(
                        "the coordinator is back and runs build {build}; waiting for it to end"
                    )));
                    told = true;
                }
                unreachable_since = Instant::now();
            }
            Ok(other) => return Err(unexpected(other)),
            Err(e) => last = e.to_string(),
        }
    }
    Err(BuildError::Local(format!(
        "lost the coordinator {} during build {build}, and could not reach it again within {}s: {last}",
        config.coordinator,
        STATUS_PATIENCE.as_secs()
    )))
}

/// How long a client that lost the coordinator tries to reach it again.
const STATUS_PATIENCE: Duration = Duration::from_secs(60);

/// Turns the outcome into the engine's result, writing local outputs first.
async fn finish(
    req: &BuildRequest,
    config: &SubmitConfig,
    result: Result<BuiltImage, Failure>,
) -> Result<BuildResult, BuildError> {
    let image = match result {
        Ok(image) => image,
        Err(f) if f.exit_code == 2 => return Err(BuildError::Usage(f.message)),
        Err(f) => return Err(BuildError::Local(f.message)),
    };
    let top: Descriptor = serde_json::from_str(&image.descriptor_json)
        .map_err(|e| BuildError::Local(format!("the coordinator sent an invalid image: {e}")))?;
    let local_outputs: Vec<&Output> = req
        .outputs
        .iter()
        .filter(|o| !matches!(o, Output::Registry | Output::CacheOnly))
        .collect();
    if !local_outputs.is_empty() {
        download(req, config, &image, &top, &local_outputs).await?;
    }
    Ok(BuildResult {
        image: top,
        config_digest: image.config,
        pushed: image.pushed,
        stats: Stats {
            run: image.run as usize,
            cached: image.cached as usize,
        },
        size: image.size,
        stage: None,
        facts: Vec::new(),
        sboms: Vec::new(),
        extra_sboms: Vec::new(),
    })
}

/// Writes the attestations of the downloaded image beside the files of its local export in
/// `dest`, as `ossb build` does: each statement about those files, under its file name; one
/// directory per platform for several.
fn write_local_attestations(
    store: &BlobStore,
    image: &BuiltImage,
    top: &Descriptor,
    dest: &std::path::Path,
) -> Result<(), BuildError> {
    let bad = |e: String| BuildError::Export(format!("the attestations of the download: {e}"));
    if image.statement_files.is_empty() {
        return Ok(());
    }
    let index: ossb_image::oci::Index =
        serde_json::from_slice(&store.read(&top.digest).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    let (images, attestations): (Vec<&Descriptor>, Vec<&Descriptor>) = index
        .manifests
        .iter()
        .partition(|m| !ossb_attest::is_attestation_manifest(m));
    let names: BTreeMap<&Digest, &String> =
        image.statement_files.iter().map(|(d, n)| (d, n)).collect();
    for attestation in attestations {
        let subject = attestation
            .annotations
            .as_ref()
            .and_then(|a| a.get(ossb_attest::REFERENCE_DIGEST_ANNOTATION));
        let of = images
            .iter()
            .find(|i| Some(&i.digest.to_string()) == subject)
            .ok_or_else(|| {
                bad(format!(
                    "{} attests no image of the index",
                    attestation.digest
                ))
            })?;
        let manifest: ossb_image::oci::Manifest = serde_json::from_slice(
            &store
                .read(&attestation.digest)
                .map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let mut statements = Vec::new();
        for layer in &manifest.layers {
            let name = names
                .get(&layer.digest)
                .ok_or_else(|| bad(format!("no file name for statement {}", layer.digest)))?;
            let bytes = store.read(&layer.digest).map_err(|e| bad(e.to_string()))?;
            statements.push((name.to_string(), bytes));
        }
        let dir = match (images.as_slice(), &of.platform) {
            ([_], _) | (_, None) => dest.to_path_buf(),
            (_, Some(p)) => dest.join(p.platform().to_string().replace('/', "_")),
        };
        ossb_engine::attestations::write_local_statements(&dir, &statements)?;
    }
    Ok(())
}

/// Fetches the image from the peer cache into the local cache directory and writes the
/// requested outputs.
async fn download(
    req: &BuildRequest,
    config: &SubmitConfig,
    image: &BuiltImage,
    top: &Descriptor,
    outputs: &[&Output],
) -> Result<(), BuildError> {
    let store = BlobStore::open(&req.cache_dir)
        .map_err(|e| BuildError::Local(format!("opening the cache: {e}")))?;
    let _lease = store
        .lease()
        .map_err(|e| BuildError::Local(format!("locking the cache: {e}")))?;
    let put = |bytes: &[u8]| {
        store
            .put(bytes)
            .map_err(|e| BuildError::Local(format!("storing the manifest: {e}")))
    };
    put(&image.top)?;
    for m in &image.manifests {
        put(m)?;
    }
    if image.cache_peers.is_empty() {
        return Err(BuildError::Export(
            "the workers have no peer cache to hand the image back through (start them with --cache-peers)".into(),
        ));
    }
    let peers = PeerCache::connect(&config.tls_dir, &image.cache_peers)
        .map_err(|e| BuildError::Export(format!("the peer cache: {e}")))?;
    for digest in &image.blobs {
        peers
            .get_to_store(digest, &store)
            .await
            .map_err(|e| BuildError::Export(format!("downloading the image: {e}")))?;
    }
    let named = [NamedImage {
        descriptor: top.clone(),
        names: req.tags.clone(),
    }];
    for output in outputs {
        let result = match output {
            Output::Oci { dest, tar: true } => export::write_oci_tar(&store, &named, dest),
            Output::Oci { dest, tar: false } => export::write_oci_dir(&store, &named, dest),
            Output::Docker { dest } => {
                let [platform] = req.platforms.as_slice() else {
                    return Err(BuildError::Usage(
                        "--output type=docker holds one platform; build one --platform, or use type=oci or type=registry for several".into(),
                    ));
                };
                export::write_docker_archive(&store, &named, dest, platform)
            }
            Output::Local { dest } => {
                export::write_local(&store, top, dest, &ApplyOptions::default())
                    .map_err(|e| BuildError::Export(e.to_string()))?;
                write_local_attestations(&store, image, top, dest)?;
                Ok(())
            }
            Output::Tar { dest } => {
                export::write_tar(&store, top, dest, &ApplyOptions::default()).map(|_| ())
            }
            Output::Registry | Output::CacheOnly => Ok(()),
        };
        result.map_err(|e| BuildError::Export(e.to_string()))?;
    }
    Ok(())
}
