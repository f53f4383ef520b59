//! Ten RUN steps (each writes a 1 MiB file) with a COPY of a source file after the fifth:
//! ossb against buildah and BuildKit, cold, fully cached and that source file changed (five
//! RUNs rerun).
//!
//! `cargo bench -p ossb-benches --bench build_ten_runs` (or scripts/bench.sh)

use ossb_benches::workload::{bench, context_dir, Env, Workload};

fn main() {
    let env = Env::get();
    let ctx = context_dir("tenruns");
    std::fs::write(ctx.join("source.txt"), "version 1\n").unwrap();
    let mut dockerfile = format!("FROM {}\n", env.busybox());
    for i in 0..10 {
        if i == 5 {
            dockerfile.push_str("COPY source.txt /source.txt\n");
        }
        dockerfile.push_str(&format!(
            "RUN mkdir -p /work/{i} && head -c 1048576 /dev/urandom > /work/{i}/blob && echo step {i} > /work/{i}/out\n"
        ));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    bench(
        &env,
        &Workload {
            name: "10 RUN steps".into(),
            changed_file: ctx.join("source.txt"),
            context: ctx.clone(),
            platforms: None,
        },
    );
    let _ = std::fs::remove_dir_all(ctx);
}
