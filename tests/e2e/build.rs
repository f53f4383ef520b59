//! The build engine end to end: the step cache, --no-cache, cache prune, multi-platform
//! indexes, reproducible digests and the JSON progress stream.

use crate::support::*;

pub(crate) fn busybox(env: &TestEnv) -> String {
    format!("{}/{}", env.registry(), env.var("OSSB_TEST_BUSYBOX"))
}

/// Builds `ctx` into an OCI tar with `--progress json` and returns the JSON events.
pub(crate) fn build_json(
    env: &TestEnv,
    cache: &std::path::Path,
    ctx: &std::path::Path,
    extra: &[&str],
) -> Vec<serde_json::Value> {
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
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("progress line is not JSON ({e}): {l}"))
        })
        .collect()
}

pub(crate) fn result_of(events: &[serde_json::Value]) -> &serde_json::Value {
    events
        .iter()
        .find(|e| e["event"] == "result")
        .expect("a result event")
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
    let ctx = context(
        dir.path(),
        &dockerfile,
        &[("a.txt", "a\n"), ("b.txt", "b\n")],
    );
    let cache = dir.path().join("cache");
    let first = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&first)["steps_run"], 4);
    assert_eq!(result_of(&first)["steps_cached"], 0);
    // The base image's pull reports the bytes it received.
    let pulled = first
        .iter()
        .filter(|e| e["event"] == "transfer")
        .filter_map(|e| e["received"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        pulled > 100_000,
        "no transfer event for the pull: {first:?}"
    );

    let second = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(
        result_of(&second)["steps_run"],
        0,
        "a repeated build runs nothing"
    );
    assert_eq!(result_of(&second)["steps_cached"], 4);
    assert_eq!(second.iter().filter(|e| e["event"] == "cached").count(), 4);
    // As BuildKit: the history keeps each layer's first build time, so a fully cached build
    // gives the same image (without SOURCE_DATE_EPOCH too) and a push has nothing new to send.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&again)["digest"], result_of(&first)["digest"]);
    assert_eq!(result_of(&again)["config"], result_of(&first)["config"]);

    // mtime alone does not invalidate; content does, and only from that step on.
    std::process::Command::new("touch")
        .arg(ctx.join("a.txt"))
        .status()
        .unwrap();
    assert_eq!(
        result_of(&build_json(&env, &cache, &ctx, &[]))["steps_run"],
        0,
        "touch must not invalidate the cache"
    );
    std::fs::write(ctx.join("b.txt"), "changed\n").unwrap();
    let third = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(
        result_of(&third)["steps_run"],
        1,
        "only the COPY of b.txt reruns"
    );

    let forced = build_json(&env, &cache, &ctx, &["--no-cache"]);
    assert_eq!(
        result_of(&forced)["steps_run"],
        4,
        "--no-cache runs every step"
    );

    let info = tool(
        env!("CARGO_BIN_EXE_ossb"),
        &["cache", "info", "--cache-dir", cache.to_str().unwrap()],
    )
    .success("ossb cache info");
    assert!(info.stdout.contains("cached steps"), "{}", info.stdout);
    assert!(
        info.stdout.contains("hit rate:") && info.stdout.contains("% of"),
        "{}",
        info.stdout
    );
    let prune = |args: &[&str]| {
        let mut all = vec!["cache", "prune", "--cache-dir", cache.to_str().unwrap()];
        all.extend_from_slice(args);
        tool(env!("CARGO_BIN_EXE_ossb"), &all).success("ossb cache prune")
    };
    // Everything was used within the day: nothing goes.
    let kept = prune(&["--filter", "until=24h"]);
    assert!(
        kept.stdout.contains("removed 0 cached steps, 0 blobs"),
        "{}",
        kept.stdout
    );
    assert_eq!(
        result_of(&build_json(&env, &cache, &ctx, &[]))["steps_run"],
        0
    );
    // No storage kept: every blob goes, and the records of the layers with them.
    prune(&["--keep-storage", "0"]);
    assert_eq!(
        result_of(&build_json(&env, &cache, &ctx, &[]))["steps_run"],
        4,
        "after --keep-storage 0 everything runs again"
    );
    tool(
        env!("CARGO_BIN_EXE_ossb"),
        &[
            "cache",
            "prune",
            "--all",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    )
    .success("ossb cache prune --all");
    let after = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(
        result_of(&after)["steps_run"],
        4,
        "after prune --all everything runs again"
    );
}

/// A stage starts as soon as what it needs is built, not when a whole wave of stages is: `c`,
/// built on the quick stage `a`, starts while the slow stage `b` still runs.
#[test]
fn a_stage_starts_when_its_own_inputs_are_built() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {0} AS a\nRUN echo a > /a\n\
         FROM {0} AS b\nRUN sleep 3 && echo b > /b\n\
         FROM a AS c\nRUN echo c > /c\n\
         FROM {0}\nCOPY --from=b /b /b\nCOPY --from=c /c /c\n",
        busybox(&env)
    );
    let ctx = context(dir.path(), &dockerfile, &[]);
    let events = build_json(&env, &dir.path().join("cache"), &ctx, &[]);
    let position = |what: &str, name_part: &str| {
        let ids: Vec<u64> = events
            .iter()
            .filter(|e| e["event"] == "started")
            .filter(|e| e["name"].as_str().is_some_and(|n| n.contains(name_part)))
            .filter_map(|e| e["id"].as_u64())
            .collect();
        events
            .iter()
            .position(|e| e["event"] == what && e["id"].as_u64().is_some_and(|i| ids.contains(&i)))
            .unwrap_or_else(|| panic!("no {what} of {name_part}: {events:?}"))
    };
    assert!(
        position("started", "[c 1/1]") < position("done", "[b 1/1]"),
        "stage c waited for the unrelated stage b"
    );
}

/// `ossb cache prune --all` started while a build runs waits for it: the build succeeds with
/// its blobs, and the prune removes them afterwards.
#[test]
fn prune_waits_for_a_running_build() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!("FROM {}\nRUN sleep 3 && echo slow > /slow\n", busybox(&env));
    let ctx = context(dir.path(), &dockerfile, &[]);
    let cache = dir.path().join("cache");
    let reg = env.registry();
    let build = std::process::Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args(["build", "--progress", "plain", "--insecure-registry", &reg])
        .arg(&ctx)
        .env("OSSB_CACHE_DIR", &cache)
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the build holds the cache (its work directory exists).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_dir(cache.join("work"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let started = std::time::Instant::now();
    let prune = tool(
        env!("CARGO_BIN_EXE_ossb"),
        &[
            "cache",
            "prune",
            "--all",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    )
    .success("ossb cache prune --all");
    let waited = started.elapsed();
    let out = build.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The build still had its 3 s RUN ahead when the prune started.
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "prune --all returned after {waited:?}, while the build ran:\n{stderr}"
    );
    assert!(
        out.status.success(),
        "the build failed under prune:\n{stderr}"
    );
    assert!(stderr.contains("built sha256:"), "{stderr}");
    assert!(!prune.stdout.contains(" 0 blobs"), "{}", prune.stdout);
}

/// On a terminal the status block lists the running steps with their time, the build's
/// steps done and total, and the estimate once earlier builds timed the steps.
#[test]
fn tty_progress_shows_running_steps_and_an_estimate() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN sleep 1 && echo a > /a\nCOPY f /f\n",
            busybox(&env)
        ),
        &[("f", "1")],
    );
    let cache = dir.path().join("cache");
    let reg = env.registry();
    // `script` gives ossb a terminal; what ossb draws is captured as it was written.
    let run_on_tty = |no_cache: bool| {
        let cmd = format!(
            "{} build --progress tty {} --insecure-registry {reg} {}",
            env!("CARGO_BIN_EXE_ossb"),
            if no_cache { "--no-cache" } else { "" },
            ctx.display()
        );
        let out = std::process::Command::new("script")
            .args(["-qefc", &cmd, "/dev/null"])
            .env("OSSB_CACHE_DIR", &cache)
            .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
            .env("TERM", "xterm")
            .output()
            .expect("script (util-linux) runs ossb on a terminal");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        text
    };
    let first = run_on_tty(false);
    assert!(first.contains("[+] Building"), "{first}");
    assert!(
        first.contains(" => #") && first.contains("RUN sleep 1"),
        "{first}"
    );
    assert!(
        first.contains("(0/2)") || first.contains("(1/2)"),
        "{first}"
    );
    // The second run knows how long the steps took: it shows an estimate.
    let second = run_on_tty(true);
    assert!(second.contains(" ETA "), "{second}");
    assert!(second.contains("built sha256:"), "{second}");
}

/// One build for two platforms pushes an index; podman runs each platform and RUN saw its own
/// architecture (arm64 through QEMU).
#[test]
fn multi_platform_index_is_pushed_and_each_platform_runs_sharing_buildplatform_stages() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    // The tools stage runs on the build platform, once for both targets: both images carry
    // the same random id.
    let dockerfile = format!(
        "FROM --platform=$BUILDPLATFORM {0} AS tools\n\
         RUN head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /id\n\
         FROM {0}\nARG TARGETARCH\nCOPY --from=tools /id /id\n\
         RUN echo \"$TARGETARCH $(uname -m) $(cat /id)\" > /arch\nCMD [\"cat\", \"/arch\"]\n",
        busybox(&env)
    );
    let ctx = context(dir.path(), &dockerfile, &[]);
    let image = format!("{reg}/tests/{}:latest", unique("multiarch"));
    ossb(
        &env,
        &dir.path().join("cache"),
        &[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "--insecure-registry",
            &reg,
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("multi-platform build");
    let raw = inspect_raw(&image);
    let index: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    // The images, then the default provenance's attestation manifests.
    assert_eq!(archs, ["amd64", "arm64", "unknown", "unknown"]);
    let mut ids = Vec::new();
    for (platform, want) in [
        ("linux/amd64", "amd64 x86_64 "),
        ("linux/arm64", "arm64 aarch64 "),
    ] {
        let run = podman_run(&image, &["--platform", platform]).success("podman run --platform");
        let id = run
            .stdout
            .strip_prefix(want)
            .unwrap_or_else(|| panic!("{platform}: {:?} does not start with {want:?}", run.stdout));
        assert_eq!(id.trim().len(), 32, "{platform}: {:?}", run.stdout);
        ids.push(id.to_string());
    }
    assert_eq!(
        ids[0], ids[1],
        "the $BUILDPLATFORM stage ran once for both platforms"
    );
}

/// With SOURCE_DATE_EPOCH, two builds in two empty cache directories give the same index.
#[test]
fn builds_are_reproducible_across_cache_dirs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {}\nCOPY a.txt /a.txt\nRUN echo built > /built && mkdir /d\n",
        busybox(&env)
    );
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
                    "build",
                    "--platform",
                    "linux/amd64,linux/arm64",
                    "--insecure-registry",
                    &reg,
                    "--output",
                    &out,
                    "--metadata-file",
                    meta.to_str().unwrap(),
                    ctx.to_str().unwrap(),
                ],
                &[("SOURCE_DATE_EPOCH", "1700000000")],
            )
            .success("reproducible build");
            let meta: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(meta).unwrap()).unwrap();
            meta["containerimage.digest"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
}

/// Builds `ctx` into an OCI layout and unpacks it with umoci; returns the rootfs.
fn build_and_unpack(
    env: &TestEnv,
    dir: &std::path::Path,
    ctx: &std::path::Path,
) -> std::path::PathBuf {
    let reg = env.registry();
    let layout = dir.join("layout");
    ossb(
        env,
        &dir.join("cache"),
        &[
            "build",
            "--insecure-registry",
            &reg,
            "-t",
            "t:v1",
            "--output",
            &format!("type=oci,dest={},tar=false", layout.display()),
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build");
    let bundle = dir.join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:v1", layout.display()),
            bundle.to_str().unwrap(),
        ],
    )
    .success("umoci unpack");
    bundle.join("rootfs")
}

/// ADD unpacks local archives (also those a wildcard matches) and fetches URLs (checked with
/// --checksum); COPY takes heredocs, symbolic --chmod, --parents and --exclude; RUN mounts an
/// image that is not a stage.
#[test]
fn add_and_copy_options_do_what_buildkit_does() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A tar.gz in the context and a file served over HTTP from the test.
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    let checksum = format!("sha256:{}", crate::sha256_hex(b"#!/bin/sh\necho tool\n"));
    let port = free_port();
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(&served)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    let payload = dir.path().join("payload");
    std::fs::create_dir_all(payload.join("inner")).unwrap();
    std::fs::write(payload.join("inner/data.txt"), "from the archive\n").unwrap();
    let dockerfile = format!(
        "FROM {}\n\
         ADD bundle.tar.gz /opt/bundle/\n\
         ADD --checksum={checksum} http://127.0.0.1:{port}/tool.sh /usr/local/bin/\n\
         COPY --chmod=u+x,go-w <<EOF /usr/local/bin/hello\n#!/bin/sh\necho hello\nEOF\n\
         COPY --parents src/a/*.txt /p/\n\
         COPY --exclude=**/*.log src /ex/\n\
         ADD wild-*.tar /opt/wild/\n\
         ADD bundle.tar.bz2 /opt/bz2/\n\
         ADD bundle.tar.xz /opt/xz/\n\
         RUN cat /opt/wild/.wh.data.txt > /wh-seen\n\
         RUN --mount=type=bind,from={0},source=/etc,target=/mnt/img-etc cp /mnt/img-etc/group /from-image-group\n",
        busybox(&env)
    );
    let ctx = context(
        dir.path(),
        &dockerfile,
        &[("src/a/keep.txt", "k\n"), ("src/a/skip.log", "s\n")],
    );
    let status = std::process::Command::new("tar")
        .args([
            "-czf",
            ctx.join("bundle.tar.gz").to_str().unwrap(),
            "-C",
            payload.to_str().unwrap(),
            "inner",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // Archives a wildcard matches are unpacked too; in a user's archive `.wh.` names are
    // files, not whiteouts (as Docker's untar).
    std::fs::write(payload.join(".wh.data.txt"), "not a whiteout\n").unwrap();
    for (name, flag) in [("bundle.tar.bz2", "-cjf"), ("bundle.tar.xz", "-cJf")] {
        let status = std::process::Command::new("tar")
            .args([flag, ctx.join(name).to_str().unwrap(), "-C"])
            .args([payload.to_str().unwrap(), "inner"])
            .status()
            .unwrap();
        assert!(status.success(), "tar {flag}");
    }
    for (name, member) in [("wild-1.tar", "inner"), ("wild-2.tar", ".wh.data.txt")] {
        let status = std::process::Command::new("tar")
            .args(["-cf", ctx.join(name).to_str().unwrap(), "-C"])
            .args([payload.to_str().unwrap(), member])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let rootfs = build_and_unpack(&env, dir.path(), &ctx);
    let _ = server.kill();
    let _ = server.wait();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::read_to_string(rootfs.join("opt/bundle/inner/data.txt")).unwrap(),
        "from the archive\n"
    );
    let tool_meta = std::fs::metadata(rootfs.join("usr/local/bin/tool.sh")).unwrap();
    assert_eq!(
        tool_meta.permissions().mode() & 0o7777,
        0o600,
        "ADD from a URL gives mode 600"
    );
    let hello = std::fs::metadata(rootfs.join("usr/local/bin/hello")).unwrap();
    assert_eq!(
        hello.permissions().mode() & 0o7777,
        0o744,
        "heredoc 0644 with u+x,go-w"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("usr/local/bin/hello")).unwrap(),
        "#!/bin/sh\necho hello\n"
    );
    assert!(
        rootfs.join("p/src/a/keep.txt").exists(),
        "--parents keeps the path"
    );
    assert!(rootfs.join("ex/a/keep.txt").exists());
    assert!(
        !rootfs.join("ex/a/skip.log").exists(),
        "--exclude leaves the file out"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("opt/wild/inner/data.txt")).unwrap(),
        "from the archive\n",
        "ADD wild-*.tar unpacks each archive"
    );
    // (In the image it is a whiteout again: a layer cannot hold such a name.)
    assert_eq!(
        std::fs::read_to_string(rootfs.join("wh-seen")).unwrap(),
        "not a whiteout\n"
    );
    assert!(!rootfs.join("opt/wild/wild-1.tar").exists());
    for dir in ["opt/bz2", "opt/xz"] {
        assert_eq!(
            std::fs::read_to_string(rootfs.join(dir).join("inner/data.txt")).unwrap(),
            "from the archive\n",
            "{dir}"
        );
    }
    let group = std::fs::read_to_string(rootfs.join("from-image-group")).unwrap();
    assert!(
        group.starts_with("root:"),
        "RUN --mount from=IMAGE: {group:?}"
    );

    // A wrong checksum fails the build and names both digests.
    let bad = context(
        &dir.path().join("bad"),
        &format!(
            "FROM {}\nADD --checksum=sha256:{} http://127.0.0.1:{port}/tool.sh /t\n",
            busybox(&env),
            "0".repeat(64)
        ),
        &[],
    );
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(&served)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    let reg = env.registry();
    let run = ossb(
        &env,
        &dir.path().join("cache2"),
        &["build", "--insecure-registry", &reg, bad.to_str().unwrap()],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("checksum mismatch"), "{}", run.stderr);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// --cache-to stores every step in a registry repository; a build in an empty cache directory
/// with --cache-from runs nothing (as ephemeral CI pods would share the cache).
#[test]
fn registry_cache_is_shared_between_empty_cache_dirs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let dockerfile = format!(
        "FROM {}\nCOPY a.txt /a.txt\nRUN echo built > /built\nRUN true\n",
        busybox(&env)
    );
    let ctx = context(dir.path(), &dockerfile, &[("a.txt", "a\n")]);
    let repo = format!("{reg}/cache/{}", unique("shared"));
    let first = build_json(
        &env,
        &dir.path().join("pod-1"),
        &ctx,
        &["--cache-to", &format!("type=registry,ref={repo}")],
    );
    assert_eq!(result_of(&first)["steps_run"], 3);
    let second = build_json(
        &env,
        &dir.path().join("pod-2"),
        &ctx,
        &["--cache-from", &repo],
    );
    assert_eq!(
        result_of(&second)["steps_run"],
        0,
        "every step comes from the registry cache"
    );
    assert_eq!(result_of(&second)["steps_cached"], 3);
}

/// buildx's `type=local` cache, as CI jobs save and restore it: the first job finds no
/// directory yet and exports to one; a job with an empty cache directory reads it back and
/// runs nothing; a corrupted blob in it is refused, and the step runs.
#[test]
fn local_cache_directory_is_shared_between_empty_cache_dirs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {}\nCOPY a.txt /a.txt\nRUN echo built > /built\nRUN true\n",
        busybox(&env)
    );
    let ctx = context(dir.path(), &dockerfile, &[("a.txt", "a\n")]);
    let saved = dir.path().join("ci-cache");
    let first = build_json(
        &env,
        &dir.path().join("job-1"),
        &ctx,
        &[
            "--cache-from",
            &format!("type=local,src={}", saved.display()),
            "--cache-to",
            &format!("type=local,dest={},mode=max", saved.display()),
        ],
    );
    assert_eq!(result_of(&first)["steps_run"], 3);
    let from = format!("type=local,src={}", saved.display());
    let second = build_json(
        &env,
        &dir.path().join("job-2"),
        &ctx,
        &["--cache-from", &from],
    );
    assert_eq!(
        (
            result_of(&second)["steps_run"].as_u64(),
            result_of(&second)["steps_cached"].as_u64()
        ),
        (Some(0), Some(3)),
        "every step comes from the cache directory"
    );

    // A flipped byte in every saved blob: each is refused on the way in, and the steps run.
    let blobs = saved.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    }
    let third = build_json(
        &env,
        &dir.path().join("job-3"),
        &ctx,
        &["--cache-from", &from],
    );
    assert_eq!(result_of(&third)["steps_run"], 2, "{third:?}");
    assert!(
        third.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("verification failed"))),
        "no warning about the corrupt blob: {third:?}"
    );

    // A build cluster's workers cannot read this machine's directory: refused up front.
    let submit = std::process::Command::new(env!("CARGO_BIN_EXE_ossb-submit"))
        .args(["--coordinator", "127.0.0.1:9", "--tls-dir", "/nonexistent"])
        .args(["--cache-from", &from, ctx.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&submit.stderr);
    assert_eq!(submit.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("out of a build cluster's reach"),
        "{stderr}"
    );
}

/// The other outputs and layer settings: a docker archive that podman loads and runs, the
/// filesystem in a directory, zstd layers, Docker media types, and `FROM busybox` resolved
/// through a docker.io mirror (the only way it resolves on this offline machine).
#[test]
fn outputs_layer_settings_and_a_docker_io_mirror() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let mirror = format!("docker.io={reg}");
    let ctx = context(
        dir.path(),
        "FROM busybox\nRUN echo from-a-mirror > /m\nCMD [\"cat\", \"/m\"]\n",
        &[],
    );
    let cache = dir.path().join("cache");
    let archive = dir.path().join("image.tar");
    let local = dir.path().join("rootfs");
    ossb(
        &env,
        &cache,
        &[
            "build",
            "--registry-mirror",
            &mirror,
            "--insecure-registry",
            &reg,
            "-t",
            "localhost/ossb-test/docker-out:1",
            "--output",
            &format!("type=docker,dest={}", archive.display()),
            "--output",
            &format!("type=local,dest={}", local.display()),
            ctx.to_str().unwrap(),
        ],
    )
    .success("build with a docker.io mirror to docker and local outputs");
    assert_eq!(
        std::fs::read_to_string(local.join("m")).unwrap(),
        "from-a-mirror\n"
    );
    assert!(local.join("bin/busybox").exists());
    tool("podman", &["load", "-i", archive.to_str().unwrap()])
        .success("podman load of the docker archive");
    let run = podman_run("localhost/ossb-test/docker-out:1", &[])
        .success("podman run of the loaded image");
    assert_eq!(run.stdout, "from-a-mirror\n");

    // zstd layers with OCI media types, and Docker schema 2 media types with gzip.
    for (settings, layer_type, manifest_type) in [
        (
            "compression=zstd",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (
            "oci-mediatypes=false",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
    ] {
        let image = format!("{reg}/tests/{}:latest", unique("settings"));
        ossb(
            &env,
            &cache,
            &[
                "build",
                "--registry-mirror",
                &mirror,
                "--insecure-registry",
                &reg,
                "-t",
                &image,
                "--output",
                &format!("type=registry,{settings}"),
                // A plain manifest, to read its layers' media types.
                "--provenance=false",
                ctx.to_str().unwrap(),
            ],
        )
        .success(settings);
        let raw = inspect_raw(&image);
        let manifest: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
        assert_eq!(manifest["mediaType"], manifest_type, "{settings}");
        let last = manifest["layers"].as_array().unwrap().last().unwrap();
        assert_eq!(last["mediaType"], layer_type, "{settings}");
        let run = podman_run(&image, &[]).success("podman run");
        assert_eq!(run.stdout, "from-a-mirror\n", "{settings}");
    }
}

/// `COPY --from` an image that is not a stage: pulled for the build's platform, copied from.
#[test]
fn copy_from_an_image() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM scratch\nCOPY --from={} /bin/busybox /bb\nCOPY --from={} /etc/passwd /etc/\n",
        busybox(&env),
        busybox(&env)
    );
    let ctx = context(dir.path(), &dockerfile, &[]);
    let rootfs = build_and_unpack(&env, dir.path(), &ctx);
    assert!(
        std::fs::metadata(rootfs.join("bb")).unwrap().len() > 100_000,
        "the busybox binary was copied"
    );
    assert!(std::fs::read_to_string(rootfs.join("etc/passwd"))
        .unwrap()
        .contains("root:"));
}

/// `ADD` of a git repository (a tag, and a subdirectory of it), served over HTTP by the test;
/// `.git` is left out unless `--keep-git-dir`.
#[test]
fn add_a_git_repository() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("git init -q src && cd src && echo hi > a.txt && mkdir sub && echo s > sub/s.txt && git add . \
        && git -c user.email=t@example.com -c user.name=t commit -qm init && git tag v1 \
        && cd .. && mkdir served && git clone -q --bare src served/repo.git && cd served/repo.git && git update-server-info");
    let port = free_port();
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir.path().join("served"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    let url = format!("http://127.0.0.1:{port}/repo.git");
    let dockerfile = format!(
        "FROM {}\nADD {url}#v1 /src/\nADD {url}#v1:sub /sub/\nADD --keep-git-dir=true {url}#v1 /withgit/\n",
        busybox(&env)
    );
    let ctx = context(&dir.path().join("build"), &dockerfile, &[]);
    let rootfs = build_and_unpack(&env, &dir.path().join("build"), &ctx);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("src/a.txt")).unwrap(),
        "hi\n"
    );
    assert!(
        !rootfs.join("src/.git").exists(),
        ".git is left out by default"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("sub/s.txt")).unwrap(),
        "s\n"
    );
    assert!(
        rootfs.join("withgit/.git").is_dir(),
        "--keep-git-dir keeps it"
    );
}

/// `--build-context NAME=DIR`: `COPY --from=NAME` reads the directory, and its content is part
/// of the step's cache key.
#[test]
fn named_build_context() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("config.txt"), "v1\n").unwrap();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nCOPY --from=configs config.txt /etc/app/\n",
            busybox(&env)
        ),
        &[],
    );
    let arg = format!("configs={}", extra.display());
    let cache = dir.path().join("cache");
    let first = build_json(&env, &cache, &ctx, &["--build-context", &arg]);
    assert_eq!(result_of(&first)["steps_run"], 1);
    std::fs::write(extra.join("config.txt"), "v2\n").unwrap();
    let second = build_json(&env, &cache, &ctx, &["--build-context", &arg]);
    assert_eq!(
        result_of(&second)["steps_run"],
        1,
        "a changed file in the named context reruns the COPY"
    );
    let third = build_json(
        &env,
        &cache,
        &ctx,
        &["--build-context", &arg, "-t", "named:v1"],
    );
    assert_eq!(result_of(&third)["steps_cached"], 1);
    // The image holds the file: unpack the OCI archive build_json wrote.
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    tool(
        "tar",
        &[
            "-xf",
            cache.join("out.tar").to_str().unwrap(),
            "-C",
            layout.to_str().unwrap(),
        ],
    )
    .success("tar -x");
    let bundle = dir.path().join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:v1", layout.display()),
            bundle.to_str().unwrap(),
        ],
    )
    .success("umoci unpack");
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/etc/app/config.txt")).unwrap(),
        "v2\n"
    );
}

/// Builds `ctx` with `SOURCE_DATE_EPOCH` and `OSSB_LOG=debug`, plus `extra_env`; returns the
/// manifest digest and the log.
fn build_epoch(
    env: &TestEnv,
    cache: &std::path::Path,
    ctx: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> (String, String) {
    let reg = env.registry();
    let meta = cache.join("meta.json");
    let mut vars = vec![
        ("SOURCE_DATE_EPOCH", "1700000000"),
        ("OSSB_LOG", "ossb_engine=debug"),
    ];
    vars.extend_from_slice(extra_env);
    let run = ossb_with(
        env,
        cache,
        &[
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "--metadata-file",
            meta.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ],
        &vars,
    )
    .success("ossb build");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(meta).unwrap()).unwrap();
    let digest = meta["containerimage.digest"].as_str().unwrap().to_string();
    (digest, run.stderr)
}

/// A build hands the filesystems it unpacked to later builds, as BuildKit keeps its
/// snapshots: a stage an earlier build ran is taken as that build left it, not unpacked again,
/// and the image is the one a build in an empty cache makes. `ossb cache info` counts the
/// trees kept and `ossb cache prune --all` removes them.
#[test]
fn a_later_build_starts_from_the_rootfs_an_earlier_one_left() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let df = format!(
        "FROM {bb} AS tools\n\
         RUN mkdir -p /tools && echo tool > /tools/t && rm /bin/vi\n\
         FROM {bb}\n\
         COPY f /f\n\
         COPY --from=tools /bin /toolsbin\n\
         RUN cat /f /toolsbin/t 2>/dev/null; ls /toolsbin | wc -l > /count\n",
        bb = busybox(&env)
    );
    let ctx = context(dir.path(), &df, &[("f", "one\n")]);
    let cache = dir.path().join("cache");
    build_epoch(&env, &cache, &ctx, &[]);
    // f changed: stage tools comes from the cache, and its COPY --from of a directory takes
    // the tree the first build left (its RUN's deletion in it) rather than unpack 2 layers.
    std::fs::write(ctx.join("f"), "two\n").unwrap();
    let (digest, log) = build_epoch(&env, &cache, &ctx, &[]);
    assert!(log.contains("reusing a kept rootfs layers=2"), "{log}");
    assert!(!log.contains("unpacking 2 layers"), "{log}");
    let (cold, _) = build_epoch(&env, &dir.path().join("cold"), &ctx, &[]);
    assert_eq!(
        digest, cold,
        "a kept tree gave another image than a cold build"
    );

    let info = ossb(&env, &cache, &["cache", "info"]).success("ossb cache info");
    assert!(info.stdout.contains("filesystems kept"), "{}", info.stdout);
    let pruned = ossb(&env, &cache, &["cache", "prune", "--all"]).success("ossb cache prune");
    assert!(!pruned.stdout.contains(" 0 unpacked"), "{}", pruned.stdout);
    let left = std::fs::read_dir(cache.join("rootfs")).map_or(0, |d| d.count());
    assert_eq!(left, 0, "prune --all left kept trees");
}

/// Copies a directory tree (a cache dir) keeping modes, owners and links.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    tool("cp", &["-a", from.to_str().unwrap(), to.to_str().unwrap()]).success("cp -a");
}

/// A COPY rerun because one of its files changed (the others large and unchanged) writes its
/// layer from the context's files, not from a copy of them (the debug line says so), and the
/// layer is byte for byte the one a cold build of the same content writes, on a skeleton in a
/// fresh cache and on an unpacked rootfs with a real copy (`OSSB_COPY_ON_ROOTFS=1`).
#[test]
fn a_rebuild_after_one_file_changed_writes_the_cold_builds_layer_from_the_context() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!("FROM {}\nCOPY data/ /data/\n", busybox(&env));
    let ctx = context(dir.path(), &dockerfile, &[("data/version.txt", "1\n")]);
    // Incompressible and compressible pieces, a file spanning a piece boundary, a hard link.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..(3 << 20) + 12345)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(ctx.join("data/noise.bin"), &noise).unwrap();
    std::fs::write(ctx.join("data/text.txt"), "layer bytes\n".repeat(200_000)).unwrap();
    std::fs::hard_link(ctx.join("data/noise.bin"), ctx.join("data/same.bin")).unwrap();
    let cache = dir.path().join("cache");
    build_epoch(&env, &cache, &ctx, &[]);
    std::fs::write(ctx.join("data/version.txt"), "2\n").unwrap();
    let (rebuilt, log) = build_epoch(&env, &cache, &ctx, &[]);
    assert!(
        log.contains("CACHE MISS") && log.contains("layer bytes read from the context"),
        "the rebuilt COPY should write its layer from the context:\n{log}"
    );
    let (cold, _) = build_epoch(&env, &dir.path().join("cold"), &ctx, &[]);
    assert_eq!(
        rebuilt, cold,
        "a cold build of the same content gives another image"
    );
    let (copied, log) = build_epoch(
        &env,
        &dir.path().join("copied"),
        &ctx,
        &[("OSSB_COPY_ON_ROOTFS", "1")],
    );
    assert!(!log.contains("layer bytes read from the context"), "{log}");
    assert_eq!(rebuilt, copied, "a real copy gives another image");
}

/// A COPY whose earlier steps all come from the cache runs on a skeleton of the base's layers
/// instead of an unpacked rootfs. It must give the very layer the unpacked rootfs gives
/// (`OSSB_COPY_ON_ROOTFS=1`): destinations under absolute and relative symlinked directories
/// resolved inside the rootfs, an existing directory copied into, a file in the way,
/// `--chown` names from the image's own /etc/passwd, `--chmod`, `--parents`, `--exclude`,
/// `--link`, heredocs, and the parent directories with the base's owner and mode. A RUN of a
/// stage built on it sees the copied files. (A RUN later in the same stage makes the COPYs
/// run on the unpacked rootfs: unpacking their layers again would cost more.) (Not mtimes: on the unpacked rootfs the RUN sees the copy's own
/// times, after a skeleton COPY the layer's, clamped to SOURCE_DATE_EPOCH.)
#[test]
fn copy_after_cached_steps_matches_the_unpacked_rootfs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {} AS app\n\
         RUN mkdir -p /opt/real/sub /existing /home/app && ln -s /opt/real /opt/link \
           && ln -s ../opt/link /rel-link && chown 1000:1000 /opt/real && chmod 0750 /opt/real \
           && echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd \
           && echo 'app:x:1000:' >> /etc/group && echo old > /file-in-way \
           && mkdir /dir-over && echo x > /dir-over/x && echo k > /dir-over/keep\n\
         COPY a.txt /opt/link/sub/\n\
         COPY --chown=app:app tree/ /rel-link/new/deep/\n\
         COPY --chmod=600 a.txt /existing\n\
         COPY --parents tree/x/y.txt /p/\n\
         COPY --exclude=*.log tree /ex/\n\
         COPY --link a.txt /l/\n\
         COPY a.txt /file-in-way\n\
         COPY tree /dir-over/\n\
         COPY <<EOT /opt/link/heredoc\nhello\nEOT\n\
         FROM app\n\
         RUN cat /opt/real/sub/a.txt > /seen && stat -c '%u:%g %a %n' /opt/real/* > /listing\n",
        busybox(&env)
    );
    let files = |v: &str| {
        vec![
            ("a.txt", format!("a {v}\n")),
            ("tree/x/y.txt", format!("y {v}\n")),
            ("tree/x/z.log", "log\n".to_string()),
            ("tree/top", format!("top {v}\n")),
        ]
    };
    let write = |ctx: &std::path::Path, v: &str| {
        for (name, content) in files(v) {
            let path = ctx.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
    };
    let ctx = context(dir.path(), &dockerfile, &[]);
    write(&ctx, "one");
    let cache = dir.path().join("cache");
    build_epoch(&env, &cache, &ctx, &[]);
    // The same cache twice: the COPYs rerun after the cached RUN, on a skeleton and on the
    // unpacked rootfs.
    let reference = dir.path().join("reference");
    copy_dir(&cache, &reference);
    write(&ctx, "two");
    let (skeleton, log) = build_epoch(&env, &cache, &ctx, &[]);
    assert!(
        log.contains("skeleton=true") && !log.contains("skeleton=false"),
        "every COPY should run on a skeleton:\n{log}"
    );
    let (unpacked, _) = build_epoch(&env, &reference, &ctx, &[("OSSB_COPY_ON_ROOTFS", "1")]);
    assert_eq!(
        skeleton, unpacked,
        "a skeleton COPY must give the same image"
    );

    // What the layers hold: the copied file where the symlink leads, its parent directory with
    // the base's owner and mode, and the later RUN saw it.
    let store = ossb_image::store::BlobStore::open(&cache).unwrap();
    let digest: ossb_protocol::Digest = skeleton.parse().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read(&digest).unwrap()).unwrap();
    let layers: Vec<Vec<ossb_image::store::LayerEntry>> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let d: ossb_protocol::Digest = l["digest"].as_str().unwrap().parse().unwrap();
            store.layer_listing(&d).unwrap()
        })
        .collect();
    let find = |layer: &[ossb_image::store::LayerEntry], name: &str| {
        layer
            .iter()
            .find(|e| String::from_utf8_lossy(&e.name).trim_end_matches('/') == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in the layer"))
    };
    let copy = &layers[layers.len() - 10];
    let real = find(copy, "opt/real");
    assert_eq!(
        (real.kind, real.mode, real.uid, real.gid),
        (b'5', 0o750, 1000, 1000)
    );
    find(copy, "opt/real/sub/a.txt");
    assert!(
        !copy.iter().any(|e| e.name.starts_with(b"opt/link/")),
        "{copy:?}"
    );
    let chowned = &layers[layers.len() - 9];
    let deep = find(chowned, "opt/real/new/deep/top");
    assert_eq!((deep.uid, deep.gid), (1000, 1000));
    let existing = find(&layers[layers.len() - 8], "existing/a.txt");
    assert_eq!(existing.mode, 0o600);
    find(&layers[layers.len() - 3], "dir-over/x/y.txt");
    let seen = find(layers.last().unwrap(), "seen");
    assert_eq!(seen.size, "a two\n".len() as u64);
}

/// Sets the mtime of `path` to `secs` since the epoch.
fn set_mtime(path: &std::path::Path, secs: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// The checksum cache skips re-reading unchanged context files, yet a file rewritten with the
/// same size and its old mtime put back is read again (its ctime changed): the COPY reruns
/// and the image has the new content. A touched but identical file still hits the cache.
#[test]
fn checksum_cache_notices_a_file_changed_with_the_same_size_and_mtime() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!("FROM {}\nCOPY data/ /data/\n", busybox(&env));
    let ctx = context(
        dir.path(),
        &dockerfile,
        &[("data/a.txt", "aaaa\n"), ("data/b.txt", "bbbb\n")],
    );
    for f in ["a.txt", "b.txt"] {
        set_mtime(&ctx.join("data").join(f), 1_600_000_000);
    }
    let cache = dir.path().join("cache");
    let first = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&first)["steps_run"], 1);
    assert!(
        cache.join("checksums").is_file(),
        "the checksum cache is kept"
    );
    let second = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&second)["steps_cached"], 1);
    // Touched, same content: still cached.
    set_mtime(&ctx.join("data/b.txt"), 1_600_000_100);
    let touched = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&touched)["steps_cached"], 1);
    // Same size, old mtime back: the copy must run again.
    std::fs::write(ctx.join("data/a.txt"), "zzzz\n").unwrap();
    set_mtime(&ctx.join("data/a.txt"), 1_600_000_000);
    let changed = build_json(&env, &cache, &ctx, &[]);
    assert_eq!(result_of(&changed)["steps_run"], 1, "{changed:?}");
    // And the image holds the new content (the step it just ran is the one cached now).
    let unpacked = dir.path().join("unpacked");
    let reg = env.registry();
    let dest = format!("type=local,dest={}", unpacked.display());
    ossb(
        &env,
        &cache,
        &[
            "build",
            "--insecure-registry",
            &reg,
            "-o",
            &dest,
            ctx.to_str().unwrap(),
        ],
    )
    .success("the export of the changed build");
    assert_eq!(
        std::fs::read_to_string(unpacked.join("data/a.txt")).unwrap(),
        "zzzz\n"
    );
    assert_eq!(
        std::fs::read_to_string(unpacked.join("data/b.txt")).unwrap(),
        "bbbb\n"
    );
}

/// `--quiet`, as `docker build -q`: stdout is the image ID (the `--iidfile`'s), stderr is
/// empty; a failing step still prints its error, its exit code and its last output lines.
#[test]
fn quiet_prints_only_the_image_id_and_errors() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nRUN echo quiet > /q\n", busybox(&env)),
        &[],
    );
    let cache = dir.path().join("cache");
    let iid = dir.path().join("iid");
    let dest = format!("type=oci,dest={}", dir.path().join("q.tar").display());
    let run = ossb(
        &env,
        &cache,
        &[
            "build",
            "-q",
            "--insecure-registry",
            &reg,
            "--iidfile",
            iid.to_str().unwrap(),
            "--output",
            &dest,
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build -q");
    assert_eq!(
        run.stdout,
        format!("{}\n", std::fs::read_to_string(&iid).unwrap())
    );
    assert_eq!(run.stderr, "", "--quiet printed progress");

    let failing = dir.path().join("failing");
    std::fs::create_dir(&failing).unwrap();
    let ctx = context(
        &failing,
        &format!(
            "FROM {}\nRUN echo the-last-words | tr a-z A-Z && exit 7\n",
            busybox(&env)
        ),
        &[],
    );
    let run = ossb(
        &env,
        &cache,
        &[
            "build",
            "--quiet",
            "--insecure-registry",
            &reg,
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stdout, "");
    // THE-LAST-WORDS: the step's output, which the command's text does not hold.
    for want in ["Dockerfile:2", "exit code: 7", "THE-LAST-WORDS"] {
        assert!(
            run.stderr.contains(want),
            "{want:?} missing:\n{}",
            run.stderr
        );
    }
    let both = ossb(
        &env,
        &cache,
        &["build", "-q", "--progress", "plain", ctx.to_str().unwrap()],
    );
    assert_eq!(both.code, 2);
    assert!(
        both.stderr.contains("--quiet and --progress plain"),
        "{}",
        both.stderr
    );
}

/// `--annotation`, as buildx's: on each platform's manifest (the default), on the manifests'
/// descriptors in the index, and on the index; what the registry serves carries them. The
/// cases ossb cannot write are refused before the build.
#[test]
fn annotations_reach_the_manifests_descriptors_and_index() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nRUN echo annotated > /a\n", busybox(&env)),
        &[],
    );
    let image = format!("{reg}/tests/{}:1", unique("annotated"));
    let source = "org.opencontainers.image.source=https://example.com/team/app";
    ossb(
        &env,
        &dir.path().join("cache"),
        &[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "--insecure-registry",
            &reg,
            "--annotation",
            source,
            "--annotation",
            "index,manifest-descriptor:org.opencontainers.image.description=two platforms",
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("annotated build");
    let raw = |reference: &str| -> serde_json::Value {
        let out = inspect_raw(reference);
        serde_json::from_str(&out.stdout).unwrap()
    };
    let index = raw(&image);
    let description = "two platforms";
    assert_eq!(
        index["annotations"]["org.opencontainers.image.description"], description,
        "{index}"
    );
    // The images (the default provenance's attestation manifests follow them).
    let manifests: Vec<&serde_json::Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["platform"]["os"] == "linux")
        .collect();
    assert_eq!(manifests.len(), 2);
    for m in manifests {
        assert_eq!(
            m["annotations"]["org.opencontainers.image.description"], description,
            "{m}"
        );
        let repo = image.rsplit_once(':').unwrap().0;
        let manifest = raw(&format!("{repo}@{}", m["digest"].as_str().unwrap()));
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.source"],
            "https://example.com/team/app",
            "{manifest}"
        );
        assert!(manifest["annotations"]
            .get("org.opencontainers.image.description")
            .is_none());
    }

    let ctx = ctx.to_str().unwrap();
    for (flags, error) in [
        (
            &["--annotation", "index:a=b"][..],
            "single-platform build has no index",
        ),
        (
            &["--annotation", "manifest[linux/amd64]:a=b"],
            "for one platform",
        ),
        (
            &["--annotation", "index-descriptor:a=b"],
            "not written by ossb",
        ),
        (
            &[
                "--annotation",
                "a=b",
                "-o",
                "type=oci,dest=x.tar,oci-mediatypes=false",
            ],
            "needs OCI media types",
        ),
        (&["--annotation", "nokey"], "expected [TYPE:]KEY=VALUE"),
    ] {
        let mut args = vec!["build"];
        args.extend_from_slice(flags);
        args.push(ctx);
        let run = ossb(&env, &dir.path().join("cache"), &args);
        assert_eq!(run.code, 2, "{flags:?}: {}", run.stderr);
        assert!(run.stderr.contains(error), "{flags:?}: {}", run.stderr);
    }
}

/// A context that is not there is named as the context (exit 2), not as a Dockerfile missing
/// from it.
#[test]
fn a_missing_context_is_named() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let run = ossb(
        &env,
        &dir.path().join("cache"),
        &["build", missing.to_str().unwrap()],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "the build context {} is not a directory",
            missing.display()
        )),
        "{}",
        run.stderr
    );
}

/// SIGTERM (a pod being deleted) stops a build in the middle of a RUN: exit 143 with a line
/// that says so, the step's processes gone, and nothing left behind: no work directory, no
/// file of a secret taken from the environment.
#[test]
fn sigterm_stops_a_build_and_leaves_nothing_behind() {
    use std::io::BufRead;
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN --mount=type=secret,id=tok echo step-started && sleep 417\n",
            busybox(&env)
        ),
        &[],
    );
    let cache = dir.path().join("cache");
    let reg = env.registry();
    let mut build = std::process::Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args(["build", "--progress", "plain", "--insecure-registry", &reg])
        .args(["--secret", "id=tok,env=OSSB_E2E_SIGTERM_SECRET"])
        .arg(&ctx)
        .env("OSSB_CACHE_DIR", &cache)
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
        .env("OSSB_E2E_SIGTERM_SECRET", "s3cr3t")
        .env("XDG_RUNTIME_DIR", &runtime)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read stderr on a thread: the step has started when it prints its line.
    let stderr = build.stderr.take().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("step-started") {
                let _ = started_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    started_rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the RUN never started");
    let sleeping = || {
        tool("pgrep", &["-f", "sleep 417"])
            .stdout
            .contains(char::is_numeric)
    };
    assert!(
        (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            sleeping()
        }),
        "the step's sleep never ran"
    );
    tool("kill", &["-TERM", &build.id().to_string()]).success("kill -TERM");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = build.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ossb build did not stop on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&runtime).unwrap().collect();
    assert!(left.is_empty(), "the secret's file was left: {left:?}");
    let work: Vec<_> = std::fs::read_dir(cache.join("work")).unwrap().collect();
    assert!(work.is_empty(), "the work directory was left: {work:?}");
    // The step's sleep dies with the sandbox (parent-death signal): give it a moment.
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        !sleeping()
    });
    assert!(gone, "the step's process outlived the build");
}

/// `type=tar` writes the image's filesystem as one archive (what the build wrote, with the
/// base's files), and `type=cacheonly` exports nothing but fills the cache: the same build
/// afterwards runs no step.
#[test]
fn tar_and_cacheonly_outputs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN mkdir -p /app && echo hi > /app/greeting\n",
            busybox(&env)
        ),
        &[],
    );
    let cache = dir.path().join("cache");
    let only = ossb(
        &env,
        &cache,
        &[
            "build",
            "--insecure-registry",
            &reg,
            "--progress",
            "plain",
            "--output",
            "type=cacheonly",
            ctx.to_str().unwrap(),
        ],
    )
    .success("--output type=cacheonly");
    assert!(!only.stderr.contains("exporting"), "{}", only.stderr);
    let archive = dir.path().join("fs.tar");
    let events = build_json(
        &env,
        &cache,
        &ctx,
        &["--output", &format!("type=tar,dest={}", archive.display())],
    );
    assert_eq!(
        result_of(&events)["steps_run"],
        0,
        "cacheonly filled the cache"
    );
    let listing = tool("tar", &["-tvf", archive.to_str().unwrap()]).success("tar -t");
    let names: Vec<&str> = listing
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    assert!(names.contains(&"app/greeting"), "{names:?}");
    assert!(names.contains(&"bin/busybox"), "{names:?}");
    let greeting =
        tool("tar", &["-xOf", archive.to_str().unwrap(), "app/greeting"]).success("tar -xO");
    assert_eq!(greeting.stdout, "hi\n");
}

/// An output whose destination an export could never write (a local export onto a file or
/// a directory with files, an OCI layout onto a directory that is not one, an archive onto
/// a directory) fails before any step runs, with exit 2, naming the destination; what is
/// there is left as it was.
#[test]
fn an_output_that_could_never_be_written_fails_before_any_step() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nRUN echo ran > /ran\n", busybox(&env)),
        &[],
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, "mine\n").unwrap();
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), "mine\n").unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for (output, refusal) in [
        (
            format!("type=local,dest={}", file.display()),
            "is not an empty directory;",
        ),
        (
            format!("type=local,dest={}", full.display()),
            "is not an empty directory;",
        ),
        (
            format!("type=oci,tar=false,dest={}", full.display()),
            "is not an empty directory or an OCI layout;",
        ),
        (
            format!("type=tar,dest={}", empty.display()),
            "is not a file;",
        ),
        (
            format!("type=oci,dest={}", empty.display()),
            "is not a file;",
        ),
    ] {
        let run = ossb(
            &env,
            &dir.path().join("cache"),
            &[
                "build",
                "--insecure-registry",
                &reg,
                "--progress",
                "plain",
                "--output",
                &output,
                ctx.to_str().unwrap(),
            ],
        );
        assert_eq!(run.code, 2, "{output}: {}", run.stderr);
        assert!(
            run.stderr.contains(refusal) && run.stderr.contains("refusing to overwrite it"),
            "{output}: {}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("RUN echo ran"),
            "{output}: a step ran before the refusal: {}",
            run.stderr
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine\n");
    assert_eq!(
        std::fs::read_to_string(full.join("keep")).unwrap(),
        "mine\n"
    );
    assert!(empty.is_dir());
}

/// A COPY --from of a few files of a stage that is not unpacked (cached here, or built by
/// another task of a cluster) reads only the layers that hold them: the newest version of a
/// file rewritten in a later layer, a file of a lower layer; a directory, a deleted file or a
/// symlink still go through the whole rootfs and behave as before.
#[test]
fn copy_from_a_cached_stage_reads_only_the_layers_holding_the_files() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let stage_a = format!(
        "FROM {} AS a\n\
         RUN mkdir -p /out/bin /d && echo old > /out/bin/tool && echo keep > /keep \
             && echo gone > /gone && echo d > /d/f && ln -s /keep /link\n\
         RUN echo new > /out/bin/tool && rm /gone\n",
        busybox(&env)
    );
    let cache = dir.path().join("cache");
    let build = |final_stage: &str, out: &str| {
        let ctx = context(
            &dir.path().join(out),
            &format!("{stage_a}FROM {}\n{final_stage}", busybox(&env)),
            &[],
        );
        let dest = format!(
            "type=local,dest={}",
            dir.path().join(out).join("fs").display()
        );
        let args = [
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &env.registry(),
            "--output",
            &dest,
            ctx.to_str().unwrap(),
        ];
        (ossb(&env, &cache, &args), dir.path().join(out).join("fs"))
    };
    // Stage a runs (unpacked) in the first build; the others find it cached.
    build("COPY --from=a /keep /first\n", "first")
        .0
        .success("first build");
    let (run, fs) = build(
        "RUN echo final > /final\nCOPY --from=a /out/bin/tool /keep /\n",
        "files",
    );
    let run = run.success("COPY --from of two files of a cached stage");
    assert_eq!(std::fs::read_to_string(fs.join("tool")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(fs.join("keep")).unwrap(), "keep\n");
    assert!(
        run.stderr
            .contains("reading /out/bin/tool, /keep from the stage's layers that hold them"),
        "{}",
        run.stderr
    );
    // busybox's layer and a's two: never unpacked for two files.
    assert!(!run.stderr.contains("unpacking 3 layers"), "{}", run.stderr);

    // A symlink points elsewhere: the whole stage is read.
    let (run, fs) = build("COPY --from=a /d /d\nCOPY --from=a /link /link\n", "whole");
    let run = run.success("COPY --from of a directory and a symlink of a cached stage");
    assert_eq!(std::fs::read_to_string(fs.join("d/f")).unwrap(), "d\n");
    assert_eq!(std::fs::read_to_string(fs.join("link")).unwrap(), "keep\n");
    // (The whole stage: unpacked, or the tree the first build left, from the kept trees.)
    assert!(!run.stderr.contains("reading /link"), "{}", run.stderr);

    // A file a later layer deleted is missing, as when the stage is unpacked.
    let (run, _) = build("COPY --from=a /gone /gone\n", "gone");
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("gone"), "{}", run.stderr);
}
