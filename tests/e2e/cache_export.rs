//! `--cache-to` as buildx's: `mode=min` stores the steps the image holds, `mode=max` every
//! step, `type=inline` puts the records in the image's config; a machine with an empty cache
//! directory then finds them with `--cache-from`.

use serde_json::Value;

use crate::build::{build_json, busybox, result_of};
use crate::support::*;

/// A builder stage (two steps) the final stage copies from, then a step of its own: four
/// steps, two of them in the image.
fn two_stage(env: &TestEnv) -> String {
    format!(
        "FROM {b} AS builder\nRUN echo built > /artifact\nRUN echo more > /more\n\
         FROM {b}\nCOPY --from=builder /artifact /artifact\nRUN cat /artifact > /copy\n",
        b = busybox(env)
    )
}

fn tags(repo: &str) -> Vec<String> {
    let run = tool(
        "skopeo",
        &[
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{repo}"),
        ],
    )
    .success("skopeo list-tags");
    let listed: Value = serde_json::from_str(&run.stdout).unwrap();
    listed["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn run_and_cached(events: &[Value]) -> (u64, u64) {
    let result = result_of(events);
    (
        result["steps_run"].as_u64().unwrap(),
        result["steps_cached"].as_u64().unwrap(),
    )
}

/// mode=max stores all four steps and a fresh machine runs none; mode=min (the default) stores
/// the two the image holds, and a fresh machine runs only the builder's steps.
#[test]
fn cache_to_min_and_max_store_what_buildx_would() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), &two_stage(&env), &[]);
    let reg = env.registry();
    for (mode, stored, fresh) in [("max", 4, (0, 4)), ("min", 2, (2, 2))] {
        let repo = format!("{reg}/cache/{}", unique(mode));
        let spec = format!("type=registry,ref={repo},mode={mode}");
        let first = build_json(
            &env,
            &dir.path().join(format!("{mode}-1")),
            &ctx,
            &["--cache-to", &spec],
        );
        assert_eq!(run_and_cached(&first), (4, 0), "mode={mode}");
        assert_eq!(tags(&repo).len(), stored, "mode={mode}: {:?}", tags(&repo));
        let second = build_json(
            &env,
            &dir.path().join(format!("{mode}-2")),
            &ctx,
            &["--cache-from", &format!("type=registry,ref={repo}")],
        );
        assert_eq!(
            run_and_cached(&second),
            fresh,
            "mode={mode}: a fresh machine's build"
        );
    }

    // oci-mediatypes=false: Docker's manifests, which the fresh machine reads alike.
    let repo = format!("{reg}/cache/{}", unique("docker"));
    let spec = format!("type=registry,ref={repo},oci-mediatypes=false");
    build_json(
        &env,
        &dir.path().join("docker-1"),
        &ctx,
        &["--cache-to", &spec],
    );
    let tag = &tags(&repo)[0];
    let manifest: Value =
        serde_json::from_str(&inspect_raw(&format!("{repo}:{tag}")).stdout).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let second = build_json(
        &env,
        &dir.path().join("docker-2"),
        &ctx,
        &["--cache-from", &repo],
    );
    assert_eq!(run_and_cached(&second), (2, 2));
}

/// A cache that cannot be written fails the build, unless `ignore-error=true`: then the image
/// is still built, with a warning naming the cache.
#[test]
fn cache_to_ignore_error_keeps_the_build() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), &two_stage(&env), &[]);
    // Nothing listens on port 9: the export fails.
    let unreachable = "type=registry,ref=127.0.0.1:9/cache/none";
    let reg = env.registry();
    let out = dir.path().join("out.tar");
    let dest = format!("type=oci,dest={}", out.display());
    let build = |cache: &str, spec: String| {
        ossb(
            &env,
            &dir.path().join(cache),
            &[
                "build",
                "--insecure-registry",
                &reg,
                "--insecure-registry",
                "127.0.0.1:9",
                "--progress",
                "plain",
                "--output",
                &dest,
                "--cache-to",
                &spec,
                ctx.to_str().unwrap(),
            ],
        )
    };
    let failed = build("a", unreachable.to_string());
    assert_ne!(failed.code, 0, "{}", failed.stderr);
    assert!(failed.stderr.contains("127.0.0.1:9"), "{}", failed.stderr);
    let kept = build("b", format!("{unreachable},ignore-error=true")).success("ignore-error=true");
    let all = format!("{}{}", kept.stdout, kept.stderr);
    assert!(
        all.contains("warning: --cache-to") && all.contains("ignore-error=true"),
        "{all}"
    );
    assert!(out.exists());
}

/// `type=inline`: the pushed image's config lists the steps it holds; a fresh machine
/// building with `--cache-from` of the image finds them (the builder stage is not in it); an
/// image built FROM it does not inherit its list.
#[test]
fn inline_cache_rides_in_the_image() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), &two_stage(&env), &[]);
    let reg = env.registry();
    let image = format!("{reg}/inline/{}:v1", unique("app"));
    let push = |cache: &str, extra: &[&str]| {
        let mut args = vec![
            "build",
            "--progress",
            "json",
            "--insecure-registry",
            &reg,
            "-t",
            &image,
            "--push",
        ];
        args.extend_from_slice(extra);
        args.push(ctx.to_str().unwrap());
        let run = ossb(&env, &dir.path().join(cache), &args).success("ossb build --push");
        run.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect::<Vec<Value>>()
    };
    let first = push("first", &["--cache-to", "type=inline"]);
    assert_eq!(run_and_cached(&first), (4, 0));
    let config = inspect_config_raw(&image);
    let config: Value = serde_json::from_str(&config.stdout).unwrap();
    let steps = config["ossb.cache.v1"].as_array().expect("an inline cache");
    assert_eq!(steps.len(), 2, "{steps:?}");
    let layers = config["rootfs"]["diff_ids"].as_array().unwrap().len();
    assert_eq!(steps[0]["layer"], layers - 2);
    assert_eq!(steps[1]["layer"], layers - 1);

    let fresh = build_json(
        &env,
        &dir.path().join("fresh"),
        &ctx,
        &["--cache-from", &image],
    );
    assert_eq!(run_and_cached(&fresh), (2, 2));

    let child_ctx = dir.path().join("child");
    std::fs::create_dir_all(&child_ctx).unwrap();
    std::fs::write(
        child_ctx.join("Dockerfile"),
        format!("FROM {image}\nRUN true\n"),
    )
    .unwrap();
    let out = dir.path().join("child.tar");
    ossb(
        &env,
        &dir.path().join("child-cache"),
        &[
            "build",
            "--insecure-registry",
            &reg,
            "--output",
            &format!("type=oci,dest={}", out.display()),
            child_ctx.to_str().unwrap(),
        ],
    )
    .success("a build FROM the image");
    let unpacked = dir.path().join("child-oci");
    std::fs::create_dir_all(&unpacked).unwrap();
    tool(
        "tar",
        &[
            "-xf",
            out.to_str().unwrap(),
            "-C",
            unpacked.to_str().unwrap(),
        ],
    )
    .success("tar -x");
    let configs = tool(
        "grep",
        &[
            "-rl",
            "ossb.cache.v1",
            unpacked.join("blobs").to_str().unwrap(),
        ],
    );
    assert_eq!(
        configs.stdout, "",
        "the child image inherited the inline cache"
    );
}
