//! The build engine end to end: the step cache, --no-cache, cache prune, multi-platform
//! indexes, reproducible digests and the JSON progress stream.

use crate::support::*;

fn busybox(env: &TestEnv) -> String {
    format!("{}/{}", env.registry(), env.var("OSSB_TEST_BUSYBOX"))
}

/// Builds `ctx` into an OCI tar with `--progress json` and returns the JSON events.
fn build_json(env: &TestEnv, cache: &std::path::Path, ctx: &std::path::Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let reg = env.registry();
    let out = cache.join("out.tar");
    let mut args = vec!["build", "--progress", "json", "--insecure-registry", &reg];
    let dest = format!("type=oci,dest={}", out.display());
    args.extend_from_slice(&["--output", &dest]);
    args.extend_from_slice(extra);
    args.push(ctx.to_str().unwrap());
    let run = ossb(env, cache, &args).success("ossb build --progress json");
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("progress line is not JSON ({e}): {l}")))
        .collect()
}

fn result_of(events: &[serde_json::Value]) -> &serde_json::Value {
    events.iter().find(|e| e["event"] == "result").expect("a result event")
}

/// A second build of the same context runs nothing; changing one file reruns only what
/// depends on it; --no-cache runs everything; prune --all empties the cache.
#[test]
fn second_build_is_fully_cached_and_no_cache_and_prune_work() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {}\nRUN echo one > /one\nCOPY a.txt /a.txt\nRUN cat /a.txt > /copy\nCOPY b.txt /b.txt\n",
        busybox(&env)
    );
    let ctx = context(dir.path(), &dockerfile, &[("a.txt", "a\n"), ("b.txt", "b\n")]);
    let cache = dir.path().join("cache");
    let first = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&first)["steps_run"], 4);
    assert_eq!(result_of(&first)["steps_cached"], 0);

    let second = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&second)["steps_run"], 0, "a repeated build runs nothing");
    assert_eq!(result_of(&second)["steps_cached"], 4);
    assert_eq!(second.iter().filter(|e| e["event"] == "cached").count(), 4);

    // mtime alone does not invalidate; content does, and only from that step on.
    std::process::Command::new("touch").arg(ctx.join("a.txt")).status().unwrap();
    assert_eq!(result_of(&build_json(&env, &cache, &ctx, &[]))["steps_run"], 0, "touch must not invalidate the cache");
    std::fs::write(ctx.join("b.txt"), "changed\n").unwrap();
    let third = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&third)["steps_run"], 1, "only the COPY of b.txt reruns");

    let forced = build_json(&env, &cache, &ctx, &["--no-cache"]);
    assert_eq!(result_of(&forced)["steps_run"], 4, "--no-cache runs every step");

    let info = tool(env!("CARGO_BIN_EXE_ossb"), &["cache", "info", "--cache-dir", cache.to_str().unwrap()]).success("ossb cache info");
    assert!(info.stdout.contains("cached steps"), "{}", info.stdout);
    tool(env!("CARGO_BIN_EXE_ossb"), &["cache", "prune", "--all", "--cache-dir", cache.to_str().unwrap()]).success("ossb cache prune --all");
    let after = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&after)["steps_run"], 4, "after prune --all everything runs again");
}

/// One build for two platforms pushes an index; podman runs each platform and RUN saw its own
/// architecture (arm64 through QEMU).
#[test]
fn multi_platform_index_is_pushed_and_each_platform_runs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let dockerfile = format!(
        "FROM {}\nARG TARGETARCH\nRUN echo \"$TARGETARCH $(uname -m)\" > /arch\nCMD [\"cat\", \"/arch\"]\n",
        busybox(&env)
    );
    let ctx = context(dir.path(), &dockerfile, &[]);
    let image = format!("{reg}/tests/{}:latest", unique("multiarch"));
    ossb(
        &env,
        &dir.path().join("cache"),
        &["build", "--platform", "linux/amd64,linux/arm64", "--insecure-registry", &reg, "-t", &image, "--push", ctx.to_str().unwrap()],
    )
    .success("multi-platform build");
    let raw = tool("skopeo", &["inspect", "--raw", "--tls-verify=false", &format!("docker://{image}")]).success("skopeo inspect --raw");
    let index: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    let archs: Vec<&str> = index["manifests"].as_array().unwrap().iter().map(|m| m["platform"]["architecture"].as_str().unwrap()).collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    for (platform, want) in [("linux/amd64", "amd64 x86_64\n"), ("linux/arm64", "arm64 aarch64\n")] {
        let run = podman_run(&image, &["--platform", platform]).success("podman run --platform");
        assert_eq!(run.stdout, want, "{platform}");
    }
}

/// With SOURCE_DATE_EPOCH, two builds in two empty cache directories give the same index.
#[test]
fn builds_are_reproducible_across_cache_dirs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!("FROM {}\nCOPY a.txt /a.txt\nRUN echo built > /built && mkdir /d\n", busybox(&env));
    let ctx = context(dir.path(), &dockerfile, &[("a.txt", "a\n")]);
    let digests: Vec<String> = ["one", "two"]
        .iter()
        .map(|name| {
            let cache = dir.path().join(name);
            let meta = cache.join("meta.json");
            let reg = env.registry();
            let out = format!("type=oci,dest={}", cache.join("o.tar").display());
            ossb_with(
                &env,
                &cache,
                &[
                    "build", "--platform", "linux/amd64,linux/arm64", "--insecure-registry", &reg, "--output", &out,
                    "--metadata-file", meta.to_str().unwrap(), ctx.to_str().unwrap(),
                ],
                &[("SOURCE_DATE_EPOCH", "1700000000")],
            )
            .success("reproducible build");
            let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(meta).unwrap()).unwrap();
            meta["containerimage.digest"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
}
