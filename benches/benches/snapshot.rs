//! What a step's snapshot costs against the size of the rootfs: a metadata snapshot before the
//! step, one after, and their diff, for rootfs of 1k, 10k and 100k files where the step changes
//! one file. The figure that matters is the time per step, which with the metadata fallback
//! grows with the rootfs, not with the change.
//!
//! `cargo bench -p ossb-benches --bench snapshot`

use std::path::Path;
use std::time::{Duration, Instant};

use ossb_worker::snapshot::Snapshot;

/// A rootfs of `n` small files in directories of 1000.
fn make_rootfs(root: &Path, n: usize) {
    for i in 0..n {
        let dir = root.join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
    }
}

fn main() {
    println!("snapshot before + after + diff, one file changed (metadata fallback; median of 5)");
    let mut per_file = Vec::new();
    for n in [1_000usize, 10_000, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        make_rootfs(dir.path(), n);
        let mut times: Vec<(Duration, Duration, Duration)> = Vec::new();
        for round in 0..5 {
            let t0 = Instant::now();
            let before = Snapshot::take(dir.path(), &[]).unwrap();
            let t1 = Instant::now();
            std::fs::write(dir.path().join("d0/f0"), format!("{round}")).unwrap();
            let t2 = Instant::now();
            let after = Snapshot::take(dir.path(), &[]).unwrap();
            let changes = before.diff(&after);
            let t3 = Instant::now();
            assert_eq!(changes.len(), 1, "{changes:?}");
            times.push((t1 - t0, t3 - t2, t3 - t2 + (t1 - t0)));
        }
        times.sort_by_key(|t| t.2);
        let (take, take_diff, total) = times[2];
        println!(
            "{n:>7} files  snapshot {:>8.1} ms  snapshot+diff {:>8.1} ms  per step {:>8.1} ms  ({:.2} µs/file)",
            take.as_secs_f64() * 1e3,
            take_diff.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e6 / n as f64
        );
        per_file.push((n, total));
    }
    let (n0, t0) = per_file[0];
    let (n2, t2) = per_file[2];
    println!(
        "ratio {n2} / {n0} files: {:.1}x the time for {:.0}x the files (the fallback walks the whole rootfs)",
        t2.as_secs_f64() / t0.as_secs_f64(),
        n2 as f64 / n0 as f64
    );
}
