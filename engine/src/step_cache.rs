//! The step cache chain, in one place (as BuildKit's combined cache), over the levels that
//! implement [`CacheLevel`]: a step's record comes from the local cache (its layer blob still
//! in the store), then a `--cache-from` source; then, holding the claim that lets one platform
//! of the build run a step the platforms share, from the cluster's step records (a worker's
//! task). A hit is kept by the levels before the one that had it; a step that runs is put into
//! every level that keeps records: the local cache, this build's own runs, the cluster.
//!
//! `ossb build` and a cluster worker go through this chain alike; a worker's differs only in
//! having [`Shared::cluster`].

use std::collections::HashMap;

use ossb_protocol::Platform;

use crate::cache::{CacheKey, CacheLevel, CacheRecord};
use crate::remote_cache::CacheFrom;
use crate::stage::Shared;

/// What the chain answered for a key.
pub(crate) enum Lookup {
    /// A record: the step is cached.
    Hit(Box<CacheRecord>),
    /// None: the caller runs the step, holding the claim until it [`put`]s the record.
    Miss(Claim),
}

/// The right to run a step key in this build; the other platforms asking for the key wait.
pub(crate) struct Claim {
    _guard: StepLock,
}

/// The record of `key` from the first level that has it, or the claim to run it. Under
/// `--no-cache` only this build's own runs count locally, and the cluster decides what it
/// may reuse (this build's steps only).
pub(crate) async fn get_or_claim(
    shared: &Shared<'_>,
    platform: &Platform,
    key: &CacheKey,
) -> Lookup {
    let cache_from = CacheFrom { shared, platform };
    let before_claim: [&dyn CacheLevel; 2] = [&shared.cache, &cache_from];
    let no_cache = shared.req.no_cache;
    if !no_cache {
        if let Some(record) = first_hit(shared, &before_claim, key).await {
            return Lookup::Hit(Box::new(record));
        }
    }
    let guard = in_build_lock(key).await;
    // Another platform of this build may have run it while this one waited.
    if !no_cache || built_here(shared, key) {
        if let Some(record) = first_hit(shared, &before_claim, key).await {
            return Lookup::Hit(Box::new(record));
        }
    }
    if let Some(cluster) = shared.cluster {
        if let Some(record) = first_hit(shared, &[&shared.cache, cluster], key).await {
            return Lookup::Hit(Box::new(record));
        }
    }
    Lookup::Miss(Claim { _guard: guard })
}

/// The record of `key` from the first of `levels` that has one, kept by the levels before it
/// (the local cache) too.
async fn first_hit(
    shared: &Shared<'_>,
    levels: &[&dyn CacheLevel],
    key: &CacheKey,
) -> Option<CacheRecord> {
    for (n, level) in levels.iter().enumerate() {
        if let Some(record) = level.get(key, &shared.store).await {
            for earlier in &levels[..n] {
                earlier.put(key, &record, &shared.store).await;
            }
            return Some(record);
        }
    }
    None
}

/// Records a step this build ran in every level that keeps records (the local cache, the
/// cluster's), then releases its claim.
pub(crate) async fn put(shared: &Shared<'_>, key: &CacheKey, record: &CacheRecord, claim: Claim) {
    let keeping: [Option<&dyn CacheLevel>; 2] = [Some(&shared.cache), shared.cluster];
    shared
        .built
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(*key);
    for level in keeping.into_iter().flatten() {
        level.put(key, record, &shared.store).await;
    }
    drop(claim);
}

/// Queues a step (run or cached) for the `--cache-to mode=max` export at the end of the build
/// (`mode=min` exports the final images' chains).
pub(crate) fn export(
    shared: &Shared<'_>,
    platform: &Platform,
    key: &CacheKey,
    record: &CacheRecord,
) {
    let max = shared
        .req
        .cache_to
        .as_ref()
        .is_some_and(|c| c.mode == crate::remote_cache::CacheMode::Max);
    if max {
        shared
            .cache_exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((*key, record.clone(), platform.clone()));
    }
}

/// One lock per step key being run in this process: platforms of one build, and builds run
/// together (`ossb bake`'s targets), that share a step run it once; the others wait and find
/// its record. A lock nobody holds or waits for is dropped with its entry.
static RUNNING: std::sync::LazyLock<
    std::sync::Mutex<HashMap<CacheKey, std::sync::Arc<tokio::sync::Mutex<()>>>>,
> = std::sync::LazyLock::new(Default::default);

/// Waits until no other build or platform in this process runs the step `key`, and holds it.
async fn in_build_lock(key: &CacheKey) -> StepLock {
    let lock = {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
        running.entry(*key).or_default().clone()
    };
    lock.lock_owned().await
}

/// Held while a step runs.
pub(crate) type StepLock = tokio::sync::OwnedMutexGuard<()>;

/// Whether this build ran `key` (its record is fresh even under `--no-cache`).
fn built_here(shared: &Shared<'_>, key: &CacheKey) -> bool {
    shared
        .built
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(key)
}
