//! `ossb bake` of 6 targets on a shared base stage against 6 `ossb build`s one after
//! another (the same Dockerfile, `--target app --build-arg NAME=N`), each from a cold cache.
//! The base stage's RUN waits 2 s (as a download does) and each target's RUN waits 1 s and
//! writes 20 MB of random data (a layer to compress): the bake builds the base once and the
//! targets at once; the sequential builds find the base cached after the first. Interleaved,
//! medians of `OSSB_BENCH_RUNS` (3).
//!
//! The cluster is measured twice: on those targets, which mostly wait (a machine overlaps
//! their waits for free, so no split of them reaches much), and on targets that compute.
//!
//! `cargo bench -p ossb-benches --bench bake` (or scripts/bench.sh); `OSSB_BENCH_ONLY=sequential`,
//! `cluster` (both cluster rows) or `computing` runs a part.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ossb_benches::cluster::{median as cluster_median, Cluster, WorkerSpec};
use ossb_benches::workload::{context_dir, runs, selected, Env};
use ossb_benches::{measure, Sample};

const TARGETS: usize = 6;

fn main() {
    let env = Env::get();
    let ctx = bake_context(
        "bake",
        &format!(
            "FROM {} AS base\nRUN sleep 2 && echo base > /base\n\
             FROM base AS app\nARG NAME\nRUN sleep 1 && head -c 20000000 /dev/urandom > /data && echo \"$NAME\" > /name\n",
            env.busybox()
        ),
    );
    // Targets that compute, as compiles do (about 2 CPU-s each: 80 MB of random bytes through
    // busybox's gzip), on the same waiting base.
    let computing = bake_context(
        "bake-computing",
        &format!(
            "FROM {} AS base\nRUN sleep 2 && echo base > /base\n\
             FROM base AS app\nARG NAME\nRUN head -c 80000000 /dev/urandom | gzip -1 | md5sum > /sum && echo \"$NAME\" > /name\n",
            env.busybox()
        ),
    );
    let scratch = std::env::temp_dir().join(format!("ossb-bench-bake-{}", std::process::id()));
    let mut rows = String::new();
    if selected("sequential") {
        rows += &against_sequential(&env, &ctx, &scratch);
    }
    if selected("cluster") {
        rows += &against_cluster(&env, &ctx, &scratch, "");
    }
    if selected("cluster computing") {
        rows += &against_cluster(
            &env,
            &computing,
            &scratch,
            " (targets computing ~2 CPU-s each)",
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(&ctx);
    let _ = std::fs::remove_dir_all(&computing);
    print!("{rows}");
    ossb_benches::record(&rows);
}

/// A context named `name` with `dockerfile` and a bake file of [`TARGETS`] targets of its
/// `app` stage, each with its own `NAME`.
fn bake_context(name: &str, dockerfile: &str) -> std::path::PathBuf {
    let ctx = context_dir(name);
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let mut hcl = format!(
        "group \"default\" {{ targets = [{}] }}\n",
        (0..TARGETS)
            .map(|i| format!("\"t{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for i in 0..TARGETS {
        hcl.push_str(&format!(
            "target \"t{i}\" {{\n  target = \"app\"\n  args = {{ NAME = \"{i}\" }}\n}}\n"
        ));
    }
    std::fs::write(ctx.join("docker-bake.hcl"), hcl).unwrap();
    ctx
}

/// `ossb bake` against its targets built one after another: the row.
fn against_sequential(env: &Env, ctx: &Path, scratch: &Path) -> String {
    let (mut baked, mut sequential): (Vec<Sample>, Vec<Sample>) = (Vec::new(), Vec::new());
    for run in 0..runs() {
        let cache = scratch.join(format!("bake-{run}"));
        eprintln!("bake / run {run}");
        let mut cmd = ossb(env, &cache, "bake");
        cmd.current_dir(ctx);
        baked.push(measure(&mut cmd));
        let cache = scratch.join(format!("seq-{run}"));
        eprintln!("sequential / run {run}");
        let start = std::time::Instant::now();
        let mut peak = 0;
        for i in 0..TARGETS {
            let mut cmd = ossb(env, &cache, "build");
            cmd.args(["--target", "app", "--build-arg"])
                .arg(format!("NAME={i}"))
                .arg(ctx);
            peak = peak.max(measure(&mut cmd).max_rss_kib);
        }
        sequential.push(Sample {
            wall: start.elapsed(),
            max_rss_kib: peak,
        });
    }
    let (b, s) = (
        ossb_benches::median(&mut baked).wall,
        ossb_benches::median(&mut sequential).wall,
    );
    let ratio = b.as_secs_f64() / s.as_secs_f64().max(1e-9);
    format!(
        "| bake | {TARGETS} targets on a shared base stage, cold: `ossb bake` vs {TARGETS} `ossb build`s one after another | {:.2} s | {:.2} s | {ratio:.2}x | {} |\n",
        secs(b),
        secs(s),
        ossb_benches::verdict(ratio, 0.5)
    )
}

/// The bake through a cluster of two workers with a CPU each against `ossb bake` on one CPU
/// (a machine each, as cluster_builds measures it), every run from cold caches: the row.
fn against_cluster(env: &Env, ctx: &Path, scratch: &Path, workload: &str) -> String {
    let (mut local, mut clustered) = (Vec::new(), Vec::new());
    for run in 0..runs() {
        // A cache of its own per workload: the two share their base stage.
        let cache = scratch.join(format!("one-cpu-{}-{run}", ctx.display()).replace('/', "_"));
        eprintln!("bake on one CPU / run {run}");
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"]).arg(&env.ossb);
        cmd.env("OSSB_CACHE_DIR", &cache)
            .args([
                "bake",
                "--progress",
                "plain",
                "--insecure-registry",
                env.registry(),
            ])
            .current_dir(ctx);
        local.push(measure(&mut cmd).wall);
        eprintln!("bake on a 2-worker cluster / run {run}");
        let cluster = Cluster::start(
            env,
            &[
                WorkerSpec {
                    name: "a",
                    cpu: Some(0),
                    args: &[],
                },
                WorkerSpec {
                    name: "b",
                    cpu: Some(1),
                    args: &[],
                },
            ],
        );
        clustered.push(cluster.submit_bake(env, ctx, false));
    }
    let (one, two) = (cluster_median(local), cluster_median(clustered));
    let ratio = two.as_secs_f64() / one.as_secs_f64().max(1e-9);
    format!(
        "| bake | the same bake{workload} through a cluster of 2 workers (a CPU each) vs `ossb bake` on one CPU | {:.2} s | {:.2} s | {ratio:.2}x | {} |\n",
        secs(two),
        secs(one),
        ossb_benches::verdict(ratio, 0.6)
    )
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `ossb SUBCOMMAND` with a cache of its own and the test environment's registries.
fn ossb(env: &Env, cache: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new(&env.ossb);
    cmd.env("OSSB_CACHE_DIR", cache)
        .arg(subcommand)
        .args(["--progress", "plain"])
        .args(["--insecure-registry", env.registry()]);
    if let Some(dc) = env.var("DOCKER_CONFIG") {
        cmd.env("DOCKER_CONFIG", dc);
    }
    cmd
}
