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
//! [`CLAIM_TIMEOUT`]. A followed put that breaks off (its fetcher died) leaves the blob
//! *stalled*: the node keeps the bytes that arrived, its followers are told to ask again, and
//! the first of them to claim it resumes the fetch from the first missing byte (the registry
//! sends the rest by `Range`). A stalled blob nobody claims within [`CLAIM_TIMEOUT`] is
//! dropped, as is one whose put was refused (wrong bytes are never resumed from).

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ossb_image::store::PartialBlob;
use ossb_protocol::Digest;
use tokio::sync::watch;

/// How long a claimed blob waits for its fetcher's put to begin, and a stalled one for its
/// next fetcher.
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
    /// Its put broke off; the bytes that arrived wait for the next fetcher.
    Stalled {
        /// Tells this stall from a later one of the same blob.
        id: u64,
    },
    /// Verified and in the store.
    Stored,
    /// The put failed or the claim lapsed: nothing was stored.
    Failed,
}

/// A claim that resumes a stalled fetch: the bytes before `from` are on this node.
pub(crate) struct Resume {
    /// The first byte the fetcher brings.
    pub(crate) from: u64,
    /// The kept bytes (`0..from`), for the fetcher to have them too.
    pub(crate) file: File,
}

/// What [`Inflight::join`] found.
pub(crate) enum Joined {
    /// The blob is on its way: follow it.
    Following(watch::Receiver<Arrival>),
    /// The asker fetches it (claim `id`), from the start or resuming.
    Claimed {
        /// The claim.
        id: u64,
        /// Where a stalled fetch stopped.
        resume: Option<Resume>,
    },
    /// Nothing is on its way, and no claim was asked for.
    Nothing,
}

/// One blob on its way in.
struct Entry {
    arrival: watch::Sender<Arrival>,
    /// The bytes a broken-off put brought, while the blob is stalled or claimed again.
    kept: Option<PartialBlob>,
}

/// The blobs on their way into this node.
#[derive(Default)]
pub(crate) struct Inflight {
    blobs: Mutex<HashMap<Digest, Entry>>,
    next_id: AtomicU64,
}

fn state(entry: &Entry) -> Arrival {
    entry.arrival.borrow().clone()
}

impl Inflight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Entry>> {
        self.blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Follows `digest` if it is on its way; else, with `claim`, makes the asker its fetcher
    /// (resuming a stalled fetch where it stopped).
    pub(crate) fn join(&self, digest: &Digest, claim: bool) -> Joined {
        let mut blobs = self.lock();
        let id = self.next_id();
        match blobs.get_mut(digest) {
            Some(entry) if !matches!(state(entry), Arrival::Stalled { .. }) => {
                Joined::Following(entry.arrival.subscribe())
            }
            Some(_) if !claim => Joined::Nothing,
            Some(entry) => {
                entry.arrival.send_replace(Arrival::Claimed { id });
                let resume = entry.kept.as_mut().and_then(|kept| {
                    kept.flush().ok()?;
                    Some(Resume {
                        from: kept.len(),
                        file: kept.reader().ok()?,
                    })
                });
                if resume.is_none() {
                    entry.kept = None;
                }
                Joined::Claimed { id, resume }
            }
            None if !claim => Joined::Nothing,
            None => {
                let arrival = watch::channel(Arrival::Claimed { id }).0;
                blobs.insert(
                    *digest,
                    Entry {
                        arrival,
                        kept: None,
                    },
                );
                Joined::Claimed { id, resume: None }
            }
        }
    }

    /// A claim's end: if the blob still waits for that claim's put, it stalls again when
    /// bytes were kept (`Some(stall id)`, for [`Inflight::expire`]), else it fails and the
    /// next asker claims it afresh.
    pub(crate) fn lapse(&self, digest: &Digest, claim: u64) -> Option<u64> {
        let mut blobs = self.lock();
        let entry = blobs.get_mut(digest)?;
        if !matches!(state(entry), Arrival::Claimed { id } if id == claim) {
            return None;
        }
        if entry.kept.is_some() {
            let id = self.next_id();
            entry.arrival.send_replace(Arrival::Stalled { id });
            return Some(id);
        }
        if let Some(entry) = blobs.remove(digest) {
            entry.arrival.send_replace(Arrival::Failed);
        }
        None
    }

    /// Drops a stalled blob that nobody claimed since stall `id`: its kept bytes go.
    pub(crate) fn expire(&self, digest: &Digest, id: u64) {
        let mut blobs = self.lock();
        if matches!(blobs.get(digest).map(state), Some(Arrival::Stalled { id: i }) if i == id) {
            if let Some(entry) = blobs.remove(digest) {
                entry.arrival.send_replace(Arrival::Failed);
            }
        }
    }

    /// Ends a claim of `digest` whose put will not come (the node holds the blob after all, or
    /// refused the put): its followers are told `how` at once rather than at the lapse.
    pub(crate) fn settle(&self, digest: &Digest, how: Arrival) {
        let mut blobs = self.lock();
        if matches!(blobs.get(digest).map(state), Some(Arrival::Claimed { .. })) {
            if let Some(entry) = blobs.remove(digest) {
                entry.arrival.send_replace(how);
            }
        }
    }

    /// Resolves when claim `id` of `digest` no longer waits for its put.
    pub(crate) async fn claim_settled(&self, digest: &Digest, id: u64) {
        let Some(mut rx) = self.lock().get(digest).map(|e| e.arrival.subscribe()) else {
            return;
        };
        let _ = rx
            .wait_for(|a| !matches!(a, Arrival::Claimed { id: i } if *i == id))
            .await;
    }

    /// The bytes kept for a claimed blob whose fetch resumes at `from`: the put that resumes
    /// it continues them. `None` when nothing (or a different length) was kept.
    pub(crate) fn take_kept(&self, digest: &Digest, from: u64) -> Option<PartialBlob> {
        let mut blobs = self.lock();
        let entry = blobs.get_mut(digest)?;
        if !matches!(state(entry), Arrival::Claimed { .. }) {
            return None;
        }
        match &entry.kept {
            Some(kept) if kept.len() == from => entry.kept.take(),
            _ => None,
        }
    }

    /// A put of `digest` begins, writing `file`, which holds `written` bytes already (a
    /// resumed fetch): the returned handle tells its followers how far it got and how it
    /// ended. `None` when another put of the blob is being followed already (this one is
    /// received unfollowed).
    pub(crate) fn receiving(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        file: File,
        written: u64,
    ) -> Option<Receiving> {
        let arrival = Arrival::Receiving {
            size,
            file: Arc::new(file),
            written,
        };
        let mut blobs = self.lock();
        match blobs.get_mut(digest) {
            Some(entry)
                if matches!(
                    state(entry),
                    Arrival::Claimed { .. } | Arrival::Stalled { .. }
                ) =>
            {
                // A whole put supersedes what a broken one left.
                entry.kept = None;
                entry.arrival.send_replace(arrival);
            }
            Some(_) => return None,
            None => {
                let arrival = watch::channel(arrival).0;
                blobs.insert(
                    *digest,
                    Entry {
                        arrival,
                        kept: None,
                    },
                );
            }
        }
        let sender = blobs.get(digest)?.arrival.clone();
        Some(Receiving {
            inflight: self.clone(),
            digest: *digest,
            sender,
            ended: false,
        })
    }
}

/// A followed put. Dropped without [`Receiving::stored`] or [`Receiving::stall`], it fails
/// its followers.
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
        self.ended = true;
        self.inflight.lock().remove(&self.digest);
        self.sender.send_replace(Arrival::Stored);
    }

    /// The put broke off with `partial` (the bytes that arrived) on disk: they are kept for
    /// the next fetcher; the followers are told to ask again. The stall's id, for
    /// [`Inflight::expire`].
    pub(crate) fn stall(mut self, partial: PartialBlob) -> u64 {
        self.ended = true;
        let id = self.inflight.next_id();
        let mut blobs = self.inflight.lock();
        if let Some(entry) = blobs.get_mut(&self.digest) {
            entry.kept = Some(partial);
            entry.arrival.send_replace(Arrival::Stalled { id });
        }
        id
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.inflight.lock().remove(&self.digest);
        self.sender.send_replace(Arrival::Failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_asker_claims_and_the_others_follow() {
        let inflight = Arc::new(Inflight::default());
        let d = Digest::of(b"blob");
        let Joined::Claimed { id, resume: None } = inflight.join(&d, true) else {
            panic!("the first asker did not claim");
        };
        let Joined::Following(mut rx) = inflight.join(&d, true) else {
            panic!("the second asker did not follow");
        };
        assert!(matches!(*rx.borrow_and_update(), Arrival::Claimed { .. }));
        let file = tempfile::tempfile().unwrap();
        let receiving = inflight.receiving(&d, 3, file, 0).unwrap();
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
        let Joined::Claimed { .. } = inflight.join(&d, true) else {
            panic!()
        };
        let Joined::Following(rx) = inflight.join(&d, true) else {
            panic!()
        };
        inflight.settle(&d, Arrival::Stored);
        assert!(matches!(*rx.borrow(), Arrival::Stored));
        assert!(matches!(inflight.join(&d, false), Joined::Nothing));
        // A put under way is not a claim: settling leaves it alone.
        let receiving = inflight.receiving(&d, 3, tempfile::tempfile().unwrap(), 0);
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
        let Joined::Claimed { id, .. } = inflight.join(&d, true) else {
            panic!()
        };
        let Joined::Following(rx) = inflight.join(&d, false) else {
            panic!()
        };
        inflight.lapse(&d, id);
        assert!(matches!(*rx.borrow(), Arrival::Failed));
        let Joined::Claimed { resume: None, .. } = inflight.join(&d, true) else {
            panic!("the blob was not free to claim again")
        };
        let Joined::Following(rx) = inflight.join(&d, false) else {
            panic!()
        };
        drop(inflight.receiving(&d, 3, tempfile::tempfile().unwrap(), 0));
        assert!(matches!(*rx.borrow(), Arrival::Failed));
        assert!(matches!(inflight.join(&d, false), Joined::Nothing));
    }

    /// A put that breaks off keeps its bytes: the next claimant resumes from them, a lapse of
    /// its claim stalls the blob again, and an unclaimed stall expires.
    #[test]
    fn a_broken_put_stalls_and_the_next_claim_resumes_where_it_stopped() {
        let store_dir = tempfile::tempdir().unwrap();
        let store = ossb_image::store::BlobStore::open(store_dir.path()).unwrap();
        let inflight = Arc::new(Inflight::default());
        let d = Digest::of(b"abcdef");
        let Joined::Claimed { .. } = inflight.join(&d, true) else {
            panic!()
        };
        let mut partial = store.partial().unwrap();
        partial.write(b"abc").unwrap();
        let receiving = inflight
            .receiving(&d, 6, partial.reader().unwrap(), 0)
            .unwrap();
        let Joined::Following(follower) = inflight.join(&d, true) else {
            panic!()
        };
        receiving.stall(partial);
        assert!(matches!(*follower.borrow(), Arrival::Stalled { .. }));
        // A stalled blob is not followed, and only a claim takes it up.
        assert!(matches!(inflight.join(&d, false), Joined::Nothing));
        let Joined::Claimed {
            id,
            resume: Some(resume),
        } = inflight.join(&d, true)
        else {
            panic!("the next claim did not resume")
        };
        assert_eq!(resume.from, 3);
        let mut kept = String::new();
        std::io::Read::read_to_string(&mut { resume.file }, &mut kept).unwrap();
        assert_eq!(kept, "abc");
        // Its fetcher dies before its put: stalled again, the bytes still kept.
        let stall = inflight.lapse(&d, id).expect("the blob stalls again");
        let Joined::Claimed {
            resume: Some(_), ..
        } = inflight.join(&d, true)
        else {
            panic!()
        };
        assert!(
            inflight.take_kept(&d, 2).is_none(),
            "a wrong offset is refused"
        );
        let mut kept = inflight
            .take_kept(&d, 3)
            .expect("the resumed put takes the bytes");
        kept.write(b"def").unwrap();
        assert_eq!(kept.digest(), d);
        // An old stall's expiry does not touch the blob claimed since.
        inflight.expire(&d, stall);
        assert!(matches!(inflight.join(&d, false), Joined::Following(_)));
    }

    #[test]
    fn an_unclaimed_stall_expires() {
        let store_dir = tempfile::tempdir().unwrap();
        let store = ossb_image::store::BlobStore::open(store_dir.path()).unwrap();
        let inflight = Arc::new(Inflight::default());
        let d = Digest::of(b"abcdef");
        let partial = store.partial().unwrap();
        let receiving = inflight
            .receiving(&d, 6, partial.reader().unwrap(), 0)
            .unwrap();
        let stall = receiving.stall(partial);
        inflight.expire(&d, stall);
        let Joined::Claimed { resume: None, .. } = inflight.join(&d, true) else {
            panic!("the expired stall was not dropped")
        };
    }
}
