//! A COPY of 1 GiB (four 256 MiB files of incompressible data and a small version file in the
//! same directory): ossb against buildah and BuildKit, cold, fully cached and the small file
//! changed (so the whole 1 GiB COPY step runs again). `OSSB_BENCH_BIG_MIB` scales the size
//! down.
//!
//! `cargo bench -p ossb-benches --bench build_big_copy` (or scripts/bench.sh)

use ossb_benches::workload::{bench, context_dir, write_noise, Env, Workload};

fn main() {
    let env = Env::get();
    let total_mib: usize = std::env::var("OSSB_BENCH_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let ctx = context_dir("bigcopy");
    std::fs::create_dir(ctx.join("data")).unwrap();
    for i in 0..4 {
        // Streamed: see write_noise for why a 256 MiB buffer here would count as ossb's memory.
        let path = ctx.join(format!("data/part{i}.bin"));
        write_noise(
            &path,
            total_mib / 4 * 1024 * 1024,
            0x9e3779b97f4a7c15 ^ i as u64,
        )
        .unwrap();
    }
    std::fs::write(ctx.join("data/version.txt"), "1\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\nCOPY data/ /data/\n", env.busybox()),
    )
    .unwrap();
    bench(
        &env,
        &Workload {
            name: format!("COPY of {total_mib} MiB"),
            changed_file: ctx.join("data/version.txt"),
            context: ctx.clone(),
            platforms: None,
        },
    );
    let _ = std::fs::remove_dir_all(ctx);
}
