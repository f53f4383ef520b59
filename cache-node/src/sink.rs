//! Received blob bytes written and hashed off the async runtime.
//!
//! sha256 and the disk write cost more per byte than QUIC's decryption; done on the runtime's
//! threads they keep quinn from draining the UDP socket, and the packets a full socket buffer
//! drops look to quinn like an MTU black hole (it then falls back to 1200-byte packets, several
//! times the per-byte cost). A blocking thread of its own does that work here, fed batches of
//! the chunks quinn hands over.

use bytes::Bytes;
use ossb_image::store::{PartialBlob, StoreError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes of received chunks handed to the writer thread at once (one wake-up per batch, not
/// per packet).
const BATCH: usize = 256 << 10;
/// Batches queued for the writer thread (8 MiB): the transfer waits when the disk does.
const QUEUE: usize = 32;

/// Told how many bytes a blob being received holds on disk.
pub(crate) type Written = Box<dyn Fn(u64) + Send>;

/// Appends chunks to a [`PartialBlob`] on a blocking thread.
pub(crate) struct Sink {
    tx: mpsc::Sender<Vec<Bytes>>,
    batch: Vec<Bytes>,
    batched: usize,
    /// Bytes the blob holds once everything pushed is written.
    len: u64,
    writer: JoinHandle<(PartialBlob, Option<StoreError>)>,
}

impl Sink {
    /// Starts the writer thread for `partial` (which may hold bytes already).
    pub(crate) fn new(partial: PartialBlob) -> Sink {
        Sink::watched(partial, None)
    }

    /// As [`Sink::new`], telling `written` how many bytes the file holds after each batch
    /// (flushed first): readers of a blob still arriving follow it.
    pub(crate) fn watched(partial: PartialBlob, written: Option<Written>) -> Sink {
        let len = partial.len();
        let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(QUEUE);
        let writer = tokio::task::spawn_blocking(move || {
            let mut partial = partial;
            let mut failed = None;
            while let Some(batch) = rx.blocking_recv() {
                if failed.is_none() {
                    failed = partial.write_pieces(&batch).err();
                }
                if let (Some(written), None) = (&written, &failed) {
                    failed = partial.flush().err();
                    if failed.is_none() {
                        written(partial.len());
                    }
                }
            }
            (partial, failed)
        });
        Sink {
            tx,
            batch: Vec::new(),
            batched: 0,
            len,
            writer,
        }
    }

    /// Bytes pushed so far (those the blob held when the sink started included).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Queues a chunk; false when the writer thread is gone.
    pub(crate) async fn push(&mut self, chunk: Bytes) -> bool {
        self.len += chunk.len() as u64;
        self.batched += chunk.len();
        self.batch.push(chunk);
        if self.batched < BATCH {
            return true;
        }
        self.send_batch().await
    }

    /// Hands what is batched to the writer thread now; false when it is gone.
    pub(crate) async fn send_batch(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        self.batched = 0;
        self.tx.send(std::mem::take(&mut self.batch)).await.is_ok()
    }

    /// Writes what is queued and hands the blob back, with the write error if one occurred
    /// (the blob then holds only the bytes before it).
    pub(crate) async fn finish(self) -> (PartialBlob, Option<StoreError>) {
        if !self.batch.is_empty() {
            let _ = self.tx.send(self.batch).await;
        }
        drop(self.tx);
        match self.writer.await {
            Ok(done) => done,
            // The writer only panics on a bug: let it surface as one.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
