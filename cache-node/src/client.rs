//! [`PeerCache`]: the client of the cache nodes that workers (and nodes filling themselves)
//! use, with placement and failover built in.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ossb_image::store::{BlobStore, PartialBlob, StoreError};
use ossb_net::{read_message, write_message, Identity, NetError, Role};
use ossb_protocol::wire::{CacheReply, CacheRequest, CacheStats, Message, StreamReset};
use ossb_protocol::Digest;
use quinn::{Connection, Endpoint};

use crate::placement::{Placement, REPLICAS};
use crate::sink::Sink;

/// Size of the chunks blobs are read and sent in.
pub(crate) const CHUNK: usize = 1 << 20;

/// How long a node that could not be reached is tried last instead of first.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Errors of [`PeerCache`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No node could serve the blob; says what each answered.
    #[error("blob {digest} is not in the peer cache ({tried})")]
    NotFound {
        /// The blob.
        digest: Digest,
        /// Each node tried and its answer.
        tried: String,
    },
    /// No node stored the blob; says why for each.
    #[error("no cache node stored blob {digest} ({tried})")]
    PutFailed {
        /// The blob.
        digest: Digest,
        /// Each node tried and its answer.
        tried: String,
    },
    /// One node failed a request made to it alone.
    #[error("cache node {node}: {reason}")]
    Node {
        /// The node.
        node: String,
        /// What went wrong.
        reason: String,
    },
    /// The local blob store failed (or lacks the blob to put).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The TLS material or the local endpoint is unusable.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// The outcome of one node's attempt at a get.
pub(crate) enum Attempt {
    /// All bytes arrived (not yet verified).
    Complete,
    /// The node does not have it.
    Missing,
    /// The transfer broke off; the bytes that arrived are good to resume from (they are
    /// verified with the rest at the end).
    Failed(String),
    /// Nobody has the blob: the asker was made its fetcher (a get with a claim), from byte
    /// `from` on; the bytes the node kept before it were appended to the partial blob (all of
    /// them unless the transfer broke off).
    Fetch {
        /// The first byte to fetch.
        from: u64,
    },
    /// The fetch this get followed broke off and the node kept its bytes: ask it again (to
    /// resume the fetch, or follow whoever does).
    Stalled,
}

/// What [`PeerCache::get_or_claim`] came back with.
#[derive(Debug)]
pub enum Claimed {
    /// The blob is in the local store: its size.
    Got(u64),
    /// Nobody had it: the caller fetches it from its origin and streams it to the node
    /// ([`PeerCache::put_stream`]) while others wait for those bytes.
    Fetch(Box<Fetch>),
}

/// A claim to fetch a blob for the cluster ([`Claimed::Fetch`]).
pub struct Fetch {
    /// The home node that handed out the claim, where the bytes go.
    pub node: String,
    /// The first byte to fetch and put: 0, or where an earlier fetcher that died stopped
    /// (the node kept the bytes before it).
    pub from: u64,
    /// The blob's first bytes, continued by the fetch: the `from` bytes the node kept, or
    /// none when they did not all arrive (the fetch then starts from the first byte, and
    /// only bytes from `from` on are put).
    pub start: PartialBlob,
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch")
            .field("node", &self.node)
            .field("from", &self.from)
            .field("start", &self.start.len())
            .finish()
    }
}

/// The cache nodes of the cluster as one blob cache.
///
/// - [`PeerCache::get_to_store`] asks the blob's home nodes first, then the others, in
///   rendezvous order; a transfer that breaks off resumes from the bytes already received on
///   the next node; every byte is verified against the digest before the blob enters the
///   local store.
/// - [`PeerCache::put_from_store`] sends a blob to its [`REPLICAS`] home nodes (the next nodes
///   in order stand in for unreachable ones).
/// - [`PeerCache::has`] asks the home nodes which blobs they hold.
///
/// Connections are opened on first use and kept; a node that cannot be reached is tried last
/// for a while. Cloning is cheap and shares the connections.
#[derive(Clone)]
pub struct PeerCache {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    placement: Placement,
    connections: tokio::sync::Mutex<HashMap<String, Connection>>,
    down: Mutex<HashMap<String, Instant>>,
    timeout: Duration,
    local_only: bool,
}

impl PeerCache {
    /// A client of `nodes` (`host:port`, the same list the nodes get as `--peers`) presenting
    /// the client certificate of `tls_dir`. Call it within a tokio runtime (the endpoint's
    /// socket is registered with it).
    pub fn connect(tls_dir: &Path, nodes: &[String]) -> Result<PeerCache, ClientError> {
        let identity = Identity::load(tls_dir, Role::Client)?;
        Ok(PeerCache::new(ossb_net::client(&identity)?, nodes))
    }

    /// A client of `nodes` dialling from `endpoint` (a node uses its own server endpoint).
    pub fn new(endpoint: Endpoint, nodes: &[String]) -> PeerCache {
        PeerCache {
            inner: Arc::new(Inner {
                endpoint,
                placement: Placement::new(nodes),
                connections: Default::default(),
                down: Default::default(),
                timeout: Duration::from_secs(3),
                local_only: false,
            }),
        }
    }

    /// A client of `nodes` that asks them to answer from their own disks only (what a node
    /// filling itself uses, so that a miss never travels further than one hop).
    pub(crate) fn local_only(endpoint: Endpoint, nodes: &[String]) -> PeerCache {
        let mut cache = PeerCache::new(endpoint, nodes);
        if let Some(inner) = Arc::get_mut(&mut cache.inner) {
            inner.local_only = true;
        }
        cache
    }

    /// The placement of blobs over the nodes.
    pub fn placement(&self) -> &Placement {
        &self.inner.placement
    }

    /// For each digest, whether one of its home nodes holds it.
    pub async fn has(&self, digests: &[Digest]) -> Vec<bool> {
        let mut present = vec![false; digests.len()];
        for replica in 0..REPLICAS {
            let mut by_node: HashMap<String, Vec<usize>> = HashMap::new();
            for (i, d) in digests.iter().enumerate() {
                if !present[i] {
                    if let Some(node) = self.ranked(d).get(replica) {
                        by_node.entry(node.clone()).or_default().push(i);
                    }
                }
            }
            for (node, indexes) in by_node {
                let asked: Vec<Digest> = indexes.iter().map(|&i| digests[i]).collect();
                if let Ok(sizes) = self.has_on(&node, asked).await {
                    for (i, size) in indexes.into_iter().zip(sizes) {
                        present[i] |= size.is_some();
                    }
                }
            }
        }
        present
    }

    /// Which of `digests` one node holds, with their sizes.
    pub async fn has_on(
        &self,
        node: &str,
        digests: Vec<Digest>,
    ) -> Result<Vec<Option<u64>>, ClientError> {
        let n = digests.len();
        match self
            .request(node, CacheRequest::Has { digests })
            .await
            .map_err(|reason| node_err(node, reason))?
        {
            CacheReply::Has { sizes } if sizes.len() == n => Ok(sizes),
            other => Err(node_err(node, format!("unexpected answer {other:?}"))),
        }
    }

    /// One node's counters.
    pub async fn stats(&self, node: &str) -> Result<CacheStats, ClientError> {
        match self
            .request(node, CacheRequest::Stat)
            .await
            .map_err(|reason| node_err(node, reason))?
        {
            CacheReply::Stats(s) => Ok(s),
            other => Err(node_err(node, format!("unexpected answer {other:?}"))),
        }
    }

    /// Fetches the blob into `store` (nothing to do if it is there already) and returns its
    /// size. Tries the nodes in rendezvous order; verified before it is stored.
    pub async fn get_to_store(
        &self,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<u64, ClientError> {
        if let Some(size) = store.size(digest) {
            return Ok(size);
        }
        got(self
            .get_from_nodes(digest, store, &self.ranked(digest), false)
            .await?)
    }

    /// As [`PeerCache::get_to_store`], asking only `node`.
    pub async fn get_from_node(
        &self,
        node: &str,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<u64, ClientError> {
        got(self
            .get_from_nodes(digest, store, &[node.to_string()], false)
            .await?)
    }

    /// As [`PeerCache::get_to_store`], but asking with a claim:
    /// when nobody has the blob and nobody is fetching it, the caller is made its fetcher
    /// ([`Claimed::Fetch`]); when another fetcher's bytes are on their way, they come as they
    /// arrive. Single-flight for the whole cluster: a blob crosses the registry link once.
    pub async fn get_or_claim(
        &self,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<Claimed, ClientError> {
        if let Some(size) = store.size(digest) {
            return Ok(Claimed::Got(size));
        }
        // Every worker ranks the nodes alike: they all claim at the first that answers.
        self.get_from_nodes(digest, store, &self.ranked(digest), true)
            .await
    }

    /// Streams bytes `from..size` of a blob to `node` as its `chunks` come (those of a fetch
    /// the node handed a claim for, [`Fetch`]); `Ok` once the node holds a verified copy.
    /// Chunks that stop short of `size` abort the put (the node keeps what arrived for the
    /// next fetcher).
    pub async fn put_stream(
        &self,
        node: &str,
        digest: &Digest,
        size: u64,
        from: u64,
        mut chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> Result<(), ClientError> {
        let err = |reason: String| node_err(node, reason);
        let Some((mut send, recv)) = self.open_put(node, digest, size, from).await.map_err(err)?
        else {
            return Ok(());
        };
        let mut sent = from;
        while let Some(chunk) = chunks.recv().await {
            sent += chunk.len() as u64;
            if sent > size {
                break;
            }
            send.write_chunk(chunk)
                .await
                .map_err(|e| err(e.to_string()))?;
        }
        if sent != size {
            let _ = send.reset(quinn::VarInt::from_u32(StreamReset::Aborted.code()));
            return Err(err(format!(
                "the fetch stopped after {sent} of {size} bytes; the put was aborted"
            )));
        }
        finish_put(send, recv).await.map_err(err)
    }

    /// Opens a put of `digest` on `node`: the streams to send its bytes on, or `None` when the
    /// node has the blob already.
    async fn open_put(
        &self,
        node: &str,
        digest: &Digest,
        size: u64,
        from: u64,
    ) -> Result<Option<(quinn::SendStream, quinn::RecvStream)>, String> {
        let (send, mut recv) = self
            .open(
                node,
                CacheRequest::Put {
                    digest: *digest,
                    size,
                    from,
                },
            )
            .await?;
        match read_message(&mut recv).await.map_err(|e| e.to_string())? {
            Message::CacheReply(CacheReply::PutPresent) => Ok(None),
            Message::CacheReply(CacheReply::PutReady) => Ok(Some((send, recv))),
            Message::Error(e) => Err(e.message),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Asks `nodes` in order (with a claim when `claim`), resuming on the next node from the
    /// bytes the last one sent. A node whose fetch stalled is asked again, a few times.
    async fn get_from_nodes(
        &self,
        digest: &Digest,
        store: &BlobStore,
        nodes: &[String],
        claim: bool,
    ) -> Result<Claimed, ClientError> {
        const STALLS: usize = 3;
        let mut partial = store.partial()?;
        // The nodes whose bytes `partial` holds: told when they do not verify.
        let mut senders: Vec<&str> = Vec::new();
        let mut tried = Vec::new();
        let (mut next, mut stalls) = (0, 0);
        while let Some(node) = nodes.get(next) {
            let before = partial.len();
            let (outcome, back) = self.attempt(node, digest, partial, claim).await;
            partial = back;
            if partial.len() > before {
                senders.push(node);
            }
            let note = match outcome {
                Attempt::Complete => {
                    let done = std::mem::replace(&mut partial, store.partial()?);
                    match done.commit(digest) {
                        Ok(size) => return Ok(Claimed::Got(size)),
                        Err(StoreError::DigestMismatch { actual, .. }) => {
                            self.report_corrupt(digest, &std::mem::take(&mut senders), &actual)
                                .await
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Attempt::Fetch { from } => {
                    let mut start = partial;
                    if start.len() != from {
                        start.reset()?;
                    }
                    let node = node.clone();
                    return Ok(Claimed::Fetch(Box::new(Fetch { node, from, start })));
                }
                Attempt::Stalled if stalls < STALLS => {
                    stalls += 1;
                    continue;
                }
                Attempt::Stalled => "its fetch stalled, again and again".to_string(),
                Attempt::Missing => "missing".to_string(),
                Attempt::Failed(reason) => reason,
            };
            tracing::debug!(%digest, node, note, "peer cache get attempt");
            tried.push(format!("{node}: {note}"));
            next += 1;
        }
        Err(ClientError::NotFound {
            digest: *digest,
            tried: tried_text(tried),
        })
    }

    /// Tells the nodes that sent bytes hashing to `actual` rather than `digest` to check their
    /// copies (they discard a corrupt one); what they found, for the error.
    async fn report_corrupt(&self, digest: &Digest, senders: &[&str], actual: &Digest) -> String {
        let mut found = Vec::new();
        for node in senders {
            found.push(match self.check(node, digest).await {
                Ok(false) => format!("{node}'s copy was corrupt and discarded"),
                Ok(true) => format!("{node}'s copy is intact"),
                Err(e) => format!("{node} could not check its copy: {e}"),
            });
        }
        format!("sent bytes hashing to {actual} ({})", found.join("; "))
    }

    /// Has `node` hash its copy of `digest`: whether it was intact (a corrupt one is gone).
    pub(crate) async fn check(&self, node: &str, digest: &Digest) -> Result<bool, String> {
        match self
            .request(node, CacheRequest::Check { digest: *digest })
            .await?
        {
            CacheReply::Checked { intact } => Ok(intact),
            CacheReply::Missing => Err("it does not hold the blob".into()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// One node's attempt at sending the blob, appended to `partial` (resuming from its
    /// length); hands `partial` back with whatever arrived.
    ///
    /// The bytes are written and hashed off the runtime ([`Sink`]). With `claim`, see
    /// [`PeerCache::get_or_claim`].
    pub(crate) async fn attempt(
        &self,
        node: &str,
        digest: &Digest,
        partial: PartialBlob,
        claim: bool,
    ) -> (Attempt, PartialBlob) {
        let offset = partial.len();
        let request = CacheRequest::Get {
            digest: *digest,
            offset,
            local_only: self.inner.local_only,
            claim: claim && !self.inner.local_only,
        };
        // `end`: where the bytes that follow stop; `fetch`: the claim handed with them.
        let (mut recv, size, fetch) = match self.open(node, request).await {
            Ok((_, mut recv)) => match read_message(&mut recv).await {
                Ok(Message::CacheReply(CacheReply::Blob { size, offset: o })) if o == offset => {
                    (recv, size, None)
                }
                Ok(Message::CacheReply(CacheReply::Missing)) => return (Attempt::Missing, partial),
                // The bytes an earlier fetcher brought in follow, up to `from`.
                Ok(Message::CacheReply(CacheReply::Fetch { from })) if claim => {
                    if offset >= from {
                        return (Attempt::Fetch { from }, partial);
                    }
                    (recv, from, Some(from))
                }
                Ok(Message::Error(e)) => return (Attempt::Failed(e.message), partial),
                Ok(other) => {
                    return (
                        Attempt::Failed(format!("unexpected answer {other:?}")),
                        partial,
                    )
                }
                Err(e) => return (Attempt::Failed(e.to_string()), partial),
            },
            Err(reason) => return (Attempt::Failed(reason), partial),
        };
        let mut sink = Sink::new(partial);
        let attempt = loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    if sink.len() + chunk.bytes.len() as u64 > size {
                        break Attempt::Failed(format!(
                            "sent more than the {size} bytes announced"
                        ));
                    }
                    if !sink.push(chunk.bytes).await {
                        break Attempt::Failed("the local writer stopped".into());
                    }
                }
                Ok(None) if sink.len() == size => break Attempt::Complete,
                Ok(None) => break Attempt::Failed(format!("sent {} of {size} bytes", sink.len())),
                Err(quinn::ReadError::Reset(code))
                    if StreamReset::from_code(code.into_inner()) == Some(StreamReset::Stalled) =>
                {
                    break Attempt::Stalled
                }
                Err(e) => {
                    self.forget(node).await;
                    break Attempt::Failed(e.to_string());
                }
            }
        };
        let (partial, failed) = sink.finish().await;
        // A claim is ours whether or not its kept bytes all came (the caller starts over then).
        if let Some(from) = fetch {
            return (Attempt::Fetch { from }, partial);
        }
        match failed {
            None => (attempt, partial),
            // The local disk failed: what this node sent is not all stored.
            Some(e) => (Attempt::Failed(e.to_string()), partial),
        }
    }

    /// Sends the blob from `store` to its home nodes (standing in: the next nodes in order
    /// for unreachable ones) and returns how many nodes now hold it (at most [`REPLICAS`]).
    pub async fn put_from_store(
        &self,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<usize, ClientError> {
        let size = store.size(digest).ok_or(StoreError::Missing(*digest))?;
        let ranked = self.ranked(digest);
        let (mut copies, mut next, mut tried) = (0, 0, Vec::new());
        while copies < REPLICAS && next < ranked.len() {
            let results = match &ranked[next..ranked.len().min(next + REPLICAS - copies)] {
                [a, b] => {
                    let (ra, rb) = tokio::join!(
                        self.put_to(a, digest, size, store),
                        self.put_to(b, digest, size, store)
                    );
                    vec![(a, ra), (b, rb)]
                }
                [a] => vec![(a, self.put_to(a, digest, size, store).await)],
                _ => Vec::new(),
            };
            next += results.len();
            for (node, r) in results {
                match r {
                    Ok(()) => copies += 1,
                    Err(reason) => tried.push(format!("{node}: {reason}")),
                }
            }
        }
        if copies == 0 {
            return Err(ClientError::PutFailed {
                digest: *digest,
                tried: tried_text(tried),
            });
        }
        Ok(copies)
    }

    /// Sends the blob to one node; `Ok` once it holds a verified copy.
    pub async fn put_to_node(
        &self,
        node: &str,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<(), ClientError> {
        let size = store.size(digest).ok_or(StoreError::Missing(*digest))?;
        self.put_to(node, digest, size, store)
            .await
            .map_err(|reason| node_err(node, reason))
    }

    async fn put_to(
        &self,
        node: &str,
        digest: &Digest,
        size: u64,
        store: &BlobStore,
    ) -> Result<(), String> {
        let Some((mut send, recv)) = self.open_put(node, digest, size, 0).await? else {
            return Ok(());
        };
        let mut file = store.open_blob(digest).map_err(|e| e.to_string())?;
        let mut sent = 0u64;
        while sent < size {
            let mut buf = BytesMut::zeroed(CHUNK.min((size - sent) as usize));
            let n = file.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                let _ = send.reset(quinn::VarInt::from_u32(StreamReset::Aborted.code()));
                return Err(format!("the local blob ended after {sent} of {size} bytes"));
            }
            buf.truncate(n);
            send.write_chunk(buf.freeze())
                .await
                .map_err(|e| e.to_string())?;
            sent += n as u64;
        }
        finish_put(send, recv).await
    }

    /// A request whose reply is one message.
    async fn request(&self, node: &str, request: CacheRequest) -> Result<CacheReply, String> {
        let (_, mut recv) = self.open(node, request).await?;
        match read_message(&mut recv).await.map_err(|e| e.to_string())? {
            Message::CacheReply(r) => Ok(r),
            Message::Error(e) => Err(e.message),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Opens a stream to `node` and sends `request` on it.
    async fn open(
        &self,
        node: &str,
        request: CacheRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        let conn = self.connection(node).await?;
        let opened = async {
            let (mut send, recv) = conn.open_bi().await?;
            write_message(&mut send, Message::CacheRequest(request)).await?;
            Ok::<_, NetError>((send, recv))
        };
        match opened.await {
            Ok(streams) => Ok(streams),
            Err(e) => {
                self.forget(node).await;
                Err(e.to_string())
            }
        }
    }

    async fn connection(&self, node: &str) -> Result<Connection, String> {
        let mut conns = self.inner.connections.lock().await;
        if let Some(c) = conns.get(node) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        match ossb_net::connect(&self.inner.endpoint, node, self.inner.timeout).await {
            Ok(c) => {
                conns.insert(node.to_string(), c.clone());
                self.lock_down().remove(node);
                Ok(c)
            }
            Err(e) => {
                conns.remove(node);
                self.lock_down()
                    .insert(node.to_string(), Instant::now() + DOWN_FOR);
                Err(e.to_string())
            }
        }
    }

    async fn forget(&self, node: &str) {
        self.inner.connections.lock().await.remove(node);
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.inner
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The nodes in rendezvous order for `digest`, those recently unreachable moved last.
    fn ranked(&self, digest: &Digest) -> Vec<String> {
        let now = Instant::now();
        let down = self.lock_down();
        let (up, late): (Vec<&str>, Vec<&str>) = self
            .inner
            .placement
            .rank(digest)
            .into_iter()
            .partition(|n| down.get(*n).is_none_or(|until| *until < now));
        up.into_iter().chain(late).map(str::to_string).collect()
    }
}

/// Ends a put whose bytes are all sent: `Ok` once the node stored a verified copy.
async fn finish_put(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    send.finish().map_err(|e| e.to_string())?;
    match read_message(&mut recv).await.map_err(|e| e.to_string())? {
        Message::CacheReply(CacheReply::Stored) => Ok(()),
        Message::Error(e) => Err(e.message),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// The size of a blob a get without a claim brought; only a get with a claim is answered with
/// one.
fn got(claimed: Claimed) -> Result<u64, ClientError> {
    match claimed {
        Claimed::Got(size) => Ok(size),
        Claimed::Fetch(fetch) => Err(node_err(
            &fetch.node,
            "handed out a claim that was not asked for".into(),
        )),
    }
}

fn node_err(node: &str, reason: String) -> ClientError {
    ClientError::Node {
        node: node.to_string(),
        reason,
    }
}

fn tried_text(tried: Vec<String>) -> String {
    if tried.is_empty() {
        "no cache nodes configured".into()
    } else {
        tried.join("; ")
    }
}
