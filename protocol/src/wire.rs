//! The cluster's control messages: what nodes say to each other over QUIC streams.
//!
//! # Conversations
//! Every request opens its own bidirectional stream. The requester writes one [`Envelope`]
//! frame (see [`crate::frame`]), the answerer writes one back; blob bytes travel raw on the same
//! stream after the header that announces them, never inside a frame:
//!
//! | request | reply | then |
//! |---|---|---|
//! | [`CacheRequest::Has`] | [`CacheReply::Has`] | — |
//! | [`CacheRequest::Get`] | [`CacheReply::Blob`], [`CacheReply::Missing`] or (with a claim) [`CacheReply::Fetch`] | after `Blob`: bytes `offset..size`, then the stream finishes; after `Fetch`: bytes `offset..from` (what an earlier fetcher brought in), then the stream finishes |
//! | [`CacheRequest::Put`] | [`CacheReply::PutReady`] or [`CacheReply::PutPresent`] | after `PutReady`: the requester sends bytes `from..size`, finishes its side, and reads [`CacheReply::Stored`] or an error |
//! | [`CacheRequest::Stat`] | [`CacheReply::Stats`] | — |
//!
//! Any request may be answered with [`Message::Error`] instead.
//!
//! A node streaming a blob hashes it as it reads it from disk; if the bytes do not match the
//! digest (a flipped bit on disk), it discards the blob and resets the stream with
//! [`StreamReset::BlobCorrupt`]: the requester throws away what it received and treats the
//! blob as missing on that node. Requesters verify every byte themselves too.
//!
//! # Versions and extension
//! [`VERSION`] is written first in every frame. postcard is not self-describing: a message
//! layout that changes (a field added, a variant reordered) is a new version. New kinds of
//! messages (the coordinator and workers of the build cluster) are new variants appended at the
//! end of [`Message`]: postcard numbers variants by position, so existing variants keep their
//! encoding and a node that does not know a variant answers [`ErrorCode::Unsupported`].

use serde::{Deserialize, Serialize};

use crate::Digest;

/// The protocol version this build speaks. 2: build specs carry named contexts, secrets and
/// registry CAs; task outcomes carry input statistics; tasks can be cancelled. 3: tasks are
/// stages (stage, export, build platform); the cluster's step cache (claim, publish). 4: fifos
/// and device nodes in contexts. 5: tasks carry the stages they read, outcomes the stage built;
/// a get may claim a blob nobody has (single-flight fetches from registries). 6: cache mounts
/// shared through the peer cache. 8: a fetch resumes where a dead fetcher's bytes stopped
/// (`Fetch { from }`, `Put { from }`). 9: attestations (`BuildSpec::attest`, task facts and
/// SBOMs). 10: `BuildSpec::cache_to` is buildx's whole spec (type, mode, ...), not a repository.
/// 11: attestations carry `oci-artifact`, the context's git facts and extra SBOMs. 12: named
/// contexts of other sources (`BuildSpec::context_sources`); a step's cache-miss reason
/// (`BuildEvent::CacheMiss`). 13: the image exporter's options (`BuildSpec::export`:
/// compression level, force-compression, push-by-digest, name-canonical). 14: a bake as one
/// submission (`SubmitBake`, `BakeAccepted`, `TargetEvent`, `TargetFinished`). 15: a bake
/// target's image handed to a task of another target as a named context (`TaskSpec::contexts`).
/// 16: a worker says it is draining to collect its cache (`Heartbeat::draining`).
pub const VERSION: u16 = 16;

/// One control message as it travels: the sender's protocol version, then the message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The protocol version of the sender ([`VERSION`]).
    pub version: u16,
    /// What is said.
    pub message: Message,
}

impl Envelope {
    /// `message` in this build's protocol version.
    pub fn new(message: Message) -> Envelope {
        Envelope {
            version: VERSION,
            message,
        }
    }
}

/// Every message of the cluster protocol. New variants go at the end (see the module
/// documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A request to a cache node (from a worker, a client, or another cache node).
    CacheRequest(CacheRequest),
    /// A cache node's answer.
    CacheReply(CacheReply),
    /// A request that could not be served.
    Error(ErrorReply),
    /// A message of the build cluster (client, coordinator, workers): see [`crate::cluster`].
    Cluster(Box<crate::cluster::ClusterMessage>),
}

/// Requests to the peer cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheRequest {
    /// Which of these blobs the node holds.
    Has {
        /// The blobs asked about (at most [`MAX_HAS_DIGESTS`]).
        digests: Vec<Digest>,
    },
    /// Send the blob's bytes from `offset` on (0 for all of it; more to resume a transfer).
    Get {
        /// The blob.
        digest: Digest,
        /// The first byte wanted.
        offset: u64,
        /// Answer from this node's disk only. Without it, a node that is one of the blob's home
        /// nodes and misses it first fetches it from its peers (and keeps it); nodes set it
        /// when they ask each other, so a miss never travels further than one hop.
        local_only: bool,
        /// When nobody holds the blob and nobody is bringing it in, make the asker its
        /// fetcher ([`CacheReply::Fetch`]) rather than answer [`CacheReply::Missing`]. Asked
        /// while another fetcher's bytes arrive, the node sends them on as they come.
        claim: bool,
    },
    /// Store a blob of `size` bytes whose sha256 is `digest`.
    Put {
        /// What the bytes must hash to.
        digest: Digest,
        /// The blob's whole size.
        size: u64,
        /// The first byte that follows: 0, or the `from` of the [`CacheReply::Fetch`] that
        /// handed the sender its claim (the node holds the bytes before it).
        from: u64,
    },
    /// The node's counters.
    Stat,
    /// The bytes this node sent for the blob did not hash to its digest on the asker's side:
    /// hash the stored copy and discard it when it is corrupt. Nodes do not hash what they
    /// serve (the asker verifies every byte anyway), so this is how a bad disk is found.
    Check {
        /// The blob.
        digest: Digest,
    },
}

/// The most digests one [`CacheRequest::Has`] may carry (it must fit in a frame).
pub const MAX_HAS_DIGESTS: usize = 65_536;

/// Answers of the peer cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheReply {
    /// For each digest of the request, in order: its size if the node holds it.
    Has {
        /// `Some(size)` for a blob that is present.
        sizes: Vec<Option<u64>>,
    },
    /// The blob follows: bytes `offset..size` come raw on the stream, then it finishes.
    Blob {
        /// The whole blob's size.
        size: u64,
        /// Where the bytes that follow start (the request's offset).
        offset: u64,
    },
    /// The node does not have the blob.
    Missing,
    /// Nobody has the blob or is bringing it in: the asker fetches it from its origin and
    /// puts it on this node as it arrives; whoever asks meanwhile gets those bytes as they
    /// come. The claim lapses when the asker's connection closes, or if its put does not
    /// start in time. When an earlier fetcher died halfway, the node kept what it had put:
    /// bytes `offset..from` of the blob follow on this stream, and the asker fetches the rest
    /// from byte `from` and puts it with that `from`.
    Fetch {
        /// Where the bytes still to fetch start (0: all of them).
        from: u64,
    },
    /// Send the blob's bytes.
    PutReady,
    /// The node already has the blob: send nothing.
    PutPresent,
    /// The bytes were verified against the digest and stored.
    Stored,
    /// The node's counters.
    Stats(CacheStats),
    /// The answer to [`CacheRequest::Check`]: whether the stored copy was intact (false: it
    /// was discarded). Missing when the node does not hold the blob.
    Checked {
        /// The copy hashed to its digest.
        intact: bool,
    },
}

/// A cache node's counters, as `ossb cache-node` also exports them in Prometheus form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Blobs stored.
    pub blobs: u64,
    /// Their total size.
    pub bytes: u64,
    /// The size limit (`--max-size`); 0 when unlimited.
    pub max_bytes: u64,
    /// Gets answered with the blob.
    pub hits: u64,
    /// Gets answered with [`CacheReply::Missing`].
    pub misses: u64,
    /// Blob bytes received and stored.
    pub bytes_in: u64,
    /// Blob bytes sent.
    pub bytes_out: u64,
    /// Blobs evicted to stay under the size limit.
    pub evictions: u64,
    /// Blobs whose bytes did not match their digest (received, or found corrupt on disk by a
    /// [`CacheRequest::Check`]).
    pub verification_failures: u64,
    /// Gets of a blob nobody had, whose asker was made its fetcher.
    pub fetch_claims: u64,
    /// Gets answered with a blob's bytes as they arrived.
    pub followed: u64,
}

/// Why a request was not served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The kind of failure, for the requester's logic.
    pub code: ErrorCode,
    /// What failed, for a human.
    pub message: String,
}

/// Kinds of [`ErrorReply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The requester speaks a protocol version this node does not.
    UnsupportedVersion,
    /// A message this node does not serve (e.g. a coordinator message sent to a cache node).
    Unsupported,
    /// The request could not be decoded.
    Malformed,
    /// The bytes of a put did not match its digest or size; nothing was stored.
    DigestMismatch,
    /// The blob is larger than the node's size limit.
    TooLarge,
    /// The node failed (its disk); the requester should try another node.
    Internal,
}

/// QUIC stream reset codes of this protocol (the application error code of
/// `RESET_STREAM`/`STOP_SENDING`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum StreamReset {
    /// The sender gave up (it is shutting down, or its source failed).
    Aborted = 2,
    /// The put this get followed broke off (its fetcher died) and the node kept the bytes it
    /// had: ask the same node again with a claim, to resume the fetch or follow whoever does.
    Stalled = 3,
}

impl StreamReset {
    /// The code on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The reset a code stands for, if it is one of ours.
    pub fn from_code(code: u64) -> Option<StreamReset> {
        match code {
            2 => Some(StreamReset::Aborted),
            3 => Some(StreamReset::Stalled),
            _ => None,
        }
    }
}
