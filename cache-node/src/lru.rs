//! Which blobs to evict: least recently used first, down to a size limit.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use ossb_protocol::Digest;

/// Sizes and use order of the blobs a node holds. Uses are numbered by a counter, so the
/// order is exact even for uses within the same clock tick.
#[derive(Debug, Default)]
pub struct Lru {
    entries: HashMap<Digest, (u64, u64)>,
    order: BTreeMap<u64, Digest>,
    next: u64,
    bytes: u64,
    limit: Option<u64>,
}

impl Lru {
    /// An empty index evicting above `limit` bytes (`None`: never).
    pub fn new(limit: Option<u64>) -> Lru {
        Lru {
            limit,
            ..Lru::default()
        }
    }

    /// Rebuilds the order from what a store already holds (oldest last use first).
    pub fn load(limit: Option<u64>, mut blobs: Vec<(Digest, u64, SystemTime)>) -> Lru {
        blobs.sort_by_key(|b| b.2);
        let mut lru = Lru::new(limit);
        for (d, size, _) in blobs {
            lru.insert_only(d, size);
        }
        lru
    }

    /// Records a new (or re-stored) blob as just used and returns the blobs to evict to get
    /// back under the limit, oldest first. The new blob itself is never among them.
    pub fn insert(&mut self, digest: Digest, size: u64) -> Vec<Digest> {
        self.insert_only(digest, size);
        self.over_limit(&digest)
    }

    fn insert_only(&mut self, digest: Digest, size: u64) {
        self.remove(&digest);
        let tick = self.tick();
        self.entries.insert(digest, (size, tick));
        self.order.insert(tick, digest);
        self.bytes += size;
    }

    /// The blobs to evict now (e.g. after loading a store larger than the limit).
    pub fn over_limit(&mut self, keep: &Digest) -> Vec<Digest> {
        let mut evicted = Vec::new();
        let Some(limit) = self.limit else {
            return evicted;
        };
        while self.bytes > limit {
            let Some((_, oldest)) = self.order.iter().find(|(_, d)| *d != keep) else {
                break;
            };
            let oldest = *oldest;
            self.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Marks a blob used now; false if it is not indexed.
    pub fn touch(&mut self, digest: &Digest) -> bool {
        let tick = self.tick();
        let Some((_, t)) = self.entries.get_mut(digest) else {
            return false;
        };
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, *digest);
        true
    }

    /// Forgets a blob (removed, or found corrupt).
    pub fn remove(&mut self, digest: &Digest) {
        if let Some((size, tick)) = self.entries.remove(digest) {
            self.order.remove(&tick);
            self.bytes -= size;
        }
    }

    /// Whether the blob is indexed.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.entries.contains_key(digest)
    }

    /// Blobs indexed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Their total size.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The size limit.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    fn tick(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u8) -> Digest {
        Digest::of(&[i])
    }

    #[test]
    fn evicts_least_recently_used_first_down_to_the_limit() {
        let mut lru = Lru::new(Some(100));
        assert!(lru.insert(d(1), 40).is_empty());
        assert!(lru.insert(d(2), 40).is_empty());
        assert!(lru.touch(&d(1)));
        // 40 + 40 + 30 > 100: the oldest use (2) goes, 1 was used since.
        assert_eq!(lru.insert(d(3), 30), vec![d(2)]);
        assert_eq!((lru.len(), lru.bytes()), (2, 70));
        // A blob larger than everything else evicts all others but stays itself.
        assert_eq!(lru.insert(d(4), 100), vec![d(1), d(3)]);
        assert!(lru.contains(&d(4)));
        assert_eq!(lru.insert(d(5), 150), vec![d(4)]);
        assert_eq!(lru.bytes(), 150);
        // Re-inserting counts the size once.
        lru.remove(&d(5));
        assert!(lru.insert(d(6), 10).is_empty());
        assert!(lru.insert(d(6), 10).is_empty());
        assert_eq!(lru.bytes(), 10);
        assert!(!lru.touch(&d(9)));
    }

    #[test]
    fn loads_in_order_of_last_use_and_unlimited_never_evicts() {
        let t = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let mut lru = Lru::load(Some(10), vec![(d(1), 6, t(50)), (d(2), 6, t(10))]);
        assert_eq!(lru.over_limit(&d(0)), vec![d(2)]);
        let mut free = Lru::new(None);
        for i in 0..100 {
            assert!(free.insert(d(i), u64::MAX / 1000).is_empty());
        }
    }
}
