//! A three-stage build (generated dependencies, a build stage over 50 source files, a final
//! stage of COPY --from): ossb against buildah and BuildKit, cold, fully cached and one source
//! file changed.
//!
//! `cargo bench -p ossb-benches --bench build_multistage` (or scripts/bench.sh)

use ossb_benches::workload::{bench, context_dir, Env, Workload};

fn main() {
    let env = Env::get();
    let ctx = context_dir("multistage");
    std::fs::create_dir(ctx.join("src")).unwrap();
    for i in 0..50 {
        let text = format!("/* unit {i} */\n").repeat(600);
        std::fs::write(ctx.join(format!("src/unit{i:02}.c")), text).unwrap();
    }
    let busybox = env.busybox();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {busybox} AS deps\n\
             RUN mkdir -p /deps && for i in $(seq 1 200); do head -c 20000 /dev/urandom > /deps/lib$i.so; done\n\
             FROM {busybox} AS build\n\
             COPY --from=deps /deps /deps\n\
             COPY src/ /src/\n\
             RUN for i in $(seq 1 20); do cat /src/*.c; done > /app.bin && sha256sum /app.bin > /app.sum\n\
             FROM {busybox}\n\
             COPY --from=deps /deps /usr/lib/app\n\
             COPY --from=build /app.bin /app.sum /usr/local/bin/\n\
             CMD [\"/usr/local/bin/app.bin\"]\n"
        ),
    )
    .unwrap();
    bench(
        &env,
        &Workload {
            name: "multi-stage (3 stages)".into(),
            changed_file: ctx.join("src/unit07.c"),
            context: ctx.clone(),
            platforms: None,
        },
    );
    let _ = std::fs::remove_dir_all(ctx);
}
