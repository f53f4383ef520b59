//! A cache node's counters, and their Prometheus text form.

use std::sync::atomic::{AtomicU64, Ordering};

use ossb_protocol::wire::CacheStats;

/// Counters, updated as requests are served.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) verification_failures: AtomicU64,
    pub(crate) fetch_claims: AtomicU64,
    pub(crate) followed: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// The counters with the store's current size.
    pub fn stats(&self, blobs: u64, bytes: u64, max_bytes: Option<u64>) -> CacheStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            blobs,
            bytes,
            max_bytes: max_bytes.unwrap_or(0),
            hits: get(&self.hits),
            misses: get(&self.misses),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            evictions: get(&self.evictions),
            verification_failures: get(&self.verification_failures),
            fetch_claims: get(&self.fetch_claims),
            followed: get(&self.followed),
        }
    }
}

/// The Prometheus text exposition of `stats`.
pub fn prometheus(stats: &CacheStats) -> String {
    let rows: [(&str, &str, &str, u64); 11] = [
        ("ossb_cache_blobs", "gauge", "Blobs stored.", stats.blobs),
        ("ossb_cache_bytes", "gauge", "Bytes stored.", stats.bytes),
        (
            "ossb_cache_max_bytes",
            "gauge",
            "The size limit in bytes (0: none).",
            stats.max_bytes,
        ),
        (
            "ossb_cache_hits_total",
            "counter",
            "Gets answered with the blob.",
            stats.hits,
        ),
        (
            "ossb_cache_misses_total",
            "counter",
            "Gets of a blob the node does not hold.",
            stats.misses,
        ),
        (
            "ossb_cache_received_bytes_total",
            "counter",
            "Blob bytes received, verified and stored.",
            stats.bytes_in,
        ),
        (
            "ossb_cache_sent_bytes_total",
            "counter",
            "Blob bytes sent.",
            stats.bytes_out,
        ),
        (
            "ossb_cache_evictions_total",
            "counter",
            "Blobs evicted to stay under the size limit.",
            stats.evictions,
        ),
        (
            "ossb_cache_verification_failures_total",
            "counter",
            "Blobs whose bytes did not match their digest (received or read from disk).",
            stats.verification_failures,
        ),
        (
            "ossb_cache_fetch_claims_total",
            "counter",
            "Gets of a blob nobody had, whose asker was made its fetcher (single-flight).",
            stats.fetch_claims,
        ),
        (
            "ossb_cache_followed_total",
            "counter",
            "Gets answered with a blob's bytes as they arrived (another fetch's or put's).",
            stats.followed,
        ),
    ];
    let mut out = ossb_net::http::PrometheusText::default();
    for (name, kind, help, value) in rows {
        out.single(name, kind, help, value);
    }
    out.finish()
}
