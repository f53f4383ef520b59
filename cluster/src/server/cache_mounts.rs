//! Cache mounts that follow the build: the latest content of each `RUN --mount=type=cache`
//! directory, by platform and id, as the last task that succeeded and changed it left it (a
//! blob in the peer cache). A task's worker asks for the ones its steps use before it runs
//! and brings them in; afterwards it publishes those it changed.

use super::*;

/// The versions of `ids` on `task`'s platform that the cluster holds.
pub(super) fn cache_mount_versions(
    state: &State,
    task: u64,
    ids: &[String],
) -> Result<Vec<CacheMountVersion>, String> {
    let inner = state.lock();
    let platform = platform_of(&inner, task)?;
    Ok(ids
        .iter()
        .filter_map(|id| inner.cache_mounts.get(&(platform.clone(), id.clone())))
        .cloned()
        .collect())
}

/// Makes `version` the cache mount's latest content on `task`'s platform, in memory and in
/// the state database.
pub(super) async fn publish_cache_mount(
    state: &Arc<State>,
    task: u64,
    version: CacheMountVersion,
) -> Result<(), String> {
    let platform = {
        let mut inner = state.lock();
        let platform = platform_of(&inner, task)?;
        inner
            .cache_mounts
            .insert((platform.clone(), version.id.clone()), version.clone());
        platform
    };
    let records = state.records.clone();
    tokio::task::spawn_blocking(move || records.set_cache_mount(&platform, &version))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn platform_of(inner: &Inner, task: u64) -> Result<String, String> {
    inner
        .tasks
        .get(&task)
        .map(|t| t.runs_on.to_string())
        .ok_or_else(|| format!("task {task} is not running here"))
}
