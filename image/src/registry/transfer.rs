//! Bytes moved by a pull or a push, for the progress display.
//!
//! A caller runs a pull or push inside [`counting`]; blob bytes received and sent within it
//! are added to its [`Transfer`]. The counter travels as a task-local value, so concurrent
//! pulls (two platforms) each count their own bytes; upload bodies, which the HTTP client
//! polls on its own task, take the counter along when they are made.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Blob bytes received and sent so far.
#[derive(Debug, Default)]
pub struct Transfer {
    received: AtomicU64,
    sent: AtomicU64,
}

impl Transfer {
    /// Bytes received (downloads).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes sent (uploads).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub(crate) fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }
}

tokio::task_local! {
    static CURRENT: Arc<Transfer>;
}

/// Runs `work`, counting the blob bytes its pulls and pushes move into `transfer`.
pub async fn counting<F: Future>(transfer: Arc<Transfer>, work: F) -> F::Output {
    CURRENT.scope(transfer, work).await
}

/// Counts `n` bytes received by the running pull, if it is counted.
pub(crate) fn received(n: u64) {
    let _ = CURRENT.try_with(|t| t.received.fetch_add(n, Ordering::Relaxed));
}

/// The counter of the running push, for an upload body to count what it sends.
pub(crate) fn current() -> Option<Arc<Transfer>> {
    CURRENT.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_within_its_scope_only() {
        let t = Arc::new(Transfer::default());
        received(5); // outside: nowhere to count
        counting(t.clone(), async {
            received(7);
            current().unwrap().add_sent(3);
        })
        .await;
        assert_eq!((t.received(), t.sent()), (7, 3));
        assert!(current().is_none());
    }
}
