//! Single-flight: blobs on their way into this node.
//!
//! When several workers need a blob that nobody has, the first to ask a home node with a
//! claim becomes its fetcher: it pulls the blob from its registry and puts it on the node as
//! the bytes arrive. Whoever asks for the blob meanwhile is sent those bytes as they reach the
//! node's disk (verified at the end, as every get), instead of pulling the blob from the
//! registry too. Any put is followed that way, so layers and context files on their way in
//! are shared as they arrive as well.
//!
//! A claim lapses when the fetcher's connection closes or its put does not begin within
//! [`CLAIM_TIMEOUT`]; a put that breaks off fails its followers (their get is reset). Either
//! way the next asker claims the blob again.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ossb_protocol::Digest;
use tokio::sync::watch;

/// How long a claimed blob waits for its fetcher's put to begin.
pub(crate) const CLAIM_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a blob on its way in stands.
#[derive(Clone, Debug)]
pub(crate) enum Arrival {
    /// A worker fetches it from its origin; its put has not begun.
    Claimed {
        /// Tells this claim from a later one of the same blob.
        id: u64,
    },
    /// Its bytes arrive.
    Receiving {
        /// The size its put announced.
        size: u64,
        /// The file being written (read with `read_at`; valid after the commit too).
        file: Arc<File>,
        /// Bytes on disk so far.
        written: u64,
    },
    /// Verified and in the store.
    Stored,
    /// The put failed or the claim lapsed: nothing was stored.
    Failed,
}

/// What [`Inflight::join`] found.
pub(crate) enum Joined {
    /// The blob is on its way: follow it.
    Following(watch::Receiver<Arrival>),
    /// The asker fetches it (claim `id`).
    Claimed(u64),
    /// Nothing is on its way, and no claim was asked for.
    Nothing,
}

/// The blobs on their way into this node.
#[derive(Default)]
pub(crate) struct Inflight {
    blobs: Mutex<HashMap<Digest, watch::Sender<Arrival>>>,
    next_claim: std::sync::atomic::AtomicU64,
}

impl Inflight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, watch::Sender<Arrival>>> {
        self.blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows `digest` if it is on its way; else, with `claim`, makes the asker its fetcher.
    pub(crate) fn join(&self, digest: &Digest, claim: bool) -> Joined {
        let mut blobs = self.lock();
        if let Some(arrival) = blobs.get(digest) {
            return Joined::Following(arrival.subscribe());
        }
        if !claim {
            return Joined::Nothing;
        }
        let id = self
            .next_claim
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        blobs.insert(*digest, watch::channel(Arrival::Claimed { id }).0);
        Joined::Claimed(id)
    }

    /// A claim's end: if the blob still waits for that claim's put, it fails, and the next
    /// asker claims it.
    pub(crate) fn lapse(&self, digest: &Digest, claim: u64) {
        self.end_claim(digest, |id| id == claim, Arrival::Failed);
    }

    /// Ends a claim of `digest` whose put will not come (the node holds the blob after all, or
    /// refused the put): its followers are told `how` at once rather than at the lapse.
    pub(crate) fn settle(&self, digest: &Digest, how: Arrival) {
        self.end_claim(digest, |_| true, how);
    }

    /// Ends the claim of `digest` if one whose id `which` accepts waits for its put.
    fn end_claim(&self, digest: &Digest, which: impl Fn(u64) -> bool, how: Arrival) {
        let mut blobs = self.lock();
        let waiting = matches!(blobs.get(digest), Some(a) if matches!(*a.borrow(), Arrival::Claimed { id } if which(id)));
        if waiting {
            if let Some(arrival) = blobs.remove(digest) {
                arrival.send_replace(how);
            }
        }
    }

    /// Resolves when claim `id` of `digest` no longer waits for its put.
    pub(crate) async fn claim_settled(&self, digest: &Digest, id: u64) {
        let Some(mut rx) = self.lock().get(digest).map(watch::Sender::subscribe) else {
            return;
        };
        let _ = rx
            .wait_for(|a| !matches!(a, Arrival::Claimed { id: i } if *i == id))
            .await;
    }

    /// A put of `digest` begins, writing `file`: the returned handle tells its followers how
    /// far it got and how it ended. `None` when another put of the blob is being followed
    /// already (this one is received unfollowed).
    pub(crate) fn receiving(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        file: File,
    ) -> Option<Receiving> {
        let arrival = Arrival::Receiving {
            size,
            file: Arc::new(file),
            written: 0,
        };
        let mut blobs = self.lock();
        match blobs.get(digest) {
            Some(a) if matches!(*a.borrow(), Arrival::Claimed { .. }) => {
                a.send_replace(arrival);
            }
            Some(_) => return None,
            None => {
                blobs.insert(*digest, watch::channel(arrival).0);
            }
        }
        let sender = blobs.get(digest).cloned()?;
        Some(Receiving {
            inflight: self.clone(),
            digest: *digest,
            sender,
            ended: false,
        })
    }
}

/// A followed put. Dropped without [`Receiving::stored`], it fails its followers.
pub(crate) struct Receiving {
    inflight: Arc<Inflight>,
    digest: Digest,
    sender: watch::Sender<Arrival>,
    ended: bool,
}

impl Receiving {
    /// Tells the followers how many bytes are on disk (called from the writer thread).
    pub(crate) fn progress(&self) -> impl Fn(u64) + Send + 'static {
        let sender = self.sender.clone();
        move |n| {
            sender.send_modify(|a| {
                if let Arrival::Receiving { written, .. } = a {
                    *written = n;
                }
            })
        }
    }

    /// The blob is verified and in the store (call after it is findable there).
    pub(crate) fn stored(mut self) {
        self.end(Arrival::Stored);
    }

    fn end(&mut self, how: Arrival) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.inflight.lock().remove(&self.digest);
        self.sender.send_replace(how);
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.end(Arrival::Failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_asker_claims_and_the_others_follow() {
        let inflight = Arc::new(Inflight::default());
        let d = Digest::of(b"blob");
        let Joined::Claimed(id) = inflight.join(&d, true) else {
            panic!("the first asker did not claim");
        };
        let Joined::Following(mut rx) = inflight.join(&d, true) else {
            panic!("the second asker did not follow");
        };
        assert!(matches!(*rx.borrow_and_update(), Arrival::Claimed { .. }));
        let file = tempfile::tempfile().unwrap();
        let receiving = inflight.receiving(&d, 3, file).unwrap();
        (receiving.progress())(2);
        assert!(matches!(
            *rx.borrow_and_update(),
            Arrival::Receiving { written: 2, .. }
        ));
        // A lapse after the put began changes nothing.
        inflight.lapse(&d, id);
        assert!(matches!(*rx.borrow(), Arrival::Receiving { .. }));
        receiving.stored();
        assert!(matches!(*rx.borrow(), Arrival::Stored));
        assert!(matches!(inflight.join(&d, false), Joined::Nothing));
    }

    /// A claim whose put will not come (the node has the blob after all) ends at once.
    #[test]
    fn a_settled_claim_tells_its_followers_without_waiting_for_the_lapse() {
        let inflight = Arc::new(Inflight::default());
        let d = Digest::of(b"blob");
        let Joined::Claimed(_) = inflight.join(&d, true) else {
            panic!()
        };
        let Joined::Following(rx) = inflight.join(&d, true) else {
            panic!()
        };
        inflight.settle(&d, Arrival::Stored);
        assert!(matches!(*rx.borrow(), Arrival::Stored));
        assert!(matches!(inflight.join(&d, false), Joined::Nothing));
        // A put under way is not a claim: settling leaves it alone.
        let receiving = inflight.receiving(&d, 3, tempfile::tempfile().unwrap());
        let Joined::Following(rx) = inflight.join(&d, false) else {
            panic!()
        };
        inflight.settle(&d, Arrival::Failed);
        assert!(matches!(*rx.borrow(), Arrival::Receiving { .. }));
        drop(receiving);
    }

    #[test]
    fn a_lapsed_claim_or_a_broken_put_fails_the_followers_and_frees_the_blob() {
        let inflight = Arc::new(Inflight::default());
        let d = Digest::of(b"blob");
        let Joined::Claimed(id) = inflight.join(&d, true) else {
            panic!()
        };
        let Joined::Following(rx) = inflight.join(&d, false) else {
            panic!()
        };
        inflight.lapse(&d, id);
        assert!(matches!(*rx.borrow(), Arrival::Failed));
        let Joined::Claimed(_) = inflight.join(&d, true) else {
            panic!("the blob was not free to claim again")
        };
        let Joined::Following(rx) = inflight.join(&d, false) else {
            panic!()
        };
        drop(inflight.receiving(&d, 3, tempfile::tempfile().unwrap()));
        assert!(matches!(*rx.borrow(), Arrival::Failed));
        assert!(matches!(inflight.join(&d, false), Joined::Nothing));
    }
}
