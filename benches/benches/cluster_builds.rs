//! The build cluster as a whole (issue 7), with real processes on this machine:
//!
//! - **two workers vs one**: a two-platform build (linux/amd64 + linux/arm64) on two workers, one
//!   per platform, each pinned to a CPU of its own (two machines), against one worker that
//!   builds both (amd64 natively, arm64 through QEMU) pinned to one CPU (one machine). Target:
//!   at most 0.6x. The arm64 worker says `--platform linux/arm64` on this amd64 host: its RUN
//!   steps go through the same QEMU handler either way, so both sides do the same work.
//! - **two independent stages**: one platform, two stages that need nothing of each other and
//!   a final stage copying from both: split into stage tasks on two workers (a CPU each)
//!   against one worker (one CPU). Target: at most 0.6x.
//! - **20 builds at once**: twenty different single-platform builds submitted together to a
//!   cluster of two workers; all must succeed; the wall time, the throughput and the p50/p95
//!   latency are reported.
//!
//! The coordinator, the cache node and ossb-submit run unpinned, beside the workers. Every run
//! starts a fresh cluster (empty step caches and peer cache), pushes to the registry of
//! scripts/testenv.sh, and times only the submission.
//!
//! `cargo bench -p ossb-benches --bench cluster_builds` (after `cargo build --release -p
//! ossb-cli` and `scripts/testenv.sh start`; scripts/bench.sh does both).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ossb_benches::cluster::{median, percentile, Cluster, WorkerSpec};
use ossb_benches::workload::{runs, selected, Env};

/// A context: the Dockerfile and `mib` MiB of text-like files (compressed per platform, the
/// CPU-bound part of the build) with `seed` making it unique.
fn context(root: &Path, name: &str, dockerfile: &str, mib: usize, seed: u64) -> PathBuf {
    let ctx = root.join(name);
    std::fs::create_dir_all(ctx.join("data")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    for i in 0..mib {
        let mut x = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(i as u64)
            | 1;
        let mut bytes = Vec::with_capacity(1 << 20);
        while bytes.len() < 1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Words from a small alphabet: compresses about 3x, as source trees do.
            bytes.extend_from_slice(format!("w{} ", x % 5000).as_bytes());
        }
        std::fs::write(ctx.join(format!("data/f{i:03}")), &bytes).unwrap();
    }
    ctx
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::get();
    let scratch = tempfile::tempdir().unwrap();
    if selected("two-platform") {
        two_platforms(&env, scratch.path());
    }
    if selected("two independent stages") {
        two_stages(&env, scratch.path());
    }
    if selected("builds at once") {
        many_builds(&env, scratch.path());
    }
}

fn two_platforms(env: &Env, scratch: &Path) {
    let (busybox, registry) = (env.busybox(), env.registry());
    // Two workers, one per platform, each on its own CPU, against one worker on one CPU.
    let dockerfile = format!(
        "FROM {busybox}\nCOPY data /data\nRUN cat /data/* | md5sum > /sum && uname -m >> /sum\n"
    );
    let ctx = context(scratch, "two-platforms", &dockerfile, 96, 1);
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for run in 0..runs() {
        let tag = |side: &str| format!("{registry}/bench/cluster-{side}:{run}");
        let cluster = Cluster::start(
            env,
            &[WorkerSpec {
                name: "both",
                cpu: Some(0),
                args: &["--platform", "linux/amd64", "--emulate", "linux/arm64"],
            }],
        );
        one.push(cluster.submit(env, &ctx, "linux/amd64,linux/arm64", Some(&tag("one"))));
        drop(cluster);
        let cluster = Cluster::start(
            env,
            &[
                WorkerSpec {
                    name: "amd64",
                    cpu: Some(0),
                    args: &["--platform", "linux/amd64"],
                },
                WorkerSpec {
                    name: "arm64",
                    cpu: Some(1),
                    args: &["--platform", "linux/arm64"],
                },
            ],
        );
        two.push(cluster.submit(env, &ctx, "linux/amd64,linux/arm64", Some(&tag("two"))));
    }
    let (one, two) = (median(one), median(two));
    let ratio = two.as_secs_f64() / one.as_secs_f64();
    println!(
        "{:<40} two workers {:>8.3}s  one worker {:>8.3}s  ratio {:>5.2}x  {}",
        "two-platform build (96 MiB COPY + RUN)",
        two.as_secs_f64(),
        one.as_secs_f64(),
        ratio,
        ossb_benches::verdict(ratio, 0.6)
    );
}

fn two_stages(env: &Env, scratch: &Path) {
    let (busybox, registry) = (env.busybox(), env.registry());
    // One platform, two independent stages: the coordinator's stage tasks put them on two
    // workers (a CPU each) at once; one worker (one CPU) builds them one after the other.
    let dockerfile = format!(
        "FROM {busybox} AS a\nCOPY data/f0[0-4]* /data/\nRUN cat /data/* | md5sum > /sum\n\
         FROM {busybox} AS b\nCOPY data/f0[5-9]* /data/\nRUN cat /data/* | md5sum > /sum\n\
         FROM {busybox}\nCOPY --from=a /sum /a.sum\nCOPY --from=b /sum /b.sum\n"
    );
    let ctx = context(scratch, "two-stages", &dockerfile, 96, 2);
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for run in 0..runs() {
        let tag = |side: &str| format!("{registry}/bench/stages-{side}:{run}");
        let amd = &["--platform", "linux/amd64"];
        let cluster = Cluster::start(
            env,
            &[WorkerSpec {
                name: "one",
                cpu: Some(0),
                args: amd,
            }],
        );
        one.push(cluster.submit(env, &ctx, "linux/amd64", Some(&tag("one"))));
        drop(cluster);
        let cluster = Cluster::start(
            env,
            &[
                WorkerSpec {
                    name: "w1",
                    cpu: Some(0),
                    args: amd,
                },
                WorkerSpec {
                    name: "w2",
                    cpu: Some(1),
                    args: amd,
                },
            ],
        );
        two.push(cluster.submit(env, &ctx, "linux/amd64", Some(&tag("two"))));
    }
    let (one, two) = (median(one), median(two));
    let ratio = two.as_secs_f64() / one.as_secs_f64();
    println!(
        "{:<40} two workers {:>8.3}s  one worker {:>8.3}s  ratio {:>5.2}x  {}",
        "two independent stages (2 x 48 MiB)",
        two.as_secs_f64(),
        one.as_secs_f64(),
        ratio,
        ossb_benches::verdict(ratio, 0.6)
    );
}

fn many_builds(env: &Env, scratch: &Path) {
    let (busybox, registry) = (env.busybox(), env.registry());
    // Twenty different builds at once on two workers.
    const BUILDS: usize = 20;
    let cluster = Cluster::start(
        env,
        &[
            WorkerSpec {
                name: "w1",
                cpu: None,
                args: &["--platform", "linux/amd64"],
            },
            WorkerSpec {
                name: "w2",
                cpu: None,
                args: &["--platform", "linux/amd64"],
            },
        ],
    );
    let contexts: Vec<PathBuf> = (0..BUILDS)
        .map(|i| {
            context(
                scratch,
                &format!("many-{i}"),
                &format!("FROM {busybox}\nCOPY data /data\nRUN wc -c /data/* > /sizes\n"),
                4,
                100 + i as u64,
            )
        })
        .collect();
    let start = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = contexts
            .iter()
            .enumerate()
            .map(|(i, ctx)| {
                let (cluster, env, registry) = (&cluster, env, &registry);
                s.spawn(move || {
                    cluster.submit(
                        env,
                        ctx,
                        "linux/amd64",
                        Some(&format!("{registry}/bench/many-{i}:latest")),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = start.elapsed();
    latencies.sort();
    println!(
        "{BUILDS} builds at once on 2 workers        all succeeded in {:>7.3}s  throughput {:>5.1} builds/min  latency p50 {:>6.3}s  p95 {:>6.3}s  max {:>6.3}s  (no target: recorded)",
        wall.as_secs_f64(),
        BUILDS as f64 / wall.as_secs_f64() * 60.0,
        percentile(&latencies, 0.5).as_secs_f64(),
        percentile(&latencies, 0.95).as_secs_f64(),
        latencies.last().unwrap().as_secs_f64(),
    );
}
