//! The cache node server: a verified blob store served over QUIC.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::BytesMut;
use ossb_image::store::{BlobStore, PartialBlob, StoreError};
use ossb_net::{read_message, write_message, Identity, NetError, Role};
use ossb_protocol::frame::FrameError;
use ossb_protocol::wire::{
    CacheReply, CacheRequest, CacheStats, ErrorCode, ErrorReply, Message, StreamReset,
    MAX_HAS_DIGESTS,
};
use ossb_protocol::Digest;
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::watch;

use crate::client::{PeerCache, CHUNK};
use crate::inflight::{Arrival, Inflight, Joined, Receiving, Resume, CLAIM_TIMEOUT};
use crate::lru::Lru;
use crate::metrics::{add, Metrics};
use crate::placement::Placement;
use crate::sink::Sink;

/// How long a followed put may pause before its batched bytes are written for the followers.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(5);

/// Chunks read ahead of the sending of a get.
const READ_AHEAD: usize = 4;

/// What `ossb cache-node` is given.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The UDP address to serve QUIC on.
    pub listen: SocketAddr,
    /// Where blobs are stored (a blob store: `blobs/sha256/<hex>`, `tmp/`).
    pub data_dir: PathBuf,
    /// The `--tls-dir` (`ca.crt`, `node.crt`, `node.key`).
    pub tls_dir: PathBuf,
    /// Every cache node of the cluster, this one included, as clients name them.
    pub peers: Vec<String>,
    /// Evict least recently used blobs above this many bytes.
    pub max_size: Option<u64>,
    /// Where to serve `/metrics` and `/healthz` over HTTP.
    pub metrics: Option<SocketAddr>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// TLS material or the QUIC endpoint.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The data directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The metrics listener.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running cache node.
pub struct Node {
    endpoint: Endpoint,
    state: Arc<State>,
    metrics_addr: Option<SocketAddr>,
}

struct State {
    store: BlobStore,
    lru: Mutex<Lru>,
    metrics: Metrics,
    endpoint: Endpoint,
    listen: SocketAddr,
    placement: Placement,
    /// This node's own entry of `--peers`, once found (see [`State::own_name`]).
    own_name: OnceLock<String>,
    /// The other nodes, asked (local only) when a blob this node is home for is missing.
    fill_from: OnceLock<PeerCache>,
    /// Blobs on their way in: claimed by a fetcher, or being put.
    inflight: Arc<Inflight>,
    /// One [`CacheRequest::Check`] hashes at a time: an asker cannot make the node hash
    /// blobs on every core at once.
    checking: tokio::sync::Semaphore,
}

impl Node {
    /// Opens the store, binds the endpoint and the metrics listener, and starts serving.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let store = BlobStore::open(&config.data_dir)?;
        clear_leftovers(&store);
        let identity = Identity::load(&config.tls_dir, Role::Node)?;
        let endpoint = ossb_net::server(config.listen, &identity)?;
        let listen = endpoint.local_addr().map_err(|source| NetError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
        let blobs = store
            .blobs()?
            .into_iter()
            .map(|b| (b.digest, b.size, b.last_used))
            .collect();
        let state = Arc::new(State {
            store,
            lru: Mutex::new(Lru::load(config.max_size, blobs)),
            metrics: Metrics::default(),
            endpoint: endpoint.clone(),
            listen,
            placement: Placement::new(&config.peers),
            own_name: OnceLock::new(),
            fill_from: OnceLock::new(),
            inflight: Arc::default(),
            checking: tokio::sync::Semaphore::new(1),
        });
        let evicted = state.lock_lru().over_limit(&Digest::of(b""));
        state.evict(evicted);
        let metrics_addr = match config.metrics {
            Some(addr) => Some(serve_metrics(addr, state.clone()).await?),
            None => None,
        };
        tokio::spawn(accept(endpoint.clone(), state.clone()));
        let stats = state.stats();
        tracing::info!(
            listen = %listen,
            blobs = stats.blobs,
            bytes = stats.bytes,
            peers = ?config.peers,
            "cache node serving"
        );
        Ok(Node {
            endpoint,
            state,
            metrics_addr,
        })
    }

    /// The address QUIC is served on (the actual port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.state.listen
    }

    /// The address of `/metrics`, if served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The node's counters.
    pub fn stats(&self) -> CacheStats {
        self.state.stats()
    }

    /// Stops accepting, closes every connection, and waits (a few seconds at most) for the
    /// peers to be told.
    pub async fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.endpoint.wait_idle())
            .await;
    }
}

/// `ossb cache-node`: starts a node and serves until SIGTERM or SIGINT.
pub async fn serve(config: NodeConfig) -> Result<(), NodeError> {
    let node = Node::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| {
            NodeError::Net(NetError::Bind {
                addr: "SIGTERM handler".into(),
                source: e,
            })
        })?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    node.close().await;
    Ok(())
}

/// Temporary files of transfers that a crash interrupted.
fn clear_leftovers(store: &BlobStore) {
    if let Ok(entries) = std::fs::read_dir(store.tmp_dir()) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

async fn serve_metrics(addr: SocketAddr, state: Arc<State>) -> Result<SocketAddr, NodeError> {
    let err = |source| NodeError::Metrics { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    let routes =
        ossb_net::http::metrics_and_health(move || crate::metrics::prometheus(&state.stats()));
    tokio::spawn(ossb_net::http::serve(listener, routes));
    Ok(bound)
}

async fn accept(endpoint: Endpoint, state: Arc<State>) {
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
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(serve_stream(state.clone(), conn.clone(), send, recv));
            }
        });
    }
}

/// How long a new stream may take to send its request: a silent one is dropped.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn serve_stream(
    state: Arc<State>,
    conn: quinn::Connection,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let Ok(request) = tokio::time::timeout(REQUEST_TIMEOUT, read_message(&mut recv)).await else {
        return;
    };
    let request = match request {
        Ok(Message::CacheRequest(r)) => r,
        Ok(_) => {
            return reply_error(
                &mut send,
                ErrorCode::Unsupported,
                "a cache node serves only cache requests".into(),
            )
            .await
        }
        Err(NetError::Frame(e @ FrameError::Version { .. })) => {
            return reply_error(&mut send, ErrorCode::UnsupportedVersion, e.to_string()).await
        }
        Err(NetError::Frame(e)) => {
            return reply_error(&mut send, ErrorCode::Malformed, e.to_string()).await
        }
        Err(_) => return,
    };
    let result = match request {
        CacheRequest::Has { digests } => state.has(&mut send, digests).await,
        CacheRequest::Get {
            digest,
            offset,
            local_only,
            claim,
        } => {
            state
                .get(&mut send, &conn, digest, offset, local_only, claim)
                .await
        }
        CacheRequest::Put { digest, size, from } => {
            state.put(&mut send, &mut recv, digest, size, from).await
        }
        CacheRequest::Stat => reply(&mut send, CacheReply::Stats(state.stats())).await,
        CacheRequest::Check { digest } => state.check(&mut send, digest).await,
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "request failed");
    }
}

async fn reply(send: &mut SendStream, reply: CacheReply) -> Result<(), NetError> {
    write_message(send, Message::CacheReply(reply)).await?;
    let _ = send.finish();
    Ok(())
}

/// Refuses a get whose `offset` lies past the blob's end; whether it did.
async fn past_end(send: &mut SendStream, digest: &Digest, offset: u64, size: u64) -> bool {
    if offset <= size {
        return false;
    }
    reply_error(
        send,
        ErrorCode::Malformed,
        format!("offset {offset} is past the end of {digest} ({size} bytes)"),
    )
    .await;
    true
}

async fn reply_error(send: &mut SendStream, code: ErrorCode, message: String) {
    let _ = write_message(send, Message::Error(ErrorReply { code, message })).await;
    let _ = send.finish();
}

impl State {
    fn lock_lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stats(&self) -> CacheStats {
        let (blobs, bytes, limit) = {
            let lru = self.lock_lru();
            (lru.len() as u64, lru.bytes(), lru.limit())
        };
        self.metrics.stats(blobs, bytes, limit)
    }

    fn size(&self, digest: &Digest) -> Option<u64> {
        if !self.lock_lru().contains(digest) {
            return None;
        }
        self.store.size(digest)
    }

    fn evict(&self, digests: Vec<Digest>) {
        for d in digests {
            if let Err(e) = self.store.remove(&d) {
                tracing::warn!(digest = %d, error = %e, "eviction failed");
            }
            add(&self.metrics.evictions, 1);
            tracing::info!(digest = %d, "evicted");
        }
    }

    /// Records a blob just stored, evicting what no longer fits.
    fn stored(&self, digest: Digest, size: u64) {
        let evicted = self.lock_lru().insert(digest, size);
        self.evict(evicted);
    }

    /// Forgets and deletes a blob whose bytes on disk do not match its digest.
    fn discard_corrupt(&self, digest: &Digest, actual: &Digest) {
        self.lock_lru().remove(digest);
        let _ = self.store.remove(digest);
        add(&self.metrics.verification_failures, 1);
        tracing::error!(%digest, %actual, "blob on disk failed verification: discarded");
    }

    async fn has(&self, send: &mut SendStream, digests: Vec<Digest>) -> Result<(), NetError> {
        if digests.len() > MAX_HAS_DIGESTS {
            reply_error(
                send,
                ErrorCode::Malformed,
                format!("at most {MAX_HAS_DIGESTS} digests per has"),
            )
            .await;
            return Ok(());
        }
        let sizes = digests.iter().map(|d| self.size(d)).collect();
        reply(send, CacheReply::Has { sizes }).await
    }

    /// A get: the blob from disk; else one on its way in, as its bytes arrive; else, as a home
    /// node, filled from the other nodes; else, with `claim`, the asker is made its fetcher.
    async fn get(
        self: &Arc<Self>,
        send: &mut SendStream,
        conn: &quinn::Connection,
        digest: Digest,
        offset: u64,
        local_only: bool,
        claim: bool,
    ) -> Result<(), NetError> {
        if self.size(&digest).is_none() {
            // Only those who take tasks fetch for the cluster: a submitter's get never claims
            // (nor holds others waiting on its claim).
            let fetcher = claim
                && !local_only
                && matches!(ossb_net::peer_role(conn), Some(Role::Worker | Role::Node));
            if let Joined::Following(arrival) = self.inflight.join(&digest, false) {
                return self
                    .follow(send, conn, digest, offset, arrival, fetcher)
                    .await;
            }
            if local_only || !self.fill(&digest).await {
                return match self.inflight.join(&digest, fetcher) {
                    Joined::Following(arrival) => {
                        self.follow(send, conn, digest, offset, arrival, fetcher)
                            .await
                    }
                    Joined::Claimed { id, resume } => {
                        self.hand_claim(send, conn, digest, offset, id, resume)
                            .await
                    }
                    Joined::Nothing => self.miss(send).await,
                };
            }
        }
        self.send_stored(send, digest, offset).await
    }

    /// Makes the asker the fetcher of `digest` (claim `id`): from the first byte, or, resuming
    /// a fetch that broke off, from where it stopped, with the bytes kept before that (from
    /// the asker's `offset` on) sent along.
    async fn hand_claim(
        self: &Arc<Self>,
        send: &mut SendStream,
        conn: &quinn::Connection,
        digest: Digest,
        offset: u64,
        id: u64,
        resume: Option<Resume>,
    ) -> Result<(), NetError> {
        self.watch_claim(conn, digest, id);
        add(&self.metrics.fetch_claims, 1);
        let from = resume.as_ref().map_or(0, |r| r.from);
        tracing::info!(%digest, from, remote = %conn.remote_address(), "blob claimed: the asker fetches it");
        write_message(send, Message::CacheReply(CacheReply::Fetch { from })).await?;
        match resume {
            Some(resume) if offset < from => {
                self.stream_file(send, digest, resume.file, offset, from)
                    .await
            }
            _ => {
                let _ = send.finish();
                Ok(())
            }
        }
    }

    /// Answers a get of a blob this node does not have.
    async fn miss(&self, send: &mut SendStream) -> Result<(), NetError> {
        add(&self.metrics.misses, 1);
        reply(send, CacheReply::Missing).await
    }

    /// Lets claim `id` lapse when its fetcher's connection closes or its put is late.
    fn watch_claim(self: &Arc<Self>, conn: &quinn::Connection, digest: Digest, id: u64) {
        let (state, conn) = (self.clone(), conn.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = conn.closed() => {}
                _ = tokio::time::sleep(CLAIM_TIMEOUT) => {}
                _ = state.inflight.claim_settled(&digest, id) => return,
            }
            if let Some(stall) = state.inflight.lapse(&digest, id) {
                state.expire_later(digest, stall);
            }
        });
    }

    /// Drops stalled `digest`'s kept bytes if nobody claims it within [`CLAIM_TIMEOUT`].
    fn expire_later(self: &Arc<Self>, digest: Digest, stall: u64) {
        let state = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLAIM_TIMEOUT).await;
            state.inflight.expire(&digest, stall);
        });
    }

    /// Sends a blob on its way in as its bytes reach the disk; the stream finishes once the
    /// put has verified and stored the blob, and is reset when the put fails (the asker then
    /// asks again, and may claim the blob). A `fetcher` whose fetch stalls before its bytes
    /// begin takes the claim up here.
    async fn follow(
        self: &Arc<Self>,
        send: &mut SendStream,
        conn: &quinn::Connection,
        digest: Digest,
        offset: u64,
        mut arrival: watch::Receiver<Arrival>,
        fetcher: bool,
    ) -> Result<(), NetError> {
        // Until the fetcher's put begins.
        let (size, file) = loop {
            let now = arrival.borrow_and_update().clone();
            match now {
                Arrival::Receiving { size, file, .. } => break (size, file),
                Arrival::Stored => return self.send_stored(send, digest, offset).await,
                Arrival::Failed => {
                    return self.miss(send).await;
                }
                Arrival::Stalled { .. } if fetcher => match self.inflight.join(&digest, true) {
                    Joined::Following(next) => arrival = next,
                    Joined::Claimed { id, resume } => {
                        return self
                            .hand_claim(send, conn, digest, offset, id, resume)
                            .await
                    }
                    Joined::Nothing => return self.miss(send).await,
                },
                Arrival::Stalled { .. } => return self.miss(send).await,
                Arrival::Claimed { .. } => {
                    if arrival.changed().await.is_err() {
                        return self.miss(send).await;
                    }
                }
            }
        };
        if past_end(send, &digest, offset, size).await {
            return Ok(());
        }
        add(&self.metrics.followed, 1);
        write_message(send, Message::CacheReply(CacheReply::Blob { size, offset })).await?;
        let mut pos = 0u64;
        loop {
            let (written, ended) = match &*arrival.borrow_and_update() {
                Arrival::Receiving { written, .. } => (*written, false),
                Arrival::Stored => (size, true),
                // The put broke off and its bytes are kept: the asker comes back to claim.
                Arrival::Stalled { .. } | Arrival::Claimed { .. } => {
                    let _ = send.reset(VarInt::from_u32(StreamReset::Stalled.code()));
                    return Ok(());
                }
                Arrival::Failed => {
                    let _ = send.reset(VarInt::from_u32(StreamReset::Aborted.code()));
                    return Ok(());
                }
            };
            while pos < written {
                let want = CHUNK.min((written - pos) as usize);
                let (file, at) = (file.clone(), pos);
                let read = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = BytesMut::zeroed(want);
                    let n = file.read_at(&mut buf, at)?;
                    buf.truncate(n);
                    Ok::<_, std::io::Error>(buf.freeze())
                })
                .await;
                let chunk = match read {
                    Ok(Ok(chunk)) if !chunk.is_empty() => chunk,
                    _ => {
                        let _ = send.reset(VarInt::from_u32(StreamReset::Aborted.code()));
                        return Ok(());
                    }
                };
                let end = pos + chunk.len() as u64;
                if end > offset {
                    let skip = offset.saturating_sub(pos) as usize;
                    let part = chunk.slice(skip..);
                    add(&self.metrics.bytes_out, part.len() as u64);
                    if send.write_chunk(part).await.is_err() {
                        return Ok(()); // the asker went away
                    }
                }
                pos = end;
            }
            if ended {
                break;
            }
            if arrival.changed().await.is_err() && !matches!(*arrival.borrow(), Arrival::Stored) {
                let _ = send.reset(VarInt::from_u32(StreamReset::Aborted.code()));
                return Ok(());
            }
        }
        if pos != size {
            let _ = send.reset(VarInt::from_u32(StreamReset::Aborted.code()));
            return Ok(());
        }
        add(&self.metrics.hits, 1);
        let _ = send.finish();
        Ok(())
    }

    /// Sends a stored blob from `offset` on.
    async fn send_stored(
        &self,
        send: &mut SendStream,
        digest: Digest,
        offset: u64,
    ) -> Result<(), NetError> {
        let file = match self.store.open_blob(&digest) {
            Ok(f) => f,
            Err(_) => {
                // Evicted (or removed by hand) since it was looked up.
                self.lock_lru().remove(&digest);
                return self.miss(send).await;
            }
        };
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if past_end(send, &digest, offset, size).await {
            return Ok(());
        }
        self.lock_lru().touch(&digest);
        self.store.touch(&digest);
        write_message(send, Message::CacheReply(CacheReply::Blob { size, offset })).await?;
        self.stream_file(send, digest, file, offset, size).await
    }

    /// Sends bytes `offset..end` of `file` (of blob `digest`) and finishes the stream; resets
    /// it when they cannot all be read.
    async fn stream_file(
        &self,
        send: &mut SendStream,
        digest: Digest,
        mut file: std::fs::File,
        offset: u64,
        end: u64,
    ) -> Result<(), NetError> {
        // The asker verifies every byte and reports a mismatch ([`State::check`]): hashing
        // here too would double the CPU a get costs for a disk fault that the check finds.
        // Reading runs on a blocking thread, a few chunks ahead of the sending.
        if offset > 0 {
            use std::io::{Seek, SeekFrom};
            if let Err(e) = file.seek(SeekFrom::Start(offset)) {
                tracing::error!(%digest, error = %e, "reading a blob failed");
                let _ = send.reset(VarInt::from_u32(StreamReset::Aborted.code()));
                return Ok(());
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(READ_AHEAD);
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let mut pos = offset;
            let mut file = file.take(end.saturating_sub(offset));
            loop {
                // `read_to_end` into spare capacity: nothing is zeroed first.
                let mut buf = Vec::with_capacity(CHUNK);
                let n = (&mut file).take(CHUNK as u64).read_to_end(&mut buf)?;
                if n == 0 {
                    return Ok(pos);
                }
                pos += n as u64;
                if tx.blocking_send(bytes::Bytes::from(buf)).is_err() {
                    // The sending side gave up (the peer went away).
                    return Err(std::io::Error::other("the transfer stopped"));
                }
            }
        });
        let mut sent = Ok(());
        while let Some(chunk) = rx.recv().await {
            add(&self.metrics.bytes_out, chunk.len() as u64);
            if let Err(e) = send.write_chunk(chunk).await {
                sent = Err(e);
                break;
            }
        }
        drop(rx);
        let verdict = reader.await;
        sent?;
        match verdict {
            Ok(Ok(pos)) if pos == end => {}
            Ok(Ok(pos)) => {
                tracing::error!(%digest, pos, end, "a blob changed size while it was read");
                let _ = send.reset(VarInt::from_u32(StreamReset::Aborted.code()));
                return Ok(());
            }
            Ok(Err(e)) => {
                tracing::error!(%digest, error = %e, "reading a blob failed");
                let _ = send.reset(VarInt::from_u32(StreamReset::Aborted.code()));
                return Ok(());
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
        add(&self.metrics.hits, 1);
        let _ = send.finish();
        Ok(())
    }

    /// Hashes a stored blob an asker found corrupt, and discards it when it is.
    async fn check(
        self: &Arc<Self>,
        send: &mut SendStream,
        digest: Digest,
    ) -> Result<(), NetError> {
        let Ok(_permit) = self.checking.acquire().await else {
            return self.miss(send).await;
        };
        if self.size(&digest).is_none() {
            return self.miss(send).await;
        }
        let state = self.clone();
        let rehashed = tokio::task::spawn_blocking(move || state.store.rehash(&digest)).await;
        let intact = match rehashed {
            Ok(Ok(actual)) if actual == digest => true,
            Ok(Ok(actual)) => {
                self.discard_corrupt(&digest, &actual);
                false
            }
            Ok(Err(StoreError::Missing(_))) => return self.miss(send).await,
            Ok(Err(e)) => {
                tracing::error!(%digest, error = %e, "checking a blob failed");
                reply_error(send, ErrorCode::Internal, e.to_string()).await;
                return Ok(());
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        reply(send, CacheReply::Checked { intact }).await
    }

    /// Fetches a blob this node is a home of from the other nodes (local only, one hop).
    async fn fill(&self, digest: &Digest) -> bool {
        let Some(own) = self.own_name().await else {
            return false;
        };
        if !self.placement.homes(digest).contains(&own.as_str()) {
            return false;
        }
        let peers = self.fill_from.get_or_init(|| {
            let others: Vec<String> = self
                .placement
                .nodes()
                .iter()
                .filter(|n| **n != own)
                .cloned()
                .collect();
            PeerCache::local_only(self.endpoint.clone(), &others)
        });
        match peers.get_to_store(digest, &self.store).await {
            Ok(size) => {
                tracing::info!(%digest, size, "filled from a peer");
                add(&self.metrics.bytes_in, size);
                self.stored(*digest, size);
                true
            }
            Err(e) => {
                tracing::debug!(%digest, error = %e, "fill from peers failed");
                false
            }
        }
    }

    /// This node's entry of `--peers`: the one whose port is the listening port and whose
    /// host resolves to an address of this machine (the one listened on, when it is not the
    /// unspecified address). Looked up until found: names of a StatefulSet resolve only once
    /// its pods are ready.
    async fn own_name(&self) -> Option<String> {
        if let Some(n) = self.own_name.get() {
            return Some(n.clone());
        }
        for node in self.placement.nodes() {
            let Ok(addrs) = tokio::net::lookup_host(node.as_str()).await else {
                continue;
            };
            let mine = addrs.into_iter().any(|a| {
                a.port() == self.listen.port()
                    && if self.listen.ip().is_unspecified() {
                        std::net::UdpSocket::bind((a.ip(), 0)).is_ok()
                    } else {
                        a.ip() == self.listen.ip()
                    }
            });
            if mine {
                return Some(self.own_name.get_or_init(|| node.clone()).clone());
            }
        }
        None
    }

    /// A put of bytes `from..size` (see [`CacheRequest::Put`]).
    async fn put(
        self: &Arc<Self>,
        send: &mut SendStream,
        recv: &mut RecvStream,
        digest: Digest,
        size: u64,
        from: u64,
    ) -> Result<(), NetError> {
        let limit = self.lock_lru().limit();
        if let Some(limit) = limit.filter(|l| size > *l) {
            self.inflight.settle(&digest, Arrival::Failed);
            recv.stop(VarInt::from_u32(StreamReset::Aborted.code()))
                .ok();
            reply_error(
                send,
                ErrorCode::TooLarge,
                format!("{digest} is {size} bytes, more than this node's limit of {limit}"),
            )
            .await;
            return Ok(());
        }
        if self.size(&digest).is_some() {
            self.lock_lru().touch(&digest);
            self.store.touch(&digest);
            self.inflight.settle(&digest, Arrival::Stored);
            return reply(send, CacheReply::PutPresent).await;
        }
        // A resumed fetch continues the bytes its claim was handed with.
        let start = match from {
            0 => None,
            _ => match self.inflight.take_kept(&digest, from) {
                Some(kept) if from <= size => Some(kept),
                _ => {
                    recv.stop(VarInt::from_u32(StreamReset::Aborted.code()))
                        .ok();
                    let message = format!("this node holds no claimed bytes of {digest} to resume at {from}; put the whole blob");
                    reply_error(send, ErrorCode::Malformed, message).await;
                    return Ok(());
                }
            },
        };
        write_message(send, Message::CacheReply(CacheReply::PutReady)).await?;
        match self.receive(recv, &digest, size, start).await? {
            Ok(followed) => {
                add(&self.metrics.bytes_in, size);
                self.stored(digest, size);
                if let Some(followed) = followed {
                    followed.stored();
                }
                reply(send, CacheReply::Stored).await
            }
            Err((code, message)) => {
                if code == ErrorCode::DigestMismatch {
                    add(&self.metrics.verification_failures, 1);
                }
                tracing::warn!(%digest, message, "put refused");
                reply_error(send, code, message).await;
                Ok(())
            }
        }
    }

    /// Receives a put's bytes into the store, verified, while those who ask for the blob
    /// follow them (see [`Inflight`]); the inner error is the refusal to send back (nothing
    /// was stored). The blob is findable in the store before the followers are told it is
    /// stored (by the caller, with the handle returned).
    /// A put whose fetcher dies halfway leaves its bytes for the next fetcher
    /// ([`Receiving::stall`]).
    async fn receive(
        self: &Arc<Self>,
        recv: &mut RecvStream,
        digest: &Digest,
        size: u64,
        start: Option<PartialBlob>,
    ) -> Result<Result<Option<Receiving>, (ErrorCode, String)>, NetError> {
        let internal = |e: StoreError| Ok(Err((ErrorCode::Internal, e.to_string())));
        let partial = match start.map_or_else(|| self.store.partial(), Ok) {
            Ok(p) => p,
            Err(e) => return internal(e),
        };
        let followed = match partial.reader() {
            Ok(file) => self.inflight.receiving(digest, size, file, partial.len()),
            Err(e) => return internal(e),
        };
        // Written and hashed off the runtime, which keeps draining the socket meanwhile.
        let progress = followed
            .as_ref()
            .map(|f| Box::new(f.progress()) as crate::sink::Written);
        let mut sink = Sink::watched(partial, progress);
        let mut refusal = None;
        let read = loop {
            // When the sender pauses (a fetch waiting on its registry), what is batched goes to
            // disk, where the followers read it.
            let next = {
                let read = recv.read_chunk(CHUNK, true);
                tokio::pin!(read);
                tokio::select! {
                    biased;
                    r = &mut read => r,
                    _ = tokio::time::sleep(SETTLE), if followed.is_some() => {
                        if !sink.send_batch().await {
                            break Ok(());
                        }
                        read.await
                    }
                }
            };
            match next {
                Ok(Some(chunk)) => {
                    if sink.len() + chunk.bytes.len() as u64 > size {
                        recv.stop(VarInt::from_u32(StreamReset::Aborted.code()))
                            .ok();
                        refusal = Some(format!("more than the {size} bytes announced for {digest} arrived; nothing was stored"));
                        break Ok(());
                    }
                    if !sink.push(chunk.bytes).await {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let (mut partial, failed) = sink.finish().await;
        if let Err(e) = read {
            // The fetcher died or gave up: keep what arrived for the next one.
            if let (Some(followed), None) = (followed, &failed) {
                let kept = partial.len();
                if kept > 0 && kept < size && partial.flush().is_ok() {
                    let stall = followed.stall(partial);
                    self.expire_later(*digest, stall);
                    tracing::info!(%digest, kept, size, "a put broke off; its bytes wait for the next fetcher");
                }
            }
            return Err(e.into());
        }
        if let Some(e) = failed {
            return internal(e);
        }
        if let Some(message) = refusal {
            return Ok(Err((ErrorCode::DigestMismatch, message)));
        }
        if partial.len() != size {
            return Ok(Err((
                ErrorCode::DigestMismatch,
                format!(
                    "{} of the {size} bytes announced for {digest} arrived; nothing was stored",
                    partial.len()
                ),
            )));
        }
        match partial.commit(digest) {
            Ok(_) => Ok(Ok(followed)),
            Err(e @ StoreError::DigestMismatch { .. }) => {
                Ok(Err((ErrorCode::DigestMismatch, e.to_string())))
            }
            Err(e) => internal(e),
        }
    }
}
