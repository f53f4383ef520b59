//! The build cluster: the same engine as `ossb build`, with transport around it.
//!
//! - [`server`] (`ossb coordinator`): accepts builds from `ossb-submit` clients, receives
//!   their context file by file (by content: files it holds already are not sent again),
//!   splits each build into one task per stage and platform, queues a stage's task when the
//!   stages it needs are built, schedules tasks on registered workers (on the stage's own
//!   platform, native first, emulating only when no native worker of the platform exists,
//!   preferring the worker that built the stage's inputs), keeps the cluster's step cache (a
//!   step key is built by one task while the others wait for its record), reschedules the
//!   tasks of a worker that stops heartbeating, merges the per-platform manifests into an
//!   index and pushes it last. What outlives a restart is in its state dir ([`records`]:
//!   build records, accepted builds' submissions, step records, cache mounts); a restarted
//!   coordinator runs again the builds it had accepted.
//! - [`worker`] (`ossb worker`): registers, heartbeats, runs each task with
//!   [`ossb_engine::build::build_with`] for one stage of one platform, its local step cache first,
//!   then the cluster's (layers through the peer cache); publishes every step it builds;
//!   pushes the platform's manifest by digest when its stage is the image, and streams the
//!   engine's progress events back.
//! - [`submit`] (`ossb-submit`): sends the build and its context, renders the forwarded
//!   events with the caller's [`Progress`], and downloads the result from the peer cache for
//!   `--output type=oci|docker|local`.
//!
//! Workers look for base-image blobs in their store, then the peer cache, then the registry,
//! and publish what they pulled and what they built to the peer cache.

pub mod attest;
pub mod context;
pub mod records;
pub mod server;
pub mod submit;
pub mod worker;

use std::io::Write;
use std::time::Duration;

use ossb_image::store::BlobStore;
use ossb_protocol::cluster::{BuildEvent, ClusterMessage};
use ossb_protocol::wire::{ErrorCode, ErrorReply, Message};
use ossb_protocol::Digest;

use ossb_engine::progress::Event;

/// How often a worker says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a worker counts as lost and its tasks are scheduled again.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a task waits for a worker that can build its platform (natively or emulated) to
/// register before its build fails, counted from when it was queued or the coordinator
/// started, whichever is later.
pub const NO_WORKER_GRACE: Duration = Duration::from_secs(10);
/// Time allowed to dial a node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the cluster's nodes.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The transport failed.
    #[error("{0}")]
    Net(#[from] ossb_net::NetError),
    /// The peer said something out of turn.
    #[error("unexpected answer from {peer}: {got}")]
    Protocol {
        /// Who.
        peer: String,
        /// What it said.
        got: String,
    },
    /// The peer refused the request.
    #[error("{peer} refused: {message}")]
    Refused {
        /// Who.
        peer: String,
        /// Its message.
        message: String,
    },
    /// A local failure (disk, store).
    #[error("{0}")]
    Local(String),
    /// Bytes received were not those of the digest they were sent as.
    #[error("{0}")]
    Mismatch(String),
}

pub(crate) fn local_err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ClusterError + '_ {
    move |e| ClusterError::Local(format!("{what}: {e}"))
}

/// Writes a cluster message.
pub(crate) async fn send(
    send: &mut quinn::SendStream,
    message: ClusterMessage,
) -> Result<(), ClusterError> {
    Ok(ossb_net::write_message(send, Message::Cluster(Box::new(message))).await?)
}

/// Writes an error reply.
pub(crate) async fn send_error(send: &mut quinn::SendStream, message: String) {
    let _ = ossb_net::write_message(
        send,
        Message::Error(ErrorReply {
            code: ErrorCode::Internal,
            message,
        }),
    )
    .await;
}

/// Reads a cluster message; an error reply or another kind of message is an error.
pub(crate) async fn recv(
    recv: &mut quinn::RecvStream,
    peer: &str,
) -> Result<ClusterMessage, ClusterError> {
    match ossb_net::read_message(recv).await? {
        Message::Cluster(m) => Ok(*m),
        Message::Error(e) => Err(ClusterError::Refused {
            peer: peer.to_string(),
            message: e.message,
        }),
        Message::CacheRequest(_) | Message::CacheReply(_) => Err(ClusterError::Protocol {
            peer: peer.to_string(),
            got: "a peer-cache message".into(),
        }),
    }
}

/// Sends the blob's bytes from the store, raw.
pub(crate) async fn send_blob_bytes(
    send: &mut quinn::SendStream,
    store: &BlobStore,
    digest: &Digest,
) -> Result<(), ClusterError> {
    send_file(send, &store.path(digest)).await
}

/// Sends a file's bytes, raw.
pub(crate) async fn send_file(
    send: &mut quinn::SendStream,
    path: &std::path::Path,
) -> Result<(), ClusterError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ClusterError::Local(format!("reading {}: {e}", path.display())))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| ClusterError::Local(format!("reading {}: {e}", path.display())))?;
        if n == 0 {
            return Ok(());
        }
        send.write_all(&buf[..n])
            .await
            .map_err(ossb_net::NetError::from)?;
    }
}

/// Receives `size` raw bytes into the store, verified against `digest`.
pub(crate) async fn recv_blob_bytes(
    recv: &mut quinn::RecvStream,
    store: &BlobStore,
    digest: &Digest,
    size: u64,
    mut tee: Option<ossb_image::registry::Tee>,
) -> Result<(), ClusterError> {
    let mut writer = store.writer().map_err(local_err("storing a blob"))?;
    let mut left = size;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match recv
            .read(&mut buf[..want])
            .await
            .map_err(ossb_net::NetError::from)?
        {
            Some(n) => {
                writer
                    .write_all(&buf[..n])
                    .map_err(local_err("storing a blob"))?;
                // A copy for the peer cache (single-flight); dropped if its receiver is gone.
                if tee.is_some() {
                    let at = size - left;
                    let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                    ossb_image::registry::Tee::copy(&mut tee, at, &chunk).await;
                }
                left -= n as u64;
            }
            None => return Err(ossb_net::NetError::Truncated.into()),
        }
    }
    writer.commit(Some(digest)).map_err(|e| match e {
        ossb_image::store::StoreError::DigestMismatch { .. } => {
            ClusterError::Mismatch(format!("verifying a blob: {e}"))
        }
        e => ClusterError::Local(format!("verifying a blob: {e}")),
    })?;
    Ok(())
}

/// The engine's event on the wire.
pub fn event_to_wire(event: &Event) -> BuildEvent {
    let ms = |d: &Duration| d.as_millis() as u64;
    match event {
        Event::Started { id, name } => BuildEvent::Started {
            id: *id as u64,
            name: name.clone(),
        },
        Event::Output { id, elapsed, line } => BuildEvent::Output {
            id: *id as u64,
            elapsed_ms: ms(elapsed),
            line: line.clone(),
        },
        Event::Done { id, elapsed } => BuildEvent::Done {
            id: *id as u64,
            elapsed_ms: ms(elapsed),
        },
        Event::Failed {
            id,
            elapsed,
            message,
        } => BuildEvent::Failed {
            id: *id as u64,
            elapsed_ms: ms(elapsed),
            message: message.clone(),
        },
        Event::Cached { id } => BuildEvent::Cached { id: *id as u64 },
        Event::CacheMiss { id, reason } => BuildEvent::CacheMiss {
            id: *id as u64,
            reason: reason.clone(),
        },
        Event::Estimate {
            steps,
            finished,
            remaining,
        } => BuildEvent::Estimate {
            steps: *steps as u64,
            finished: *finished as u64,
            remaining_ms: remaining.as_ref().map(ms),
        },
        Event::Info(s) => BuildEvent::Info(s.clone()),
        Event::Transfer { id, received, sent } => BuildEvent::Transfer {
            id: *id as u64,
            received: *received,
            sent: *sent,
        },
    }
}

/// A wire event as the engine's.
pub fn event_from_wire(event: BuildEvent) -> Event {
    let d = Duration::from_millis;
    match event {
        BuildEvent::Started { id, name } => Event::Started {
            id: id as usize,
            name,
        },
        BuildEvent::Output {
            id,
            elapsed_ms,
            line,
        } => Event::Output {
            id: id as usize,
            elapsed: d(elapsed_ms),
            line,
        },
        BuildEvent::Done { id, elapsed_ms } => Event::Done {
            id: id as usize,
            elapsed: d(elapsed_ms),
        },
        BuildEvent::Failed {
            id,
            elapsed_ms,
            message,
        } => Event::Failed {
            id: id as usize,
            elapsed: d(elapsed_ms),
            message,
        },
        BuildEvent::Cached { id } => Event::Cached { id: id as usize },
        BuildEvent::CacheMiss { id, reason } => Event::CacheMiss {
            id: id as usize,
            reason,
        },
        BuildEvent::Estimate {
            steps,
            finished,
            remaining_ms,
        } => Event::Estimate {
            steps: steps as usize,
            finished: finished as usize,
            remaining: remaining_ms.map(d),
        },
        BuildEvent::Info(s) => Event::Info(s),
        BuildEvent::Transfer { id, received, sent } => Event::Transfer {
            id: id as usize,
            received,
            sent,
        },
    }
}
