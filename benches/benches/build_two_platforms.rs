//! One build for linux/amd64 and linux/arm64 (arm64 RUN through QEMU): a COPY of sources and
//! a RUN over them per platform. ossb against `buildah bud --platform ... --manifest` and
//! BuildKit, cold, fully cached and one source file changed. dockerd 20.10's BuildKit refuses
//! a multi-platform build, so it runs one `docker build --platform` per platform, both at once
//! (`Dockerd::build_platforms`).
//!
//! `cargo bench -p ossb-benches --bench build_two_platforms` (or scripts/bench.sh)

use ossb_benches::workload::{bench, context_dir, Env, Workload};

fn main() {
    let env = Env::get();
    if env.var("OSSB_TEST_ARM64") != Some("1") {
        eprintln!(
            "SKIPPED: arm64 emulation does not work here (scripts/testenv.sh start says why)"
        );
        return;
    }
    let ctx = context_dir("twoplatforms");
    std::fs::create_dir(ctx.join("src")).unwrap();
    for i in 0..20 {
        std::fs::write(
            ctx.join(format!("src/m{i}.txt")),
            format!("module {i}\n").repeat(500),
        )
        .unwrap();
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}\nCOPY src/ /src/\nRUN uname -m > /arch && sha256sum /src/* > /sums && gzip -k /src/m0.txt\nCMD [\"cat\", \"/arch\"]\n",
            env.busybox()
        ),
    )
    .unwrap();
    bench(
        &env,
        &Workload {
            name: "two platforms (amd64 + arm64)".into(),
            changed_file: ctx.join("src/m3.txt"),
            context: ctx.clone(),
            platforms: Some("linux/amd64,linux/arm64".into()),
        },
    );
    let _ = std::fs::remove_dir_all(ctx);
}
