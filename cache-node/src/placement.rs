//! Where a blob lives: rendezvous (highest random weight) hashing of its digest over the
//! cache nodes.
//!
//! Every node gets a score `sha256(node name || digest)`; the blob's nodes in order of
//! preference are the nodes by descending score, and its [`REPLICAS`] home nodes are the first
//! of them. Everyone who holds the same node list computes the same order without talking to
//! anyone; adding or removing a node moves only the blobs whose home it becomes or was.
//! Node names are compared as written: clients and nodes must be given the same list (the
//! StatefulSet's stable DNS names, `cache-0.cache:7000,...`).

use ossb_protocol::Digest;
use sha2::{Digest as _, Sha256};

/// How many nodes hold each blob.
pub const REPLICAS: usize = 2;

/// The cache nodes of the cluster, as `host:port` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    nodes: Vec<String>,
}

impl Placement {
    /// The placement over `nodes` (duplicates and empty names are dropped).
    pub fn new<S: AsRef<str>>(nodes: &[S]) -> Placement {
        let mut out: Vec<String> = Vec::new();
        for n in nodes {
            let n = n.as_ref().trim();
            if !n.is_empty() && !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
        Placement { nodes: out }
    }

    /// Every node, in the order given.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Every node in order of preference for `digest`: its home nodes first.
    pub fn rank(&self, digest: &Digest) -> Vec<&str> {
        let mut scored: Vec<([u8; 8], &str)> = self
            .nodes
            .iter()
            .map(|n| (score(n, digest), n.as_str()))
            .collect();
        scored.sort_by(|a, b| b.cmp(a));
        scored.into_iter().map(|(_, n)| n).collect()
    }

    /// The nodes that should hold `digest` (the first [`REPLICAS`] of [`Placement::rank`]).
    pub fn homes(&self, digest: &Digest) -> Vec<&str> {
        let mut r = self.rank(digest);
        r.truncate(REPLICAS);
        r
    }
}

fn score(node: &str, digest: &Digest) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update((node.len() as u64).to_be_bytes());
    h.update(node.as_bytes());
    h.update(digest.as_bytes());
    let out = h.finalize();
    let mut s = [0u8; 8];
    s.copy_from_slice(&out[..8]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("cache-{i}.cache.ossb.svc:7000"))
            .collect()
    }

    #[test]
    fn placement_is_stable_and_independent_of_list_order() {
        let a = Placement::new(&nodes(5));
        let mut reversed = nodes(5);
        reversed.reverse();
        let b = Placement::new(&reversed);
        for i in 0..200u32 {
            let d = Digest::of(&i.to_be_bytes());
            assert_eq!(a.rank(&d), b.rank(&d));
            assert_eq!(a.homes(&d).len(), REPLICAS);
            assert_eq!(a.rank(&d).len(), 5);
        }
        // Fixed expectations, so that a change of the hash (which would move every blob of a
        // running cluster) is noticed.
        // Computed apart from this code (Python's hashlib over the same bytes).
        let rank = |name: &[u8]| -> Vec<usize> {
            a.rank(&Digest::of(name))
                .iter()
                .map(|n| nodes(5).iter().position(|m| m == n).unwrap())
                .collect()
        };
        assert_eq!(rank(b"stable"), [4, 2, 3, 1, 0]);
        assert_eq!(rank(b"blob-1"), [4, 3, 1, 0, 2]);
        assert_eq!(rank(b"blob-2"), [3, 0, 4, 2, 1]);
        assert_eq!(
            a.homes(&Digest::of(b"stable")),
            ["cache-4.cache.ossb.svc:7000", "cache-2.cache.ossb.svc:7000"]
        );
    }

    #[test]
    fn placement_spreads_blobs_evenly() {
        let p = Placement::new(&nodes(4));
        let mut count = std::collections::HashMap::new();
        for i in 0..4000u32 {
            for home in p.homes(&Digest::of(&i.to_be_bytes())) {
                *count.entry(home.to_string()).or_insert(0) += 1;
            }
        }
        // 8000 placements over 4 nodes: 2000 each expected.
        for n in nodes(4) {
            let c = count[&n];
            assert!((1700..2300).contains(&c), "{n}: {c} of 8000");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_blobs() {
        let all = Placement::new(&nodes(5));
        let fewer = Placement::new(&nodes(5)[..4]);
        let gone = &nodes(5)[4];
        for i in 0..500u32 {
            let d = Digest::of(&i.to_be_bytes());
            let before: Vec<&str> = all.rank(&d).into_iter().filter(|n| n != gone).collect();
            assert_eq!(before, fewer.rank(&d));
        }
    }
}
