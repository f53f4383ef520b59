//! `ossb worker`: a node that runs tasks (one platform of one build) for the coordinator.
//!
//! It registers (its platform, the platforms it emulates, its slots, its peer cache nodes),
//! heartbeats every [`super::HEARTBEAT`], and for each task: fetches the context files it lacks
//! (large ones from the peer cache first, see [`PEER_CONTEXT_FILE`]; the rest, and what the peers
//! lack, from the coordinator), lays the context out (named contexts too; secrets and registry CAs
//! as 0600 files of the task's directory, removed with it), starts from the stages other tasks
//! built, brings the base images' blobs it lacks through the peer cache's single-flight (one
//! worker of the cluster pulls a blob from the registry while the others follow its bytes; see
//! `inputs`), runs [`crate::build()`] for the platform with its
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

use ossb_cache_node::{Claimed, Fetch, PeerCache};
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
    file_digests, materialize, request_of, stage_from_wire, stage_to_wire, TaskFiles, TaskPlace,
};
use super::{event_to_wire, local_err, recv, recv_blob_bytes, send, ClusterError};
use ossb_engine::build::{BuildRequest, BuiltStage};
use ossb_engine::cache::{CacheKey, CacheLevel, CacheRecord};
use ossb_engine::progress::{Event, Progress};

mod cache_mounts;
mod inputs;
mod steps;

use inputs::{
    context_read, fetch_bases, fetch_context_file, linked_contexts, needs, publish, Fetched,
};
use steps::ClusterSteps;

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
    /// Load tests of the coordinator: run no step, every task takes this long and succeeds
    /// with a made-up image ([`simulated`]).
    pub simulate: Option<std::time::Duration>,
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
    /// Tasks read it while they use the cache; the cache's collection writes it, so that it
    /// has the cache to itself. Writers go first: once one waits, new tasks wait behind it.
    cache_use: tokio::sync::RwLock<()>,
    /// A collection waits for the running tasks: the coordinator is told (`draining`), and a
    /// task that ends meanwhile queues no second one.
    draining: std::sync::atomic::AtomicBool,
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
        cache_use: tokio::sync::RwLock::new(()),
        draining: std::sync::atomic::AtomicBool::new(false),
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
            let draining = heart_node.draining.load(Ordering::Relaxed);
            let beat_now = ClusterMessage::Heartbeat {
                free_slots,
                draining,
            };
            if beat.send(beat_now).is_err() {
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
    // The tasks' results had only this session to go to, and the coordinator schedules
    // them again (on the next session, a restarted coordinator, or another worker): stop
    // them instead of letting them hold the slots.
    let orphans: Vec<_> = node.tasks().drain().map(|(_, h)| h).collect();
    if !orphans.is_empty() {
        tracing::info!(
            tasks = orphans.len(),
            "stopping the tasks of the lost session"
        );
    }
    for task in orphans {
        task.abort();
    }
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
    let started = std::time::SystemTime::now();
    tracing::info!(task = task.task, build = %task.build, platform = %task.platform, "task started");
    let result = match node.config.simulate {
        Some(takes) => simulated(&task, takes).await,
        None => {
            let _using = node.cache_use.read().await;
            execute(&node, &conn, &task, &out).await
        }
    };
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
    // After the task has pushed and reported, as a local build collects after its export; what
    // this task used is spared. The other slots may never be free at once: no task starts until
    // the running ones end, and the coordinator, told before this task's end, sends none
    // meanwhile. One collection waits at a time.
    let cache_dir = node.config.work_dir.join("cache");
    let collect = (node.config.simulate.is_none()
        && ossb_engine::cache_gc::due(&cache_dir).is_some())
    .then(|| Draining::start(&node.draining))
    .flatten();
    let heartbeat = |draining| ClusterMessage::Heartbeat {
        free_slots: 0,
        draining,
    };
    if collect.is_some() {
        let _ = out.send(heartbeat(true));
    }
    let _ = out.send(ClusterMessage::TaskDone {
        task: task.task,
        result,
    });
    if let Some(draining) = collect {
        let others = node
            .counters
            .running
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        if others > 0 {
            tracing::info!(
                task = task.task,
                others,
                "the cache's disk is short: starting no task until the running ones end, to collect"
            );
        }
        let alone = node.cache_use.write().await;
        // A no-op if the disk is no longer short by now.
        if let Some(message) = ossb_engine::build::collect_garbage(&cache_dir, started).await {
            tracing::info!(task = task.task, "{message}");
        }
        drop(alone);
        drop(draining);
        let _ = out.send(heartbeat(false));
    }
}

/// The worker's draining flag, set while it lives: cleared however the collection ends (a
/// task aborted with its session too), so a worker never stays drained.
struct Draining<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Draining<'a> {
    /// `None` when a collection already waits.
    fn start(flag: &'a std::sync::atomic::AtomicBool) -> Option<Draining<'a>> {
        (!flag.swap(true, Ordering::SeqCst)).then_some(Draining(flag))
    }
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A task of a load test: it takes `takes` and makes a made-up one-layer image (nothing is
/// stored or pushed), so the coordinator schedules, merges and records as for a real one.
async fn simulated(
    task: &TaskSpec,
    takes: std::time::Duration,
) -> Result<PlatformOutcome, Failure> {
    tokio::time::sleep(takes).await;
    let seed = format!("{} {} {:?}", task.build, task.platform, task.stage);
    let config = Digest::of(format!("config {seed}").as_bytes());
    let manifest = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{}\",\"config\":{{\"digest\":\"{config}\"}}}}",
        ossb_image::oci::media_type::OCI_MANIFEST
    )
    .into_bytes();
    let descriptor = Descriptor {
        media_type: ossb_image::oci::media_type::OCI_MANIFEST.into(),
        digest: Digest::of(&manifest),
        size: manifest.len() as u64,
        platform: Some((&task.platform).into()),
        annotations: None,
    };
    Ok(PlatformOutcome {
        descriptor_json: serde_json::to_string(&descriptor).map_err(|e| Failure {
            message: e.to_string(),
            exit_code: 1,
        })?,
        manifest,
        config,
        blobs: vec![config],
        size: 0,
        run: 1,
        cached: 0,
        pushed: Vec::new(),
        inputs: InputStats::default(),
        stage: None,
        facts: Default::default(),
        sbom: None,
        extra_sboms: Vec::new(),
    })
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
    let mut steps = ClusterSteps {
        node: node.clone(),
        conn: conn.clone(),
        task: task.task,
        publishing: Mutex::new(Vec::new()),
        brought: Default::default(),
        registry: None,
    };
    let forward = Forward {
        task: task.task,
        out: out.clone(),
    };
    // What the planner and the registry client need, before the task's files are laid out.
    let probe = request_of(task, TaskPlace::default(), Vec::new());
    // Parsed once for the task: the stages it starts from, the base images to fetch, the
    // context files its stages read, then the build.
    let df =
        ossb_dockerfile::parse(&probe.dockerfile, &probe.dockerfile_name).map_err(|e| Failure {
            message: e.to_string(),
            exit_code: 2,
        })?;
    let built = needs(node, task, &store, &forward);
    let mut inputs = InputStats::default();
    // Planned once here, as the coordinator plans (without the base images): for the context
    // files the task's stages read and the cache mounts they use.
    let plan =
        ossb_dockerfile::plan(&df, &probe.plan_options(&task.platform), &HashMap::new()).ok();
    // The context files the stages read come while the bases do. Whether a base has ONBUILD
    // triggers (which may read any file) is known only once its config is here: then the rest
    // of the context follows.
    let mut entries = context_read(plan.as_ref(), task, &built, true);
    let mut first = file_digests(&entries);
    for (_, named) in &task.spec.build_contexts {
        first.extend(file_digests(named));
    }
    let ((to_pull, bases, onbuild_free), mut fetched) = tokio::join!(
        fetch_bases(
            node,
            &probe,
            &df,
            &task.platform,
            &store,
            &mut inputs,
            &steps,
        ),
        fetch_context_files(node, conn, &store, &steps, first)
    );
    if !onbuild_free {
        entries = context_read(plan.as_ref(), task, &built, false);
        fetched
            .extend(fetch_context_files(node, conn, &store, &steps, file_digests(&entries)).await);
    }
    forward.event(Event::Info(format!(
        "{}: base image blobs: {} in this worker's store, {} from the peer cache ({} bytes), {} to pull from registries",
        task.platform,
        inputs.local_blobs,
        inputs.peer_blobs,
        inputs.peer_bytes,
        to_pull.len()
    )));
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
    materialize(&entries, &store, &context).map_err(fail)?;
    let mut files = TaskFiles::write(&task.spec, &store, dir.path()).map_err(fail)?;
    files
        .build_contexts
        .extend(linked_contexts(node, task, &store, &forward).await?);
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
    steps.registry = Registry::with_config(&req.registry, &req.registry_config).ok();
    if from_peers.0 + from_coordinator.0 > 0 {
        let read = match entries.len() == task.spec.context.len() {
            true => String::new(),
            false => " (those its stages read)".to_string(),
        };
        forward.event(Event::Info(format!(
            "{}: context files{read}: {} from the peer cache ({} bytes), {} from the coordinator ({} bytes)",
            task.platform, from_peers.0, from_peers.1, from_coordinator.0, from_coordinator.1
        )));
    }
    let mounts = cache_mounts::ids_of(plan.as_ref());
    cache_mounts::bring(
        node,
        conn,
        task.task,
        &mounts,
        &store,
        &req.cache_dir,
        &forward,
    )
    .await;
    let built = ossb_engine::build::build_parsed(&req, &df, &forward, Some(&steps)).await;
    steps.finish().await;
    let (layers, bytes) = (&steps.brought.0, &steps.brought.1);
    if !task.needs.is_empty() {
        forward.event(Event::Info(format!(
            "{}: {} layers of stages other tasks built came from the peer cache ({} bytes)",
            task.platform,
            layers.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed)
        )));
    }
    if built.is_ok() {
        cache_mounts::publish(node, conn, task.task, &mounts, &store, &req.cache_dir).await;
    }
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
        facts: result
            .facts
            .iter()
            .find(|(p, _)| *p == task.platform)
            .map(|(_, f)| crate::attest::facts_to_wire(f, &node.config.name))
            .unwrap_or_default(),
        sbom: result.sboms.into_iter().map(|(_, doc)| doc).next(),
        extra_sboms: result
            .extra_sboms
            .into_iter()
            .map(|(_, name, doc)| (name, doc))
            .collect(),
    })
}

/// Brings the context files in `wanted` that the store lacks, several at once (a context of
/// many small files costs round trips, not bandwidth).
async fn fetch_context_files(
    node: &Node,
    conn: &quinn::Connection,
    store: &BlobStore,
    steps: &ClusterSteps,
    mut wanted: Vec<(Digest, u64)>,
) -> Vec<Result<Fetched, Failure>> {
    use futures_util::stream::{self, StreamExt};
    wanted.sort();
    wanted.dedup_by_key(|(d, _)| *d);
    wanted.retain(|(d, _)| !store.contains(d));
    stream::iter(wanted)
        .map(|(digest, size)| async move {
            fetch_context_file(node, conn, store, &digest, size, steps)
                .await
                .map_err(|e| Failure {
                    message: format!("fetching context file {digest}: {e}"),
                    exit_code: 1,
                })
        })
        .buffer_unordered(PARALLEL_FETCHES)
        .collect()
        .await
}
