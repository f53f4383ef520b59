//! A context of 20 000 small files (200 directories of 100), copied whole and counted by a
//! RUN: ossb against buildah and BuildKit, cold, fully cached and one of the files changed.
//!
//! `cargo bench -p ossb-benches --bench build_many_files` (or scripts/bench.sh)

use ossb_benches::workload::{bench, context_dir, Env, Workload};

fn main() {
    let env = Env::get();
    let ctx = context_dir("manyfiles");
    for d in 0..200 {
        let dir = ctx.join(format!("src/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("f{f:03}.txt")),
                format!("file {d}/{f}\n").repeat(20),
            )
            .unwrap();
        }
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}\nCOPY src/ /app/\nRUN find /app -type f | wc -l > /count\n",
            env.busybox()
        ),
    )
    .unwrap();
    bench(
        &env,
        &Workload {
            name: "context of 20 000 files".into(),
            changed_file: ctx.join("src/d100/f050.txt"),
            context: ctx.clone(),
            platforms: None,
        },
    );
    let _ = std::fs::remove_dir_all(ctx);
}
