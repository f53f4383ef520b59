//! The peer cache: a content-addressed blob store served to workers over QUIC.
//!
//! Nothing lives here yet: the cluster (cache nodes, rendezvous placement, the QUIC
//! protocol) arrives with the build cluster. `ossb build` needs none of it.
