//! What every benchmark needs: timing a command several times with its peak memory, medians,
//! and a table printed with the ratio to the peer measured in the same run.

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

/// Runs `cmd` to completion and measures it; panics with its output if it fails, because a
/// benchmark of a failing command measures nothing.
pub fn measure(cmd: &mut Command) -> Sample {
    let start = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let wall = start.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Sample {
        wall,
        max_rss_kib: children_max_rss_kib(),
    }
}

/// The peak RSS of the largest child waited for so far (getrusage(RUSAGE_CHILDREN)).
fn children_max_rss_kib() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss.max(0) as u64
}

/// The median of `samples` by wall time.
pub fn median(samples: &mut [Sample]) -> Sample {
    samples.sort_by_key(|s| s.wall);
    samples[samples.len() / 2]
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
