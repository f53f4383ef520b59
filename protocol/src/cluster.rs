//! The build cluster's messages: what `ossb-submit`, the coordinator and the workers say to
//! each other (carried as [`crate::wire::Message::Cluster`]).
//!
//! # Conversations
//! | who | opens a stream with | reply | then |
//! |---|---|---|---|
//! | client | [`ClusterMessage::Submit`] | [`ClusterMessage::NeedBlobs`] (context files the coordinator lacks) | the client uploads them (each on its own stream), writes [`ClusterMessage::UploadsDone`]; the coordinator answers [`ClusterMessage::Accepted`], then [`ClusterMessage::Event`]s, then one [`ClusterMessage::Finished`] |
//! | client or worker | [`ClusterMessage::Upload`] + `size` raw bytes | [`ClusterMessage::Stored`] or an error | — |
//! | client | [`ClusterMessage::Status`] | [`ClusterMessage::Finished`] or [`ClusterMessage::Running`] | — |
//! | worker | [`ClusterMessage::Register`] | [`ClusterMessage::Registered`] | the stream stays open: the coordinator writes [`ClusterMessage::Task`]s (and [`ClusterMessage::CancelTask`]), the worker writes [`ClusterMessage::Heartbeat`], [`ClusterMessage::TaskEvent`] and [`ClusterMessage::TaskDone`] |
//! | worker | [`ClusterMessage::FetchBlob`] | [`ClusterMessage::Blob`] + `size` raw bytes, or [`crate::wire::Message::Error`] | — |
//! | worker | [`ClusterMessage::ClaimStep`] | [`ClusterMessage::StepRecord`] or [`ClusterMessage::BuildStep`] (waits while another task builds the step) | — |
//! | worker | [`ClusterMessage::PublishStep`] | [`ClusterMessage::Stored`] | — |
//! | client | [`ClusterMessage::SubmitBake`] | as `Submit` | [`ClusterMessage::BakeAccepted`], then [`ClusterMessage::TargetEvent`]s and a [`ClusterMessage::TargetFinished`] per target |
//!
//! Context files travel as blobs named by their sha256, so a resubmission sends only the files
//! that changed, and a worker fetches only those it has not seen. A build is split into one
//! task per stage and platform; the coordinator keeps the cluster's step cache (records by
//! cache key, layers in the peer cache), so a step runs once in the whole cluster.

use serde::{Deserialize, Serialize};

use crate::{Digest, Platform};

/// Every cluster message. New variants go at the end (postcard numbers them by position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterMessage {
    /// A client submits a build.
    Submit(BuildSpec),
    /// The context files (by content) the coordinator does not hold yet.
    NeedBlobs {
        /// Upload these.
        digests: Vec<Digest>,
    },
    /// A blob of `size` bytes follows on the stream.
    Upload {
        /// What the bytes must hash to.
        digest: Digest,
        /// How many bytes follow.
        size: u64,
    },
    /// The uploaded blob was verified and stored.
    Stored,
    /// The client has uploaded every blob asked for.
    UploadsDone,
    /// The build is accepted under this id.
    Accepted {
        /// The build's id (also the name of its record in the coordinator's state dir).
        build: String,
    },
    /// A progress event of the build.
    Event(BuildEvent),
    /// The build ended.
    Finished(BuildOutcome),
    /// A client asks how a build ended (after losing its connection).
    Status {
        /// The build id of [`ClusterMessage::Accepted`].
        build: String,
    },
    /// The build is still running.
    Running,
    /// A worker announces itself.
    Register(WorkerInfo),
    /// The coordinator accepted the worker.
    Registered {
        /// The name it goes by in logs and metrics.
        worker: String,
    },
    /// A worker is alive; sent every second, and at once when `draining` changes.
    Heartbeat {
        /// Tasks it could start now.
        free_slots: u32,
        /// It is waiting for its running tasks to end to collect its cache: tasks sent now
        /// would wait for them, so the coordinator sends none until it says otherwise.
        draining: bool,
    },
    /// Work for a worker: one platform of one build.
    Task(Box<TaskSpec>),
    /// A progress event of a task.
    TaskEvent {
        /// The task.
        task: u64,
        /// The event.
        event: BuildEvent,
    },
    /// A task ended.
    TaskDone {
        /// The task.
        task: u64,
        /// The platform's image, or why it failed.
        result: Result<PlatformOutcome, Failure>,
    },
    /// A worker asks for a blob (a context file).
    FetchBlob {
        /// The blob.
        digest: Digest,
    },
    /// The blob's bytes follow.
    Blob {
        /// Its size.
        size: u64,
    },
    /// The coordinator withdraws a task (a sibling task of its build failed, or the client
    /// left): the worker stops it and sends nothing more about it.
    CancelTask {
        /// The task.
        task: u64,
    },
    /// A worker's task missed step `key` in its local cache: the cluster's record, or the
    /// right to build it. Answered with [`ClusterMessage::StepRecord`] or
    /// [`ClusterMessage::BuildStep`]; while another task builds the key, the answer waits.
    ClaimStep {
        /// The asking task.
        task: u64,
        /// The step's cache key.
        key: [u8; 32],
    },
    /// The step was built in the cluster: its cache record (JSON); the layer blob is in the
    /// peer cache.
    StepRecord {
        /// The record.
        record: String,
    },
    /// Nobody has the step: the asking task builds it, and holds it until it publishes the
    /// record or ends.
    BuildStep,
    /// A task built step `key` (its layer blob is in the peer cache already). Answered with
    /// [`ClusterMessage::Stored`].
    PublishStep {
        /// The task that built it.
        task: u64,
        /// The step's cache key.
        key: [u8; 32],
        /// Its cache record (JSON).
        record: String,
    },
    /// A task's worker asks which content the cluster holds for the cache mounts its steps
    /// use (`RUN --mount=type=cache`), on the task's platform. Answered with
    /// [`ClusterMessage::CacheMountVersions`].
    CacheMounts {
        /// The asking task.
        task: u64,
        /// The cache ids.
        ids: Vec<String>,
    },
    /// The cache mounts the cluster holds among those asked for.
    CacheMountVersions {
        /// Each as the last task that wrote it left it.
        versions: Vec<CacheMountVersion>,
    },
    /// A task that succeeded left a cache mount changed: its content is a blob in the peer
    /// cache already. The last one published wins. Answered with [`ClusterMessage::Stored`].
    PublishCacheMount {
        /// The task.
        task: u64,
        /// The mount's content.
        version: CacheMountVersion,
    },
    /// A client submits a bake: every target at once, planned and scheduled as one graph (a
    /// stage two targets share is one task). Answered as [`ClusterMessage::Submit`] is, with
    /// [`ClusterMessage::BakeAccepted`] for `Accepted`, then [`ClusterMessage::TargetEvent`]s
    /// and one [`ClusterMessage::TargetFinished`] per target, each as its target ends.
    SubmitBake(BakeSpec),
    /// The bake is accepted: each target is a build of its own (for
    /// [`ClusterMessage::Status`]), in the order of [`BakeSpec::targets`].
    BakeAccepted {
        /// The targets' build ids.
        builds: Vec<String>,
    },
    /// A progress event of one target of a bake (its position in [`BakeSpec::targets`]).
    TargetEvent {
        /// The target.
        target: u32,
        /// The event.
        event: BuildEvent,
    },
    /// One target of a bake ended.
    TargetFinished {
        /// The target.
        target: u32,
        /// How it ended.
        outcome: BuildOutcome,
    },
}

/// A bake's targets, each the build `ossb-submit` would send for it alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeSpec {
    /// The targets, in the bake's order.
    pub targets: Vec<BakeTarget>,
}

/// One target of a [`BakeSpec`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeTarget {
    /// Its name in the bake file.
    pub name: String,
    /// Its build.
    pub spec: BuildSpec,
}

/// A cache mount's content as one blob (a zstd layer) in the peer cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMountVersion {
    /// The cache id (`id=`, else the target).
    pub id: String,
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

impl ClusterMessage {
    /// The message's name, for errors and logs about a message out of turn: never its
    /// content, which may be megabytes from a stranger.
    pub fn kind(&self) -> &'static str {
        match self {
            ClusterMessage::Submit(_) => "Submit",
            ClusterMessage::NeedBlobs { .. } => "NeedBlobs",
            ClusterMessage::Upload { .. } => "Upload",
            ClusterMessage::Stored => "Stored",
            ClusterMessage::UploadsDone => "UploadsDone",
            ClusterMessage::Accepted { .. } => "Accepted",
            ClusterMessage::Event(_) => "Event",
            ClusterMessage::Finished(_) => "Finished",
            ClusterMessage::Status { .. } => "Status",
            ClusterMessage::Running => "Running",
            ClusterMessage::Register(_) => "Register",
            ClusterMessage::Registered { .. } => "Registered",
            ClusterMessage::Heartbeat { .. } => "Heartbeat",
            ClusterMessage::Task(_) => "Task",
            ClusterMessage::TaskEvent { .. } => "TaskEvent",
            ClusterMessage::TaskDone { .. } => "TaskDone",
            ClusterMessage::FetchBlob { .. } => "FetchBlob",
            ClusterMessage::Blob { .. } => "Blob",
            ClusterMessage::CancelTask { .. } => "CancelTask",
            ClusterMessage::ClaimStep { .. } => "ClaimStep",
            ClusterMessage::StepRecord { .. } => "StepRecord",
            ClusterMessage::BuildStep => "BuildStep",
            ClusterMessage::PublishStep { .. } => "PublishStep",
            ClusterMessage::CacheMounts { .. } => "CacheMounts",
            ClusterMessage::CacheMountVersions { .. } => "CacheMountVersions",
            ClusterMessage::PublishCacheMount { .. } => "PublishCacheMount",
            ClusterMessage::SubmitBake(_) => "SubmitBake",
            ClusterMessage::BakeAccepted { .. } => "BakeAccepted",
            ClusterMessage::TargetEvent { .. } => "TargetEvent",
            ClusterMessage::TargetFinished { .. } => "TargetFinished",
        }
    }
}

/// A build as the client asked for it, without the local paths (the context is sent by
/// content; the registry settings are the cluster's own except the insecure hosts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// Its name for messages.
    pub dockerfile_name: String,
    /// `-t` references.
    pub tags: Vec<String>,
    /// The platforms to build.
    pub platforms: Vec<Platform>,
    /// `--build-arg`.
    pub build_args: Vec<(String, String)>,
    /// `--target`.
    pub target: Option<String>,
    /// `--label`.
    pub labels: Vec<(String, String)>,
    /// Push to the tags' registries.
    pub push: bool,
    /// Hand the blobs back through the peer cache (for `--output type=oci|docker|local`).
    pub download: bool,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--cache-from`.
    pub cache_from: Vec<String>,
    /// `--cache-to`, as buildx spells it (`type=registry,ref=REF,mode=max`, `type=inline`).
    pub cache_to: Option<String>,
    /// `--insecure-registry`.
    pub insecure_registries: Vec<String>,
    /// `--registry-mirror` as (registry, mirror).
    pub registry_mirrors: Vec<(String, String)>,
    /// `gzip`, `zstd` or `uncompressed`.
    pub compression: String,
    /// OCI (true) or Docker media types.
    pub oci_media_types: bool,
    /// SOURCE_DATE_EPOCH.
    pub source_date_epoch: Option<i64>,
    /// The context, file by file.
    pub context: Vec<ContextEntry>,
    /// `--build-context NAME=DIR`: each named context, file by file (its files travel as
    /// blobs, as the main context's do).
    pub build_contexts: Vec<(String, Vec<ContextEntry>)>,
    /// `--secret`: the secrets' bytes. Only in memory on the coordinator, never in a build
    /// record or a log (their `Debug` hides them); a worker writes them to 0600 files in the
    /// task's directory, removed when the task ends.
    pub secrets: Vec<Secret>,
    /// `--registry-certificate HOST:PORT=CAFILE`: the CA certificates (PEM) by registry host.
    pub registry_certificates: Vec<(String, String)>,
    /// `--network`: `default`, `none` or `host` (empty: default).
    #[serde(default)]
    pub network: String,
    /// `--add-host` as (name, address).
    #[serde(default)]
    pub extra_hosts: Vec<(String, String)>,
    /// `--annotation` as (where: `manifest`, `manifest-descriptor` or `index`, key, value).
    #[serde(default)]
    pub annotations: Vec<(String, String, String)>,
    /// `--provenance`, `--sbom`, `--attest`: the attestations the coordinator writes.
    #[serde(default)]
    pub attest: AttestSpec,
    /// `--build-context NAME=VALUE` that are not directories, as (name, value): images
    /// (`docker-image://`), downloads and git repositories, which each worker resolves itself.
    #[serde(default)]
    pub context_sources: Vec<(String, String)>,
    /// The image exporter's other options (`-o ...,compression-level=N,force-compression=true,
    /// push-by-digest=true,name-canonical=true`): layer settings for the tasks, how the
    /// coordinator pushes.
    #[serde(default)]
    pub export: ExportSpec,
}

/// The image exporter options of a [`BuildSpec`] beyond `compression` and media types.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    /// `compression-level=`: the level of `compression` (gzip 0-9, zstd 0-22).
    pub compression_level: Option<u32>,
    /// `force-compression=true`: layers compressed otherwise (a base's) recompressed.
    pub force_compression: bool,
    /// `push-by-digest=true`: the image pushed to each name's repository by digest, untagged.
    pub push_by_digest: bool,
    /// `name-canonical=true`: each name's `REPOSITORY@DIGEST` pushed too.
    pub name_canonical: bool,
}

/// The attestations a build asks for (see `ossb_engine::attestations`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestSpec {
    /// A SLSA provenance per platform.
    pub provenance: Option<ProvenanceSpec>,
    /// An SPDX SBOM per platform.
    pub sbom: bool,
    /// The exporter's `oci-artifact=true`: BuildKit v0.32's artifact layout.
    pub oci_artifact: bool,
    /// The context's git facts (buildx's `vcs:*` attributes without the prefix).
    pub vcs: Vec<(String, String)>,
}

/// How the provenance is written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenanceSpec {
    /// `mode=max` (else min).
    pub max: bool,
    /// SLSA v1 (else v0.2).
    pub v1: bool,
    /// `builder-id`.
    pub builder_id: Option<String>,
}

/// What a task's build read and did, for the provenance the coordinator writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFacts {
    /// Base images, URLs and git commits read: (uri, digest algorithm, hex).
    pub materials: Vec<(String, String, String)>,
    /// The steps run or taken from a cache.
    pub steps: Vec<WireStepFact>,
}

/// One step of a task's build.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStepFact {
    /// The stage's index in the Dockerfile.
    pub stage: u32,
    /// The Dockerfile line.
    pub line: u32,
    /// Its history text.
    pub instruction: String,
    /// Its cache key (hex).
    pub key: String,
    /// The layer it made.
    pub layer: Option<Digest>,
    /// The worker that ran the task.
    pub worker: String,
}

/// A build secret (`--secret id=ID,src=PATH`): its id and bytes. `Debug` shows the id and the
/// length only, so a logged message never carries the bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    /// The id `RUN --mount=type=secret,id=ID` names.
    pub id: String,
    /// The content.
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret {{ id: {:?}, value: <{} bytes hidden> }}",
            self.id,
            self.value.len()
        )
    }
}

/// One entry of the build context, relative to its root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextEntry {
    /// The path, `/`-separated, relative.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// What it is.
    pub kind: EntryKind,
}

/// The kinds of context entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with this content.
    File {
        /// sha256 of the content.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// A symbolic link to this target.
    Symlink(String),
    /// A named pipe: made anew where the context is laid out, never read (as BuildKit sends
    /// one). A socket travels as an empty file, BuildKit's stub.
    Fifo,
    /// A device node with this device number (`makedev(major, minor)`).
    Device {
        /// A block device (else a character device).
        block: bool,
        /// The device number.
        rdev: u64,
    },
}

/// Refuses an entry list no client of ours would send: a path that is not plain and relative
/// (`..`, absolute, empty), a path listed twice, a file of over 1 TiB. The coordinator checks
/// a submission with it before anything is uploaded; a worker checks again as it lays out.
pub fn check_entries(entries: &[ContextEntry]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for e in entries {
        check_path(&e.path)?;
        if !seen.insert(e.path.as_str()) {
            return Err(format!(
                "context path {:?} is listed twice",
                crate::clip(&e.path, 200)
            ));
        }
        if let EntryKind::File { size, .. } = e.kind {
            if size > MAX_CONTEXT_FILE {
                return Err(format!(
                    "context file {:?} is announced as {size} bytes; at most 1 TiB is taken",
                    crate::clip(&e.path, 200)
                ));
            }
        }
    }
    Ok(())
}

/// The largest context file a submission may announce.
const MAX_CONTEXT_FILE: u64 = 1 << 40;

pub fn check_path(path: &str) -> Result<(), String> {
    let rel = std::path::Path::new(path);
    if rel.as_os_str().is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "context path {:?} is not a plain relative path",
            crate::clip(path, 200)
        ));
    }
    Ok(())
}

/// What a worker offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its name (unique in the cluster).
    pub name: String,
    /// The platform it runs natively.
    pub platform: Platform,
    /// Platforms it runs through QEMU.
    pub emulates: Vec<Platform>,
    /// Tasks it runs at once.
    pub slots: u32,
    /// The peer cache nodes it publishes to.
    pub cache_peers: Vec<String>,
}

/// One stage of one platform of a build, for a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's id (unique for the coordinator's lifetime).
    pub task: u64,
    /// The build it belongs to.
    pub build: String,
    /// The platform the image is built for (TARGETPLATFORM).
    pub platform: Platform,
    /// The stage to build, by its index in the Dockerfile; the stages it needs were built by
    /// earlier tasks and come from the cluster's step cache. `None`: the whole build.
    pub stage: Option<u32>,
    /// Whether the stage is the platform's image: pushed by digest and handed back.
    pub export: bool,
    /// BUILDPLATFORM, the same for every task of the build.
    pub build_platform: Platform,
    /// The stages `stage` reads (its base, `COPY --from`, `RUN --mount from=`), as the tasks
    /// that built them left them: the worker takes them as done and never builds them again.
    pub needs: Vec<BuiltStage>,
    /// The build (its `platforms` lists every platform of the build).
    pub spec: BuildSpec,
    /// The named contexts that are other bake targets' images (`target:NAME` in
    /// `spec.context_sources`), as their tasks made them: the worker brings their blobs from
    /// the peer cache.
    pub contexts: Vec<BuiltContext>,
}

/// A bake target's image, for a task of another target whose named context it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltContext {
    /// The context's name (as [`BuildSpec::context_sources`] gives it).
    pub name: String,
    /// The target that built it.
    pub target: String,
    /// The image manifest's descriptor, as OCI JSON.
    pub descriptor_json: String,
    /// The manifest's bytes.
    pub manifest: Vec<u8>,
    /// Its config and layers (in the peer cache).
    pub blobs: Vec<Digest>,
}

/// A stage a task built: what a task of a stage reading it starts from. Its layer blobs are in
/// the peer cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltStage {
    /// The stage's index in the Dockerfile.
    pub index: u32,
    /// The cache key of its last step.
    pub key: [u8; 32],
    /// Its image config, as OCI JSON.
    pub config_json: String,
    /// Its layers (base first), as a JSON array of OCI descriptors.
    pub layers_json: String,
}

/// A per-platform image a worker built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformOutcome {
    /// The manifest's descriptor (with its platform) as OCI JSON.
    pub descriptor_json: String,
    /// The manifest's bytes.
    pub manifest: Vec<u8>,
    /// The config digest.
    pub config: Digest,
    /// Every blob of the image (config, layers).
    pub blobs: Vec<Digest>,
    /// Total size of config and layers.
    pub size: u64,
    /// Steps run.
    pub run: u64,
    /// Steps taken from the cache.
    pub cached: u64,
    /// References pushed by digest.
    pub pushed: Vec<String>,
    /// Where the base images' blobs came from.
    pub inputs: InputStats,
    /// The stage the task built, for the tasks of the stages that read it.
    pub stage: Option<BuiltStage>,
    /// What the task read and did, for the provenance.
    pub facts: WireFacts,
    /// The SPDX SBOM of the image, when asked for (the task that exports it).
    pub sbom: Option<Vec<u8>>,
    /// The extra SBOMs `BUILDKIT_SBOM_SCAN_STAGE`/`_CONTEXT` ask for, by name (a stage's
    /// name, or `context`).
    pub extra_sboms: Vec<(String, Vec<u8>)>,
}

/// Where a task's input blobs (base image configs and layers) came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputStats {
    /// Blobs the worker's own store held.
    pub local_blobs: u64,
    /// Blobs fetched from the peer cache.
    pub peer_blobs: u64,
    /// Their bytes.
    pub peer_bytes: u64,
    /// Blobs pulled from a registry (then published to the peer cache).
    pub registry_blobs: u64,
    /// Their bytes.
    pub registry_bytes: u64,
}

/// Why a task or build failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The error, as `ossb build` prints it.
    pub message: String,
    /// The exit code `ossb build` would give (1, or 2 for usage and Dockerfile errors).
    pub exit_code: i32,
}

/// How a build ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOutcome {
    /// The image (manifest or index) as OCI JSON descriptor, or why the build failed.
    pub result: Result<BuiltImage, Failure>,
}

/// A finished build's image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltImage {
    /// The top descriptor (manifest or index) as OCI JSON.
    pub descriptor_json: String,
    /// The top manifest's or index's bytes.
    pub top: Vec<u8>,
    /// The per-platform manifests' bytes (for an index).
    pub manifests: Vec<Vec<u8>>,
    /// Every config and layer of every platform (in the peer cache when `download`).
    pub blobs: Vec<Digest>,
    /// The config digest of a one-platform build.
    pub config: Option<Digest>,
    /// References pushed.
    pub pushed: Vec<String>,
    /// Steps run and cached.
    pub run: u64,
    /// Steps taken from the cache.
    pub cached: u64,
    /// Total size of configs and layers.
    pub size: u64,
    /// The peer cache nodes that hold the blobs.
    pub cache_peers: Vec<String>,
    /// The file name a local export gives each attestation statement (by its digest): a
    /// download writes them beside the files, as `ossb build` does.
    pub statement_files: Vec<(Digest, String)>,
}

/// A progress event (the engine's `Event`, durations in milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildEvent {
    /// A vertex started.
    Started {
        /// Its id.
        id: u64,
        /// Its name.
        name: String,
    },
    /// A line of output.
    Output {
        /// The vertex.
        id: u64,
        /// Milliseconds since it started.
        elapsed_ms: u64,
        /// The line.
        line: String,
    },
    /// A vertex finished.
    Done {
        /// The vertex.
        id: u64,
        /// How long it took.
        elapsed_ms: u64,
    },
    /// A vertex failed.
    Failed {
        /// The vertex.
        id: u64,
        /// How long it ran.
        elapsed_ms: u64,
        /// The error.
        message: String,
    },
    /// A vertex came from the cache.
    Cached {
        /// The vertex.
        id: u64,
    },
    /// The estimate of the time left.
    Estimate {
        /// Steps in all.
        steps: u64,
        /// Steps finished.
        finished: u64,
        /// Milliseconds left, when known.
        remaining_ms: Option<u64>,
    },
    /// A message about the build.
    Info(String),
    /// Blob bytes a pull or push vertex moved so far.
    Transfer {
        /// The vertex.
        id: u64,
        /// Bytes received.
        received: u64,
        /// Bytes sent.
        sent: u64,
    },
    /// Why a step runs although a previous build had a step at its position (appended last:
    /// postcard numbers variants by position).
    CacheMiss {
        /// The vertex.
        id: u64,
        /// The first input that changed, as the engine words it.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use crate::wire::{Envelope, Message};

    #[test]
    fn a_secret_s_debug_hides_its_bytes() {
        let spec = BuildSpec {
            secrets: vec![Secret {
                id: "tok".into(),
                value: b"hunter2".to_vec(),
            }],
            ..Default::default()
        };
        let text = format!("{:?}", ClusterMessage::Submit(spec));
        assert!(
            !text.contains("hunter2") && !text.contains("104, 117"),
            "{text}"
        );
        assert!(
            text.contains("\"tok\"") && text.contains("7 bytes hidden"),
            "{text}"
        );
    }

    #[test]
    fn cluster_messages_round_trip_through_frames() {
        let digest = Digest::of(b"hello");
        let spec = BuildSpec {
            dockerfile: "FROM scratch\n".into(),
            platforms: vec!["linux/arm64".parse().unwrap()],
            context: vec![ContextEntry {
                path: "a/b.txt".into(),
                mode: 0o644,
                kind: EntryKind::File { digest, size: 5 },
            }],
            ..Default::default()
        };
        for m in [
            ClusterMessage::Submit(spec.clone()),
            ClusterMessage::Task(Box::new(TaskSpec {
                task: 7,
                build: "b1".into(),
                platform: "linux/arm64".parse().unwrap(),
                stage: Some(1),
                export: true,
                build_platform: "linux/amd64".parse().unwrap(),
                needs: vec![BuiltStage {
                    index: 0,
                    key: [5; 32],
                    config_json: "{}".into(),
                    layers_json: "[]".into(),
                }],
                spec: spec.clone(),
                contexts: vec![BuiltContext {
                    name: "base".into(),
                    target: "base".into(),
                    descriptor_json: "{}".into(),
                    manifest: b"{}".to_vec(),
                    blobs: vec![digest],
                }],
            })),
            ClusterMessage::ClaimStep {
                task: 7,
                key: [3; 32],
            },
            ClusterMessage::PublishStep {
                task: 7,
                key: [4; 32],
                record: "{}".into(),
            },
            ClusterMessage::TaskDone {
                task: 7,
                result: Err(Failure {
                    message: "no".into(),
                    exit_code: 2,
                }),
            },
            ClusterMessage::Event(BuildEvent::Estimate {
                steps: 3,
                finished: 1,
                remaining_ms: None,
            }),
            ClusterMessage::SubmitBake(BakeSpec {
                targets: vec![BakeTarget {
                    name: "app".into(),
                    spec: spec.clone(),
                }],
            }),
            ClusterMessage::BakeAccepted {
                builds: vec!["b1".into(), "b2".into()],
            },
            ClusterMessage::TargetEvent {
                target: 1,
                event: BuildEvent::Info("x".into()),
            },
            ClusterMessage::TargetFinished {
                target: 1,
                outcome: BuildOutcome {
                    result: Err(Failure {
                        message: "no".into(),
                        exit_code: 1,
                    }),
                },
            },
        ] {
            let bytes =
                frame::encode(&Envelope::new(Message::Cluster(Box::new(m.clone())))).unwrap();
            let back = frame::decode(&bytes[frame::HEADER_LEN..]).unwrap();
            assert_eq!(back.message, Message::Cluster(Box::new(m)));
        }
    }
}
