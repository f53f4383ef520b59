//! Unpacked filesystems kept between builds, as BuildKit keeps its snapshots.
//!
//! A build leaves each stage it unpacked in the state its steps left it, which is what its
//! layers hold. Rather than remove those trees when the build ends, the build hands them to
//! this pool, keyed by the layers they hold; a later build that needs those layers, or the
//! first few of them, takes the tree (a rename) and applies only the rest.
//!
//! This saves more than the unpacking. Removing a tree and then creating as many files is
//! slow on some filesystems: ext4 without a journal skips inodes freed in the last minutes and
//! rescans for every create, so a build that removed 20,000 files made the next build's
//! 20,000 creates take 4-7 times as long (BENCHMARKS.md). Trees are removed only when the
//! pool is full, in one batch down to half, or when the disk runs low.
//!
//! A tree is taken whole by one build (a rename, so two builds never share one), and handed
//! back whole: only trees of stages that finished are kept, never one a failed step left.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ossb_protocol::Digest;

/// The most trees kept; when a build adds one more, the least recently kept go down to half.
const MAX_KEPT: usize = 8;
/// The free space kept on the pool's filesystem: below it, trees go, oldest first. Bytes, not
/// a share of the filesystem: a thin-provisioned disk reports a size it may never have.
const MIN_FREE: u64 = 4 << 30;
/// Trees kept are under `<cache>/rootfs/<key>/tree`; the entry's own mtime says when.
const TREE: &str = "tree";

/// The cache directory's kept trees, and the trees this build will hand back.
pub(crate) struct RootfsPool {
    dir: PathBuf,
    /// Whose trees these are: file owners on disk depend on the user namespace's id map.
    owner: String,
    /// Trees of finished stages, with the layers each holds, kept when the build ends.
    to_keep: Mutex<Vec<(PathBuf, Vec<Digest>)>>,
    /// [`MIN_FREE`], but for tests.
    min_free: u64,
}

impl RootfsPool {
    pub(crate) fn open(cache_dir: &Path) -> Self {
        RootfsPool {
            dir: cache_dir.join("rootfs"),
            owner: std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default(),
            to_keep: Mutex::new(Vec::new()),
            min_free: MIN_FREE,
        }
    }

    /// The pool's key for a tree holding `layers`, in order.
    fn key(&self, layers: &[Digest]) -> String {
        let mut text = format!("ossb rootfs v1\n{}\n", self.owner);
        for layer in layers {
            text.push_str(&layer.to_string());
            text.push('\n');
        }
        Digest::of(text.as_bytes()).hex()
    }

    /// Moves the kept tree holding the longest prefix of `layers` to `dest` (which must not
    /// exist); returns how many of `layers` it holds, 0 when none is kept.
    pub(crate) fn take(&self, layers: &[Digest], dest: &Path) -> usize {
        for n in (1..=layers.len()).rev() {
            let entry = self.dir.join(self.key(&layers[..n]));
            // Another build may take it first: then this one looks further.
            if std::fs::rename(entry.join(TREE), dest).is_ok() {
                let _ = std::fs::remove_dir(&entry);
                tracing::debug!(layers = n, "reusing a kept rootfs");
                return n;
            }
        }
        0
    }

    /// Hands `tree` (holding `layers`) back to the pool when the build ends.
    pub(crate) fn keep_at_end(&self, tree: &Path, layers: &[Digest]) {
        self.to_keep
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((tree.to_path_buf(), layers.to_vec()));
    }

    /// Keeps the trees handed back; then evicts if the pool is full or the disk low.
    fn finish(&self) {
        let trees = std::mem::take(&mut *self.to_keep.lock().unwrap_or_else(|e| e.into_inner()));
        if trees.is_empty() {
            return;
        }
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::debug!("not keeping rootfs trees: {}: {e}", self.dir.display());
            return;
        }
        for (tree, layers) in trees {
            if layers.is_empty() || !tree.is_dir() {
                continue;
            }
            // Made aside and renamed into place, so a taker sees a whole entry or none.
            let Ok(staging) = tempfile::Builder::new()
                .prefix(".new-")
                .tempdir_in(&self.dir)
            else {
                continue;
            };
            let staging = staging.keep();
            let entry = self.dir.join(self.key(&layers));
            if std::fs::rename(&tree, staging.join(TREE)).is_err()
                || std::fs::rename(&staging, &entry).is_err()
            {
                // The same layers are kept already (another build's): this copy goes with
                // the work directory.
                let _ = std::fs::rename(staging.join(TREE), &tree);
                let _ = std::fs::remove_dir(&staging);
            }
        }
        self.evict();
    }

    /// Removes the least recently kept trees: down to half when over [`MAX_KEPT`], and while
    /// the filesystem has less than [`MIN_FREE`] free (the newest tree stays).
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut kept: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            // What an interrupted keep or eviction left.
            if name.to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            kept.push((modified, path));
        }
        kept.sort();
        let mut excess = match kept.len() > MAX_KEPT {
            true => kept.len() - MAX_KEPT / 2,
            false => 0,
        };
        for (_, path) in &kept[..kept.len().saturating_sub(1)] {
            if excess == 0 && !self.disk_low() {
                break;
            }
            excess = excess.saturating_sub(1);
            tracing::debug!("evicting the kept rootfs {}", path.display());
            remove(path);
        }
    }

    /// Whether the pool's filesystem has less than `min_free` bytes free.
    fn disk_low(&self) -> bool {
        match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()) < self.min_free,
            Err(_) => false,
        }
    }
}

/// The build is over (whether it succeeded or not): its finished stages' trees are kept. The
/// pool is dropped before the build's work directory (declared after it) is removed.
impl Drop for RootfsPool {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Removes a kept tree: first out of the pool's names (so no build takes it half-removed).
fn remove(entry: &Path) {
    let Some(dir) = entry.parent() else { return };
    let trash = dir.join(format!(
        ".gone-{}",
        entry.file_name().unwrap_or_default().to_string_lossy()
    ));
    if std::fs::rename(entry, &trash).is_ok() {
        let _ = std::fs::remove_dir_all(&trash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that never finds the disk low (the test machine's disk is not the subject).
    fn test_pool(cache: &Path) -> RootfsPool {
        let mut pool = RootfsPool::open(cache);
        pool.min_free = 0;
        pool
    }

    #[test]
    fn a_low_disk_leaves_only_the_newest_tree() {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut pool = test_pool(cache.path());
        for n in 0..3 {
            pool.keep_at_end(&tree(work.path(), &format!("t{n}"), "f"), &[digest(n)]);
            pool.finish();
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
        assert_eq!(std::fs::read_dir(&pool.dir).unwrap().count(), 3);
        pool.min_free = u64::MAX;
        pool.keep_at_end(&tree(work.path(), "t3", "f"), &[digest(3)]);
        pool.finish();
        let left: Vec<_> = std::fs::read_dir(&pool.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(left, vec![pool.dir.join(pool.key(&[digest(3)]))]);
    }

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn tree(dir: &Path, name: &str, file: &str) -> PathBuf {
        let tree = dir.join(name);
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc").join(file), file).unwrap();
        tree
    }

    #[test]
    fn a_kept_tree_is_taken_by_the_longest_prefix_of_layers_it_holds() {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let pool = test_pool(cache.path());
        let (a, b, c) = (digest(1), digest(2), digest(3));
        pool.keep_at_end(&tree(work.path(), "one", "a"), &[a]);
        pool.keep_at_end(&tree(work.path(), "two", "ab"), &[a, b]);
        pool.finish();
        assert!(
            !work.path().join("one").exists(),
            "kept trees move out of the work dir"
        );

        let dest = work.path().join("next");
        assert_eq!(pool.take(&[a, b, c], &dest), 2);
        assert!(dest.join("etc/ab").is_file());
        // Taken once: the next build falls back to the shorter prefix, then to nothing.
        let again = work.path().join("again");
        assert_eq!(pool.take(&[a, b, c], &again), 1);
        assert!(again.join("etc/a").is_file());
        assert_eq!(pool.take(&[a, b], &work.path().join("none")), 0);
        // Another order of the same layers is another tree.
        pool.keep_at_end(&dest, &[a, b]);
        pool.finish();
        assert_eq!(pool.take(&[b, a], &work.path().join("swapped")), 0);
    }

    #[test]
    fn a_second_tree_of_the_same_layers_stays_where_it_was() {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let pool = test_pool(cache.path());
        pool.keep_at_end(&tree(work.path(), "first", "x"), &[digest(1)]);
        pool.keep_at_end(&tree(work.path(), "second", "y"), &[digest(1)]);
        pool.finish();
        assert!(work.path().join("second/etc/y").is_file());
        let dest = work.path().join("taken");
        assert_eq!(pool.take(&[digest(1)], &dest), 1);
        assert!(dest.join("etc/x").is_file());
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_down_to_half() {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let pool = test_pool(cache.path());
        for n in 0..=MAX_KEPT as u8 {
            pool.keep_at_end(&tree(work.path(), &format!("t{n}"), "f"), &[digest(n)]);
            pool.finish();
            // Distinct mtimes order the entries.
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
        let left: Vec<u8> = (0..=MAX_KEPT as u8)
            .filter(|n| pool.dir.join(pool.key(&[digest(*n)])).exists())
            .collect();
        let newest: Vec<u8> =
            (MAX_KEPT as u8 + 1 - (MAX_KEPT / 2) as u8..=MAX_KEPT as u8).collect();
        assert_eq!(left, newest);
        assert_eq!(std::fs::read_dir(&pool.dir).unwrap().count(), MAX_KEPT / 2);
    }

    #[test]
    fn a_tree_of_another_id_map_is_not_taken() {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let pool = test_pool(cache.path());
        pool.keep_at_end(&tree(work.path(), "t", "f"), &[digest(1)]);
        pool.finish();
        let mut other = test_pool(cache.path());
        other.owner = "0 100000 65536\n".into();
        assert_eq!(other.take(&[digest(1)], &work.path().join("x")), 0);
        assert_eq!(pool.take(&[digest(1)], &work.path().join("y")), 1);
    }
}
