//! Ten RUN steps on busybox: `ossb build` against `buildah bud --isolation chroot` (vfs
//! storage), both cold (no cache), in the same run, on the test environment's registry.
//!
//! `scripts/testenv.sh start; . .testenv/env; cargo bench -p ossb-benches --bench run_steps`

use std::path::Path;
use std::process::Command;

use ossb_benches::{measure, median, report};

fn main() {
    let Ok(registry) = std::env::var("OSSB_TEST_REGISTRY") else {
        eprintln!("SKIPPED: start the test environment (scripts/testenv.sh start; . .testenv/env)");
        return;
    };
    let busybox = std::env::var("OSSB_TEST_BUSYBOX").unwrap_or("library/busybox:latest".into());
    let base = format!("{registry}/{busybox}");
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    let mut dockerfile = format!("FROM {base}\n");
    for i in 0..10 {
        dockerfile.push_str(&format!(
            "RUN mkdir -p /work/{i} && echo step {i} > /work/{i}/out && ls /work | wc -l\n"
        ));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let ossb_bin = ossb_benches::workload::ossb_binary();
    let runs = 3;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..runs {
        let cache = dir.path().join(format!("ossb-cache-{round}"));
        ours.push(measure(
            Command::new(&ossb_bin)
                .args(["build", "--progress", "plain", "--no-cache"])
                .args(["--insecure-registry", &registry])
                .args([
                    "--output",
                    &format!("type=oci,dest={}/o{round}.tar", dir.path().display()),
                ])
                .arg(&ctx)
                .env("OSSB_CACHE_DIR", &cache),
        ));
        let storage = dir.path().join(format!("buildah-{round}"));
        theirs.push(measure(&mut buildah(&storage, &ctx)));
        let _ = Command::new("buildah")
            .args(["--root", &storage.join("root").to_string_lossy()])
            .args(["--runroot", &storage.join("run").to_string_lossy()])
            .args(["--storage-driver", "vfs", "rm", "--all"])
            .output();
    }
    println!("10 RUN steps on busybox, cold, median of {runs}");
    report(
        "10 RUN steps",
        median(&mut ours),
        "buildah --isolation chroot",
        median(&mut theirs),
    );
}

fn buildah(storage: &Path, ctx: &Path) -> Command {
    let mut c = Command::new("buildah");
    c.args(["--root", &storage.join("root").to_string_lossy()])
        .args(["--runroot", &storage.join("run").to_string_lossy()])
        .args(["--storage-driver", "vfs"])
        .args([
            "bud",
            "--isolation",
            "chroot",
            "--tls-verify=false",
            "--layers=false",
        ])
        .args(["-t", "bench/run-steps"])
        .arg(ctx);
    c
}
