//! What attestations cost a pushed build: the default provenance (`mode=min`) and
//! `--sbom=true` (with the provenance) against `--provenance=false`, on two build benchmarks'
//! workloads (Debian + apt-get install jq; a context of 20 000 files), cold (fresh cache)
//! and fully cached. The three variants are interleaved run by run so machine noise hits them
//! alike; medians of `OSSB_BENCH_RUNS` (3) runs.
//!
//! `cargo bench -p ossb-benches --bench build_attest` (or scripts/bench.sh)

use std::path::Path;
use std::process::Command;

use ossb_benches::workload::{context_dir, runs, Env};
use ossb_benches::{measure, Sample};

const VARIANTS: [(&str, &[&str]); 3] = [
    ("none", &["--provenance=false"]),
    ("provenance", &[]),
    ("provenance + sbom", &["--sbom=true"]),
];

fn main() {
    let env = Env::get();
    let mut workloads = Vec::new();
    if let Some(debian) = env.debian() {
        let ctx = context_dir("attest-apt");
        std::fs::write(ctx.join("app.sh"), "#!/bin/sh\njq --version\n").unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM {debian}\n\
                 RUN apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*\n\
                 COPY app.sh /usr/local/bin/app.sh\n"
            ),
        )
        .unwrap();
        workloads.push(("debian + apt-get install jq", ctx));
    } else {
        eprintln!("SKIPPED the Debian workload: run scripts/testenv.sh start --debian");
    }
    let ctx = context_dir("attest-files");
    for d in 0..200 {
        let dir = ctx.join(format!("src/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:03}.txt")), format!("file {d}/{f}\n")).unwrap();
        }
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\nCOPY src/ /app/\n", env.busybox()),
    )
    .unwrap();
    workloads.push(("context of 20 000 files", ctx));

    let scratch = std::env::temp_dir().join(format!("ossb-bench-attest-{}", std::process::id()));
    let mut rows = String::new();
    for (name, ctx) in &workloads {
        let mut cold: Vec<Vec<Sample>> = vec![Vec::new(); VARIANTS.len()];
        let mut cached: Vec<Vec<Sample>> = vec![Vec::new(); VARIANTS.len()];
        for run in 0..runs() {
            for (v, (label, flags)) in VARIANTS.iter().enumerate() {
                let cache = scratch.join(format!("cache-{v}-{run}"));
                let _ = std::fs::remove_dir_all(&cache);
                let tag = format!("{}/bench/attest:{v}", env.registry());
                eprintln!("{name} / {label} / run {run}");
                cold[v].push(measure(&mut build(&env, ctx, &cache, &tag, flags)));
                cached[v].push(measure(&mut build(&env, ctx, &cache, &tag, flags)));
                let _ = std::fs::remove_dir_all(&cache);
            }
        }
        for (scenario, samples) in [("cold", &mut cold), ("fully cached", &mut cached)] {
            let base = ossb_benches::median(&mut samples[0]).wall.as_secs_f64();
            for v in 1..VARIANTS.len() {
                let t = ossb_benches::median(&mut samples[v]).wall.as_secs_f64();
                let target = if v == 1 { 5.0 } else { 15.0 };
                let cost = (t / base - 1.0) * 100.0;
                let verdict = if cost <= target { "met" } else { "MISSED" };
                rows.push_str(&format!(
                    "| build_attest | {name}, {scenario}, pushed: {} vs --provenance=false | {t:.2} s | {base:.2} s | {:+.1}% | <= {target}%: {verdict} |\n",
                    VARIANTS[v].0,
                    cost
                ));
            }
        }
        let _ = std::fs::remove_dir_all(ctx);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    print!("{rows}");
    ossb_benches::record(&rows);
}

/// `ossb build ... --push` of `ctx` with `flags`, caching in `cache`.
fn build(env: &Env, ctx: &Path, cache: &Path, tag: &str, flags: &[&str]) -> Command {
    let mut cmd = Command::new(&env.ossb);
    cmd.args(["build", "--progress", "plain", "--insecure-registry"])
        .arg(env.registry())
        .arg("--cache-dir")
        .arg(cache)
        .args(["-t", tag, "--push"])
        .args(flags)
        .arg(ctx);
    if let Some(dc) = env.var("DOCKER_CONFIG") {
        cmd.env("DOCKER_CONFIG", dc);
    }
    cmd
}
