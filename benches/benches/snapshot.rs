//! What finding a step's changes costs against the size of the rootfs, for a RUN step that
//! changes one file in rootfs of 1k, 10k and 100k files:
//!
//! - metadata fallback: a snapshot before the step, one after, and their diff; it walks the
//!   whole rootfs twice, so it grows with the rootfs, not with the change;
//! - overlayfs: creating the upper and work directories before the step, and after it walking
//!   the upper directory and merging it into the rootfs (`ossb_worker::overlay`); plus what the
//!   overlay mount adds to the step's own process, measured as the same step run with and
//!   without the mount (in a mount namespace, through `unshare`, as the sandbox does).
//!
//! `cargo bench -p ossb-benches --bench snapshot`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ossb_worker::overlay::Upper;
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

/// Runs `sh -c script` in a new mount namespace (and a user namespace when not root), as the
/// sandbox's step process would; false when namespaces are refused here.
fn in_namespace(script: &str) -> bool {
    let mut cmd = Command::new("unshare");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.args(["--mount", "sh", "-c", script])
        .status()
        .is_ok_and(|s| s.success())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    println!(
        "finding the changes of a RUN step that changes one file (median of 5 rounds)\n\
         {:>7}  {:>16}  {:>18}  {:>16}  {:>16}",
        "files", "fallback ms", "overlay create+merge", "step+mount ms", "step alone ms"
    );
    let mut rows = Vec::new();
    for n in [1_000usize, 10_000, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        make_rootfs(&rootfs, n);
        let (mut fallback, mut bookkeeping, mut with_mount, mut alone) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut overlay_ok = true;
        for round in 0..5 {
            // Fallback: snapshots around the step, which writes the rootfs directly.
            let t0 = Instant::now();
            let before = Snapshot::take(&rootfs, &[]).unwrap();
            let t1 = Instant::now();
            let step = format!("echo {round} > '{}/d0/f0'", rootfs.display());
            let ran = in_namespace(&step);
            let t2 = Instant::now();
            let after = Snapshot::take(&rootfs, &[]).unwrap();
            let changes = before.diff(&after);
            let t3 = Instant::now();
            if !ran {
                // No namespaces: the step's write, from here.
                std::fs::write(rootfs.join("d0/f0"), format!("{round}")).unwrap();
            }
            assert_eq!(changes.len().max(1), 1, "{changes:?}");
            fallback.push((t1 - t0) + (t3 - t2));
            alone.push(t2 - t1);

            // Overlay: the same step on the merged directory.
            if !overlay_ok || !ran {
                overlay_ok = false;
                continue;
            }
            let t0 = Instant::now();
            let upper = Upper::create(&rootfs).unwrap();
            let t1 = Instant::now();
            let d = upper.dirs();
            let step = format!(
                "mount -t overlay overlay -o '{}' '{}' && echo o{round} > '{}/d0/f0'",
                d.mount_options(&rootfs),
                d.merged.display(),
                d.merged.display()
            );
            if !in_namespace(&step) {
                overlay_ok = false;
                continue;
            }
            let t2 = Instant::now();
            let changes = upper.merge(&rootfs, &[], &[]).unwrap();
            let t3 = Instant::now();
            assert_eq!(changes.len(), 1, "{changes:?}");
            if std::env::var_os("OSSB_BENCH_DETAIL").is_some() {
                eprintln!("create {:?} merge {:?}", t1 - t0, t3 - t2);
            }
            bookkeeping.push((t1 - t0) + (t3 - t2));
            with_mount.push(t2 - t1);
        }
        let fallback = median(fallback);
        let alone = median(alone);
        if overlay_ok {
            let (book, step) = (median(bookkeeping), median(with_mount));
            println!(
                "{n:>7}  {:>16.2}  {:>20.2}  {:>16.2}  {:>16.2}",
                ms(fallback),
                ms(book),
                ms(step),
                ms(alone)
            );
            rows.push((n, fallback, book + step.saturating_sub(alone)));
        } else {
            println!(
                "{n:>7}  {:>16.2}  {:>20}  {:>16}  {:>16.2}",
                ms(fallback),
                "n/a",
                "n/a",
                ms(alone)
            );
        }
    }
    println!(
        "(overlay column: unavailable here when n/a; the fallback is then what every step pays)"
    );
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        println!(
            "per step, {} -> {} files: fallback {:.1} -> {:.1} ms ({:.0}x), overlay {:.1} -> {:.1} ms (create+merge plus the mount's extra step time)",
            first.0,
            last.0,
            ms(first.1),
            ms(last.1),
            last.1.as_secs_f64() / first.1.as_secs_f64(),
            ms(first.2),
            ms(last.2)
        );
    }
}
