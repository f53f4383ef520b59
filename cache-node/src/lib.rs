//! The peer cache: a content-addressed blob store served to the cluster over QUIC.
//!
//! Workers ask the peer cache for a blob before the registry and publish the blobs they
//! produce to it. Cache nodes form a StatefulSet; a blob's two home nodes are chosen by
//! rendezvous hashing of its digest over the node list ([`placement`]), so no directory
//! service exists. Everything travels through `ossb-net` (QUIC, mutual TLS from the cluster
//! CA) in the messages of `ossb_protocol::wire`.
//!
//! - [`Node`] (`ossb cache-node`): serves has / get from an offset / put / stat from a
//!   [`ossb_image::store::BlobStore`]. Every byte received is verified against its digest before
//!   the blob is stored; every blob is hashed again as it is read from disk to be sent, and one
//!   that fails is deleted and the transfer reset as corrupt (the requester then treats it as
//!   missing there). With `--max-size`, least recently used blobs are evicted ([`lru`]). A
//!   node that is a home of a blob it misses fetches it from the other nodes before answering
//!   (one hop: such requests are `local_only`), so a replaced node refills itself on demand.
//!   Counters are served as Prometheus text ([`metrics`]).
//! - Single-flight ([`inflight`]): the first worker to ask a home node with a claim for a blob
//!   nobody has fetches it from its registry and puts it as it downloads; others asking
//!   meanwhile get its bytes as they reach the node's disk, so a blob crosses the registry
//!   link once for the whole cluster.
//! - [`PeerCache`]: the client. `get_to_store` tries the home nodes, then the others, resuming
//!   a broken transfer from the bytes already received; `put_from_store` sends to both home
//!   nodes; `has` asks the home nodes.
//!
//! `--peers` lists every cache node, this one included, exactly as clients name them (the same
//! list workers get as `--cache-peers`): placement compares names, so every process must see
//! the same list. A node recognizes its own entry as the one with its listening port whose host
//! resolves to one of its addresses; a list without it works, but the node then never fills
//! itself from its peers.

mod client;
mod inflight;
pub mod lru;
pub mod metrics;
mod node;
pub mod placement;
mod sink;

pub use client::{Claimed, ClientError, Fetch, PeerCache};
pub use node::{serve, Node, NodeConfig, NodeError};

#[cfg(test)]
mod tests;
