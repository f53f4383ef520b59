//! `ossb coordinator`: accepts builds, splits each into one task per stage and platform,
//! schedules the tasks on the workers as their stages' inputs are built, keeps the cluster's
//! step cache, merges and pushes the result.
//!
//! Every QUIC stream starts with one message that says what it is for (see
//! [`ossb_protocol::cluster`]): a build submission, a context upload, a status question, a
//! worker's registration (the stream then stays open as the worker's control channel), or a
//! worker fetching a context file.
//!
//! Tasks: the coordinator plans the Dockerfile for each platform (the stage graph does not
//! depend on the base images) and makes a task of every stage the target needs. A stage's task
//! is queued when the tasks of the stages it needs (FROM, COPY --from, RUN --mount from=) have
//! succeeded; independent stages run at once on different workers. A task runs on the stage's
//! own platform (`FROM --platform=$BUILDPLATFORM` stages on the build platform, which the
//! coordinator chooses for the whole build: the first requested platform with a native worker).
//! Only the target stage's task makes the platform's image.
//!
//! The cluster's step cache: a worker whose local cache misses a step asks here
//! ([`ClusterMessage::ClaimStep`]): it gets the record if any task built the key (the layer is
//! in the peer cache), else the right to build it; a task asking for a key another task builds
//! waits until that one publishes it ([`ClusterMessage::PublishStep`]) or ends. So a step runs
//! once in the whole cluster, and a stage task finds the stages before it there.
//!
//! Scheduling: a task goes to a worker whose native platform is the task's; only when no
//! native worker of that platform is registered does it go to one that emulates it. Among the
//! candidates with a free slot, the worker that built the stages it needs wins, then the one
//! that already fetched most of the build's context files. A worker silent for [`super::WORKER_TIMEOUT`] is dropped and its tasks are queued
//! again at the front. A task no registered worker can build (no native worker of its platform
//! and none that emulates it) fails after [`super::NO_WORKER_GRACE`], naming the workers the
//! cluster has; a task that fails for good cancels the other tasks of its build.
//!
//! Identical tasks (same stage, platform, Dockerfile, arguments and context: the same cache
//! keys) run once: while one runs, the others wait, then go to the worker that built it, whose
//! step cache answers every step. Tasks that share only some steps share them through the
//! cluster's step cache.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ossb_image::oci::Descriptor;
use ossb_image::registry::{parse_reference, Registry};
use ossb_image::store::BlobStore;
use ossb_net::{Identity, Role};
use ossb_protocol::cluster::{
    BuildEvent, BuildOutcome, BuildSpec, BuiltImage, ClusterMessage, Failure, InputStats,
    PlatformOutcome, TaskSpec, WorkerInfo,
};
use ossb_protocol::{Digest, Platform};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot, Notify};

use super::context::{all_file_digests, media_types, registry_config, registry_options, TaskFiles};
use super::records::{Record, Records, Status};
use super::{local_err, recv, recv_blob_bytes, send, send_blob_bytes, send_error, ClusterError};

/// How `ossb coordinator` is set up.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// The UDP address to serve QUIC on.
    pub listen: SocketAddr,
    /// Build records and received context files.
    pub state_dir: PathBuf,
    /// The certificates (`ossb certs init`).
    pub tls_dir: PathBuf,
    /// Where to serve `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
}

type TaskResult = (Result<PlatformOutcome, Failure>, Vec<String>);

struct Task {
    spec: TaskSpec,
    /// The platform its stage runs on (the target platform, or the stage's FROM --platform).
    runs_on: Platform,
    /// Tasks of the same build whose stages this one needs, not finished yet.
    deps: Vec<u64>,
    /// The worker that built one of those stages: it holds their layers.
    prefer: Option<u64>,
    worker: Option<u64>,
    /// Where events go: the build's handler, which renumbers them.
    events: mpsc::UnboundedSender<(u64, BuildEvent)>,
    done: Option<oneshot::Sender<TaskResult>>,
    /// The build's context files (for placement by locality).
    context: Vec<Digest>,
    /// What makes identical tasks identical (see [`task_key`]); `None` with `--no-cache`.
    key: Option<Digest>,
    /// When it was queued (for the grace period of a platform no worker builds).
    queued_at: Instant,
    /// The client was told it waits (for a worker of its platform, for an identical task).
    told: bool,
}

struct Worker {
    info: WorkerInfo,
    tasks: mpsc::UnboundedSender<ClusterMessage>,
    last_seen: Instant,
    running: HashSet<u64>,
    /// Context files it fetched from here: it holds them.
    holds: HashSet<Digest>,
}

#[derive(Default)]
struct Counters {
    succeeded: u64,
    failed: u64,
    queued: u64,
    running: u64,
    /// Steps by the worker that ran them: (run, cached).
    steps: BTreeMap<String, (u64, u64)>,
    /// Steps by the platform built and whether its worker ran it natively or emulated:
    /// (run, cached).
    steps_by_mode: BTreeMap<(String, &'static str), (u64, u64)>,
    context_bytes_received: u64,
    context_bytes_served: u64,
    tasks_rescheduled: u64,
    workers_lost: u64,
    tasks_cancelled: u64,
    tasks_unschedulable: u64,
    /// Tasks that waited for an identical task instead of running beside it.
    tasks_waited_identical: u64,
    /// Where the workers' input blobs came from, by worker.
    inputs: BTreeMap<String, InputStats>,
    /// Step claims answered with a record, granted (the task builds the step), and claims
    /// that waited for another task building the same step.
    steps_from_cluster: u64,
    steps_claimed: u64,
    steps_waited: u64,
}

#[derive(Default)]
struct Inner {
    workers: HashMap<u64, Worker>,
    queue: VecDeque<u64>,
    tasks: HashMap<u64, Task>,
    next_id: u64,
    counters: Counters,
    /// Task keys being built, and the task building each.
    building: HashMap<Digest, u64>,
    /// The worker that last built each task key (its step cache holds the steps).
    built_on: HashMap<Digest, u64>,
    /// The cluster's step cache: records by step key, oldest first in `step_order`.
    steps: HashMap<[u8; 32], StepEntry>,
    step_order: VecDeque<[u8; 32]>,
    /// Step keys being built, by the task building each.
    claims: HashMap<[u8; 32], StepClaim>,
    /// Context blobs submissions are waiting for, with their size and how many wait.
    wanted: HashMap<Digest, u64>,
    wanted_by: HashMap<Digest, usize>,
}

/// A step some task built.
struct StepEntry {
    /// Its cache record (JSON, as the workers' engines write it).
    record: String,
    /// The build whose task built it: a `--no-cache` build reuses only its own steps.
    build: String,
}

/// A step key a task is building, and the claims waiting for it.
struct StepClaim {
    task: u64,
    waiters: Vec<oneshot::Sender<()>>,
}

/// How long a new stream may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Step records the coordinator keeps (a few hundred bytes each); the oldest go first.
const MAX_STEP_RECORDS: usize = 100_000;

struct State {
    inner: Mutex<Inner>,
    wake: Notify,
    store: BlobStore,
    records: Records,
    /// Workers need a moment to register after a coordinator starts.
    started: Instant,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> u64 {
        let mut inner = self.lock();
        inner.next_id += 1;
        inner.next_id
    }
}

/// A running coordinator.
pub struct Coordinator {
    endpoint: quinn::Endpoint,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Coordinator {
    /// Opens the state dir (failing the builds a previous run lost), binds, and serves.
    pub async fn start(config: CoordinatorConfig) -> Result<Coordinator, ClusterError> {
        let store = BlobStore::open(config.state_dir.join("context"))
            .map_err(local_err("opening the state dir"))?;
        let records =
            Records::open(&config.state_dir).map_err(local_err("opening the state dir"))?;
        let lost = records
            .fail_unfinished()
            .map_err(local_err("reading the build records"))?;
        if !lost.is_empty() {
            tracing::warn!(builds = ?lost, "builds lost in a restart are marked failed");
        }
        let identity = Identity::load(&config.tls_dir, Role::Node)?;
        let endpoint = ossb_net::server(config.listen, &identity)?;
        let listen = endpoint
            .local_addr()
            .map_err(local_err("reading the bound address"))?;
        let state = Arc::new(State {
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            store,
            records,
            started: Instant::now(),
        });
        let metrics = match config.metrics {
            Some(addr) => Some(serve_metrics(addr, state.clone()).await?),
            None => None,
        };
        tokio::spawn(accept(endpoint.clone(), state.clone()));
        tokio::spawn(schedule_loop(state.clone()));
        tokio::spawn(watch_workers(state.clone()));
        tracing::info!(listen = %listen, metrics = ?metrics, "coordinator serving");
        Ok(Coordinator {
            endpoint,
            listen,
            metrics,
        })
    }

    /// The QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The metrics address, if served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.endpoint.wait_idle())
            .await;
    }
}

/// `ossb coordinator`: serves until SIGTERM or SIGINT.
pub async fn serve(config: CoordinatorConfig) -> Result<(), ClusterError> {
    let coordinator = Coordinator::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(local_err("installing the SIGTERM handler"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    coordinator.close().await;
    Ok(())
}

async fn serve_metrics(addr: SocketAddr, state: Arc<State>) -> Result<SocketAddr, ClusterError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(local_err("binding the metrics address"))?;
    let bound = listener
        .local_addr()
        .map_err(local_err("binding the metrics address"))?;
    let routes: ossb_net::http::Routes = Arc::new(move |path| match path {
        "/metrics" => Some(ossb_net::http::Response {
            content_type: ossb_net::http::PROMETHEUS_TEXT,
            body: prometheus(&state.lock()),
        }),
        "/healthz" => Some(ossb_net::http::Response {
            content_type: "text/plain",
            body: "ok\n".into(),
        }),
        _ => None,
    });
    tokio::spawn(ossb_net::http::serve(listener, routes));
    Ok(bound)
}

/// The coordinator's counters in Prometheus text form.
fn prometheus(inner: &Inner) -> String {
    use std::fmt::Write;
    let c = &inner.counters;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "ossb_builds_queued",
        "gauge",
        "Builds waiting for their context or a worker.",
        vec![(String::new(), c.queued)],
    );
    metric(
        "ossb_builds_running",
        "gauge",
        "Builds whose tasks run.",
        vec![(String::new(), c.running)],
    );
    metric(
        "ossb_builds_finished_total",
        "counter",
        "Builds finished, by status.",
        vec![
            ("{status=\"succeeded\"}".into(), c.succeeded),
            ("{status=\"failed\"}".into(), c.failed),
        ],
    );
    let mut steps = Vec::new();
    for (worker, (run, cached)) in &c.steps {
        steps.push((format!("{{worker=\"{worker}\",result=\"run\"}}"), *run));
        steps.push((
            format!("{{worker=\"{worker}\",result=\"cached\"}}"),
            *cached,
        ));
    }
    metric(
        "ossb_steps_total",
        "counter",
        "Steps of finished tasks, by the worker that ran them and whether its local step cache had them.",
        steps,
    );
    let mut by_mode = Vec::new();
    for ((platform, mode), (run, cached)) in &c.steps_by_mode {
        for (result, n) in [("run", run), ("cached", cached)] {
            by_mode.push((
                format!("{{platform=\"{platform}\",mode=\"{mode}\",result=\"{result}\"}}"),
                *n,
            ));
        }
    }
    metric(
        "ossb_steps_by_platform_total",
        "counter",
        "Steps of finished tasks, by the platform built, whether the worker ran it natively or emulated, and whether its step cache had them.",
        by_mode,
    );
    let mut workers: BTreeMap<(String, &str), u64> = BTreeMap::new();
    for w in inner.workers.values() {
        *workers
            .entry((w.info.platform.to_string(), "native"))
            .or_default() += 1;
        for p in &w.info.emulates {
            *workers.entry((p.to_string(), "emulated")).or_default() += 1;
        }
    }
    metric(
        "ossb_workers",
        "gauge",
        "Registered workers, by platform they build and how.",
        workers
            .into_iter()
            .map(|((p, how), n)| (format!("{{platform=\"{p}\",mode=\"{how}\"}}"), n))
            .collect(),
    );
    metric(
        "ossb_tasks_queued",
        "gauge",
        "Tasks (one stage of one platform of a build) waiting for their stages' inputs or a worker.",
        vec![(String::new(), inner.queue.len() as u64)],
    );
    metric(
        "ossb_tasks_rescheduled_total",
        "counter",
        "Tasks scheduled again because their worker was lost.",
        vec![(String::new(), c.tasks_rescheduled)],
    );
    metric(
        "ossb_workers_lost_total",
        "counter",
        "Workers that stopped heartbeating.",
        vec![(String::new(), c.workers_lost)],
    );
    metric(
        "ossb_tasks_cancelled_total",
        "counter",
        "Tasks cancelled because another task of their build failed.",
        vec![(String::new(), c.tasks_cancelled)],
    );
    metric(
        "ossb_tasks_unschedulable_total",
        "counter",
        "Tasks failed because no worker builds their platform, natively or emulated.",
        vec![(String::new(), c.tasks_unschedulable)],
    );
    metric(
        "ossb_tasks_waited_identical_total",
        "counter",
        "Tasks that waited for an identical task (same cache keys) to finish instead of running beside it.",
        vec![(String::new(), c.tasks_waited_identical)],
    );
    metric(
        "ossb_cluster_steps_total",
        "counter",
        "Step claims of the cluster's step cache (after a worker's local miss), by answer: the record of a step another task built, the right to build it, and claims that first waited for another task building the same step.",
        vec![
            ("{answer=\"record\"}".into(), c.steps_from_cluster),
            ("{answer=\"build\"}".into(), c.steps_claimed),
            ("{answer=\"waited\"}".into(), c.steps_waited),
        ],
    );
    metric(
        "ossb_cluster_step_records",
        "gauge",
        "Step records the coordinator holds.",
        vec![(String::new(), inner.steps.len() as u64)],
    );
    let mut blobs = Vec::new();
    let mut bytes = Vec::new();
    for (worker, i) in &c.inputs {
        for (source, n, b) in [
            ("local", i.local_blobs, None),
            ("peer", i.peer_blobs, Some(i.peer_bytes)),
            ("registry", i.registry_blobs, Some(i.registry_bytes)),
        ] {
            let labels = format!("{{worker=\"{worker}\",source=\"{source}\"}}");
            if let Some(b) = b {
                bytes.push((labels.clone(), b));
            }
            blobs.push((labels, n));
        }
    }
    metric(
        "ossb_input_blobs_total",
        "counter",
        "Base image blobs (configs, layers) of finished tasks, by worker and where they came from: its own store (a local hit), the peer cache (a peer hit) or a registry (a miss, then published to the peer cache).",
        blobs,
    );
    metric(
        "ossb_input_bytes_total",
        "counter",
        "Bytes of base image blobs fetched by the workers, from the peer cache and from registries.",
        bytes,
    );
    metric(
        "ossb_context_bytes_total",
        "counter",
        "Context file bytes received from clients and served to workers.",
        vec![
            ("{direction=\"received\"}".into(), c.context_bytes_received),
            ("{direction=\"served\"}".into(), c.context_bytes_served),
        ],
    );
    out
}

async fn accept(endpoint: quinn::Endpoint, state: Arc<State>) {
    while let Some(incoming) = endpoint.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a connection");
                    return;
                }
            };
            let role = ossb_net::peer_role(&conn);
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(serve_stream(state.clone(), send, recv, remote, role));
            }
        });
    }
}

async fn serve_stream(
    state: Arc<State>,
    mut tx: SendStream,
    mut rx: RecvStream,
    remote: SocketAddr,
    role: Option<Role>,
) {
    let peer = remote.to_string();
    // A stream opened and left silent is dropped, not waited for forever.
    let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, recv(&mut rx, &peer)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "unreadable request");
            return send_error(&mut tx, e.to_string()).await;
        }
        Err(_) => {
            tracing::debug!(%remote, "a stream sent no request");
            return send_error(
                &mut tx,
                format!("no request within {FIRST_MESSAGE_TIMEOUT:?}"),
            )
            .await;
        }
    };
    // Tasks carry other tenants' secrets and context: only a worker's certificate may take
    // them, not a submitter's.
    let worker_only = matches!(
        first,
        ClusterMessage::Register(_)
            | ClusterMessage::FetchBlob { .. }
            | ClusterMessage::ClaimStep { .. }
            | ClusterMessage::PublishStep { .. }
    );
    if worker_only && !matches!(role, Some(Role::Worker | Role::Node)) {
        let shown = role.map_or("an unknown".to_string(), |r| format!("a {r}"));
        tracing::warn!(%remote, role = %shown, "refused a worker request from a non-worker certificate");
        return send_error(
            &mut tx,
            format!("this connection presents {shown} certificate; registering as a worker and fetching context files need the worker certificate (worker.crt and worker.key of `ossb certs init`)"),
        )
        .await;
    }
    let result = match first {
        ClusterMessage::Submit(spec) => run_build(&state, spec, &mut tx, &mut rx).await,
        ClusterMessage::Upload { digest, size } => {
            // Only what a submission asked for, at the size its list gave: a stranger with a
            // client certificate cannot fill the state dir.
            let wanted = state.lock().wanted.get(&digest).copied();
            if wanted != Some(size) {
                return send_error(
                    &mut tx,
                    format!("no build waits for blob {digest} of {size} bytes"),
                )
                .await;
            }
            let r = recv_blob_bytes(&mut rx, &state.store, &digest, size).await;
            if r.is_ok() {
                state.lock().counters.context_bytes_received += size;
                let _ = send(&mut tx, ClusterMessage::Stored).await;
            }
            r
        }
        ClusterMessage::Status { build } => status(&state, &build, &mut tx).await,
        ClusterMessage::Register(info) => worker_channel(&state, info, tx, rx).await,
        ClusterMessage::FetchBlob { digest } => fetch_blob(&state, digest, &mut tx).await,
        ClusterMessage::ClaimStep { task, key } => claim_step(&state, task, key, &mut tx).await,
        ClusterMessage::PublishStep { task, key, record } => {
            publish_step(&state, task, key, record);
            send(&mut tx, ClusterMessage::Stored).await
        }
        other => Err(ClusterError::Protocol {
            peer,
            got: other.kind().to_string(),
        }),
    };
    if let Err(e) = result {
        tracing::warn!(%remote, error = %e, "request failed");
    }
}

async fn status(state: &State, build: &str, tx: &mut SendStream) -> Result<(), ClusterError> {
    let reply = match state.records.load(build) {
        None => ClusterMessage::Finished(BuildOutcome {
            result: Err(Failure {
                message: format!("the coordinator has no record of build {build}"),
                exit_code: 1,
            }),
        }),
        Some(r) => match r.status {
            Status::Queued | Status::Running => ClusterMessage::Running,
            Status::Failed => ClusterMessage::Finished(BuildOutcome {
                result: Err(Failure {
                    message: r.error.unwrap_or_else(|| "the build failed".into()),
                    exit_code: r.exit_code.unwrap_or(1),
                }),
            }),
            Status::Succeeded => ClusterMessage::Finished(BuildOutcome {
                result: Ok(BuiltImage {
                    descriptor_json: r.descriptor.unwrap_or_default(),
                    top: Vec::new(),
                    manifests: Vec::new(),
                    blobs: Vec::new(),
                    config: None,
                    pushed: Vec::new(),
                    run: 0,
                    cached: 0,
                    size: 0,
                    cache_peers: Vec::new(),
                }),
            }),
        },
    };
    send(tx, reply).await?;
    let _ = tx.finish();
    Ok(())
}

async fn fetch_blob(
    state: &State,
    digest: Digest,
    tx: &mut SendStream,
) -> Result<(), ClusterError> {
    let Some(size) = state.store.size(&digest) else {
        send_error(tx, format!("the coordinator has no blob {digest}")).await;
        return Ok(());
    };
    send(tx, ClusterMessage::Blob { size }).await?;
    send_blob_bytes(tx, &state.store, &digest).await?;
    let _ = tx.finish();
    state.lock().counters.context_bytes_served += size;
    Ok(())
}

/// Answers a task's claim of step `key`: the record when some task built it (for a
/// `--no-cache` build, a task of the same build), else the right to build it; while another
/// task builds it, waits for that one to publish it or end.
async fn claim_step(
    state: &State,
    task: u64,
    key: [u8; 32],
    tx: &mut SendStream,
) -> Result<(), ClusterError> {
    enum Answer {
        Gone,
        Record(String),
        Build,
        Wait(oneshot::Receiver<()>),
    }
    let mut waited = false;
    loop {
        // Decided under the lock, answered after it (the guard never lives across an await).
        let answer = {
            let mut inner = state.lock();
            match inner.tasks.get(&task) {
                None => Answer::Gone,
                Some(t) => {
                    let (build, no_cache) = (t.spec.build.clone(), t.spec.spec.no_cache);
                    let record = inner
                        .steps
                        .get(&key)
                        .filter(|e| !no_cache || e.build == build)
                        .map(|e| e.record.clone());
                    match record {
                        Some(record) => {
                            inner.counters.steps_from_cluster += 1;
                            Answer::Record(record)
                        }
                        None => match inner.claims.get_mut(&key) {
                            Some(claim) if claim.task != task => {
                                let (wake, wait) = oneshot::channel();
                                claim.waiters.push(wake);
                                if !waited {
                                    waited = true;
                                    inner.counters.steps_waited += 1;
                                }
                                Answer::Wait(wait)
                            }
                            _ => {
                                inner.claims.insert(
                                    key,
                                    StepClaim {
                                        task,
                                        waiters: Vec::new(),
                                    },
                                );
                                inner.counters.steps_claimed += 1;
                                Answer::Build
                            }
                        },
                    }
                }
            }
        };
        match answer {
            Answer::Gone => {
                send_error(tx, format!("task {task} is not running here")).await;
                return Ok(());
            }
            Answer::Record(record) => return send(tx, ClusterMessage::StepRecord { record }).await,
            Answer::Build => return send(tx, ClusterMessage::BuildStep).await,
            // The builder published the step or ended (then this task may build it).
            Answer::Wait(wait) => {
                let _ = wait.await;
            }
        }
    }
}

/// Records a step a task built, and wakes the tasks waiting for it.
fn publish_step(state: &State, task: u64, key: [u8; 32], record: String) {
    let mut inner = state.lock();
    let build = inner
        .tasks
        .get(&task)
        .map(|t| t.spec.build.clone())
        .unwrap_or_default();
    if inner
        .steps
        .insert(key, StepEntry { record, build })
        .is_none()
    {
        inner.step_order.push_back(key);
        while inner.step_order.len() > MAX_STEP_RECORDS {
            if let Some(old) = inner.step_order.pop_front() {
                inner.steps.remove(&old);
            }
        }
    }
    if inner.claims.get(&key).is_some_and(|c| c.task == task) {
        if let Some(claim) = inner.claims.remove(&key) {
            for waiter in claim.waiters {
                let _ = waiter.send(());
            }
        }
    }
}

/// A worker's control stream: tasks go out, heartbeats, events and results come in.
async fn worker_channel(
    state: &Arc<State>,
    info: WorkerInfo,
    mut tx: SendStream,
    mut rx: RecvStream,
) -> Result<(), ClusterError> {
    let id = state.next_id();
    let name = info.name.clone();
    let (task_tx, mut task_rx) = mpsc::unbounded_channel();
    send(
        &mut tx,
        ClusterMessage::Registered {
            worker: name.clone(),
        },
    )
    .await?;
    tracing::info!(worker = %name, platform = %info.platform, emulates = ?info.emulates.iter().map(|p| p.to_string()).collect::<Vec<_>>(), slots = info.slots, "worker registered");
    state.lock().workers.insert(
        id,
        Worker {
            info,
            tasks: task_tx,
            last_seen: Instant::now(),
            running: HashSet::new(),
            holds: HashSet::new(),
        },
    );
    state.wake.notify_one();
    let writer = tokio::spawn(async move {
        while let Some(m) = task_rx.recv().await {
            if send(&mut tx, m).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        let message = match recv(&mut rx, &name).await {
            Ok(m) => m,
            Err(e) => break Err(e),
        };
        let mut inner = state.lock();
        let Some(worker) = inner.workers.get_mut(&id) else {
            // Dropped as lost: whatever it says now is too late.
            break Ok(());
        };
        worker.last_seen = Instant::now();
        match message {
            ClusterMessage::Heartbeat { .. } => {}
            ClusterMessage::TaskEvent { task, event } => {
                if let Some(t) = inner.tasks.get(&task).filter(|t| t.worker == Some(id)) {
                    let _ = t.events.send((task, event));
                }
            }
            ClusterMessage::TaskDone { task, result } => {
                let peers = worker.info.cache_peers.clone();
                let native = worker.info.platform.clone();
                worker.running.remove(&task);
                if inner.tasks.get(&task).is_some_and(|t| t.worker == Some(id)) {
                    release(&mut inner, task);
                }
                if let Some(mut t) = inner.tasks.remove(&task).filter(|t| t.worker == Some(id)) {
                    if let Some(w) = inner.workers.get_mut(&id) {
                        w.holds.extend(t.context.iter().copied());
                    }
                    if let Ok(outcome) = &result {
                        let steps = inner.counters.steps.entry(name.clone()).or_default();
                        steps.0 += outcome.run;
                        steps.1 += outcome.cached;
                        let mode = if t.runs_on == native {
                            "native"
                        } else {
                            "emulated"
                        };
                        let by_mode = inner
                            .counters
                            .steps_by_mode
                            .entry((t.runs_on.to_string(), mode))
                            .or_default();
                        by_mode.0 += outcome.run;
                        by_mode.1 += outcome.cached;
                        let i = inner.counters.inputs.entry(name.clone()).or_default();
                        i.local_blobs += outcome.inputs.local_blobs;
                        i.peer_blobs += outcome.inputs.peer_blobs;
                        i.peer_bytes += outcome.inputs.peer_bytes;
                        i.registry_blobs += outcome.inputs.registry_blobs;
                        i.registry_bytes += outcome.inputs.registry_bytes;
                        if let Some(key) = t.key {
                            if inner.built_on.len() > 100_000 {
                                inner.built_on.clear();
                            }
                            inner.built_on.insert(key, id);
                        }
                    }
                    // The tasks waiting for this stage may go; the worker that built it is
                    // where they find its layers.
                    if result.is_ok() {
                        for other in inner.tasks.values_mut() {
                            if other.deps.contains(&task) {
                                other.deps.retain(|d| *d != task);
                                other.prefer.get_or_insert(id);
                            }
                        }
                    }
                    if let Some(done) = t.done.take() {
                        let _ = done.send((result, peers));
                    }
                }
                drop(inner);
                state.wake.notify_one();
            }
            other => {
                drop(inner);
                tracing::warn!(worker = %name, message = ?other, "unexpected message from a worker");
            }
        }
    };
    writer.abort();
    lose_worker(state, id, "its connection closed");
    result
}

/// Drops a worker and queues its tasks again, first.
fn lose_worker(state: &State, id: u64, why: &str) {
    let mut inner = state.lock();
    let Some(worker) = inner.workers.remove(&id) else {
        return;
    };
    inner.counters.workers_lost += 1;
    tracing::warn!(worker = %worker.info.name, reason = why, tasks = worker.running.len(), "worker lost");
    inner.built_on.retain(|_, w| *w != id);
    for task in worker.running {
        release(&mut inner, task);
        if let Some(t) = inner.tasks.get_mut(&task) {
            t.worker = None;
            // A fresh grace period: the lost worker may have been the only one of its
            // platform, and may come back.
            t.queued_at = Instant::now();
            t.told = false;
            let _ = t.events.send((
                task,
                BuildEvent::Info(format!(
                    "worker {} was lost ({why}): building {} again elsewhere",
                    worker.info.name, t.spec.platform
                )),
            ));
            inner.queue.push_front(task);
            inner.counters.tasks_rescheduled += 1;
        }
    }
    drop(inner);
    state.wake.notify_one();
}

/// Drops workers that stopped heartbeating.
async fn watch_workers(state: Arc<State>) {
    loop {
        tokio::time::sleep(super::HEARTBEAT / 2).await;
        let silent: Vec<u64> = state
            .lock()
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen.elapsed() > super::WORKER_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            lose_worker(&state, id, "no heartbeat");
        }
    }
}

async fn schedule_loop(state: Arc<State>) {
    loop {
        schedule(&state);
        // Woken by new tasks, new workers and finished tasks; the timeout catches the rest.
        let _ = tokio::time::timeout(super::HEARTBEAT, state.wake.notified()).await;
    }
}

/// Forgets that `task` builds its key and the steps it claimed (it ended, was cancelled, or
/// lost its worker); the tasks waiting for those steps may build them now.
fn release(inner: &mut Inner, task: u64) {
    if let Some(key) = inner.tasks.get(&task).and_then(|t| t.key) {
        if inner.building.get(&key) == Some(&task) {
            inner.building.remove(&key);
        }
    }
    inner.claims.retain(|_, claim| {
        if claim.task != task {
            return true;
        }
        for waiter in std::mem::take(&mut claim.waiters) {
            let _ = waiter.send(());
        }
        false
    });
}

/// Assigns queued tasks to workers with a free slot. A task whose identical twin runs waits
/// for it; a task no worker can build fails once the grace period is over.
fn schedule(state: &State) {
    let mut inner = state.lock();
    let mut waiting = VecDeque::new();
    let mut unschedulable = Vec::new();
    let uptime = state.started.elapsed();
    while let Some(task_id) = inner.queue.pop_front() {
        let Some(task) = inner.tasks.get(&task_id) else {
            continue;
        };
        if !task.deps.is_empty() {
            // Its stage needs stages still being built.
            waiting.push_back(task_id);
            continue;
        }
        let (key, platform, queued_at, told) =
            (task.key, task.runs_on.clone(), task.queued_at, task.told);
        if let Some(twin) = key.and_then(|k| inner.building.get(&k).copied()) {
            if twin != task_id {
                if !told {
                    let on = inner
                        .tasks
                        .get(&twin)
                        .and_then(|t| t.worker)
                        .and_then(|w| inner.workers.get(&w))
                        .map(|w| w.info.name.clone())
                        .unwrap_or_default();
                    inner.counters.tasks_waited_identical += 1;
                    if let Some(t) = inner.tasks.get_mut(&task_id) {
                        t.told = true;
                        let _ = t.events.send((
                            task_id,
                            BuildEvent::Info(format!(
                                "{platform}: an identical build runs on worker {on}; waiting for it, then its steps come from that worker's cache"
                            )),
                        ));
                    }
                }
                waiting.push_back(task_id);
                continue;
            }
        }
        let preferred = key
            .and_then(|k| inner.built_on.get(&k).copied())
            .or(inner.tasks[&task_id].prefer);
        let context = &inner.tasks[&task_id].context;
        match pick_worker(&inner.workers, &platform, context, preferred) {
            Some(w) => {
                let task = inner.tasks.get_mut(&task_id).expect("present above");
                task.worker = Some(w);
                let spec = task.spec.clone();
                let events = task.events.clone();
                if let Some(key) = key {
                    inner.building.insert(key, task_id);
                }
                let emulated = inner.workers[&w].info.platform != platform;
                let worker = inner.workers.get_mut(&w).expect("picked from the map");
                worker.running.insert(task_id);
                let name = worker.info.name.clone();
                let sent = worker.tasks.send(ClusterMessage::Task(spec.clone()));
                let how = if emulated { "emulated" } else { "native" };
                tracing::info!(build = %spec.build, task = task_id, platform = %spec.platform, stage = ?spec.stage, runs_on = %platform, worker = %name, how, "task scheduled");
                let _ = events.send((
                    task_id,
                    BuildEvent::Info(format!(
                        "{}{} scheduled on worker {name} ({how})",
                        spec.platform,
                        stage_label(&spec)
                    )),
                ));
                if sent.is_err() {
                    // Its channel is gone; the worker is being dropped and the task will be
                    // queued again then.
                    tracing::warn!(worker = %name, "worker channel closed");
                }
            }
            None if !can_build(&inner.workers, &platform) => {
                // Counted from the coordinator's start too: after a restart, workers need a
                // moment to register again.
                if queued_at.elapsed().min(uptime) >= super::NO_WORKER_GRACE {
                    unschedulable.push(task_id);
                    continue;
                }
                if let Some(t) = inner.tasks.get_mut(&task_id).filter(|t| !t.told) {
                    t.told = true;
                    let _ = t.events.send((
                        task_id,
                        BuildEvent::Info(format!(
                            "no worker builds {platform} yet; waiting up to {}s for one to register",
                            super::NO_WORKER_GRACE.as_secs()
                        )),
                    ));
                }
                waiting.push_back(task_id);
            }
            None => waiting.push_back(task_id),
        }
    }
    inner.queue = waiting;
    if unschedulable.is_empty() {
        return;
    }
    let roster = roster(&inner.workers);
    for task_id in unschedulable {
        let Some(mut t) = inner.tasks.remove(&task_id) else {
            continue;
        };
        inner.counters.tasks_unschedulable += 1;
        let p = &t.runs_on;
        let message = format!(
            "no worker can build {p}: none runs it natively and none emulates it ({} waited for one to register). The cluster has {roster}. Start a worker with --platform {p}, or one with --emulate {p} (QEMU through binfmt_misc)",
            humanize(super::NO_WORKER_GRACE)
        );
        tracing::warn!(build = %t.spec.build, task = task_id, platform = %p, "no worker can build the platform");
        if let Some(done) = t.done.take() {
            let _ = done.send((Err(failure(message, 1)), Vec::new()));
        }
    }
}

fn humanize(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Whether any registered worker builds `platform`, natively or emulated, busy or not.
fn can_build(workers: &HashMap<u64, Worker>, platform: &Platform) -> bool {
    workers
        .values()
        .any(|w| w.info.platform == *platform || w.info.emulates.contains(platform))
}

/// The registered workers for a message: `a (linux/amd64), b (linux/amd64; emulates
/// linux/arm64)`, or that there are none.
fn roster(workers: &HashMap<u64, Worker>) -> String {
    let mut names: Vec<String> = workers
        .values()
        .map(|w| {
            let emulates: Vec<String> = w.info.emulates.iter().map(|p| p.to_string()).collect();
            if emulates.is_empty() {
                format!("{} ({})", w.info.name, w.info.platform)
            } else {
                format!(
                    "{} ({}; emulates {})",
                    w.info.name,
                    w.info.platform,
                    emulates.join(", ")
                )
            }
        })
        .collect();
    if names.is_empty() {
        return "no workers registered".into();
    }
    names.sort();
    format!("these workers: {}", names.join(", "))
}

/// Withdraws `tasks` (queued or running) and tells their workers to stop them.
fn cancel_tasks(state: &State, tasks: &[u64], why: &str) {
    let mut inner = state.lock();
    for &task in tasks {
        release(&mut inner, task);
        let Some(t) = inner.tasks.remove(&task) else {
            continue;
        };
        inner.queue.retain(|q| *q != task);
        inner.counters.tasks_cancelled += 1;
        let _ = t.events.send((
            task,
            BuildEvent::Info(format!("{} cancelled: {why}", t.spec.platform)),
        ));
        if let Some(w) = t.worker.and_then(|w| inner.workers.get_mut(&w)) {
            w.running.remove(&task);
            tracing::info!(build = %t.spec.build, task, worker = %w.info.name, "task cancelled");
            let _ = w.tasks.send(ClusterMessage::CancelTask { task });
        }
    }
    drop(inner);
    state.wake.notify_one();
}

/// One task of a build before it is queued: a stage of one platform's plan.
struct StagePlan {
    /// The platform whose image the stage is part of.
    platform: Platform,
    /// The stage's index in the Dockerfile.
    stage: usize,
    /// Where it runs: its FROM --platform, else `platform`.
    runs_on: Platform,
    /// Whether it is the platform's image (the target stage).
    export: bool,
    /// The stages it needs, as positions in the build's list of stage plans.
    deps: Vec<usize>,
}

/// The stage tasks of a build: for each platform, every stage its target needs, with the
/// stages each needs. The stage graph depends on the Dockerfile and the arguments only, so it
/// is planned here without the base images (the workers plan again with them).
fn stage_tasks(
    df: &ossb_dockerfile::Dockerfile,
    spec: &BuildSpec,
    build_platform: &Platform,
) -> Result<Vec<StagePlan>, Failure> {
    let mut out = Vec::new();
    let network = super::context::network_of(spec).map_err(|e| failure(e, 2))?;
    for platform in &spec.platforms {
        let opts = ossb_dockerfile::PlanOptions {
            build_args: spec.build_args.iter().cloned().collect(),
            target: spec.target.clone(),
            target_index: None,
            target_platform: platform.clone(),
            build_platform: build_platform.clone(),
            network,
            extra_hosts: spec.extra_hosts.clone(),
        };
        let plan = ossb_dockerfile::plan(df, &opts, &HashMap::new())
            .map_err(|e| failure(e.to_string(), 2))?;
        let offset = out.len();
        for (position, stage) in plan.stages.iter().enumerate() {
            out.push(StagePlan {
                platform: platform.clone(),
                stage: stage.index,
                runs_on: stage.platform.clone().unwrap_or_else(|| platform.clone()),
                export: position == plan.target,
                deps: stage.deps().iter().map(|d| offset + d).collect(),
            });
        }
    }
    Ok(out)
}

/// BUILDPLATFORM of a build: the first platform asked for that a worker runs natively, else
/// the native platform of a worker, else the first platform asked for.
fn choose_build_platform(workers: &HashMap<u64, Worker>, wanted: &[Platform]) -> Platform {
    wanted
        .iter()
        .find(|p| workers.values().any(|w| w.info.platform == **p))
        .or_else(|| {
            workers
                .values()
                .map(|w| &w.info.platform)
                .min_by_key(|p| p.to_string())
        })
        .or(wanted.first())
        .cloned()
        .unwrap_or_else(Platform::host)
}

/// ` stage N` for messages about a stage task.
fn stage_label(spec: &TaskSpec) -> String {
    spec.stage
        .map(|i| format!(" stage {i}"))
        .unwrap_or_default()
}

/// What makes two tasks identical: everything that goes into their steps' cache keys and
/// their image (not the tags, nor where the image goes). Only in the coordinator's memory.
fn task_key(task: &TaskSpec) -> Option<Digest> {
    let spec = &task.spec;
    if spec.no_cache {
        return None;
    }
    // postcard: the wire encoding, field by field in declaration order, never `Debug` text.
    let bytes = postcard::to_allocvec(&(
        "ossb-task-v1",
        (&task.platform, task.stage, &task.build_platform),
        (&spec.dockerfile, &spec.dockerfile_name, &spec.build_args),
        (
            &spec.target,
            &spec.labels,
            &spec.context,
            &spec.build_contexts,
        ),
        &spec.cache_from,
        (&spec.network, &spec.extra_hosts, &spec.annotations),
        (
            &spec.compression,
            spec.oci_media_types,
            spec.source_date_epoch,
        ),
    ))
    .ok()?;
    Some(Digest::of(&bytes))
}

/// The worker for a task of `platform`: native workers when any is registered, else emulating
/// ones; among those with a free slot, the one that holds most of the context, then the least
/// busy.
fn pick_worker(
    workers: &HashMap<u64, Worker>,
    platform: &Platform,
    context: &[Digest],
    preferred: Option<u64>,
) -> Option<u64> {
    let native: Vec<(&u64, &Worker)> = workers
        .iter()
        .filter(|(_, w)| w.info.platform == *platform)
        .collect();
    let pool = if native.is_empty() {
        workers
            .iter()
            .filter(|(_, w)| w.info.emulates.contains(platform))
            .collect()
    } else {
        native
    };
    pool.into_iter()
        .filter(|(_, w)| (w.running.len() as u32) < w.info.slots.max(1))
        .max_by_key(|(id, w)| {
            let held = context.iter().filter(|d| w.holds.contains(d)).count();
            (
                preferred == Some(**id),
                held,
                std::cmp::Reverse(w.running.len()),
                std::cmp::Reverse(**id),
            )
        })
        .map(|(id, _)| *id)
}

/// Serves one submitted build on the client's stream until it ends.
async fn run_build(
    state: &Arc<State>,
    spec: BuildSpec,
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<(), ClusterError> {
    let build = format!("b{}-{}", ossb_engine::build::now(), state.next_id());
    let mut record = Record {
        id: build.clone(),
        status: Status::Queued,
        platforms: spec.platforms.iter().map(|p| p.to_string()).collect(),
        tags: spec.tags.clone(),
        submitted: ossb_engine::build::now(),
        digest: None,
        descriptor: None,
        error: None,
        exit_code: None,
    };
    let _ = state.records.save(&record);
    let outcome = build_outcome(state, &build, spec, tx, rx).await;
    {
        let mut inner = state.lock();
        match &outcome {
            Ok(_) => inner.counters.succeeded += 1,
            Err(_) => inner.counters.failed += 1,
        }
    }
    match &outcome {
        Ok(image) => {
            record.status = Status::Succeeded;
            record.digest = serde_json::from_str::<Descriptor>(&image.descriptor_json)
                .ok()
                .map(|d| d.digest.to_string());
            record.descriptor = Some(image.descriptor_json.clone());
            tracing::info!(build = %build, digest = ?record.digest, "build succeeded");
        }
        Err(f) => {
            record.status = Status::Failed;
            record.error = Some(f.message.clone());
            record.exit_code = Some(f.exit_code);
            tracing::info!(build = %build, error = %f.message, "build failed");
        }
    }
    let _ = state.records.save(&record);
    send(
        tx,
        ClusterMessage::Finished(BuildOutcome { result: outcome }),
    )
    .await?;
    let _ = tx.finish();
    Ok(())
}

/// The blobs one submission waits for, registered as wanted until dropped.
struct Wanted<'a> {
    state: &'a State,
    digests: Vec<Digest>,
}

impl<'a> Wanted<'a> {
    fn new(state: &'a State, blobs: &[(Digest, u64)]) -> Wanted<'a> {
        let mut inner = state.lock();
        for (d, size) in blobs {
            inner.wanted.insert(*d, *size);
            *inner.wanted_by.entry(*d).or_default() += 1;
        }
        Wanted {
            state,
            digests: blobs.iter().map(|(d, _)| *d).collect(),
        }
    }
}

impl Drop for Wanted<'_> {
    fn drop(&mut self) {
        let mut inner = self.state.lock();
        for d in &self.digests {
            let left = inner.wanted_by.get_mut(d).map(|n| {
                *n -= 1;
                *n
            });
            if left == Some(0) {
                inner.wanted_by.remove(d);
                inner.wanted.remove(d);
            }
        }
    }
}

/// Counts a build as queued, then as running, until dropped.
struct Gauge<'a> {
    state: &'a State,
    running: bool,
}

impl<'a> Gauge<'a> {
    fn new(state: &'a State) -> Gauge<'a> {
        state.lock().counters.queued += 1;
        Gauge {
            state,
            running: false,
        }
    }

    fn start_running(&mut self) {
        let mut inner = self.state.lock();
        inner.counters.queued = inner.counters.queued.saturating_sub(1);
        inner.counters.running += 1;
        self.running = true;
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        let mut inner = self.state.lock();
        let c = &mut inner.counters;
        if self.running {
            c.running = c.running.saturating_sub(1);
        } else {
            c.queued = c.queued.saturating_sub(1);
        }
    }
}

fn failure(message: impl Into<String>, exit_code: i32) -> Failure {
    Failure {
        message: message.into(),
        exit_code,
    }
}

/// Receives the context, runs every platform's task, merges and pushes.
async fn build_outcome(
    state: &Arc<State>,
    build: &str,
    spec: BuildSpec,
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<BuiltImage, Failure> {
    let mut gauge = Gauge::new(state);
    let caches = spec
        .cache_from
        .iter()
        .map(|c| ossb_engine::remote_cache::parse_cache(c, false))
        .chain(
            spec.cache_to
                .iter()
                .map(|c| ossb_engine::remote_cache::parse_cache(c, true)),
        )
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failure(e, 2))?;
    ossb_engine::build::check_references(&spec.tags, &caches)
        .map_err(|e| failure(e.to_string(), 2))?;
    let df = ossb_dockerfile::parse(&spec.dockerfile, &spec.dockerfile_name)
        .map_err(|e| failure(e.to_string(), 2))?;
    if spec.platforms.is_empty() {
        return Err(failure("no platform to build for", 2));
    }
    spec.compression
        .parse::<ossb_image::layer::Compression>()
        .map_err(|e| failure(e, 2))?;
    for (name, entries) in std::iter::once(("the context", &spec.context))
        .chain(spec.build_contexts.iter().map(|(n, e)| (n.as_str(), e)))
    {
        ossb_protocol::cluster::check_entries(entries)
            .map_err(|e| failure(format!("{}: {e}", ossb_dockerfile::clip(name, 100)), 2))?;
    }
    let build_platform = choose_build_platform(&state.lock().workers, &spec.platforms);
    let stages = stage_tasks(&df, &spec, &build_platform)?;
    let files = all_file_digests(&spec);
    let context: Vec<Digest> = files.iter().map(|(d, _)| *d).collect();
    let missing: Vec<(Digest, u64)> = files
        .iter()
        .filter(|(d, _)| !state.store.contains(d))
        .copied()
        .collect();
    let net = |e: ClusterError| failure(format!("receiving the build: {e}"), 1);
    let _wanted = Wanted::new(state, &missing);
    send(
        tx,
        ClusterMessage::NeedBlobs {
            digests: missing.iter().map(|(d, _)| *d).collect(),
        },
    )
    .await
    .map_err(net)?;
    match recv(rx, "the client").await.map_err(net)? {
        ClusterMessage::UploadsDone => {}
        other => {
            return Err(failure(
                format!("expected UploadsDone, got {}", other.kind()),
                1,
            ))
        }
    }
    if let Some(d) = context.iter().find(|d| !state.store.contains(d)) {
        return Err(failure(format!("the context file {d} was not uploaded"), 1));
    }
    for d in &context {
        state.store.touch(d);
    }
    send(
        tx,
        ClusterMessage::Accepted {
            build: build.to_string(),
        },
    )
    .await
    .map_err(net)?;
    tracing::info!(build, platforms = ?spec.platforms.iter().map(|p| p.to_string()).collect::<Vec<_>>(), context_files = context.len(), "build accepted");
    let build_args = spec.build_args.iter().cloned().collect();
    if let Some(warning) =
        ossb_engine::build::unused_build_args_warning(&df, &build_args, spec.target.as_deref())
    {
        let _ = send(tx, ClusterMessage::Event(BuildEvent::Info(warning))).await;
    }

    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut pending = Vec::new();
    gauge.start_running();
    // The build's tasks get consecutive ids, in the order of `stages`.
    let first = {
        let mut inner = state.lock();
        let first = inner.next_id + 1;
        inner.next_id += stages.len() as u64;
        for (n, stage) in stages.iter().enumerate() {
            let task = first + n as u64;
            let (done_tx, done_rx) = oneshot::channel();
            let spec = TaskSpec {
                task,
                build: build.to_string(),
                platform: stage.platform.clone(),
                stage: Some(stage.stage as u32),
                export: stage.export,
                build_platform: build_platform.clone(),
                spec: spec.clone(),
            };
            let key = task_key(&spec);
            inner.tasks.insert(
                task,
                Task {
                    spec,
                    runs_on: stage.runs_on.clone(),
                    deps: stage.deps.iter().map(|d| first + *d as u64).collect(),
                    prefer: None,
                    worker: None,
                    events: events_tx.clone(),
                    done: Some(done_tx),
                    context: context.clone(),
                    key,
                    queued_at: Instant::now(),
                    told: false,
                },
            );
            inner.queue.push_back(task);
            pending.push((task, stage.platform.clone(), done_rx));
        }
        first
    };
    let _ = state.records.save(&running_record(build, &spec));
    state.wake.notify_one();
    drop(events_tx);

    // Forward events (renumbered: each task's engine counts from 1) until every task ends.
    let platforms: HashMap<u64, Platform> =
        pending.iter().map(|(t, p, _)| (*t, p.clone())).collect();
    let multi = spec.platforms.len() > 1;
    let mut ids: HashMap<(u64, u64), u64> = HashMap::new();
    let mut next = 0u64;
    let mut results: futures_util::stream::FuturesUnordered<_> = pending
        .into_iter()
        .map(|(task, _, rx)| async move { (task, rx.await) })
        .collect();
    let mut remaining: Vec<u64> = platforms.keys().copied().collect();
    let mut outcomes = Vec::new();
    let mut peers = Vec::new();
    let mut failed = None;
    let mut client_gone = false;
    loop {
        tokio::select! {
            r = futures_util::StreamExt::next(&mut results) => {
                let Some((task, r)) = r else { break };
                remaining.retain(|t| *t != task);
                match r {
                    Ok((Ok(o), p)) => {
                        outcomes.push((task, o));
                        peers.extend(p);
                    }
                    Ok((Err(f), _)) => {
                        failed = Some((task, f));
                        break;
                    }
                    Err(_) => {
                        failed = Some((task, failure("a task was dropped by the coordinator", 1)));
                        break;
                    }
                }
            }
            Some((task, event)) = events_rx.recv() => {
                let event = renumber(event, task, &mut ids, &mut next, multi.then(|| &platforms[&task]));
                if !client_gone && send(tx, ClusterMessage::Event(event)).await.is_err() {
                    client_gone = true;
                }
            }
        }
    }
    // A task that failed for good fails the build: its siblings stop now rather than run on.
    if let Some((task, _)) = &failed {
        if !remaining.is_empty() {
            cancel_tasks(state, &remaining, &format!("{} failed", platforms[task]));
        }
    }
    while let Ok((task, event)) = events_rx.try_recv() {
        let event = renumber(
            event,
            task,
            &mut ids,
            &mut next,
            multi.then(|| &platforms[&task]),
        );
        if !client_gone {
            let _ = send(tx, ClusterMessage::Event(event)).await;
        }
    }
    drop(gauge);
    if let Some((_, f)) = failed {
        return Err(f);
    }
    // The platforms' images, in the order asked for (task ids were given in that order).
    // Steps: those each platform's tasks ran; the rest of its image's steps came from a cache.
    outcomes.sort_by_key(|(task, _)| *task);
    let mut images = Vec::new();
    for (n, stage) in stages.iter().enumerate().filter(|(_, st)| st.export) {
        let Some((_, image)) = outcomes.iter().find(|(t, _)| *t == first + n as u64) else {
            return Err(failure(
                format!("no image was built for {}", stage.platform),
                1,
            ));
        };
        let mut image = image.clone();
        let run: u64 = outcomes
            .iter()
            .filter(|(t, _)| stages[(*t - first) as usize].platform == stage.platform)
            .map(|(_, o)| o.run)
            .sum();
        image.cached = (image.run + image.cached).saturating_sub(run);
        image.run = run;
        images.push(image);
    }
    let outcomes = images;
    peers.sort();
    peers.dedup();
    merge_and_push(&spec, outcomes, peers).await
}

fn running_record(build: &str, spec: &BuildSpec) -> Record {
    Record {
        id: build.to_string(),
        status: Status::Running,
        platforms: spec.platforms.iter().map(|p| p.to_string()).collect(),
        tags: spec.tags.clone(),
        submitted: ossb_engine::build::now(),
        digest: None,
        descriptor: None,
        error: None,
        exit_code: None,
    }
}

/// Gives a task's event a build-wide vertex id, and names the platform in vertex names of a
/// multi-platform build.
fn renumber(
    event: BuildEvent,
    task: u64,
    ids: &mut HashMap<(u64, u64), u64>,
    next: &mut u64,
    platform: Option<&Platform>,
) -> BuildEvent {
    let mut map = |id: u64| {
        *ids.entry((task, id)).or_insert_with(|| {
            *next += 1;
            *next
        })
    };
    match event {
        BuildEvent::Started { id, name } => {
            let name = match platform {
                Some(p) if name.starts_with('[') && !name.starts_with(&format!("[{p}")) => {
                    format!("[{p} {}", &name[1..])
                }
                _ => name,
            };
            BuildEvent::Started { id: map(id), name }
        }
        BuildEvent::Output {
            id,
            elapsed_ms,
            line,
        } => BuildEvent::Output {
            id: map(id),
            elapsed_ms,
            line,
        },
        BuildEvent::Done { id, elapsed_ms } => BuildEvent::Done {
            id: map(id),
            elapsed_ms,
        },
        BuildEvent::Failed {
            id,
            elapsed_ms,
            message,
        } => BuildEvent::Failed {
            id: map(id),
            elapsed_ms,
            message,
        },
        BuildEvent::Cached { id } => BuildEvent::Cached { id: map(id) },
        BuildEvent::Transfer { id, received, sent } => BuildEvent::Transfer {
            id: map(id),
            received,
            sent,
        },
        other => other,
    }
}

/// Merges the platforms' manifests (an index for several) and pushes the top under each tag,
/// last: the workers pushed the manifests and their blobs by digest already.
async fn merge_and_push(
    spec: &BuildSpec,
    outcomes: Vec<PlatformOutcome>,
    cache_peers: Vec<String>,
) -> Result<BuiltImage, Failure> {
    let bad =
        |e: serde_json::Error| failure(format!("a worker sent an invalid descriptor: {e}"), 1);
    let descriptors: Vec<Descriptor> = outcomes
        .iter()
        .map(|o| serde_json::from_str(&o.descriptor_json))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    let types = media_types(spec);
    let (top, top_bytes, manifests) = match (descriptors.as_slice(), outcomes.as_slice()) {
        ([one], [o]) => (one.clone(), o.manifest.clone(), Vec::new()),
        _ => {
            let (top, bytes) = ossb_engine::build::index_of(
                &descriptors,
                types,
                &super::context::annotations_of(spec).index,
            );
            (
                top,
                bytes,
                outcomes.iter().map(|o| o.manifest.clone()).collect(),
            )
        }
    };
    let mut pushed = Vec::new();
    if spec.push {
        // An empty store: pushing the top alone reads nothing from it. The registry CAs the
        // client sent are written beside it, for as long as the push lasts.
        let scratch = tempfile::tempdir().map_err(|e| failure(e.to_string(), 1))?;
        let store =
            BlobStore::open(scratch.path().join("store")).map_err(|e| failure(e.to_string(), 1))?;
        let certificates = TaskFiles::write(
            &BuildSpec {
                registry_certificates: spec.registry_certificates.clone(),
                ..Default::default()
            },
            &store,
            scratch.path(),
        )
        .map_err(|e| failure(e, 1))?
        .certificates;
        let registry = Registry::with_config(
            &registry_options(spec, &certificates),
            &registry_config(spec),
        )
        .map_err(|e| failure(e.to_string(), 1))?;
        for tag in &spec.tags {
            let reference = parse_reference(tag).map_err(|e| failure(e.to_string(), 2))?;
            registry
                .push(&reference, &store, &[], &top_bytes, &top.media_type)
                .await
                .map_err(|e| failure(e.to_string(), 1))?;
            tracing::info!(reference = %reference.whole(), digest = %top.digest, "pushed");
            pushed.push(format!("{}@{}", reference.whole(), top.digest));
        }
    }
    let mut blobs: Vec<Digest> = outcomes.iter().flat_map(|o| o.blobs.clone()).collect();
    blobs.sort();
    blobs.dedup();
    Ok(BuiltImage {
        descriptor_json: serde_json::to_string(&top).unwrap_or_default(),
        top: top_bytes,
        manifests,
        blobs,
        config: match outcomes.as_slice() {
            [one] => Some(one.config),
            _ => None,
        },
        pushed,
        run: outcomes.iter().map(|o| o.run).sum(),
        cached: outcomes.iter().map(|o| o.cached).sum(),
        size: outcomes.iter().map(|o| o.size).sum(),
        cache_peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(platform: &str, emulates: &[&str], slots: u32) -> Worker {
        let (tx, _) = mpsc::unbounded_channel();
        Worker {
            info: WorkerInfo {
                name: platform.into(),
                platform: platform.parse().unwrap(),
                emulates: emulates.iter().map(|p| p.parse().unwrap()).collect(),
                slots,
                cache_peers: Vec::new(),
            },
            tasks: tx,
            last_seen: Instant::now(),
            running: HashSet::new(),
            holds: HashSet::new(),
        }
    }

    #[test]
    fn native_workers_first_emulation_only_without_them() {
        let arm: Platform = "linux/arm64".parse().unwrap();
        let amd: Platform = "linux/amd64".parse().unwrap();
        let mut workers = HashMap::new();
        workers.insert(1, worker("linux/amd64", &["linux/arm64"], 1));
        // No native arm64 worker: the emulating one takes it.
        assert_eq!(pick_worker(&workers, &arm, &[], None), Some(1));
        workers.insert(2, worker("linux/arm64", &[], 1));
        assert_eq!(pick_worker(&workers, &arm, &[], None), Some(2));
        // The native one is busy: wait for it rather than emulate.
        workers.get_mut(&2).unwrap().running.insert(9);
        assert_eq!(pick_worker(&workers, &arm, &[], None), None);
        assert_eq!(pick_worker(&workers, &amd, &[], None), Some(1));
        let riscv: Platform = "linux/riscv64".parse().unwrap();
        assert_eq!(pick_worker(&workers, &riscv, &[], None), None);
    }

    #[test]
    fn the_worker_holding_the_context_is_preferred() {
        let amd: Platform = "linux/amd64".parse().unwrap();
        let d = Digest::of(b"file");
        let mut workers = HashMap::new();
        workers.insert(1, worker("linux/amd64", &[], 2));
        workers.insert(2, worker("linux/amd64", &[], 2));
        workers.get_mut(&2).unwrap().holds.insert(d);
        assert_eq!(pick_worker(&workers, &amd, &[d], None), Some(2));
    }

    fn task(spec: &BuildSpec, platform: &Platform) -> TaskSpec {
        TaskSpec {
            task: 1,
            build: "b".into(),
            platform: platform.clone(),
            stage: Some(0),
            export: true,
            build_platform: "linux/amd64".parse().unwrap(),
            spec: spec.clone(),
        }
    }

    #[test]
    fn identical_tasks_share_a_key_whatever_their_tags() {
        let amd: Platform = "linux/amd64".parse().unwrap();
        let arm: Platform = "linux/arm64".parse().unwrap();
        let task_key = |spec: &BuildSpec, p: &Platform| task_key(&task(spec, p));
        let other_stage = TaskSpec {
            stage: Some(1),
            ..task(&BuildSpec::default(), &amd)
        };
        assert_ne!(
            super::task_key(&other_stage),
            super::task_key(&task(&BuildSpec::default(), &amd))
        );
        let spec = BuildSpec {
            dockerfile: "FROM busybox\nRUN true\n".into(),
            tags: vec!["a:1".into()],
            ..Default::default()
        };
        let retagged = BuildSpec {
            tags: vec!["b:2".into()],
            push: true,
            ..spec.clone()
        };
        assert_eq!(task_key(&spec, &amd), task_key(&retagged, &amd));
        assert!(task_key(&spec, &amd).is_some());
        assert_ne!(task_key(&spec, &amd), task_key(&spec, &arm));
        let other_arg = BuildSpec {
            build_args: vec![("X".into(), "1".into())],
            ..spec.clone()
        };
        assert_ne!(task_key(&spec, &amd), task_key(&other_arg, &amd));
        let no_cache = BuildSpec {
            no_cache: true,
            ..spec
        };
        assert_eq!(task_key(&no_cache, &amd), None);
    }

    #[test]
    fn the_roster_names_every_worker_and_what_it_builds() {
        let mut workers = HashMap::new();
        assert_eq!(roster(&workers), "no workers registered");
        workers.insert(1, worker("linux/amd64", &["linux/arm64"], 1));
        workers.insert(2, worker("linux/arm64", &[], 1));
        assert_eq!(
            roster(&workers),
            "these workers: linux/amd64 (linux/amd64; emulates linux/arm64), linux/arm64 (linux/arm64)"
        );
        assert!(can_build(&workers, &"linux/arm64".parse().unwrap()));
        assert!(!can_build(&workers, &"linux/riscv64".parse().unwrap()));
    }

    #[test]
    fn the_worker_that_built_a_key_is_preferred_when_free() {
        let amd: Platform = "linux/amd64".parse().unwrap();
        let mut workers = HashMap::new();
        workers.insert(1, worker("linux/amd64", &[], 1));
        workers.insert(2, worker("linux/amd64", &[], 1));
        assert_eq!(pick_worker(&workers, &amd, &[], None), Some(1));
        assert_eq!(pick_worker(&workers, &amd, &[], Some(2)), Some(2));
        workers.get_mut(&2).unwrap().running.insert(5);
        assert_eq!(pick_worker(&workers, &amd, &[], Some(2)), Some(1));
    }

    #[test]
    fn events_of_several_tasks_get_distinct_ids() {
        let (mut ids, mut next) = (HashMap::new(), 0);
        let p: Platform = "linux/arm64".parse().unwrap();
        let a = renumber(
            BuildEvent::Started {
                id: 1,
                name: "[stage-0 1/2] RUN x".into(),
            },
            10,
            &mut ids,
            &mut next,
            Some(&p),
        );
        let b = renumber(
            BuildEvent::Started {
                id: 1,
                name: "x".into(),
            },
            11,
            &mut ids,
            &mut next,
            None,
        );
        assert_eq!(
            a,
            BuildEvent::Started {
                id: 1,
                name: "[linux/arm64 stage-0 1/2] RUN x".into()
            }
        );
        assert!(matches!(b, BuildEvent::Started { id: 2, .. }));
    }

    /// A build becomes one task per needed stage and platform; a `$BUILDPLATFORM` stage runs
    /// on the build platform, the others on their target platform; each task knows the tasks
    /// of the stages it needs, and only the target stage makes the platform's image.
    #[test]
    fn builds_split_into_stage_tasks_with_their_dependencies() {
        let spec = BuildSpec {
            dockerfile: "FROM --platform=$BUILDPLATFORM busybox AS tools\nRUN make\n\
                         FROM busybox AS unused\nRUN x\n\
                         FROM busybox AS build\nCOPY --from=tools /t /t\n\
                         FROM build\nCOPY --from=tools /u /u\n"
                .into(),
            dockerfile_name: "Dockerfile".into(),
            platforms: vec![
                "linux/amd64".parse().unwrap(),
                "linux/arm64".parse().unwrap(),
            ],
            ..Default::default()
        };
        let df = ossb_dockerfile::parse(&spec.dockerfile, "Dockerfile").unwrap();
        let amd: Platform = "linux/amd64".parse().unwrap();
        let tasks = stage_tasks(&df, &spec, &amd).unwrap();
        let summary: Vec<(String, usize, String, bool, Vec<usize>)> = tasks
            .iter()
            .map(|t| {
                (
                    t.platform.to_string(),
                    t.stage,
                    t.runs_on.to_string(),
                    t.export,
                    t.deps.clone(),
                )
            })
            .collect();
        let s = |x: &str| x.to_string();
        assert_eq!(
            summary,
            vec![
                (s("linux/amd64"), 0, s("linux/amd64"), false, vec![]),
                (s("linux/amd64"), 2, s("linux/amd64"), false, vec![0]),
                (s("linux/amd64"), 3, s("linux/amd64"), true, vec![0, 1]),
                (s("linux/arm64"), 0, s("linux/amd64"), false, vec![]),
                (s("linux/arm64"), 2, s("linux/arm64"), false, vec![3]),
                (s("linux/arm64"), 3, s("linux/arm64"), true, vec![3, 4]),
            ]
        );
        let bad = BuildSpec {
            target: Some("nope".into()),
            ..spec
        };
        let err = stage_tasks(&df, &bad, &amd)
            .err()
            .expect("an unknown target");
        assert_eq!(err.exit_code, 2);
        assert!(err.message.contains("nope"), "{}", err.message);
    }

    #[test]
    fn the_build_platform_is_the_first_asked_for_with_a_native_worker() {
        let amd: Platform = "linux/amd64".parse().unwrap();
        let arm: Platform = "linux/arm64".parse().unwrap();
        let mut workers = HashMap::new();
        assert_eq!(
            choose_build_platform(&workers, &[arm.clone(), amd.clone()]),
            arm
        );
        workers.insert(1, worker("linux/amd64", &["linux/arm64"], 1));
        assert_eq!(
            choose_build_platform(&workers, &[arm.clone(), amd.clone()]),
            amd
        );
        assert_eq!(
            choose_build_platform(&workers, std::slice::from_ref(&arm)),
            amd
        );
        workers.insert(2, worker("linux/arm64", &[], 1));
        assert_eq!(
            choose_build_platform(&workers, &[arm.clone(), amd.clone()]),
            arm
        );
    }

    /// A submitter's certificate may not register as a worker (tasks carry other builds'
    /// secrets); a worker's may. A certificate of another CA does not get a connection.
    #[tokio::test]
    async fn only_worker_certificates_register_and_strangers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        ossb_net::certs::init(&tls, &[]).unwrap();
        let coordinator = Coordinator::start(CoordinatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.path().join("state"),
            tls_dir: tls.clone(),
            metrics: None,
        })
        .await
        .unwrap();
        let addr = coordinator.local_addr().to_string();
        let info = WorkerInfo {
            name: "w".into(),
            platform: Platform::host(),
            emulates: Vec::new(),
            slots: 1,
            cache_peers: Vec::new(),
        };
        let register = |role: Role| {
            let (tls, addr, info) = (tls.clone(), addr.clone(), info.clone());
            async move {
                let endpoint = ossb_net::client(&Identity::load(&tls, role).unwrap()).unwrap();
                let timeout = Duration::from_secs(5);
                let conn = ossb_net::connect(&endpoint, &addr, timeout).await.unwrap();
                let (mut tx, mut rx) = conn.open_bi().await.unwrap();
                send(&mut tx, ClusterMessage::Register(info)).await.unwrap();
                recv(&mut rx, &addr).await
            }
        };
        let refused = register(Role::Client).await.unwrap_err().to_string();
        assert!(refused.contains("worker certificate"), "{refused}");
        let accepted = register(Role::Worker).await.unwrap();
        assert!(
            matches!(accepted, ClusterMessage::Registered { .. }),
            "{accepted:?}"
        );

        // A client of another CA that trusts ours: the refusal is the coordinator's.
        let other = dir.path().join("other");
        ossb_net::certs::init(&other, &[]).unwrap();
        let mixed = dir.path().join("mixed");
        std::fs::create_dir(&mixed).unwrap();
        std::fs::copy(tls.join("ca.crt"), mixed.join("ca.crt")).unwrap();
        for f in ["worker.crt", "worker.key"] {
            std::fs::copy(other.join(f), mixed.join(f)).unwrap();
        }
        let endpoint = ossb_net::client(&Identity::load(&mixed, Role::Worker).unwrap()).unwrap();
        let stranger = async {
            let conn = ossb_net::connect(&endpoint, &addr, Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string())?;
            let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send(&mut tx, ClusterMessage::Register(info.clone()))
                .await
                .map_err(|e| e.to_string())?;
            recv(&mut rx, &addr).await.map_err(|e| e.to_string())
        };
        let err = stranger.await.unwrap_err();
        assert!(
            !err.contains("worker certificate"),
            "refused in the handshake, not by the role check: {err}"
        );
        coordinator.close().await;
    }
}
