//! The coordinator at scale (issue 16), with simulated workers: `ossb worker
//! --simulate-task-ms` speaks the protocol, takes every task for that long and succeeds with a
//! made-up image, so only the coordinator's scheduling, bookkeeping and merging are measured.
//! Every process runs on this machine (2 cores): the workers' own heartbeats and the clients
//! compete with the coordinator, so the figures are a floor.
//!
//! - **throughput against workers**: 50, 100 and 200 one-slot workers, each given 25 tasks'
//!   worth of builds (one build = 24 independent stages and a final stage that copies from
//!   them: 25 tasks) at once; tasks per second against the ideal (workers / task time). The
//!   200-worker run is the 5,000 tasks. Linear means the same fraction of ideal for
//!   each size.
//! - **dispatch latency**: the coordinator's own p50/p99 of the time from a task being ready to
//!   its dispatch, in the runs above (saturated: it includes waiting for a free slot) and in a
//!   run below capacity (builds arriving at about 40% of what the workers can take), which is
//!   the scheduling latency a build sees. Target: p99 below 50 ms.
//! - **coordinator peak RSS** (VmHWM) after each run.
//!
//! `cargo bench -p ossb-benches --bench cluster_scale` (after `cargo build --release -p
//! ossb-cli` and `scripts/testenv.sh start`; scripts/bench.sh does both).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ossb_benches::cluster::{sample, Cluster, WorkerSpec};
use ossb_benches::workload::Env;

/// Independent stages per build (plus the final one).
const STAGES: usize = 24;

/// How long each simulated task takes.
const TASK_MS: u64 = 1000;

/// A build of `STAGES` independent stages and a final one reading them all; `seed` makes its
/// tasks unlike every other build's (identical tasks would wait for each other).
fn context(root: &Path, seed: usize) -> PathBuf {
    let ctx = root.join(format!("build-{seed}"));
    std::fs::create_dir_all(&ctx).unwrap();
    let mut dockerfile = String::new();
    for s in 0..STAGES {
        dockerfile += &format!("FROM busybox AS s{s}\nRUN echo {seed} {s} > /out\n");
    }
    dockerfile += "FROM busybox\n";
    for s in 0..STAGES {
        dockerfile += &format!("COPY --from=s{s} /out /out{s}\n");
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sim{i:03}")).collect()
}

/// A cluster of `n` simulated one-slot workers.
fn cluster(env: &Env, n: usize) -> Cluster {
    let names = names(n);
    let ms = TASK_MS.to_string();
    let args = [
        "--platform",
        "linux/amd64",
        "--slots",
        "1",
        "--isolation",
        "chroot",
        "--simulate-task-ms",
        &ms,
    ];
    let workers: Vec<WorkerSpec> = names
        .iter()
        .map(|name| WorkerSpec {
            name,
            cpu: None,
            args: &args,
        })
        .collect();
    Cluster::start(env, &workers)
}

/// Submits `builds` (of `STAGES + 1` tasks each), at most `at_once` at a time, one every
/// `spacing`; returns the wall time.
fn submit_all(
    env: &Env,
    cluster: &Cluster,
    contexts: &[PathBuf],
    at_once: usize,
    spacing: Duration,
) -> Duration {
    let start = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..at_once {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(ctx) = contexts.get(i) else { return };
                let due = start + spacing * i as u32;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                cluster.submit(env, ctx, "linux/amd64", None);
            });
        }
    });
    start.elapsed()
}

/// Quantile `q` of the coordinator's summary `name` (microseconds), in milliseconds.
fn quantile_ms(metrics: &str, name: &str, q: &str) -> f64 {
    sample(metrics, &format!("{name}{{quantile=\"{q}\"}}")).unwrap_or(u64::MAX) as f64 / 1000.0
}

fn latency_line(metrics: &str) -> String {
    let dispatch = |q| quantile_ms(metrics, "ossb_task_dispatch_microseconds", q);
    format!(
        "dispatch p50 {:>7.1} ms  p99 {:>7.1} ms  scheduling pass p99 {:>6.2} ms",
        dispatch("0.5"),
        dispatch("0.99"),
        quantile_ms(metrics, "ossb_schedule_pass_microseconds", "0.99")
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::get();
    let scratch = tempfile::tempdir().unwrap();
    let mut seed = 0;
    let mut rates = Vec::new();
    for workers in [50, 100, 200] {
        let cluster = cluster(&env, workers);
        // 25 tasks per worker: about 25 task times if the coordinator keeps up.
        let builds = workers;
        let contexts: Vec<PathBuf> = (0..builds)
            .map(|_| {
                seed += 1;
                context(scratch.path(), seed)
            })
            .collect();
        let tasks = builds * (STAGES + 1);
        let wall = submit_all(&env, &cluster, &contexts, 40, Duration::ZERO);
        let rate = tasks as f64 / wall.as_secs_f64();
        let ideal = workers as f64 * 1000.0 / TASK_MS as f64;
        rates.push(rate / ideal);
        let m = cluster.metrics_text();
        println!(
            "{workers:>3} simulated workers, {tasks:>5} tasks   {:>7.1}s  {:>6.1} tasks/s ({:>3.0}% of ideal {ideal:.0})  {}  coordinator peak RSS {:>4} MiB",
            wall.as_secs_f64(),
            rate,
            rate / ideal * 100.0,
            latency_line(&m),
            cluster.peak_rss_kib("coordinator") / 1024,
        );
    }
    println!(
        "throughput linear in workers: fraction of ideal {} (recorded)",
        rates
            .iter()
            .map(|r| format!("{:.0}%", r * 100.0))
            .collect::<Vec<_>>()
            .join(" / ")
    );

    // Below capacity: the scheduling latency a build sees.
    let workers = 200;
    let cluster = cluster(&env, workers);
    let capacity = workers as f64 * 1000.0 / TASK_MS as f64;
    let per_build = (STAGES + 1) as f64;
    // One build every `spacing`: about 40% of capacity.
    let spacing = Duration::from_secs_f64(per_build / (0.4 * capacity));
    let contexts: Vec<PathBuf> = (0..40)
        .map(|_| {
            seed += 1;
            context(scratch.path(), seed)
        })
        .collect();
    let wall = submit_all(&env, &cluster, &contexts, 40, spacing);
    let m = cluster.metrics_text();
    let p99 = quantile_ms(&m, "ossb_task_dispatch_microseconds", "0.99");
    println!(
        "{workers} workers at ~40% load, {} tasks  {:>7.1}s  {}  {}",
        contexts.len() * (STAGES + 1),
        wall.as_secs_f64(),
        latency_line(&m),
        ossb_benches::verdict(p99 / 50.0, 1.0)
    );
}
