//! Debian bookworm with `apt-get update && apt-get install` (from Debian's archive, so it
//! needs network access to it), then a COPY of the application: ossb against buildah and
//! BuildKit, cold, fully cached and one source file changed. Needs
//! `scripts/testenv.sh start --debian`.
//!
//! `cargo bench -p ossb-benches --bench build_apt` (or scripts/bench.sh)

use ossb_benches::workload::{bench, context_dir, Env, Workload};

fn main() {
    let env = Env::get();
    let Some(debian) = env.debian() else {
        eprintln!("SKIPPED: no Debian base image: run scripts/testenv.sh start --debian");
        return;
    };
    let ctx = context_dir("apt");
    std::fs::write(ctx.join("app.sh"), "#!/bin/sh\njq --version\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {debian}\n\
             RUN apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*\n\
             COPY app.sh /usr/local/bin/app.sh\n\
             CMD [\"/usr/local/bin/app.sh\"]\n"
        ),
    )
    .unwrap();
    bench(
        &env,
        &Workload {
            name: "debian + apt-get install jq".into(),
            changed_file: ctx.join("app.sh"),
            context: ctx.clone(),
            platforms: None,
        },
    );
    let _ = std::fs::remove_dir_all(ctx);
}
