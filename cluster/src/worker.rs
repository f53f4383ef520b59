//! `ossb worker`: a node that runs tasks (one platform of one build) for the coordinator.
//!
//! It registers (its platform, the platforms it emulates, its slots, its peer cache nodes),
//! heartbeats every [`super::HEARTBEAT`], and for each task: fetches the context files it lacks
//! (large ones from the peer cache first, see [`PEER_CONTEXT_FILE`]; the rest, and what the peers
//! lack, from the coordinator), lays the context out (named contexts too; secrets and registry CAs
//! as 0600 files of the task's directory, removed with it), brings the base images' blobs it lacks
//! from the peer cache (what the peers lack, the engine pulls from the registry, and the worker
//! publishes it to the peer cache afterwards), runs [`crate::build()`] for the platform with its
//! own cache directory (so its local step cache serves repeated builds), pushes the platform's
//! manifest by digest to each tag's repository when the build pushes, publishes the image's blobs
//! to the peer cache, and streams the engine's events back. A lost connection to the coordinator is
//! retried every second; tasks that were running are abandoned there (the coordinator reschedules
//! them). A task the coordinator cancels is aborted: its RUN child is killed and its directory
//! removed.
//!
//! The process must already be in its user namespace (the CLI enters it before the runtime
//! starts, as for `ossb build`): every RUN is an `ossb __sandbox` child, as in `ossb build`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ossb_cache_node::{Claimed, PeerCache};
use ossb_image::oci::{Descriptor, Manifest};
use ossb_image::registry::{parse_reference, Registry, Tee};
use ossb_image::store::BlobStore;
use ossb_image::Reference;
use ossb_net::{Identity, Role};
use ossb_protocol::cluster::{
    ClusterMessage, Failure, InputStats, PlatformOutcome, TaskSpec, WorkerInfo,
};
use ossb_protocol::{Digest, Platform};
use ossb_worker::sandbox::Isolation;
use tokio::sync::mpsc;

use super::context::{
    all_file_digests, materialize, request_of, stage_from_wire, stage_to_wire, TaskFiles, TaskPlace,
};
use super::{event_to_wire, local_err, recv, recv_blob_bytes, send, ClusterError};
use ossb_engine::build::{BuildRequest, BuiltStage};
use ossb_engine::cache::{CacheKey, CacheRecord, SharedSteps};
use ossb_engine::progress::{Event, Progress};

/// Context files fetched at once.
const PARALLEL_FETCHES: usize = 8;

/// Context files this large are looked for in the peer cache before the coordinator (their
/// origin), and published there when they came from it: then one coordinator does not feed
/// every worker the same large files. Smaller ones come straight from the coordinator, where
/// a peer-cache miss would cost more round trips than the file.
const PEER_CONTEXT_FILE: u64 = 1 << 20;

/// How `ossb worker` is set up.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The coordinator, `host:port`.
    pub coordinator: String,
    /// This worker's name (default: host name and pid).
    pub name: String,
    /// The platform it runs natively.
    pub platform: Platform,
    /// Platforms it runs through QEMU.
    pub emulates: Vec<Platform>,
    /// Tasks at once.
    pub slots: u32,
    /// Its cache and the tasks' contexts.
    pub work_dir: PathBuf,
    /// The certificates (`ossb certs init`): ca.crt, worker.crt, worker.key.
    pub tls_dir: PathBuf,
    /// The peer cache nodes.
    pub cache_peers: Vec<String>,
    /// How RUN steps are isolated.
    pub isolation: Isolation,
    /// The ossb binary (for `ossb __sandbox`).
    pub sandbox_exe: PathBuf,
    /// Where to serve `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
}

#[derive(Default)]
struct Counters {
    tasks_succeeded: AtomicU64,
    tasks_failed: AtomicU64,
    steps_run: AtomicU64,
    steps_cached: AtomicU64,
    /// Context bytes fetched from the coordinator and from the peer cache.
    context_bytes_coordinator: AtomicU64,
    context_bytes_peer: AtomicU64,
    blobs_published: AtomicU64,
    bytes_published: AtomicU64,
    running: AtomicU64,
    tasks_cancelled: AtomicU64,
    /// Base image blobs by where they came from, and the bytes fetched.
    blobs_local: AtomicU64,
    blobs_peer: AtomicU64,
    blobs_registry: AtomicU64,
    bytes_peer: AtomicU64,
    bytes_registry: AtomicU64,
    /// Steps taken from the cluster's step cache, and their layers fetched from peers.
    steps_cluster: AtomicU64,
    step_layers_peer: AtomicU64,
}

struct Node {
    config: WorkerConfig,
    identity: Identity,
    counters: Counters,
    peers: Option<PeerCache>,
    /// Running tasks, to abort one the coordinator cancels.
    tasks: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
}

impl Node {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, tokio::task::AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Takes the work directory for this worker alone (an exclusive lock held while it runs), then
/// removes what a worker killed there left: task directories (contexts, named contexts, CA
/// files) and the engine's work directories (rootfs of the steps that were running). No task
/// runs yet, so none of it is anyone's.
fn claim_work_dir(
    work_dir: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, ClusterError> {
    std::fs::create_dir_all(work_dir).map_err(local_err("creating the work dir"))?;
    let path = work_dir.join("worker.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(local_err("opening the work dir's lock"))?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, e)| {
            ClusterError::Local(format!(
                "{} is in use by another worker ({e}): give each worker a --work-dir of its own",
                work_dir.display()
            ))
        },
    )?;
    let tasks = work_dir.join("tasks");
    for leftover in [&tasks, &work_dir.join("cache").join("work")] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover)
                .map_err(local_err("removing what a killed worker left"))?;
        }
    }
    std::fs::create_dir_all(&tasks).map_err(local_err("creating the work dir"))?;
    Ok(lock)
}

/// Serves the coordinator until SIGTERM or SIGINT, reconnecting when the connection breaks.
pub async fn serve(config: WorkerConfig) -> Result<(), ClusterError> {
    let _only_worker = claim_work_dir(&config.work_dir)?;
    ossb_worker::sandbox::remove_stale_step_files();
    let identity = Identity::load(&config.tls_dir, Role::Worker)?;
    let peers = if config.cache_peers.is_empty() {
        None
    } else {
        // With the worker's certificate: a worker's Secret holds no client.crt.
        Some(PeerCache::new(
            ossb_net::client(&identity)?,
            &config.cache_peers,
        ))
    };
    let node = Arc::new(Node {
        config,
        identity,
        counters: Counters::default(),
        peers,
        tasks: Mutex::new(HashMap::new()),
    });
    if let Some(addr) = node.config.metrics {
        serve_metrics(addr, node.clone()).await?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(local_err("installing the SIGTERM handler"))?;
    let run = async {
        loop {
            if let Err(e) = session(&node).await {
                tracing::warn!(coordinator = %node.config.coordinator, error = %e, "not connected to the coordinator; retrying");
            }
            tokio::time::sleep(super::HEARTBEAT).await;
        }
    };
    tokio::select! {
        _ = run => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}

async fn serve_metrics(addr: SocketAddr, node: Arc<Node>) -> Result<(), ClusterError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(local_err("binding the metrics address"))?;
    let routes = ossb_net::http::metrics_and_health(move || prometheus(&node));
    tokio::spawn(ossb_net::http::serve(listener, routes));
    Ok(())
}

fn prometheus(node: &Node) -> String {
    let c = &node.counters;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut m = ossb_net::http::PrometheusText::default();
    m.family(
        "ossb_worker_tasks_total",
        "counter",
        "Tasks finished, by result.",
    )
    .sample(&[("result", "succeeded")], g(&c.tasks_succeeded))
    .sample(&[("result", "failed")], g(&c.tasks_failed))
    .sample(&[("result", "cancelled")], g(&c.tasks_cancelled));
    m.single(
        "ossb_worker_tasks_running",
        "gauge",
        "Tasks running.",
        g(&c.running),
    );
    m.family(
        "ossb_worker_steps_total",
        "counter",
        "Steps, by whether they ran or came from the local step cache.",
    )
    .sample(&[("result", "run")], g(&c.steps_run))
    .sample(
        &[("result", "cached"), ("source", "local")],
        g(&c.steps_cached).saturating_sub(g(&c.steps_cluster)),
    )
    .sample(
        &[("result", "cached"), ("source", "cluster")],
        g(&c.steps_cluster),
    );
    m.family(
        "ossb_worker_step_layers_total",
        "counter",
        "Layers of cluster cache hits fetched from the peer cache.",
    )
    .sample(&[("source", "peer")], g(&c.step_layers_peer));
    m.family(
        "ossb_worker_context_bytes_total",
        "counter",
        "Context bytes fetched, from the coordinator and from the peer cache.",
    )
    .sample(
        &[("source", "coordinator")],
        g(&c.context_bytes_coordinator),
    )
    .sample(&[("source", "peer")], g(&c.context_bytes_peer));
    m.family(
        "ossb_worker_published_total",
        "counter",
        "Blobs and bytes published to the peer cache.",
    )
    .sample(&[("unit", "blobs")], g(&c.blobs_published))
    .sample(&[("unit", "bytes")], g(&c.bytes_published));
    m.family(
        "ossb_worker_input_blobs_total",
        "counter",
        "Base image blobs, by where they came from: this worker's store, the peer cache, a registry.",
    )
    .sample(&[("source", "local")], g(&c.blobs_local))
    .sample(&[("source", "peer")], g(&c.blobs_peer))
    .sample(&[("source", "registry")], g(&c.blobs_registry));
    m.family(
        "ossb_worker_input_bytes_total",
        "counter",
        "Base image bytes fetched, from the peer cache and from registries.",
    )
    .sample(&[("source", "peer")], g(&c.bytes_peer))
    .sample(&[("source", "registry")], g(&c.bytes_registry));
    m.family("ossb_worker_info", "gauge", "The worker's platform.")
        .sample(&[("platform", &node.config.platform.to_string())], 1);
    m.finish()
}

/// One connection to the coordinator: register, then serve tasks until it breaks.
async fn session(node: &Arc<Node>) -> Result<(), ClusterError> {
    let endpoint = ossb_net::client(&node.identity)?;
    let conn =
        ossb_net::connect(&endpoint, &node.config.coordinator, super::CONNECT_TIMEOUT).await?;
    let (mut tx, mut rx) = conn.open_bi().await.map_err(ossb_net::NetError::from)?;
    let info = WorkerInfo {
        name: node.config.name.clone(),
        platform: node.config.platform.clone(),
        emulates: node.config.emulates.clone(),
        slots: node.config.slots,
        cache_peers: node.config.cache_peers.clone(),
    };
    send(&mut tx, ClusterMessage::Register(info)).await?;
    match recv(&mut rx, "the coordinator").await? {
        ClusterMessage::Registered { worker } => {
            tracing::info!(coordinator = %node.config.coordinator, name = %worker, "registered")
        }
        other => {
            return Err(ClusterError::Protocol {
                peer: "the coordinator".into(),
                got: other.kind().to_string(),
            })
        }
    }
    // One writer owns the stream: heartbeats, events and results queue for it.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ClusterMessage>();
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if send(&mut tx, m).await.is_err() {
                break;
            }
        }
    });
    let beat = out_tx.clone();
    let slots = node.config.slots;
    let heart_node = node.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            let running = heart_node.counters.running.load(Ordering::Relaxed) as u32;
            let free_slots = slots.saturating_sub(running);
            if beat.send(ClusterMessage::Heartbeat { free_slots }).is_err() {
                break;
            }
            tokio::time::sleep(super::HEARTBEAT).await;
        }
    });
    let result = loop {
        match recv(&mut rx, "the coordinator").await {
            Ok(ClusterMessage::Task(task)) => {
                let id = task.task;
                // Registered under the lock run_task's end takes, so a task that ends at once
                // leaves no stale handle behind.
                let mut tasks = node.tasks();
                let handle =
                    tokio::spawn(run_task(node.clone(), conn.clone(), *task, out_tx.clone()));
                tasks.insert(id, handle.abort_handle());
            }
            Ok(ClusterMessage::CancelTask { task }) => {
                if let Some(handle) = node.tasks().remove(&task) {
                    handle.abort();
                    node.counters
                        .tasks_cancelled
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(task, "task cancelled by the coordinator");
                }
            }
            Ok(other) => {
                tracing::warn!(message = ?other, "unexpected message from the coordinator")
            }
            Err(e) => break Err(e),
        }
    };
    heartbeat.abort();
    writer.abort();
    result
}

/// Sends the engine's events of one task to the coordinator.
struct Forward {
    task: u64,
    out: mpsc::UnboundedSender<ClusterMessage>,
}

impl Progress for Forward {
    fn event(&self, event: Event) {
        let _ = self.out.send(ClusterMessage::TaskEvent {
            task: self.task,
            event: event_to_wire(&event),
        });
    }
}

/// Counts a task as running until it ends or is aborted (dropped at an await).
struct Running<'a> {
    node: &'a Node,
    task: u64,
}

impl<'a> Running<'a> {
    fn new(node: &'a Node, task: u64) -> Running<'a> {
        node.counters.running.fetch_add(1, Ordering::Relaxed);
        Running { node, task }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.node.counters.running.fetch_sub(1, Ordering::Relaxed);
        self.node.tasks().remove(&self.task);
    }
}

async fn run_task(
    node: Arc<Node>,
    conn: quinn::Connection,
    task: TaskSpec,
    out: mpsc::UnboundedSender<ClusterMessage>,
) {
    let _running = Running::new(&node, task.task);
    tracing::info!(task = task.task, build = %task.build, platform = %task.platform, "task started");
    let result = execute(&node, &conn, &task, &out).await;
    match &result {
        Ok(o) => {
            node.counters
                .tasks_succeeded
                .fetch_add(1, Ordering::Relaxed);
            node.counters.steps_run.fetch_add(o.run, Ordering::Relaxed);
            node.counters
                .steps_cached
                .fetch_add(o.cached, Ordering::Relaxed);
            tracing::info!(task = task.task, build = %task.build, run = o.run, cached = o.cached, "task succeeded");
        }
        Err(f) => {
            node.counters.tasks_failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(task = task.task, build = %task.build, error = %f.message, "task failed");
        }
    }
    let _ = out.send(ClusterMessage::TaskDone {
        task: task.task,
        result,
    });
}

async fn execute(
    node: &Arc<Node>,
    conn: &quinn::Connection,
    task: &TaskSpec,
    out: &mpsc::UnboundedSender<ClusterMessage>,
) -> Result<PlatformOutcome, Failure> {
    let fail = |message: String| Failure {
        message,
        exit_code: 1,
    };
    let cache_dir = node.config.work_dir.join("cache");
    let store = BlobStore::open(&cache_dir).map_err(|e| fail(format!("opening the cache: {e}")))?;
    let steps = ClusterSteps {
        node: node.clone(),
        conn: conn.clone(),
        task: task.task,
        publishing: Mutex::new(Vec::new()),
    };
    // Several at once: a context of many small files costs round trips, not bandwidth.
    let missing: Vec<(Digest, u64)> = all_file_digests(&task.spec)
        .into_iter()
        .filter(|(d, _)| !store.contains(d))
        .collect();
    let fetched: Vec<Result<Fetched, Failure>> = {
        use futures_util::stream::{self, StreamExt};
        stream::iter(missing)
            .map(|(digest, size)| {
                let (store, steps) = (&store, &steps);
                async move {
                    fetch_context_file(node, conn, store, &digest, size, steps)
                        .await
                        .map_err(|e| fail(format!("fetching context file {digest}: {e}")))
                }
            })
            .buffer_unordered(PARALLEL_FETCHES)
            .collect()
            .await
    };
    let (mut from_peers, mut from_coordinator) = ((0u64, 0u64), (0u64, 0u64));
    for f in fetched {
        let (count, bytes) = match f? {
            Fetched::Peer(n) => (&mut from_peers, n),
            Fetched::Coordinator(n) => (&mut from_coordinator, n),
        };
        count.0 += 1;
        count.1 += bytes;
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("task-{}-", task.task))
        .tempdir_in(node.config.work_dir.join("tasks"))
        .map_err(|e| fail(format!("creating the task directory: {e}")))?;
    let context = dir.path().join("context");
    std::fs::create_dir(&context).map_err(|e| fail(e.to_string()))?;
    materialize(&task.spec.context, &store, &context).map_err(fail)?;
    let files = TaskFiles::write(&task.spec, &store, dir.path()).map_err(fail)?;
    let forward = Forward {
        task: task.task,
        out: out.clone(),
    };
    let built = fetch_needs(node, task, &store, &forward).await;
    let req = request_of(
        task,
        TaskPlace {
            context,
            cache_dir,
            sandbox_exe: node.config.sandbox_exe.clone(),
            isolation: node.config.isolation,
            files,
        },
        built,
    );
    if from_peers.0 + from_coordinator.0 > 0 {
        forward.event(Event::Info(format!(
            "{}: context files: {} from the peer cache ({} bytes), {} from the coordinator ({} bytes)",
            task.platform, from_peers.0, from_peers.1, from_coordinator.0, from_coordinator.1
        )));
    }
    // Parsed once for the task: the base images to fetch, then the build.
    let df =
        ossb_dockerfile::parse(&req.dockerfile, &req.dockerfile_name).map_err(|e| Failure {
            message: e.to_string(),
            exit_code: 2,
        })?;
    let mut inputs = InputStats::default();
    let (to_pull, bases) = fetch_bases(node, &req, &df, &task.platform, &store, &mut inputs).await;
    forward.event(Event::Info(format!(
        "{}: base image blobs: {} in this worker's store, {} from the peer cache ({} bytes), {} to pull from registries",
        task.platform,
        inputs.local_blobs,
        inputs.peer_blobs,
        inputs.peer_bytes,
        to_pull.len()
    )));
    let built = ossb_engine::build::build_parsed(&req, &df, &forward, Some(&steps)).await;
    steps.finish().await;
    // What the engine pulled from registries is in the store now, whether the build then
    // succeeded or not: count it, and hand it to the peer cache for the next worker.
    let pulled: Vec<Digest> = to_pull
        .iter()
        .filter(|(d, _)| store.contains(d))
        .map(|(d, _)| *d)
        .collect();
    for (digest, size) in &to_pull {
        if store.contains(digest) {
            inputs.registry_blobs += 1;
            inputs.registry_bytes += size;
        }
    }
    let c = &node.counters;
    c.blobs_local
        .fetch_add(inputs.local_blobs, Ordering::Relaxed);
    c.blobs_peer.fetch_add(inputs.peer_blobs, Ordering::Relaxed);
    c.bytes_peer.fetch_add(inputs.peer_bytes, Ordering::Relaxed);
    c.blobs_registry
        .fetch_add(inputs.registry_blobs, Ordering::Relaxed);
    c.bytes_registry
        .fetch_add(inputs.registry_bytes, Ordering::Relaxed);
    publish(node, &store, &pulled, None, false).await?;
    let result = built.map_err(|e| Failure {
        message: e.to_string(),
        exit_code: e.exit_code(),
    })?;
    let manifest_bytes = store
        .read(&result.image.digest)
        .map_err(|e| fail(format!("reading the manifest: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| fail(format!("reading the manifest: {e}")))?;
    let mut blobs: Vec<Digest> = manifest.layers.iter().map(|l| l.digest).collect();
    blobs.push(manifest.config.digest);
    let mut pushed = Vec::new();
    if task.spec.push && task.export {
        let registry = Registry::with_config(&req.registry, &req.registry_config)
            .map_err(|e| fail(e.to_string()))?;
        for tag in &task.spec.tags {
            let tagged = parse_reference(tag).map_err(|e| fail(e.to_string()))?;
            let by_digest = Reference::with_digest(
                tagged.registry().to_string(),
                tagged.repository().to_string(),
                result.image.digest.to_string(),
            );
            forward.event(Event::Info(format!(
                "pushing {} by digest",
                by_digest.whole()
            )));
            ossb_engine::build::push_image(&registry, &store, &by_digest, &result.image, &bases)
                .await
                .map_err(|e| fail(e.to_string()))?;
            pushed.push(by_digest.whole());
        }
    }
    // A stage that is not the image: its steps' layers went to the peer cache as they were
    // built (see `ClusterSteps`).
    if task.export {
        publish(
            node,
            &store,
            &blobs,
            Some(&result.image.digest),
            task.spec.download,
        )
        .await?;
    }
    Ok(PlatformOutcome {
        descriptor_json: serde_json::to_string(&result.image).map_err(|e| fail(e.to_string()))?,
        manifest: manifest_bytes,
        config: manifest.config.digest,
        blobs,
        size: result.size,
        run: result.stats.run as u64,
        cached: result.stats.cached as u64,
        pushed,
        inputs,
        stage: result
            .stage
            .as_ref()
            .map(stage_to_wire)
            .transpose()
            .map_err(fail)?,
    })
}

/// The stages the task reads, as the tasks that built them left them, with their layer blobs
/// brought into `store` from the peer cache. A stage whose layers cannot be had is left out:
/// the engine then goes through its steps again, each one a cache hit where the cluster has
/// its record (said in the task's log).
async fn fetch_needs(
    node: &Node,
    task: &TaskSpec,
    store: &BlobStore,
    forward: &Forward,
) -> Vec<BuiltStage> {
    let (mut built, mut from_peers, mut bytes) = (Vec::new(), 0u64, 0u64);
    for wire in &task.needs {
        let stage = match stage_from_wire(wire) {
            Ok(stage) => stage,
            Err(e) => {
                tracing::warn!(task = task.task, error = %e, "an unreadable built stage");
                continue;
            }
        };
        let missing: Vec<Digest> = stage
            .layers
            .iter()
            .map(|l| l.digest)
            .filter(|d| !store.contains(d))
            .collect();
        let fetched = match &node.peers {
            _ if missing.is_empty() => Ok(()),
            None => Err("this worker has no --cache-peers".to_string()),
            Some(peers) => {
                let mut result = Ok(());
                for digest in &missing {
                    match peers.get_to_store(digest, store).await {
                        Ok(n) => {
                            let c = &node.counters;
                            c.step_layers_peer.fetch_add(1, Ordering::Relaxed);
                            c.bytes_peer.fetch_add(n, Ordering::Relaxed);
                            (from_peers, bytes) = (from_peers + 1, bytes + n);
                        }
                        Err(e) => {
                            result = Err(format!("layer {digest}: {e}"));
                            break;
                        }
                    }
                }
                result
            }
        };
        match fetched {
            Ok(()) => built.push(stage),
            Err(e) => forward.event(Event::Info(format!(
                "{}: stage {} was built by another task, but its layers cannot be fetched here ({e}); going through its steps again",
                task.platform, stage.index
            ))),
        }
    }
    if !built.is_empty() {
        let mut stages: Vec<usize> = built.iter().map(|s| s.index).collect();
        stages.sort_unstable();
        let stages: Vec<String> = stages.iter().map(usize::to_string).collect();
        forward.event(Event::Info(format!(
            "{}: starting from stage {} as built by other tasks: {from_peers} layers from the peer cache ({bytes} bytes)",
            task.platform,
            stages.join(", ")
        )));
    }
    built
}

/// Sends the image's blobs and manifest to the peer cache. Needed when the client downloads
/// the result (an error then); otherwise a best effort for other workers and builds.
async fn publish(
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
/// error.
async fn fetch_bases(
    node: &Node,
    req: &BuildRequest,
    df: &ossb_dockerfile::Dockerfile,
    platform: &Platform,
    store: &BlobStore,
    inputs: &mut InputStats,
) -> (Vec<(Digest, u64)>, Vec<Reference>) {
    use futures_util::stream::{self, StreamExt};
    let bases = match ossb_dockerfile::base_images_with_platforms(df, &req.plan_options(platform)) {
        Ok(b) => b,
        Err(_) => return (Vec::new(), Vec::new()),
    };
    let Ok(registry) = Registry::with_config(&req.registry, &req.registry_config) else {
        return (Vec::new(), Vec::new());
    };
    let mut wanted: Vec<(Reference, Descriptor)> = Vec::new();
    let mut references = Vec::new();
    for (reference, platform) in bases {
        let Ok(parsed) = parse_reference(&reference) else {
            continue;
        };
        references.push(parsed.clone());
        match registry.resolve(&parsed, &platform, store).await {
            Ok((_, manifest)) => {
                for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
                    if !wanted.iter().any(|(_, w)| w.digest == d.digest) {
                        wanted.push((parsed.clone(), d.clone()));
                    }
                }
            }
            Err(e) => tracing::debug!(%reference, error = %e, "resolving a base image"),
        }
    }
    let (present, absent): (Vec<_>, Vec<_>) = wanted
        .into_iter()
        .partition(|(_, d)| store.contains(&d.digest));
    inputs.local_blobs += present.len() as u64;
    let Some(peers) = &node.peers else {
        let absent = absent.iter().map(|(_, d)| (d.digest, d.size)).collect();
        return (absent, references);
    };
    let registry = &registry;
    let brought: Vec<(Descriptor, Option<Brought>)> = stream::iter(absent)
        .map(|(reference, desc)| async move {
            let how = bring(peers, registry, &reference, &desc, store).await;
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
            Some(Brought::Registry(n)) => {
                inputs.registry_blobs += 1;
                inputs.registry_bytes += n;
            }
            None => missing.push((desc.digest, desc.size)),
        }
    }
    (missing, references)
}

/// Where [`bring`] found a blob, and its size.
enum Brought {
    Peer(u64),
    Registry(u64),
}

/// Brings one blob of `reference` into `store` with the cluster's single-flight: from the peer
/// cache (as another worker's fetch of it arrives there, when one is under way), or, when
/// nobody has it, fetched from the registry by this worker for the whole cluster, streamed to
/// the blob's home node while it downloads. A fetch that breaks off frees the blob for the
/// next asker: this worker asks again. `None`: left to the engine's pull.
async fn bring(
    peers: &PeerCache,
    registry: &Registry,
    reference: &Reference,
    desc: &Descriptor,
    store: &BlobStore,
) -> Option<Brought> {
    for _ in 0..3 {
        match peers.get_or_claim(&desc.digest, store).await {
            Ok(Claimed::Got(n)) => return Some(Brought::Peer(n)),
            Ok(Claimed::Fetch { node }) => {
                tracing::info!(digest = %desc.digest, reference = %reference.whole(), home = %node, "fetching a blob from the registry for the cluster");
                let (tx, rx) = mpsc::channel(16);
                let (pulled, put) = tokio::join!(
                    registry.pull_blob(reference, desc, store, Some(Tee::new(tx))),
                    peers.put_stream(&node, &desc.digest, desc.size, rx)
                );
                if let Err(e) = pulled {
                    tracing::warn!(digest = %desc.digest, error = %e, "fetching a base blob for the cluster");
                    return None;
                }
                if let Err(e) = put {
                    tracing::debug!(digest = %desc.digest, error = %e, "streaming a fetched blob to its home node");
                }
                // Its second home too (the first answers that it has it), off the task's path.
                let (peers, store, digest) = (peers.clone(), store.clone(), desc.digest);
                tokio::spawn(async move {
                    if let Err(e) = peers.put_from_store(&digest, &store).await {
                        tracing::warn!(%digest, error = %e, "publishing a fetched blob");
                    }
                });
                return Some(Brought::Registry(desc.size));
            }
            Err(e) => tracing::debug!(digest = %desc.digest, error = %e, "single-flight get"),
        }
    }
    None
}

/// The cluster's step cache as a task's engine sees it: records by cache key from the
/// coordinator (which makes one task build a key while the others wait), layer blobs through
/// the peer cache.
///
/// A step's layer goes to the peer cache and its record to the coordinator in the background,
/// while the next steps run; [`ClusterSteps::finish`] waits for them before the task reports
/// its end (the tasks of later stages look for those records).
struct ClusterSteps {
    node: Arc<Node>,
    conn: quinn::Connection,
    task: u64,
    publishing: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Asks the coordinator one question on a stream of its own.
async fn ask(
    conn: &quinn::Connection,
    message: ClusterMessage,
) -> Result<ClusterMessage, ClusterError> {
    let (mut tx, mut rx) = conn.open_bi().await.map_err(ossb_net::NetError::from)?;
    send(&mut tx, message).await?;
    let _ = tx.finish();
    recv(&mut rx, "the coordinator").await
}

impl ClusterSteps {
    async fn ask(&self, message: ClusterMessage) -> Result<ClusterMessage, ClusterError> {
        ask(&self.conn, message).await
    }

    /// Waits for the steps still being published.
    async fn finish(&self) {
        let pending =
            std::mem::take(&mut *self.publishing.lock().unwrap_or_else(|e| e.into_inner()));
        for handle in pending {
            let _ = handle.await;
        }
    }

    async fn claim_step(&self, key: &CacheKey, store: &BlobStore) -> Option<CacheRecord> {
        let answer = self
            .ask(ClusterMessage::ClaimStep {
                task: self.task,
                key: *key.as_bytes(),
            })
            .await;
        let record = match answer {
            Ok(ClusterMessage::StepRecord { record }) => record,
            Ok(ClusterMessage::BuildStep) => return None,
            Ok(other) => {
                tracing::warn!(message = ?other, "unexpected answer to a step claim");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's step cache did not answer; building the step here");
                return None;
            }
        };
        let record: CacheRecord = serde_json::from_str(&record)
            .map_err(|e| tracing::warn!(error = %e, "an invalid step record"))
            .ok()?;
        if let Some(layer) = record.layer.as_ref().filter(|l| !store.contains(&l.digest)) {
            let peers = self.node.peers.as_ref()?;
            match peers.get_to_store(&layer.digest, store).await {
                Ok(n) => {
                    let c = &self.node.counters;
                    c.step_layers_peer.fetch_add(1, Ordering::Relaxed);
                    c.bytes_peer.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(digest = %layer.digest, error = %e, "a step's layer is not in the peer cache; building the step here");
                    return None;
                }
            }
        }
        self.node
            .counters
            .steps_cluster
            .fetch_add(1, Ordering::Relaxed);
        Some(record)
    }

    /// Hands `digest` to the peer cache in the background.
    fn publish_blob(&self, digest: Digest, store: &BlobStore) {
        let (node, store) = (self.node.clone(), store.clone());
        let handle = tokio::spawn(async move {
            put(&node, &digest, &store).await;
        });
        self.publishing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    fn publish_step(&self, key: &CacheKey, record: &CacheRecord, store: &BlobStore) {
        if record.layer.is_some() && self.node.peers.is_none() {
            return; // a record whose layer nobody else can fetch helps nobody
        }
        let Ok(json) = serde_json::to_string(record) else {
            return;
        };
        let (node, conn, store) = (self.node.clone(), self.conn.clone(), store.clone());
        let (task, key, layer) = (self.task, *key.as_bytes(), record.layer.clone());
        let handle = tokio::spawn(async move {
            if let Some(layer) = layer {
                if !put(&node, &layer.digest, &store).await {
                    return;
                }
            }
            let message = ClusterMessage::PublishStep {
                task,
                key,
                record: json,
            };
            if let Err(e) = ask(&conn, message).await {
                tracing::warn!(error = %e, "publishing a step record failed");
            }
        });
        self.publishing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }
}

/// Puts `digest` from `store` into the peer cache, counting it; whether it went (a failure is
/// logged: the peer cache is an optimisation here).
async fn put(node: &Node, digest: &Digest, store: &BlobStore) -> bool {
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

impl SharedSteps for ClusterSteps {
    fn claim<'a>(
        &'a self,
        key: &'a CacheKey,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, Option<CacheRecord>> {
        Box::pin(self.claim_step(key, store))
    }

    fn publish<'a>(
        &'a self,
        key: &'a CacheKey,
        record: &'a CacheRecord,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        self.publish_step(key, record, store);
        Box::pin(std::future::ready(()))
    }
}

/// Where a context file came from, and its size.
enum Fetched {
    Peer(u64),
    Coordinator(u64),
}

/// Brings one context file into `store`: a large one from the peer cache if it is there, else
/// from the coordinator (and then published to the peer cache for the next worker).
async fn fetch_context_file(
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
        match peers.get_to_store(digest, store).await {
            Ok(n) => {
                c.context_bytes_peer.fetch_add(n, Ordering::Relaxed);
                return Ok(Fetched::Peer(n));
            }
            Err(e) => tracing::debug!(%digest, error = %e, "context file not in the peer cache"),
        }
    }
    let n = fetch(conn, store, digest).await?;
    c.context_bytes_coordinator.fetch_add(n, Ordering::Relaxed);
    if peers.is_some() {
        steps.publish_blob(*digest, store);
    }
    Ok(Fetched::Coordinator(n))
}

/// Fetches one context file from the coordinator into `store`; returns its size.
async fn fetch(
    conn: &quinn::Connection,
    store: &BlobStore,
    digest: &Digest,
) -> Result<u64, ClusterError> {
    let (mut tx, mut rx) = conn.open_bi().await.map_err(ossb_net::NetError::from)?;
    send(&mut tx, ClusterMessage::FetchBlob { digest: *digest }).await?;
    let _ = tx.finish();
    match recv(&mut rx, "the coordinator").await? {
        ClusterMessage::Blob { size } => {
            recv_blob_bytes(&mut rx, store, digest, size).await?;
            Ok(size)
        }
        other => Err(ClusterError::Protocol {
            peer: "the coordinator".into(),
            got: other.kind().to_string(),
        }),
    }
}
