//! Cache mounts that follow the build (the coordinator's side is `server/cache_mounts.rs`):
//! before a task runs, the cache mounts its steps use are brought to the cluster's latest
//! content from the peer cache; after it succeeded, those it changed are published there, so
//! the next task on any worker of the platform starts warm.

use std::path::{Path, PathBuf};

use ossb_dockerfile::{BuildPlan, Instruction, MountType};
use ossb_protocol::cluster::CacheMountVersion;
use ossb_worker::shared_cache;

use super::inputs::put;
use super::*;

/// The cache ids the task's steps mount, from its plan (made without the base images, which
/// only an `ENV` of a base could change); none without one.
pub(super) fn ids_of(plan: Option<&BuildPlan>) -> Vec<String> {
    let Some(plan) = plan else {
        return Vec::new();
    };
    let mut ids: Vec<String> = plan
        .stages
        .iter()
        .flat_map(|s| &s.steps)
        .filter_map(|step| match &step.instruction {
            Instruction::Run(run) => Some(&run.mounts),
            _ => None,
        })
        .flatten()
        .filter(|m| m.kind == MountType::Cache)
        .map(|m| m.id.clone().unwrap_or_else(|| m.target.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Brings each of `ids` that the cluster holds newer content of into this worker's cache
/// directory. Best effort: a cache mount that cannot be brought starts from what is here.
pub(super) async fn bring(
    node: &Node,
    conn: &quinn::Connection,
    task: u64,
    ids: &[String],
    store: &BlobStore,
    cache_dir: &Path,
    progress: &dyn Progress,
) {
    let Some(peers) = node.peers.as_ref().filter(|_| !ids.is_empty()) else {
        return;
    };
    let asked = ClusterMessage::CacheMounts {
        task,
        ids: ids.to_vec(),
    };
    let versions = match super::steps::ask(conn, asked).await {
        Ok(ClusterMessage::CacheMountVersions { versions }) => versions,
        Ok(other) => {
            tracing::warn!(got = other.kind(), "unexpected answer about cache mounts");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "asking for the cache mounts failed");
            return;
        }
    };
    for version in versions {
        let (dir, id, digest) = (cache_dir.to_path_buf(), version.id.clone(), version.digest);
        let here = tokio::task::spawn_blocking(move || shared_cache::current(&dir, &id)).await;
        if matches!(here, Ok(Some(d)) if d == digest) {
            continue;
        }
        let brought = async {
            peers
                .get_to_store(&digest, store)
                .await
                .map_err(|e| e.to_string())?;
            let (dir, id, store) = (cache_dir.to_path_buf(), version.id.clone(), store.clone());
            tokio::task::spawn_blocking(move || {
                let blob = std::fs::File::open(store.path(&digest))?;
                shared_cache::import(&dir, &id, &digest, blob)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        };
        match brought.await {
            Ok(()) => progress.event(Event::Info(format!(
                "cache mount {}: brought from the peer cache ({} bytes), as the last task that wrote it left it",
                ossb_dockerfile::clip(&version.id, 100),
                version.size
            ))),
            Err(e) => {
                tracing::warn!(id = %version.id, error = %e, "bringing a cache mount failed")
            }
        }
    }
}

/// Publishes each of `ids` that this task's steps changed: the blob to the peer cache, then
/// its digest to the coordinator. Best effort, logged.
pub(super) async fn publish(
    node: &Node,
    conn: &quinn::Connection,
    task: u64,
    ids: &[String],
    store: &BlobStore,
    cache_dir: &Path,
) {
    if node.peers.is_none() {
        return;
    }
    for id in ids {
        let (dir, owned, blobs): (PathBuf, String, BlobStore) =
            (cache_dir.to_path_buf(), id.clone(), store.clone());
        let exported = tokio::task::spawn_blocking(move || {
            let mut w = blobs.writer().map_err(|e| e.to_string())?;
            match shared_cache::export(&dir, &owned, &mut w).map_err(|e| e.to_string())? {
                None => Ok(None),
                Some(export) => {
                    w.commit(Some(&export.layer.digest))
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(Some(export))
                }
            }
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let export = match exported {
            Ok(Some(export)) => export,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(%id, error = %e, "exporting a cache mount failed");
                continue;
            }
        };
        let digest = export.layer.digest;
        if !put(node, &digest, store).await {
            continue;
        }
        let version = CacheMountVersion {
            id: id.clone(),
            digest,
            size: export.layer.size,
        };
        match super::steps::ask(conn, ClusterMessage::PublishCacheMount { task, version }).await {
            Ok(ClusterMessage::Stored) => {
                if let Err(e) = shared_cache::exported(cache_dir, id, &export) {
                    tracing::warn!(%id, error = %e, "recording a cache mount's export failed");
                }
            }
            Ok(other) => tracing::warn!(got = other.kind(), "unexpected answer to a cache mount"),
            Err(e) => tracing::warn!(%id, error = %e, "publishing a cache mount failed"),
        }
    }
}
