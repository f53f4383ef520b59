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
//! that already fetched most of the build's context files. A worker silent for [`crate::WORKER_TIMEOUT`] is dropped and its tasks are queued
//! again at the front. A task no registered worker can build (no native worker of its platform
//! and none that emulates it) fails after [`crate::NO_WORKER_GRACE`], naming the workers the
//! cluster has; a task that fails for good cancels the other tasks of its build.
//!
//! Identical tasks (same stage, platform, Dockerfile, arguments and context: the same cache
//! keys) run once: while one runs, the others wait, then go to the worker that built it, whose
//! step cache answers every step. Tasks that share only some steps share them through the
//! cluster's step cache.
//!
//! A bake ([`ClusterMessage::SubmitBake`]) is one graph of every target's stage tasks
//! ([`graph`]): a stage two targets plan alike is one task, handed to both as built; each
//! target is merged and pushed when its own tasks are done.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ossb_image::oci::Descriptor;
use ossb_image::registry::{parse_reference, Registry};
use ossb_image::store::BlobStore;
use ossb_net::{Identity, Role};
use ossb_protocol::cluster::{
    BuildEvent, BuildOutcome, BuildSpec, BuiltContext, BuiltImage, CacheMountVersion,
    ClusterMessage, Failure, InputStats, PlatformOutcome, TaskSpec, WorkerInfo,
};
use ossb_protocol::{Digest, Platform};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::context::{all_file_digests, media_types, registry_config, registry_options, TaskFiles};
use crate::records::{Record, Records, Status, StepRecord};
use crate::{local_err, recv, recv_blob_bytes, send, send_blob_bytes, send_error, ClusterError};

mod bake;
mod cache_mounts;
mod graph;
mod merge;
mod metrics;
mod scheduler;
mod session;
mod steps;
mod tasks;
mod workers;

use bake::*;
use cache_mounts::*;
use graph::*;
use merge::*;
use metrics::*;
use scheduler::*;
use session::*;
use steps::*;
use tasks::*;
use workers::*;

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
    /// Of those, the tasks of the stages it reads (handed as built stages, `TaskSpec::needs`).
    stage_deps: Vec<u64>,
    /// The tasks whose images are its named contexts (another bake target's image), as (task,
    /// context, that target's name): handed as `TaskSpec::contexts`.
    context_deps: Vec<(u64, String, String)>,
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
    /// When it could first go to a worker: its stages built (or its worker lost).
    ready_at: Instant,
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
    /// It waits for its running tasks to end to collect its cache: no task is sent to it.
    draining: bool,
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
    /// The cluster's step cache: records by step key, oldest first in `step_order` (kept in
    /// the state database too, see [`save_steps`]).
    steps: HashMap<[u8; 32], StepRecord>,
    step_order: VecDeque<[u8; 32]>,
    /// Step keys being built, by the task building each.
    claims: HashMap<[u8; 32], StepClaim>,
    /// Context blobs submissions are waiting for, with their size and how many wait.
    wanted: HashMap<Digest, u64>,
    wanted_by: HashMap<Digest, usize>,
    /// The latest content of each cache mount, by (platform, id).
    cache_mounts: HashMap<(String, String), CacheMountVersion>,
    /// Ready-to-dispatch times of tasks, and scheduling pass times.
    dispatch_latency: Latencies,
    pass_latency: Latencies,
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
    records: Arc<Records>,
    /// Step records on their way to the state database.
    step_writes: mpsc::UnboundedSender<([u8; 32], StepRecord)>,
    /// Workers need a moment to register after a coordinator starts.
    started: Instant,
    /// The state directory: the provenance stamps a rebuild that runs nothing keeps.
    state_dir: PathBuf,
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

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A running coordinator.
pub struct Coordinator {
    endpoint: quinn::Endpoint,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Coordinator {
    /// Opens the state dir (its step records, and the builds a previous run left unfinished:
    /// accepted ones run again, the others are marked failed), binds, and serves.
    pub async fn start(config: CoordinatorConfig) -> Result<Coordinator, ClusterError> {
        let store = BlobStore::open(config.state_dir.join("context"))
            .map_err(local_err("opening the state dir"))?;
        let records = Arc::new(Records::open(&config.state_dir).map_err(local_err("opening"))?);
        let (resumed, lost) = records.unfinished().map_err(local_err("reading"))?;
        if !lost.is_empty() {
            tracing::warn!(builds = ?lost, "builds lost in a restart are marked failed");
        }
        let mut inner = Inner {
            // Ids of a previous run's tasks may still come from workers that reconnect: this
            // run's ids start above them.
            next_id: now_micros(),
            ..Inner::default()
        };
        for (key, step) in records.steps().map_err(local_err("reading"))? {
            inner.steps.insert(key, step);
            inner.step_order.push_back(key);
        }
        for (platform, version) in records.cache_mounts().map_err(local_err("reading"))? {
            inner
                .cache_mounts
                .insert((platform, version.id.clone()), version);
        }
        let identity = Identity::load(&config.tls_dir, Role::Node)?;
        let endpoint = ossb_net::server(config.listen, &identity)?;
        let listen = endpoint
            .local_addr()
            .map_err(local_err("reading the bound address"))?;
        let (step_writes, step_batches) = mpsc::unbounded_channel();
        tokio::spawn(save_steps(records.clone(), step_batches));
        let state = Arc::new(State {
            inner: Mutex::new(inner),
            wake: Notify::new(),
            store,
            records,
            step_writes,
            started: Instant::now(),
            state_dir: config.state_dir.clone(),
        });
        let metrics = match config.metrics {
            Some(addr) => Some(serve_metrics(addr, state.clone()).await?),
            None => None,
        };
        tokio::spawn(accept(endpoint.clone(), state.clone()));
        tokio::spawn(schedule_loop(state.clone()));
        tokio::spawn(watch_workers(state.clone()));
        // A bake's targets together (by their bake), every other build alone.
        let mut groups: BTreeMap<String, Vec<(Record, BuildSpec)>> = BTreeMap::new();
        for (record, spec) in resumed {
            let group = record.bake.as_ref().map_or(&record.id, |b| &b.bake).clone();
            groups.entry(group).or_default().push((record, spec));
        }
        for (group, mut targets) in groups {
            targets.sort_by(|a, b| a.0.id.cmp(&b.0.id));
            tracing::info!(
                group,
                builds = targets.len(),
                "resuming what the previous run accepted"
            );
            tokio::spawn(resume(state.clone(), targets));
        }
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
            | ClusterMessage::CacheMounts { .. }
            | ClusterMessage::PublishCacheMount { .. }
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
        ClusterMessage::SubmitBake(bake) => run_bake(&state, bake, &mut tx, &mut rx).await,
        ClusterMessage::Upload { digest, size } => {
            // Only what a submission asked for, at the size its list gave: a stranger with a
            // client certificate cannot fill the state dir.
            let wanted = state.lock().wanted.get(&digest).copied();
            match wanted {
                Some(listed) if listed == size => {}
                Some(listed) => {
                    return send_error(
                        &mut tx,
                        changed_while_sent(
                            &digest,
                            &format!("was listed with {listed} bytes and is sent with {size}"),
                        ),
                    )
                    .await;
                }
                None => {
                    return send_error(
                        &mut tx,
                        format!("no build waits for blob {digest} of {size} bytes"),
                    )
                    .await;
                }
            }
            match recv_blob_bytes(&mut rx, &state.store, &digest, size, None).await {
                Ok(()) => {
                    state.lock().counters.context_bytes_received += size;
                    let _ = send(&mut tx, ClusterMessage::Stored).await;
                    Ok(())
                }
                Err(e) => {
                    // Bytes that are not the listed file's, or fewer of them: the file changed.
                    // Anything else is this coordinator's own failure, told as it is.
                    let message = match &e {
                        ClusterError::Mismatch(_)
                        | ClusterError::Net(ossb_net::NetError::Truncated) => {
                            changed_while_sent(&digest, &e.to_string())
                        }
                        other => format!("storing context blob {digest}: {other}"),
                    };
                    send_error(&mut tx, message).await;
                    Err(e)
                }
            }
        }
        ClusterMessage::Status { build } => status(&state, &build, &mut tx).await,
        ClusterMessage::Register(info) => worker_channel(&state, info, tx, rx).await,
        ClusterMessage::FetchBlob { digest } => fetch_blob(&state, digest, &mut tx).await,
        ClusterMessage::ClaimStep { task, key } => claim_step(&state, task, key, &mut tx).await,
        ClusterMessage::PublishStep { task, key, record } => {
            publish_step(&state, task, key, record);
            send(&mut tx, ClusterMessage::Stored).await
        }
        ClusterMessage::CacheMounts { task, ids } => {
            match cache_mount_versions(&state, task, &ids) {
                Ok(versions) => {
                    send(&mut tx, ClusterMessage::CacheMountVersions { versions }).await
                }
                Err(e) => return send_error(&mut tx, e).await,
            }
        }
        ClusterMessage::PublishCacheMount { task, version } => {
            match publish_cache_mount(&state, task, version).await {
                Ok(()) => send(&mut tx, ClusterMessage::Stored).await,
                Err(e) => return send_error(&mut tx, e).await,
            }
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
                result: r.image.ok_or_else(|| Failure {
                    message: format!("the record of build {build} has no image"),
                    exit_code: 1,
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

/// Why an uploaded context file was refused when its bytes are not those the client listed:
/// a file that changed between the client hashing it and sending it.
fn changed_while_sent(digest: &Digest, what: &str) -> String {
    format!(
        "a context file changed while it was sent (blob {digest} {what}): a file written during the build inside its own context, such as a log, must be left out with .dockerignore"
    )
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
            draining: false,
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

    /// A worker draining to collect its cache gets no task, even the one it is preferred for;
    /// with no other, the task waits.
    #[test]
    fn a_draining_worker_gets_no_task() {
        let amd: Platform = "linux/amd64".parse().unwrap();
        let mut workers = HashMap::new();
        workers.insert(1, worker("linux/amd64", &[], 2));
        workers.insert(2, worker("linux/amd64", &[], 2));
        workers.get_mut(&2).unwrap().draining = true;
        assert_eq!(pick_worker(&workers, &amd, &[], Some(2)), Some(1));
        workers.get_mut(&1).unwrap().draining = true;
        assert_eq!(pick_worker(&workers, &amd, &[], Some(2)), None);
        workers.get_mut(&2).unwrap().draining = false;
        assert_eq!(pick_worker(&workers, &amd, &[], Some(2)), Some(2));
    }

    fn task(spec: &BuildSpec, platform: &Platform) -> TaskSpec {
        TaskSpec {
            task: 1,
            build: "b".into(),
            platform: platform.clone(),
            stage: Some(0),
            export: true,
            build_platform: "linux/amd64".parse().unwrap(),
            needs: Vec::new(),
            spec: spec.clone(),
            contexts: Vec::new(),
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
