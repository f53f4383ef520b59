//! What every benchmark needs: timing a command several times with its peak memory, medians,
//! and a table printed with the ratio to the peer measured in the same run.

pub mod blob;
pub mod buildkit;
pub mod cluster;
/// Network namespaces, shared with the e2e tests.
#[path = "../../tests/e2e/netns.rs"]
pub mod netns;
pub mod workload;

use std::process::Command;
use std::time::{Duration, Instant};

/// One run of a command: wall time and the peak resident memory of it and its children.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Wall-clock time.
    pub wall: Duration,
    /// Peak resident set size in KiB (the largest of the command's processes).
    pub max_rss_kib: u64,
}

/// Runs `cmd` to completion and measures it: wall time, and the peak RSS of the command's
/// own process tree as wait4(2) reports it. Panics with its stderr if it fails, because a
/// benchmark of a failing command measures nothing.
// The child is reaped by wait4 below (for its rusage), not by Child::wait.
#[allow(clippy::zombie_processes)]
pub fn measure(cmd: &mut Command) -> Sample {
    let stderr = tempfile_path();
    let err_file = std::fs::File::create(&stderr).expect("creating a temporary file");
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(err_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut status = 0;
    // SAFETY: rusage is a plain struct that wait4 fills; the pid is our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    let text = std::fs::read_to_string(&stderr).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr);
    assert!(
        pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed (wait status {status}):\n{text}"
    );
    Sample {
        wall,
        max_rss_kib: usage.ru_maxrss.max(0) as u64,
    }
}

fn tempfile_path() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("ossb-bench-{}-{nanos}.stderr", std::process::id()))
}

/// The median of `samples` by wall time.
pub fn median(samples: &mut [Sample]) -> Sample {
    samples.sort_by_key(|s| s.wall);
    samples[samples.len() / 2]
}

/// Whether `ratio` meets a target of at most `target` (`-` where there is none, NaN).
pub fn verdict(ratio: f64, target: f64) -> String {
    if target.is_nan() {
        "-".to_string()
    } else if ratio <= target {
        format!("<= {target}x: met")
    } else {
        format!("<= {target}x: MISSED")
    }
}

/// Prints one row: name, ossb's time, the peer's time, the ratio, ossb's peak memory.
pub fn report(name: &str, ossb: Sample, peer_name: &str, peer: Sample) {
    println!(
        "{name:<40} ossb {:>8.3}s  {peer_name} {:>8.3}s  ratio {:>5.2}x  ossb peak {:>6} MiB",
        ossb.wall.as_secs_f64(),
        peer.wall.as_secs_f64(),
        ossb.wall.as_secs_f64() / peer.wall.as_secs_f64().max(1e-9),
        ossb.max_rss_kib / 1024
    );
}

/// Appends result rows (Markdown) to `$OSSB_BENCH_RESULTS` when set: scripts/bench.sh
/// collects every bench's rows there.
pub fn record(rows: &str) {
    if let Some(path) = std::env::var_os("OSSB_BENCH_RESULTS") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(rows.as_bytes()).unwrap();
    }
}
