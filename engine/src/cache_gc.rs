//! Garbage collection after every build, so that a cache never fills its disk: the default
//! policy of BuildKit's daemon (keep a fifth of the filesystem free; never take the cache below
//! a tenth of the disk, at most 10 GB), run by the build that finds the disk short, since there
//! is no daemon to run it.
//!
//! - When there is room it costs one `statvfs`.
//! - When the disk is short, the least recently used blobs go (blobs no step record refers to
//!   first, as `ossb cache prune --keep-storage` removes them) until a fifth of the disk is
//!   free or the cache is down to its reserve. Blobs the collecting build used are spared:
//!   its caller may still read them (a cluster worker pushes the image after the build).
//! - It needs the cache to itself: it tries the exclusive lease without waiting, so a build
//!   that finishes while another runs on the same cache leaves the work to the next one. A
//!   cluster worker runs it after every task, once the task has pushed and reported; since its
//!   slots may never all be free at once, a worker that finds a pass [`due`] starts no new
//!   task until its running ones end, and then collects.
//! - When the cache is at its reserve and the disk is still short, what fills the disk is not
//!   the cache: the next builds skip the listing until the disk has lost another [`SLACK`]
//!   bytes (`cache/gc.json` keeps what such a pass left free).

use std::path::Path;
use std::time::{Duration, SystemTime};

use ossb_image::store::{BlobStore, Lease};
use serde::{Deserialize, Serialize};

use crate::cache::{prune_locked, PruneOptions, PruneReport};

/// BuildKit's defaults: the share of the disk kept free, and of the disk the cache may keep
/// whatever the free space (at most [`RESERVE_MAX`]).
const FREE_PERCENT: u64 = 20;
/// A pass frees this share of the disk more than is missing, so that the next builds do not
/// find the disk short again at once (a cluster worker stops starting tasks for each pass).
const HEADROOM_PERCENT: u64 = 5;
const RESERVE_PERCENT: u64 = 10;
const RESERVE_MAX: u64 = 10_000_000_000;
/// How much more of the disk must fill before a pass that could not help is tried again (at
/// most a twentieth of the disk).
const SLACK: u64 = 1 << 30;
const STATE_FILE: &str = "cache/gc.json";
/// How far before a build's start a blob it wrote may be stamped: file times come from the
/// kernel's coarse clock, a tick (1-10 ms) behind the one the build read.
const TIME_SLACK: Duration = Duration::from_millis(50);

/// What the last pass left free.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    free_after: u64,
}

/// The filesystem holding the cache: its size and what is free for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Its size in bytes.
    pub total: u64,
    /// Bytes free for an unprivileged writer.
    pub free: u64,
}

impl Disk {
    fn of(path: &Path) -> Option<Disk> {
        let s = nix::sys::statvfs::statvfs(path).ok()?;
        let unit = s.fragment_size();
        Some(Disk {
            total: s.blocks().saturating_mul(unit),
            free: s.blocks_available().saturating_mul(unit),
        })
    }

    /// Whether the disk is short of free space.
    fn short(&self) -> bool {
        self.free < self.total / 100 * FREE_PERCENT
    }
}

/// The size the blobs of a cache of `usage` bytes are pruned to on `disk`, if they are to be:
/// down by the free space missing and the headroom, but never below the reserve.
pub fn keep_bytes(disk: Disk, usage: u64) -> Option<u64> {
    if !disk.short() {
        return None;
    }
    let missing = disk.total / 100 * (FREE_PERCENT + HEADROOM_PERCENT) - disk.free;
    let reserve = (disk.total / 100 * RESERVE_PERCENT).min(RESERVE_MAX);
    let keep = usage.saturating_sub(missing).max(reserve);
    (keep < usage).then_some(keep)
}

/// Collects the cache in `cache_dir` if its disk is short (see the module documentation),
/// sparing the blobs used since `started`, when the build (or cluster task) that collects
/// began: its image and inputs, which its caller may still read, push or export. Returns
/// what was removed, when anything was. Never fails a build: problems are logged.
pub fn after_build(cache_dir: &Path, started: SystemTime) -> Option<PruneReport> {
    let disk = due(cache_dir)?;
    let state_path = cache_dir.join(STATE_FILE);
    let store = BlobStore::open(cache_dir).ok()?;
    let lease = Lease::try_exclusive(&store).ok()??;
    let report = match store.usage() {
        Ok(usage) => match keep_bytes(disk, usage.bytes) {
            Some(keep) => {
                let opts = PruneOptions {
                    keep_bytes: Some(keep),
                    // A file's time can trail the clock read before it was written by a tick.
                    spare_used_since: Some(started - TIME_SLACK),
                    ..PruneOptions::default()
                };
                prune_locked(cache_dir, &opts, &lease)
                    .inspect_err(|e| {
                        tracing::warn!("collecting the cache {}: {e}", cache_dir.display())
                    })
                    .ok()
            }
            None => None,
        },
        Err(e) => {
            tracing::warn!("measuring the cache {}: {e}", cache_dir.display());
            None
        }
    };
    // Still short: remembered, so that the next builds do not list the cache in vain.
    match Disk::of(cache_dir).filter(Disk::short) {
        Some(after) => {
            let state = State {
                free_after: after.free,
            };
            if let Ok(bytes) = serde_json::to_vec(&state) {
                let _ = crate::cache::write_atomic(&state_path, &bytes);
            }
        }
        None => {
            let _ = std::fs::remove_file(&state_path);
        }
    }
    drop(lease);
    report
}

/// The disk of the cache in `cache_dir` when a pass is due: the disk is short and a pass may
/// free something. Cheap (a `statvfs`, and a small file read when the disk is short), so a
/// cluster worker asks before it stops starting tasks to collect.
pub fn due(cache_dir: &Path) -> Option<Disk> {
    let disk = Disk::of(cache_dir)?;
    if !disk.short() {
        return None;
    }
    let state: State = std::fs::read(cache_dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    worth_a_pass(disk, &state).then_some(disk)
}

/// Whether a pass may free anything: not when the last one left the disk short (the cache was
/// at its reserve) and the disk has not lost much more since.
fn worth_a_pass(disk: Disk, last: &State) -> bool {
    let slack = SLACK.min(disk.total / 20);
    last.free_after == 0 || disk.free + slack <= last.free_after
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    #[test]
    fn a_pass_that_could_not_help_is_tried_again_only_once_the_disk_fills_more() {
        let disk = |free| Disk {
            total: 100 * GB,
            free,
        };
        assert!(worth_a_pass(disk(10 * GB), &State::default()));
        let last = State {
            free_after: 10 * GB,
        };
        assert!(!worth_a_pass(disk(10 * GB), &last));
        // Another GiB filled since the last pass: worth another.
        assert!(!worth_a_pass(disk(10 * GB - (1 << 30) + 1), &last));
        assert!(worth_a_pass(disk(10 * GB - (1 << 30)), &last));
        assert!(worth_a_pass(disk(8 * GB), &last));
    }

    #[test]
    fn nothing_goes_while_a_fifth_of_the_disk_is_free() {
        let disk = Disk {
            total: 100 * GB,
            free: 20 * GB,
        };
        assert_eq!(keep_bytes(disk, 70 * GB), None);
    }

    #[test]
    fn the_cache_gives_back_what_the_disk_is_missing_down_to_its_reserve() {
        let disk = Disk {
            total: 100 * GB,
            free: 15 * GB,
        };
        // 5 GB missing from a 50 GB cache, and 5 GB of headroom.
        assert_eq!(keep_bytes(disk, 50 * GB), Some(40 * GB));
        // A 12 GB cache stops at its 10 GB reserve.
        assert_eq!(keep_bytes(disk, 12 * GB), Some(10 * GB));
        // Below its reserve it keeps everything: something else fills the disk.
        assert_eq!(keep_bytes(disk, 8 * GB), None);
        // On a small disk the reserve is a tenth of it.
        let small = Disk {
            total: 64_000_000,
            free: 6_000_000,
        };
        assert_eq!(keep_bytes(small, 40_000_000), Some(30_000_000));
        assert_eq!(keep_bytes(small, 7_000_000), Some(6_400_000));
    }
}
