//! The cluster's step cache as a task's engine sees it.

use super::inputs::{bring, put, Brought};
use super::*;

/// The cluster's step cache as a task's engine sees it: records by cache key from the
/// coordinator (which makes one task build a key while the others wait), layer blobs through
/// the peer cache.
///
/// A step's layer goes to the peer cache and its record to the coordinator in the background,
/// while the next steps run; [`ClusterSteps::finish`] waits for them before the task reports
/// its end (the tasks of later stages look for those records).
pub(super) struct ClusterSteps {
    pub(super) node: Arc<Node>,
    pub(super) conn: quinn::Connection,
    pub(super) task: u64,
    pub(super) publishing: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Layers of stages other tasks built that steps read, brought from the peer cache:
    /// how many, and their bytes.
    pub(super) brought: (AtomicU64, AtomicU64),
    /// The task's registry client, for blobs of images the engine reads late.
    pub(super) registry: Option<Registry>,
}

/// Asks the coordinator one question on a stream of its own.
pub(super) async fn ask(
    conn: &quinn::Connection,
    message: ClusterMessage,
) -> Result<ClusterMessage, ClusterError> {
    let (mut tx, mut rx) = conn.open_bi().await.map_err(ossb_net::NetError::from)?;
    send(&mut tx, message).await?;
    let _ = tx.finish();
    recv(&mut rx, "the coordinator").await
}

impl ClusterSteps {
    async fn ask(&self, message: ClusterMessage) -> Result<ClusterMessage, ClusterError> {
        ask(&self.conn, message).await
    }

    /// Waits for the steps still being published.
    pub(super) async fn finish(&self) {
        let pending =
            std::mem::take(&mut *self.publishing.lock().unwrap_or_else(|e| e.into_inner()));
        for handle in pending {
            let _ = handle.await;
        }
    }

    async fn claim_step(&self, key: &CacheKey, store: &BlobStore) -> Option<CacheRecord> {
        let answer = self
            .ask(ClusterMessage::ClaimStep {
                task: self.task,
                key: *key.as_bytes(),
            })
            .await;
        let record = match answer {
            Ok(ClusterMessage::StepRecord { record }) => record,
            Ok(ClusterMessage::BuildStep) => return None,
            Ok(other) => {
                tracing::warn!(message = ?other, "unexpected answer to a step claim");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's step cache did not answer; building the step here");
                return None;
            }
        };
        let record: CacheRecord = serde_json::from_str(&record)
            .map_err(|e| tracing::warn!(error = %e, "an invalid step record"))
            .ok()?;
        if let Some(layer) = record.layer.as_ref().filter(|l| !store.contains(&l.digest)) {
            let peers = self.node.peers.as_ref()?;
            match peers.get_to_store(&layer.digest, store).await {
                Ok(n) => {
                    let c = &self.node.counters;
                    c.step_layers_peer.fetch_add(1, Ordering::Relaxed);
                    c.bytes_peer.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(digest = %layer.digest, error = %e, "a step's layer is not in the peer cache; building the step here");
                    return None;
                }
            }
        }
        self.node
            .counters
            .steps_cluster
            .fetch_add(1, Ordering::Relaxed);
        Some(record)
    }

    /// Hands `digest` to the peer cache in the background.
    pub(super) fn publish_blob(&self, digest: Digest, store: &BlobStore) {
        let (node, store) = (self.node.clone(), store.clone());
        let handle = tokio::spawn(async move {
            put(&node, &digest, &store).await;
        });
        self.publishing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    async fn bring_blob(&self, digest: &Digest, store: &BlobStore) -> Result<u64, String> {
        let peers = self
            .node
            .peers
            .as_ref()
            .ok_or("this worker has no --cache-peers")?;
        let n = peers
            .get_to_store(digest, store)
            .await
            .map_err(|e| e.to_string())?;
        let c = &self.node.counters;
        c.step_layers_peer.fetch_add(1, Ordering::Relaxed);
        c.bytes_peer.fetch_add(n, Ordering::Relaxed);
        self.brought.0.fetch_add(1, Ordering::Relaxed);
        self.brought.1.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    fn publish_step(&self, key: &CacheKey, record: &CacheRecord, store: &BlobStore) {
        if record.layer.is_some() && self.node.peers.is_none() {
            return; // a record whose layer nobody else can fetch helps nobody
        }
        let Ok(json) = serde_json::to_string(record) else {
            return;
        };
        let (node, conn, store) = (self.node.clone(), self.conn.clone(), store.clone());
        let (task, key, layer) = (self.task, *key.as_bytes(), record.layer.clone());
        let handle = tokio::spawn(async move {
            if let Some(layer) = layer {
                if !put(&node, &layer.digest, &store).await {
                    return;
                }
            }
            let message = ClusterMessage::PublishStep {
                task,
                key,
                record: json,
            };
            if let Err(e) = ask(&conn, message).await {
                tracing::warn!(error = %e, "publishing a step record failed");
            }
        });
        self.publishing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }
}

impl CacheLevel for ClusterSteps {
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, Option<CacheRecord>> {
        Box::pin(self.claim_step(key, store))
    }

    fn put<'a>(
        &'a self,
        key: &'a CacheKey,
        record: &'a CacheRecord,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        self.publish_step(key, record, store);
        Box::pin(std::future::ready(()))
    }

    fn blob<'a>(
        &'a self,
        digest: &'a Digest,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, Result<u64, String>> {
        Box::pin(self.bring_blob(digest, store))
    }

    fn image_blob<'a>(
        &'a self,
        reference: &'a Reference,
        blob: &'a Descriptor,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let (Some(peers), Some(registry)) = (&self.node.peers, &self.registry) else {
                return;
            };
            let c = &self.node.counters;
            match bring(peers, registry, reference, blob, store, self).await {
                Some(Brought::Peer(n)) => {
                    c.blobs_peer.fetch_add(1, Ordering::Relaxed);
                    c.bytes_peer.fetch_add(n, Ordering::Relaxed);
                }
                Some(Brought::Registry { registry, peer }) => {
                    c.blobs_registry.fetch_add(1, Ordering::Relaxed);
                    c.bytes_registry.fetch_add(registry, Ordering::Relaxed);
                    c.bytes_peer.fetch_add(peer, Ordering::Relaxed);
                }
                None => {}
            }
        })
    }
}
